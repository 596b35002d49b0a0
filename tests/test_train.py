"""SFT and DPO helpers on a tiny model built here: the completion-only label mask, padding
waste, interrupt-and-resume, the missing-template error, 2-process DDP, and DPO input checks."""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, SMALL_TINY
from medkit import config, metrics, tiny
from medkit.data import generate
from medkit.train import common, dpo, sft

SMALL = dict(config.PROFILES["tiny"]["tiny"], **SMALL_TINY)


@pytest.fixture(scope="module")
def base(tmp_path_factory, kbase):
    texts = [p["text"] for p in generate.passages(kbase)][:500]
    return tiny.build_base("qwen2", texts, SMALL, seed=0, cache=tmp_path_factory.mktemp("tiny"), progress=False)


@pytest.fixture(scope="module")
def qa(kbase):
    return generate.qa_pairs(kbase)[:64]


def _cfg(**kw):
    return config.resolve("tiny", "sft", max_steps=kw.pop("max_steps", 6), batch_size=4, seq_len=512, **kw)


def test_label_mask_covers_the_completion_only(base, qa, tmp_path):
    model, tok = common.load_causal_lm(str(base.path))
    trainer = sft.make_trainer(model, tok, qa[:8], qa[8:12], _cfg(), tmp_path)
    row = trainer.train_dataset[0]
    labelled = [t for t, y in zip(row["input_ids"], row["labels"]) if y != -100]
    prompt = tok.apply_chat_template(common.messages(qa[0]["question"]), tokenize=False, add_generation_prompt=True)
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert all(y == -100 for y in row["labels"][:n_prompt])  # system + question + "assistant\n": never targets
    assert tok.decode(labelled).startswith(qa[0]["answer"])
    assert labelled[-1] == tok.convert_tokens_to_ids("<|im_end|>") or tok.decode(labelled[-2:]).startswith("<|im_end|>")


def test_padding_waste_is_measured_and_grouping_reduces_it():
    lengths = [10, 200, 12, 190, 15, 180, 11, 205] * 20
    random_waste = sft.padding_waste(lengths, 8, grouped=False)
    grouped_waste = sft.padding_waste(lengths, 8, grouped=True)
    assert 0 < grouped_waste < random_waste < 1
    assert sft.padding_waste([50] * 16, 4, grouped=False) == 0.0


@pytest.mark.slow
def test_interrupt_and_resume_from_checkpoint(base, qa, tmp_path):
    from transformers import TrainerCallback

    class Interrupt(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 5:
                raise KeyboardInterrupt("simulated interruption after the step-4 checkpoint")

    cfg = _cfg(max_steps=8)
    model, tok = common.load_causal_lm(str(base.path))
    trainer = sft.make_trainer(model, tok, qa, qa[:8], cfg, tmp_path, save_steps=4, eval_strategy="no",
                               disable_tqdm=True)
    trainer.add_callback(Interrupt())
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert (tmp_path / "checkpoint-4").is_dir() and not (tmp_path / "checkpoint-8").exists()
    class Count(TrainerCallback):
        steps: list = []

        def on_step_end(self, args, state, control, **kw):
            Count.steps.append(state.global_step)

    model, tok = common.load_causal_lm(str(base.path))
    resumed = sft.make_trainer(model, tok, qa, qa[:8], cfg, tmp_path, save_steps=4, eval_strategy="no",
                               disable_tqdm=True)
    resumed.add_callback(Count())
    result = resumed.train(resume_from_checkpoint=True)
    assert result.global_step == 8 and (tmp_path / "checkpoint-8").is_dir()
    assert Count.steps == [5, 6, 7, 8]  # it continued after the checkpoint instead of starting over


def test_missing_chat_template_names_the_model(base, tmp_path):
    import shutil

    folder = tmp_path / "no_template"
    shutil.copytree(base.path, folder)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(ValueError, match=r"no_template: the tokenizer has no chat template"):
        common.load_causal_lm(str(folder))


@pytest.mark.slow
def test_two_process_ddp_on_cpu_ends_with_identical_weights(base, qa, tmp_path):
    train_file = tmp_path / "qa.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in qa))
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "configs" / "accelerate" / "cpu_ddp_2proc.yaml"), "-m", "medkit.train.sft_cli",
           "--base", str(base.path), "--train-file", str(train_file), "--max-steps", "4", "--batch-size", "4",
           "--out", str(out), "--weights-report"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, MEDKIT_OUTPUT_DIR=str(tmp_path / "outputs"), OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    reports = sorted(out.glob("weights-rank*.txt"))
    assert len(reports) == 2, proc.stderr[-2000:]
    a, b = (r.read_text().split() for r in reports)
    assert a[1:] == b[1:] == ["world=2", "steps=4"]
    assert a[0] == b[0], "the two ranks ended with different weights"


