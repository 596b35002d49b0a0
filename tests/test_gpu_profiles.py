"""The GPU profiles' defects found by reading (issue "GPU profiles"), each tested on the CPU."""
from pathlib import Path

import pytest

from medkit import config
from medkit.data import generate


# ---------------------------------------------------------------- defect 2: R1-Distill's template

@pytest.fixture(scope="module")
def r1_tok(kbase):
    """A tokenizer with R1's special tokens and the real DeepSeek-R1-Distill chat template (trl
    ships the released template byte for byte; it is read from the installed trl)."""
    from trl.chat_template_utils import deepseek_r1_distill_chat_template

    from medkit import tiny

    texts = [p["text"] for p in generate.passages(kbase)][:300]
    texts += [f"{r['Complex_CoT']} {r['Response']}" for r in generate.cot_cases(kbase)[:100]]
    tok = tiny.family_tokenizer(tiny.train_tokenizer(texts, vocab_size=1024), "llama")
    tok.chat_template = deepseek_r1_distill_chat_template
    return tok


def _squash(text: str) -> str:
    return " ".join(text.split())


def test_the_real_r1_template_drops_reasoning_from_an_assistant_turn(r1_tok, kbase):
    from medkit.train import cot

    row = generate.cot_cases(kbase)[0]
    prompt = cot.build_prompt(row["Question"])
    head = r1_tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full = r1_tok.apply_chat_template(prompt + [{"role": "assistant", "content": cot.training_target(row)}],
                                      tokenize=False)
    assert head.endswith("<｜Assistant｜><think>\n")
    assert not full.startswith(head) and row["Complex_CoT"].strip()[:50] not in full  # what the fix works around