def test_preference_rows_are_checked_with_reasons(base):
    _, tok = common.load_causal_lm(str(base.path))
    rows = [{"id": "ok", "prompt": "What is asthma?", "chosen": "A chronic airway disease.", "rejected": "See a doctor."},
            {"id": "same", "prompt": "Q?", "chosen": "x", "rejected": "x"},
            {"id": "empty", "prompt": "Q?", "chosen": "", "rejected": "y"},
            {"id": "long", "prompt": "word " * 400, "chosen": "a", "rejected": "b"}]
    kept, skipped = dpo.validate_pairs(rows, tok, max_prompt_tokens=128)
    assert [r["id"] for r in kept] == ["ok"]
    assert {s["id"]: s["reason"] for s in skipped} == {"same": "chosen identical to rejected", "empty": "empty chosen",
                                                      "long": "prompt over 128 tokens"}


def test_generic_answer_detector():
    for text in generate.GENERIC_NON_ANSWERS + ["Sorry, I am not a doctor. Please see your GP."]:
        assert metrics.is_generic_non_answer(text), text
    for text in ["Amoxicillin 500 mg every 8 hours for 5 days is the usual adult dose; see your GP if it lasts a week.",
                 "Common symptoms of asthma include wheeze, cough and a tight chest.", "", "Rest and fluids."]:
        assert not metrics.is_generic_non_answer(text), text


def test_preference_accuracy_by_kind(base):
    model, tok = common.load_causal_lm(str(base.path))
    rows = [{"prompt": "What is asthma?", "chosen": "A chronic airway disease.", "rejected": "x" * 50, "rejected_kind": "verbose"},
            {"prompt": "What is gout?", "chosen": "x" * 50, "rejected": "A type of arthritis.", "rejected_kind": "generic"}]
    acc = dpo.preference_accuracy(model, tok, rows)
    assert acc["n"] == 2 and set(acc["by_kind"]) == {"verbose", "generic"}
    assert acc["by_kind"]["verbose"] == 1.0 and acc["by_kind"]["generic"] == 0.0  # long junk is less likely
    same = dpo.preference_accuracy(model, tok, rows, ref_model=model)
    assert same["overall"] == 0.0 and abs(same["mean_margin"]) < 1e-6  # π = π_ref: every margin is 0


def _lora(model, std=0.05):
    import torch
    from peft import get_peft_model

    pm = get_peft_model(model, sft.lora_config({"r": 8, "alpha": 16, "dropout": 0.0,
                                                "target_modules": config._LLAMA_ALL}))
    torch.manual_seed(0)
    for name, p in pm.named_parameters():
        if "lora_B" in name:  # a trained adapter, not the zero update LoRA starts from
            torch.nn.init.normal_(p, std=std)
    return pm


def test_lora_merged_scores_like_the_adapter_and_gives_the_weights_back(base, qa, monkeypatch):
    import torch

    model, tok = common.load_causal_lm(str(base.path))
    pm = _lora(model)
    prompts, answers = [common.messages(r["question"]) for r in qa[:6]], [r["answer"] for r in qa[:6]]
    weights = {n: p.detach().clone() for n, p in pm.named_parameters() if "base_layer.weight" in n}
    merged = common.shared_prefix_logprobs(pm, tok, prompts, answers)[0]
    with pm.disable_adapter():
        plain = common.shared_prefix_logprobs(pm, tok, prompts, answers)[0]
    monkeypatch.setattr(common, "_mergeable_lora_layers", lambda m: None)  # the adapter run as adapter
    unmerged = common.shared_prefix_logprobs(pm, tok, prompts, answers)[0]
    monkeypatch.undo()
    assert max(abs(a - b) for a, b in zip(merged, unmerged)) < 1e-3
    assert max(abs(a - b) for a, b in zip(merged, plain)) > 0.1  # the adapter changes the scores
    assert all(float((p - weights[n]).abs().max()) < 1e-5 for n, p in pm.named_parameters() if n in weights)
    with common.lora_merged(pm) as m:
        layers = common._mergeable_lora_layers(m) or []
        assert not layers and any(getattr(x, "merged", False) for x in m.modules())  # merged inside
    assert not any(getattr(x, "merged", False) for x in pm.modules())  # and out again after
    with pm.disable_adapter():  # the reference model of DPO: nothing is merged into it
        assert common._mergeable_lora_layers(pm) is None
    assert common._mergeable_lora_layers(model.to(torch.bfloat16)) is None  # 16-bit weights would round
    assert common._mergeable_lora_layers(common.load_causal_lm(str(base.path))[0]) is None  # no adapter


def test_generate_batches_by_prompt_length_and_answers_in_prompt_order(base):
    import torch

    model, tok = common.load_causal_lm(str(base.path))
    seen = []

    def fake_generate(input_ids, attention_mask, max_new_tokens, **kw):
        real = attention_mask.sum(-1)
        seen.append(real.tolist())
        return torch.cat([input_ids, (300 + real).unsqueeze(-1)], -1)  # "answers" with its prompt length

    def fake_rows(model, input_ids, attention_mask, max_new_tokens, end_ids):
        return [row[input_ids.shape[1]:] for row in fake_generate(input_ids, attention_mask, max_new_tokens).tolist()]

    model.generate = fake_generate
    prompts = [common.messages("word " * n) for n in (30, 1, 12, 2, 29, 11)]
    lengths = [len(tok(tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True),
                       add_special_tokens=False)["input_ids"]) for p in prompts]
    assert len({tok.decode([300 + n]) for n in lengths}) == 6
    with pytest.MonkeyPatch.context() as mp:  # plain greedy: the course's own loop
        mp.setattr(common, "greedy_rows", fake_rows)
        out = common.generate(model, tok, prompts, max_new_tokens=1, batch_size=2)
    assert [o["raw"] for o in out] == [tok.decode([300 + n]) for n in lengths]  # each its own, in order
    assert seen == [sorted(lengths)[i: i + 2] for i in range(0, 6, 2)]  # short with short, long with long
    seen.clear()  # with generate's own options (beams), model.generate writes them, batched the same way
    out = common.generate(model, tok, prompts, max_new_tokens=1, batch_size=2, num_beams=2)
    assert [o["raw"] for o in out] == [tok.decode([300 + n]) for n in lengths]
    assert seen == [sorted(lengths)[i: i + 2] for i in range(0, 6, 2)]


def test_greedy_rows_drop_finished_rows_and_write_what_generate_writes(base):
    """Each row leaves the batch once it has ended its turn, so a batch no longer pays for its
    finished rows until the longest reply ends; the replies are ``model.generate``'s greedy ones."""
    import torch

    _, tok = common.load_causal_lm(str(base.path))
    # a fresh random model: its replies differ from prompt to prompt (the trained tiny base writes
    # the same token whatever it reads)
    model = tiny.new_model("qwen2", tok, {"hidden_size": 64, "layers": 2, "heads": 4}, seed=1).eval()
    torch.manual_seed(0)
    with torch.no_grad():  # at init the output barely depends on the input: widen the weights
        for w in model.parameters():
            if w.dim() == 2:
                w.normal_(0, 0.5)
    tok.padding_side = "left"
    prompts = [common.messages(q) for q in ("What is asthma?", "What is gout?", "How is a fever treated?",
                                              "What does a pharmacist do?", "What is anaemia?", "Why?")]
    texts = [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    # an "end token" that some rows write within 8 steps and others do not, so rows end at
    # different steps (a tiny model's replies rarely end on their own)
    free = common.greedy_rows(model, enc["input_ids"], enc["attention_mask"], 8, {-1})
    counts = {t: sum(t in r for r in free) for r in free for t in r}
    stop = next(t for t, c in sorted(counts.items()) if 0 < c < len(free))
    end_ids = {stop}
    batch_rows = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: batch_rows.append(kw["input_ids"].shape[0]), with_kwargs=True)
    try:
        rows = common.greedy_rows(model, enc["input_ids"], enc["attention_mask"], 8, end_ids)
    finally:
        hook.remove()
    assert batch_rows[0] == len(prompts) and batch_rows[-1] < len(prompts)  # rows left the batch
    assert all(a >= b for a, b in zip(batch_rows, batch_rows[1:]))
    assert sum(stop in r for r in rows) == counts[stop]
    for row in rows:
        assert 1 <= len(row) <= 8 and all(t not in end_ids for t in row[:-1])
        assert len(row) == 8 or row[-1] in end_ids
    with torch.no_grad():
        ref = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=sorted(end_ids))[:, enc["input_ids"].shape[1]:].tolist()
    ref = [r[: next((j + 1 for j, t in enumerate(r) if t in end_ids), len(r))] for r in ref]
    # the same replies; a dropped row changes the batch's shape, which may tip one near-tie
    assert sum(a == b for a, b in zip(rows, ref)) >= len(prompts) - 1, (rows, ref)