def test_r1_training_examples_keep_the_reasoning_in_the_completion(r1_tok, kbase, tmp_path):
    """Defect 2: with R1's template, 05's trained completion must hold the <think> reasoning, and
    prompt + completion must render exactly as at inference."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from medkit.train import common, cot

    rows = generate.cot_cases(kbase)[:3]
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(r1_tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))
    cfg = config.resolve("tiny", "cot", max_steps=1, seq_len=2048)
    trainer = cot.make_trainer(model, r1_tok, rows, None, cfg, tmp_path / "cot")
    for row, ex in zip(rows, trainer.train_dataset):
        ids, labels = ex["input_ids"], ex["labels"]
        trained = _squash(r1_tok.decode([t for t, lab in zip(ids, labels) if lab != -100]))
        context = r1_tok.decode([t for t, lab in zip(ids, labels) if lab == -100])
        assert _squash(row["Complex_CoT"])[:80] in trained, "the reasoning is not in the trained completion"
        assert "</think>" in trained and _squash(row["Response"])[:60] in trained
        assert trained.endswith("<｜end▁of▁sentence｜>")
        head = r1_tok.apply_chat_template(cot.build_prompt(row["Question"]), tokenize=False, add_generation_prompt=True)
        assert context == head  # the model trains on exactly the prompt it sees at inference
    assert trainer.train().global_step == 1  # the tokenized examples train
    # the held-out loss of 05 scores the same tokens
    x, attn, y = common.encode_completions(r1_tok, [cot.build_prompt(rows[0]["Question"])], [cot.training_target(rows[0])])
    scored = _squash(r1_tok.decode([t for t in y[0].tolist() if t != -100]))
    assert _squash(rows[0]["Complex_CoT"])[:80] in scored


def test_templates_that_keep_the_turn_render_as_before(kbase):
    """ChatML (Qwen) keeps the whole assistant turn: the completion is the rendered turn."""
    from medkit import tiny
    from medkit.train import common

    tok = tiny.family_tokenizer(tiny.train_tokenizer([p["text"] for p in generate.passages(kbase)][:200], 512), "qwen2")
    prompt = common.messages("What is asthma?")
    head, body = common.render_completion(tok, prompt, "A chronic airway disease.")
    assert head.endswith("<|im_start|>assistant\n") and body == "A chronic airway disease.<|im_end|>\n"


# ---------------------------------------------------------------- defect 3: 05's reload on a T4

def _notebook_code(name: str) -> str:
    import nbformat

    from conftest import REPO

    nb = nbformat.read(REPO / "notebooks" / f"{name}.ipynb", as_version=4)
    return "\n".join(c.source for c in nb.cells if c.cell_type == "code")


def test_05_frees_the_training_model_and_reloads_in_4bit_where_16bit_does_not_fit(tmp_path):
    """Defect 3: 05 reloaded the merged 8B in 16-bit (15 GiB) while the 4-bit model was loaded."""
    from medkit.train import cot

    t4 = dict(config.resolve("colab-t4", "cot"), device="cuda")
    big = dict(config.resolve("gpu-24gb", "cot"), device="cuda")
    assert cot.reload_choice(t4) == "4-bit"
    assert cot.reload_choice(big) == "16-bit"
    assert cot.reload_choice(big, resident_bytes=10 * 2 ** 30) == "4-bit"  # the training model still there
    assert cot.reload_choice(config.resolve("tiny", "cot")) == "full"
    code = _notebook_code("05_r1_cot_unsloth")
    assert "load_causal_lm(str(merged_dir)" not in code
    free, reload = code.index("del model, trainer"), code.index("cot.reload_merged(merged_dir, cfg)")
    assert free < reload and "common.free_memory()" in code[free:reload]


def test_reload_merged_loads_the_exported_folder_on_the_cpu(tmp_path, kbase):
    from transformers import LlamaConfig, LlamaForCausalLM

    from medkit import tiny
    from medkit.train import cot

    tok = tiny.family_tokenizer(tiny.train_tokenizer([p["text"] for p in generate.passages(kbase)][:100], 400), "llama")
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    model, rtok, how = cot.reload_merged(tmp_path / "m", config.resolve("tiny", "cot"))
    assert how == "full" and model.device.type == "cpu" and rtok.chat_template


# ---------------------------------------------------------------- defect 4: HF server on the GPU

class _FakeModel:
    """Weights on a device that is not the CPU (the meta device stands in for the GPU): every
    input must arrive there. Returns CPU logits that always pick token 5."""

    def __init__(self):
        import torch

        self.device = torch.device("meta")
        self.calls = 0

    def __call__(self, input_ids, attention_mask, position_ids, past_key_values, use_cache):
        import types

        import torch

        for name, t in (("input_ids", input_ids), ("attention_mask", attention_mask), ("position_ids", position_ids)):
            assert t.device == self.device, f"{name} on {t.device}, the model on {self.device}"
        self.calls += 1
        logits = torch.zeros(input_ids.shape[0], input_ids.shape[1], 8)
        logits[..., 5] = 1.0
        return types.SimpleNamespace(logits=logits, past_key_values=None)


def test_hf_server_decodes_on_the_models_device():
    """Defect 4: the HF reference server built its inputs on the CPU whatever the model's device."""
    import asyncio
    import types

    from medkit.serve import hf_server

    tok = types.SimpleNamespace(eos_token_id=0, pad_token_id=1)
    model = _FakeModel()
    dec = hf_server.BatchDecoder(model, tok, mode="batch")
    loop = asyncio.new_event_loop()
    jobs = [hf_server._Job([3, 4, 2], 3, 0.0, {}, loop, asyncio.Queue()), hf_server._Job([2], 3, 0.0, {}, loop, asyncio.Queue())]
    dec._decode(jobs)
    dec.close()
    loop.close()
    assert model.calls == 3 and [j.tokens for j in jobs] == [[5, 5, 5], [5, 5, 5]]


def test_hf_server_loads_on_the_profiles_device(monkeypatch):
    import torch

    from medkit.serve import engines, hf_server, loadtest
    from medkit.train import common

    seen = {}

    def fake_load(path, dtype="float32", device="cpu", load_in_4bit=False):
        seen.update(path=path, dtype=dtype, device=device)
        raise RuntimeError("stop after loading")

    monkeypatch.setattr(common, "load_causal_lm", fake_load)
    with pytest.raises(RuntimeError, match="stop after loading"):
        hf_server.create_app("some/model", device="cuda", dtype="float16")
    assert seen == {"path": "some/model", "dtype": "float16", "device": "cuda"}
    # a T4: the profile's device is the GPU, in fp16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (7, 5))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    assert hf_server.resolve_device("colab-t4", None, None) == ("cuda", "float16")
    assert hf_server.resolve_device(None, None, None) == ("cpu", "float32")
    backends = loadtest.four_backends("m", "m.gguf", "logs", dtype="float16", device="cuda")
    for name in ("hf_naive", "hf_batch"):
        cmd = backends[name].command
        assert cmd[cmd.index("--device") + 1] == "cuda" and cmd[cmd.index("--dtype") + 1] == "float16"
    assert "--device" in engines.hf_command("m", 1, device="cpu")


# ---------------------------------------------------------------- defect 6: the seeds' real data