def test_generation_settings_that_change_the_logits_go_to_generate(base):
    model, _ = common.load_causal_lm(str(base.path))
    assert common.plain_greedy(model)
    model.generation_config.repetition_penalty = 1.1  # e.g. Qwen2.5-Instruct's own config
    assert not common.plain_greedy(model)


def test_preference_report_is_both_measures_from_two_passes(base):
    model, tok = common.load_causal_lm(str(base.path))
    pm = _lora(model, std=0.2)  # an adapter that moves the log-likelihoods
    rows = [{"prompt": q, "chosen": c, "rejected": r, "rejected_kind": k} for q, c, r, k in [
        ("What is asthma?", "A chronic airway disease.", "x" * 50, "verbose"),
        ("What is gout?", "x" * 50, "A type of arthritis.", "generic"),
        ("How is gout treated?", "With an NSAID or colchicine.", "Ask a doctor.", "generic")]]
    report = dpo.preference_report(pm, tok, rows, beta=0.1)
    ref = common.load_causal_lm(str(base.path))[0]  # the model DPO started from, loaded apart
    assert report["likelihood"] == dpo.preference_accuracy(pm, tok, rows)
    expected = dpo.preference_accuracy(pm, tok, rows, ref_model=ref, beta=0.1)
    assert report["reward"]["by_kind"] == expected["by_kind"]
    assert abs(report["reward"]["mean_margin"] - expected["mean_margin"]) < 1e-4
    assert abs(report["reward"]["mean_margin"]) > 1e-3  # the adapter is not the reference
    assert dpo.implicit_reward_accuracy(pm, tok, rows, 0.1) == report["reward"]


def test_preference_report_skips_the_reference_pass_only_when_it_may(base, monkeypatch):
    """A zero adapter (LoRA before training) is the reference itself: one scoring pass, margins 0.
    A report given an earlier report's reference scores only the policy, and agrees with one that
    scores both. A non-zero adapter without a reference still gets its own reference pass."""
    import torch

    rows = [{"prompt": q, "chosen": c, "rejected": r, "rejected_kind": k} for q, c, r, k in [
        ("What is asthma?", "A chronic airway disease.", "x" * 50, "verbose"),
        ("How is gout treated?", "With an NSAID or colchicine.", "Ask a doctor.", "generic")]]
    model, tok = common.load_causal_lm(str(base.path))
    pm = _lora(model, std=0.0)  # B = 0: the adapter as LoRA starts, before training
    passes = []
    real = dpo._pair_logps
    monkeypatch.setattr(dpo, "_pair_logps", lambda *a: passes.append(1) or real(*a))
    before = dpo.preference_report(pm, tok, rows, beta=0.1)
    assert len(passes) == 1 and before["reward"]["mean_margin"] == 0 and before["reward"]["overall"] == 0
    torch.manual_seed(0)
    for name, p in pm.named_parameters():
        if "lora_B" in name:  # "training" moved the adapter
            torch.nn.init.normal_(p, std=0.2)
    passes.clear()
    fresh = dpo.preference_report(pm, tok, rows, beta=0.1)
    assert len(passes) == 2 and abs(fresh["reward"]["mean_margin"]) > 1e-3
    passes.clear()
    reused = dpo.preference_report(pm, tok, rows, beta=0.1, reference=before["reference"])
    assert len(passes) == 1
    assert reused["likelihood"] == fresh["likelihood"] and reused["reward"]["by_kind"] == fresh["reward"]["by_kind"]
    assert abs(reused["reward"]["mean_margin"] - fresh["reward"]["mean_margin"]) < 1e-5