def _write_jsonl(path, rows):
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _course_dir(tmp_path, kbase):
    import json

    d = tmp_path / "course"
    for name, rows in (("mcq", generate.mcqs(kbase)[:30]), ("cot", generate.cot_cases(kbase)[:30])):
        (d / name).mkdir(parents=True)
        for split, part in (("train", rows[:20]), ("validation", rows[20:25]), ("test", rows[25:])):
            (d / name / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    return d


def test_gpu_profiles_train_04_and_05_on_medmcqa_and_medical_o1(tmp_path, kbase):
    """Defect 6: the GPU profiles named MedMCQA and medical-o1, but 04 and 05 read the course's
    sets on every profile. Small local files in the loaders' schemas stand in for the hub."""
    from medkit.data import sources
    from medkit.evaluate import mcq
    from medkit.train import cot

    course = _course_dir(tmp_path, kbase)
    medmcqa = _write_jsonl(tmp_path / "medmcqa.jsonl", [
        {"id": f"m{i}", "question": f"Which nerve supplies muscle {i}?", "opa": "Radial", "opb": "Ulnar",
         "opc": "Median", "opd": "Axillary", "cop": i % 4, "exp": "Anatomy.", "subject_name": "Anatomy",
         "choice_type": "multi" if i % 10 == 9 else "single"} for i in range(60)])
    o1 = _write_jsonl(tmp_path / "o1.jsonl", [
        {"Question": f"A {30 + i}-year-old has fever and cough. Diagnosis?", "Complex_CoT": "Fever and cough suggest...",
         "Response": "Community-acquired pneumonia."} for i in range(40)])

    q = dict(config.resolve("colab-t4", "qlora"), train_limit=30, eval_limit=8)
    assert q["dataset"] == "openlifescienceai/medmcqa"
    data = sources.stage_splits(q, course, source=medmcqa)
    assert 0 < len(data.train) <= 30 and len(data.validation) == 8 and len(data.test) == 8
    assert all(r["id"].startswith("m") for r in data.train + data.validation + data.test)
    assert all(r.get("choice_type") == "single" for r in data.train)
    mcq.validate(data.train, "medmcqa/train")
    assert "openlifescienceai/medmcqa" in data.description

    c = dict(config.resolve("gpu-24gb", "cot"), train_limit=20, eval_limit=5)
    data = sources.stage_splits(c, course, source=o1)
    assert len(data.train) == 20 and len(data.validation) == 5
    cot.validate(data.train, "o1/train")
    assert all(r["Question"].startswith("A ") for r in data.train)
    assert all(r.get("condition_id") for r in data.test)  # scored on the course's cases (named diagnoses)
    assert "medical-o1-reasoning-SFT" in data.description

    tiny = sources.stage_splits(config.resolve("tiny", "qlora"), course)
    assert len(tiny.train) == 20 and "course mcq" in tiny.description
    with pytest.raises(ValueError, match="no loader"):
        sources.stage_splits(dict(q, dataset="someone/unknown"), course)


def test_04_and_05_read_their_data_through_the_profile():
    for name in ("04_qlora_phi2", "05_r1_cot_unsloth"):
        code = _notebook_code(name)
        assert "sources.stage_splits(cfg" in code and "pipeline.load_split" not in code
        assert "data.description" in code  # printed, and written into the model card


# ---------------------------------------------------------------- defect 7: GPU-only RAG paths

def _tiny_cross_encoder(folder, kbase, steps: int = 30):
    """A two-layer BERT cross-encoder built and trained here: (question, passage) → relevant?"""
    import random

    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from medkit import tiny

    passages = {p["id"]: p["text"] for p in generate.passages(kbase)}
    conds = sorted(kbase.conditions.values(), key=lambda c: c["id"])[:16]
    pairs = []
    rng = random.Random(0)
    for c in conds:
        own = [pid for pid in passages if pid.startswith(f"cond.{c['id']}.")][:1]
        if not own:
            continue
        other = rng.choice([pid for pid in passages if not pid.startswith(f"cond.{c['id']}.")])
        q = f"What is {c['name'].lower()}?"
        pairs.append((q, own[0], other))
    tok = tiny.family_tokenizer(tiny.train_tokenizer(list(passages.values())[:400], 800), "qwen2")
    model = BertForSequenceClassification(BertConfig(vocab_size=len(tok), hidden_size=48, num_hidden_layers=2,
                                                     num_attention_heads=2, intermediate_size=96, num_labels=1,
                                                     max_position_embeddings=160, pad_token_id=tok.pad_token_id))
    texts = [(q, passages[p]) for q, p, _ in pairs] + [(q, passages[n]) for q, _, n in pairs]
    labels = torch.tensor([1.0] * len(pairs) + [0.0] * len(pairs))
    enc = tok([a for a, _ in texts], [b for _, b in texts], truncation=True, max_length=64, padding=True,
              return_tensors="pt")
    enc.pop("token_type_ids", None)
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    losses = []
    model.train()
    for _ in range(steps):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(**enc).logits.squeeze(-1), labels)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return pairs, passages, losses


@pytest.mark.slow
def test_cross_encoder_reranker_runs_with_a_cross_encoder_trained_here(tmp_path, kbase):
    """Defect 7: CrossEncoderReranker (the BGE reranker's path on GPU profiles) had never run."""
    from medkit.rag import rerank

    pairs, passages, losses = _tiny_cross_encoder(tmp_path / "ce", kbase)
    assert losses[-1] < 0.5 * losses[0]
    reranker = rerank.load(str(tmp_path / "ce"), device="cpu")
    assert isinstance(reranker, rerank.CrossEncoderReranker)
    first = 0
    for q, own, other in pairs:
        ranked = reranker.rerank(q, [(other, 9.0), ("not-a-passage", 8.0), (own, 1.0)], passages)
        assert [c for c, _ in ranked] in ([own, other], [other, own])  # unknown ids are dropped
        assert ranked[0][1] >= ranked[1][1]
        first += ranked[0][0] == own
    assert first >= 0.8 * len(pairs), f"the trained cross-encoder put its passage first for {first} of {len(pairs)}"
    assert len(reranker.rerank(pairs[0][0], [(p, 0.0) for p in list(passages)[:10]], passages, top=3)) == 3


def test_every_profile_with_an_llm_wires_the_rag_generator():
    """Defect 7: 06 never passed a generator. The rag stage names it wherever the profile has an
    LLM (its agent drafts with one), and 06 hands it to answer()."""
    for name, p in config.PROFILES.items():
        has_llm = p["stages"]["agent"].get("mode") == "llm"
        gen = p["stages"]["rag"].get("generator")
        assert bool(gen) == has_llm, f"{name}: rag.generator={gen!r} but agent mode {p['stages']['agent'].get('mode')!r}"
    code = _notebook_code("06_rag")
    assert "answer.load_generator(cfg, session)" in code and "generate=generator" in code


def test_the_generator_hook_loads_the_named_model_and_answers(tmp_path, kbase):
    import types

    from transformers import LlamaConfig, LlamaForCausalLM

    from medkit import tiny
    from medkit.rag import answer

    tok = tiny.family_tokenizer(tiny.train_tokenizer([p["text"] for p in generate.passages(kbase)][:100], 400), "qwen2")
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(tmp_path / "dpo")
    tok.save_pretrained(tmp_path / "dpo")
    session = types.SimpleNamespace(get=lambda name: tmp_path / name.replace("_model", ""))
    assert answer.load_generator(config.resolve("tiny", "rag"), session) is None
    cfg = dict(config.resolve("colab-t4", "rag"), device="cpu", dtype="float32")
    write = answer.load_generator(cfg, session, max_new_tokens=4)
    ev_texts = {"cond.asthma.treatment": "Asthma is treated with inhaled corticosteroids."}
    ans = answer.answer("How is asthma treated?", [("cond.asthma.treatment", 1.0)], ev_texts, 0.0, generate=write)
    assert isinstance(ans.text, str) and "valid" in ans.check  # whatever the random model wrote is checked
    assert write.chat.runtime == "transformers"
    # the same hook on llama.cpp (smol's `generator_runtime`): the model is exported to GGUF under the
    # session folder once, and its answers go through the same check
    session.dir = tmp_path / "06_rag"
    cpp = answer.load_generator(dict(cfg, generator_runtime="llama.cpp"), session, max_new_tokens=4)
    assert cpp.chat.runtime == "llama.cpp" and [p.suffix for p in (session.dir / "gguf").iterdir()] == [".gguf"]
    written = cpp.chat.generate([[{"role": "user", "content": "How is asthma treated?"}]], max_new_tokens=4)
    assert len(written) == 1 and set(written[0]) == {"text", "stopped", "raw"}
    ans = answer.answer("How is asthma treated?", [("cond.asthma.treatment", 1.0)], ev_texts, 0.0, generate=cpp)
    assert not ans.abstained  # min_score 0: the model wrote this answer, and the check read it


# ---------------------------------------------------------------- defect 5: Colab set-up