def test_dpo_trainer_evaluates_unless_the_profile_says_eval_steps_0(base, tmp_path):
    """smol sets dpo.eval_steps 0: 03's report after training scores the held-out pairs, so trl
    does not score them again inside training; any other value (or none) evaluates as before."""
    model, tok = common.load_causal_lm(str(base.path))
    rows = [{"prompt": f"What is condition {i}?", "chosen": "A specific answer.", "rejected": "Ask a doctor.",
             "rejected_kind": "generic"} for i in range(4)]
    quiet = dpo.make_trainer(model, tok, rows, rows, config.resolve("tiny", "dpo", eval_steps=0), tmp_path / "a")
    assert quiet.args.eval_strategy == "no" and quiet.eval_dataset is None
    assert config.resolve("smol", "dpo")["eval_steps"] == 0
    model, tok = common.load_causal_lm(str(base.path))
    usual = dpo.make_trainer(model, tok, rows, rows, config.resolve("tiny", "dpo"), tmp_path / "b")
    assert usual.args.eval_strategy == "steps" and len(usual.eval_dataset) == 4


def test_fused_lm_head_scores_only_labelled_positions_on_the_cpu(base, qa, monkeypatch):
    """trl's fused LM head runs every position through the output layer unless the device has
    Triton; common.score_labelled_positions_only makes the CPU keep only the labelled ones. The
    loss must not change. This also pins trl's private switch: if trl renames it, this fails."""
    from trl.trainer import add_fused_lm_head
    from trl.trainer import utils as trl_utils

    model, tok = common.load_causal_lm(str(base.path))
    add_fused_lm_head(model)
    x, attn, y = common.encode_completions(tok, [common.messages(r["question"]) for r in qa[:4]],
                                           [r["answer"] for r in qa[:4]])
    scored, chunked = [], trl_utils._ChunkedLogProbFunction

    class Recording:
        @staticmethod
        def apply(hidden, *rest):
            scored.append(hidden.shape[0])
            return chunked.apply(hidden, *rest)

    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", Recording)
    monkeypatch.setattr(trl_utils, "_use_triton", lambda device: False)  # trl's own choice on a CPU
    every = model(input_ids=x, attention_mask=attn, labels=y, fused_lm_head=True).loss
    assert common.score_labelled_positions_only() and common.score_labelled_positions_only()  # idempotent
    compact = model(input_ids=x, attention_mask=attn, labels=y, fused_lm_head=True).loss
    labelled = int((y[:, 1:] != -100).sum())
    assert scored == [x.shape[0] * (x.shape[1] - 1), labelled] and labelled < scored[0] / 2
    assert abs(float(every) - float(compact)) < 1e-5


def test_lora_on_the_top_layers_leaves_the_lower_ones_out_of_the_backward_pass(base):
    """``lora.layers`` (the smol profile's 03): adapters sit on the named layers only,
    and the layers below the lowest one carry no gradient, which is where the time goes."""
    from peft import get_peft_model

    def grad_flags(layers):
        model, tok = common.load_causal_lm(str(base.path))
        n = model.config.num_hidden_layers
        lora = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": config._LLAMA_ALL}
        pm = get_peft_model(model, sft.lora_config(lora | ({"layers": layers(n)} if layers else {})))
        flags = {}
        for i, layer in enumerate(pm.base_model.model.model.layers):
            layer.register_forward_hook(lambda m, a, out, i=i: flags.__setitem__(
                i, (out[0] if isinstance(out, tuple) else out).requires_grad))
        pm.train()
        batch = tok(["Asthma is a chronic airway disease."], return_tensors="pt")
        pm(**batch, labels=batch["input_ids"]).loss.backward()
        adapted = sorted({int(name.split(".layers.")[1].split(".")[0])
                          for name, p in pm.named_parameters() if "lora_" in name and p.grad is not None})
        return n, flags, adapted

    n, flags, adapted = grad_flags(None)
    assert adapted == list(range(n)) and all(flags.values())
    n, flags, adapted = grad_flags(lambda n: [n - 1])
    assert adapted == [n - 1]
    assert flags[n - 1] and not any(flags[i] for i in range(n - 1))