def _colab(monkeypatch, tmp_path, gpu=True):
    """Colab's environment, simulated: its variables, nvidia-smi (or not), and every command the
    set-up would run recorded instead of run (git clone builds the clone from this checkout)."""
    import shutil
    import site
    import subprocess

    from conftest import REPO

    calls = []

    def fake_run(cmd, check=False, **kw):
        calls.append([str(c) for c in cmd])
        if list(cmd[:2]) == ["git", "clone"]:
            home = Path(cmd[-1])
            home.mkdir(parents=True)
            (home / "medkit").symlink_to(REPO / "medkit")
            (home / "notebooks").mkdir()
            shutil.copy(REPO / "pyproject.toml", home / "pyproject.toml")
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/nvidia-smi" if gpu and name == "nvidia-smi" else None)
    monkeypatch.setattr(site, "addsitedir", lambda d: None)
    monkeypatch.setenv("COLAB_RELEASE_TAG", "release-colab_20261201-060000_RC00")
    monkeypatch.setenv("MEDKIT_REPO", "https://git.example.org/medkit.git")
    home = tmp_path / "content" / "medkit"
    monkeypatch.setenv("MEDKIT_HOME", str(home))
    monkeypatch.chdir(tmp_path)
    return home, calls


def test_the_colab_cell_keeps_colabs_torch_installs_once_and_is_safe_to_run_twice(monkeypatch, tmp_path):
    """Defect 5: pip install -e replaced Colab's torch (torch==2.13.0 pin), compiled llama.cpp in
    every notebook, had no Unsloth, and a second run cloned into an existing folder."""
    import importlib.metadata as md

    from medkit import nbtools

    home, calls = _colab(monkeypatch, tmp_path, gpu=True)
    cell = nbtools.colab_cell(nbtools.COLAB_EXTRAS["05_r1_cot_unsloth"])
    exec(compile(cell, "colab-cell", "exec"), {})
    assert calls[0][:2] == ["git", "clone"]
    pips = [c for c in calls if "pip" in c]
    assert len(pips) == 1
    cmd = pips[0]
    assert cmd[cmd.index("-e") + 1] == f"{home}[gpu]"  # Unsloth on a GPU runtime
    assert Path(cmd[cmd.index("-c") + 1]).read_text() == f"torch=={md.version('torch')}\n"  # Colab's torch stays
    assert "--extra-index-url" not in cmd  # no llama.cpp outside 09
    assert Path.cwd() == home / "notebooks"
    exec(compile(cell, "colab-cell", "exec"), {})  # "Run all" again: nothing cloned or installed twice
    assert len([c for c in calls if "pip" in c]) == 1 and len([c for c in calls if c[:2] == ["git", "clone"]]) == 1
    # 09 on a GPU: llama.cpp from prebuilt wheels, and vLLM, which brings its own torch (no constraint)
    cell09 = nbtools.colab_cell(nbtools.COLAB_EXTRAS["09_vllm_serving"])
    exec(compile(cell09, "colab-cell", "exec"), {})
    cmd = [c for c in calls if "pip" in c][-1]
    assert cmd[cmd.index("-e") + 1] == f"{home}[serve,vllm]" and "--extra-index-url" in cmd and "-c" not in cmd


def test_colab_without_a_gpu_skips_unsloth_and_says_so(monkeypatch, tmp_path, capsys):
    from medkit import nbtools

    home, calls = _colab(monkeypatch, tmp_path, gpu=False)
    exec(compile(nbtools.colab_cell(["gpu"]), "colab-cell", "exec"), {})
    cmd = [c for c in calls if "pip" in c][0]
    assert cmd[cmd.index("-e") + 1] == str(home)
    assert "not installed: gpu" in capsys.readouterr().out


def test_colab_says_when_the_runtime_must_restart(monkeypatch, tmp_path):
    import json
    import os

    from medkit import colab

    home, calls = _colab(monkeypatch, tmp_path)
    calls.clear()
    import subprocess

    subprocess.run(["git", "clone", "x", str(home)])
    versions = iter([{"numpy": "1.26.4", "torch": "2.9.0"}, {"numpy": "2.2.0", "torch": "2.9.0"}])
    monkeypatch.setattr(colab, "loaded_versions", lambda: next(versions))
    with pytest.raises(colab.RestartNeeded, match="numpy.*Restart session"):
        colab.setup(str(home), ["gpu"], gpu=True)
    with pytest.raises(colab.RestartNeeded):  # run again before restarting: still told
        colab.setup(str(home), ["gpu"], gpu=True)
    assert len([c for c in calls if "pip" in c]) == 1
    stamp = home / colab.STAMP
    state = json.loads(stamp.read_text())
    stamp.write_text(json.dumps(dict(state, restart_pid=os.getpid() + 1)))  # a restarted runtime
    assert colab.setup(str(home), ["gpu"], gpu=True, quiet=True)["installed"] is False