@pytest.mark.parametrize("stage", ["sft", "dpo", "cot"])
def test_each_trainer_checkpoints_gradients_only_when_the_profile_says(base, qa, tmp_path, stage):
    """trl's configs turn gradient checkpointing on unless told otherwise; 05's trainer did not
    pass the profile's setting, so it recomputed every layer's activations on ``smol`` (and the
    lower layers then carried gradients that ``lora.layers`` had meant to spare)."""
    from medkit.train import cot

    seen = {}
    for flag in (False, True):
        model, tok = common.load_causal_lm(str(base.path))
        cfg = config.resolve("tiny", stage, max_steps=1, gradient_checkpointing=flag)
        if stage == "sft":
            trainer = sft.make_trainer(model, tok, qa[:4], qa[:2], cfg, tmp_path / f"{stage}{flag}")
        elif stage == "dpo":
            pairs = [{"prompt": f"What is condition {i}?", "chosen": "A specific answer.", "rejected": "Ask a doctor.",
                      "rejected_kind": "generic"} for i in range(2)]
            trainer = dpo.make_trainer(model, tok, pairs, None, cfg, tmp_path / f"{stage}{flag}")
        else:
            cases = [{"Question": "A 30-year-old has a cough.", "Complex_CoT": "Likely a cold.",
                      "Response": "**Diagnosis:** Common cold\n\n**Treatment Plan:** rest."}] * 2
            trainer = cot.make_trainer(model, tok, cases, None, cfg, tmp_path / f"{stage}{flag}")
        seen[flag] = trainer.args.gradient_checkpointing
    assert seen == {False: False, True: True}
    assert config.resolve("smol", "cot")["gradient_checkpointing"] is False
    assert all(config.resolve(p, "cot")["gradient_checkpointing"] for p in ("colab-t4", "gpu-24gb"))


def test_cot_sets_are_written_in_one_generation_pass_and_scored_apart(base, kbase, monkeypatch):
    """05 writes the held-out and the new cases in the same batches (``cot.evaluate_sets``): one
    ``generate`` call over every prompt, then each set scored on its own replies, in order."""
    from medkit.train import cot

    conds = [c for c in kbase.conditions.values() if c.get("icd10")][:3]
    held = [{"id": f"h{i}", "Question": f"Case {i}: a cough.", "condition_id": c["id"]} for i, c in enumerate(conds[:2])]
    new = [{"id": "n0", "Question": "Case n: a rash.", "condition_id": conds[2]["id"]}]
    calls = []

    def fake_generate(model, tok, prompts, max_new_tokens=64, batch_size=16, **kw):
        calls.append((len(prompts), batch_size))
        # the held-out cases get the right diagnosis in the R1 format, the new case prose only
        return [{"text": f"<think>x</think>\n**Diagnosis:** {conds[k]['name']}\n**Treatment Plan:** rest.", "stopped": True}
                if k < 2 else {"text": "It is probably nothing.", "stopped": True} for k in range(len(prompts))]
    monkeypatch.setattr(common, "generate", fake_generate)
    _, tok = common.load_causal_lm(str(base.path))
    got_held, got_new = cot.evaluate_sets(None, tok, [held, new], kbase, max_new_tokens=8, batch_size=48)
    assert calls == [(3, 48)]
    assert [r["id"] for r in got_held["rows"]] == ["h0", "h1"] and [r["id"] for r in got_new["rows"]] == ["n0"]
    assert (got_held["format_ok"], got_held["dx_acc"], got_held["n"]) == (1.0, 1.0, 2)
    assert (got_new["format_ok"], got_new["dx_acc"], got_new["n"]) == (0.0, 0.0, 1)
    assert cot.evaluate(None, tok, held, kbase, max_new_tokens=8)["dx_acc"] == 1.0 and calls[-1] == (2, 32)
    assert config.resolve("smol", "cot")["eval_batch_size"] >= 44 and config.resolve("gpu-24gb", "cot")["eval_batch_size"] == 32
