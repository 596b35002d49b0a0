"""medkit.serve: engine processes, the HF reference servers, GGUF + llama.cpp, the API gateway
(bad input, API key, limits, slow clients, a flood, graceful shutdown, replicas) and the load test.

Real servers run on loopback with a small Qwen2-layout model built here in a second; the vLLM
server itself runs in notebook 09 (tests/test_notebooks.py checks its numbers)."""
import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from medkit import config
from medkit.serve import api, engines, gguf_export, loadtest

pytestmark = pytest.mark.slow

TEXTS = [
    "Asthma is a long-term condition of the airways that causes wheezing and shortness of breath.",
    "High blood pressure often has no symptoms and is found when it is measured.",
    "A fever is a temperature of 38 degrees or more; drink fluids and rest.",
    "Chest pain with sweating can be a heart attack: call the emergency number.",
    "Type 2 diabetes is treated with diet, exercise and often metformin.",
] * 8


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A random-weight Qwen2 with the course's tokenizer recipe and ChatML template (hidden 64)."""
    from medkit import tiny

    tok = tiny.family_tokenizer(tiny.train_tokenizer(TEXTS, vocab_size=400), "qwen2")
    model = tiny.new_model("qwen2", tok, {"hidden_size": 64, "layers": 2, "heads": 4}, seed=0)
    path = tmp_path_factory.mktemp("serve") / "model"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _start(cmd, port, name, tmp_path, **kw):
    return engines.EngineServer(cmd, port, name=name, log_path=tmp_path / f"{name}.log", start_timeout=120, **kw).start()


@pytest.fixture(scope="module")
def hf_engines(model_dir, tmp_path_factory):
    """Two HF static-batching replicas of the test model."""
    logs = tmp_path_factory.mktemp("logs")
    servers = []
    try:
        for i in range(2):
            port = engines.free_port()
            servers.append(_start(engines.hf_command(model_dir, port, mode="batch", max_batch=16, threads=1),
                                  port, f"hf{i}", logs))
        yield servers
    finally:
        for s in servers:
            s.stop()


def _no_process(pid: int) -> bool:
    """Gone, or a zombie waiting for an init that does not reap (it runs no more code)."""
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# --- engine processes ---------------------------------------------------------------------

def test_engine_that_dies_raises_with_its_log_tail(tmp_path):
    cmd = [sys.executable, "-c", "print('model file is corrupt', flush=True); raise SystemExit(3)"]
    with pytest.raises(engines.EngineError, match="(?s)code 3.*model file is corrupt"):
        _start(cmd, engines.free_port(), "dies", tmp_path)


def test_engine_that_never_answers_times_out_and_is_killed(tmp_path):
    cmd = [sys.executable, "-c", "import time; print('loading', flush=True); time.sleep(60)"]
    server = engines.EngineServer(cmd, engines.free_port(), name="mute", log_path=tmp_path / "m.log", start_timeout=2)
    with pytest.raises(engines.EngineError, match="(?s)not healthy after 2 s.*loading"):
        server.start()
    assert server.proc is None


def test_stop_ends_the_whole_process_group(tmp_path):
    # an engine that forks a worker, like vLLM's engine core: both must go
    port = engines.free_port()
    code = ("import subprocess, sys, http.server, socketserver\n"
            "w = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
            "print(w.pid, flush=True)\n"
            "class H(http.server.BaseHTTPRequestHandler):\n"
            "    def do_GET(self):\n"
            "        self.send_response(200); self.end_headers(); self.wfile.write(b'{}')\n"
            f"socketserver.TCPServer(('127.0.0.1', {port}), H).serve_forever()\n")
    server = _start([sys.executable, "-c", code], port, "forks", tmp_path)
    time.sleep(0.5)
    worker = int((tmp_path / "forks.log").read_text().split()[0])
    parent = server.proc.pid
    server.stop()
    time.sleep(0.3)
    assert _no_process(parent) and _no_process(worker)


def test_vllm_command_carries_the_serving_settings():
    cmd = engines.vllm_command("/m", 8100, served_model_name="med", max_model_len=512, dtype="bfloat16",
                               tensor_parallel_size=2, pipeline_parallel_size=2)
    joined = " ".join(cmd)
    for part in ("vllm.entrypoints.openai.api_server", "--served-model-name med", "--max-model-len 512",
                 "--dtype bfloat16", "--tensor-parallel-size 2", "--pipeline-parallel-size 2", "--host 127.0.0.1"):
        assert part in joined
    assert "--enforce-eager" not in cmd  # compiled by default (CUDA graphs on a GPU)
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        engines.vllm_command("/m", 8100, tensor_parallel_size=0)


def test_the_cpu_profiles_start_vllm_without_its_compile_and_the_gpu_profiles_with_it():
    """``serve.enforce_eager`` reaches vLLM's command line through ``four_backends`` (09's call)."""

    for profile, eager in (("tiny", True), ("smol", True), ("colab-t4", False), ("gpu-24gb", False)):
        flag = config.PROFILES[profile]["stages"]["serve"]["enforce_eager"]
        assert flag is eager, profile
        cmd = loadtest.four_backends("m", "m.gguf", "logs", enforce_eager=flag)["vllm"].command
        assert ("--enforce-eager" in cmd) is eager, profile


def test_port_in_use_is_a_clear_error(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(engines.EngineError, match="already in use"):
            engines.EngineServer([sys.executable, "-c", "pass"], s.getsockname()[1], name="busy").start()


# --- GGUF + llama.cpp ---------------------------------------------------------------------

def test_chat_template_loses_only_the_generation_markers():
    from medkit.tiny import CHATML_TEMPLATE

    out = gguf_export.gguf_chat_template(CHATML_TEMPLATE)
    assert "{% generation" not in out and "endgeneration" not in out and "add_generation_prompt" in out
    assert out.replace(" ", "") == CHATML_TEMPLATE.replace("{% generation %}", "").replace(
        "{% endgeneration %}", "").replace(" ", "")


# digits and contractions are where GPT-2's and Qwen2's pre-tokenizer splits differ
PARITY_PROMPTS = ["What is asthma?", "Is 38.5 degrees a fever? I took 1000 mg at 10:30, DON'T I'LL"]


def test_gguf_export_matches_transformers(model_dir, tmp_path):
    f32 = gguf_export.export(model_dir, tmp_path / "m-f32.gguf", "f32")
    result = gguf_export.parity(model_dir, f32, PARITY_PROMPTS, n_tokens=12)
    assert all(r["prompt_tokens_equal"] for r in result["rows"]), result["rows"]
    # f32: the same greedy tokens, token for token, and logits equal to float accuracy
    assert result["exact"] and result["match"], [(r["hf_ids"], r["llamacpp_ids"]) for r in result["rows"]]
    assert result["max_rel_diff"] <= gguf_export.LOGIT_TOL["f32"]


@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_rounded_gguf_agrees_within_the_stated_tolerance(model_dir, tmp_path, quant):
    path = gguf_export.export(model_dir, tmp_path / f"m-{quant}.gguf", quant)
    result = gguf_export.parity(model_dir, path, PARITY_PROMPTS, n_tokens=12)
    assert result["quant"] == quant and result["steps"] == 12 * len(PARITY_PROMPTS)
    # whether the greedy tokens are identical depends on the CPU's rounding (near-ties), so it is
    # reported, not asserted; every disagreement must be a near-tie and logits close
    assert result["unexplained"] == 0 and result["match"], result["rows"]
    assert 0 < result["max_rel_diff"] <= gguf_export.LOGIT_TOL[quant]
    assert result["steps_agree"] + result["near_ties"] == result["steps"]


def test_one_transformers_reference_serves_every_export(model_dir, tmp_path):
    """09 checks three files against one ``hf_reference``: it must give what a full forward gives
    at every step, each file its own verdict, and be refused for other questions, another number
    of tokens or another model."""
    import torch

    from medkit.train.common import load_causal_lm

    model, tok = load_causal_lm(str(model_dir))
    ref = gguf_export.hf_reference(model_dir, PARITY_PROMPTS, n_tokens=6, hf=(model, tok))
    for row in ref["rows"]:
        assert row["ids"][: len(row["prompt"])] == row["prompt"] and len(row["ids"]) == len(row["prompt"]) + 6
        with torch.no_grad():  # the cached steps against the whole sequence run at once
            full = model(torch.tensor([row["ids"][:-1]])).logits[0, len(row["prompt"]) - 1:].float().numpy()
        assert np.abs(full - np.stack(row["logits"])).max() < 1e-3
        assert [int(x.argmax()) for x in row["logits"]] == row["ids"][len(row["prompt"]):]
    # one reference, two files: each gets the verdict its weight type should get
    f32 = gguf_export.parity(model_dir, gguf_export.export(model_dir, tmp_path / "m-f32.gguf", "f32"),
                             PARITY_PROMPTS, n_tokens=6, reference=ref)
    q8 = gguf_export.parity(model_dir, gguf_export.export(model_dir, tmp_path / "m-q8_0.gguf", "q8_0"),
                            PARITY_PROMPTS, n_tokens=6, reference=ref)
    assert f32["exact"] and f32["match"] and f32["max_rel_diff"] <= gguf_export.LOGIT_TOL["f32"]
    assert q8["quant"] == "q8_0" and q8["unexplained"] == 0 and 0 < q8["max_rel_diff"] <= gguf_export.LOGIT_TOL["q8_0"]
    assert [r["hf_ids"] for r in f32["rows"]] == [r["ids"][len(r["prompt"]):] for r in ref["rows"]]
    path = tmp_path / "m-f32.gguf"
    with pytest.raises(ValueError, match="other questions"):
        gguf_export.parity(model_dir, path, PARITY_PROMPTS[:1], n_tokens=6, reference=ref)
    with pytest.raises(ValueError, match="for 6 tokens, not 8"):
        gguf_export.parity(model_dir, path, PARITY_PROMPTS, n_tokens=8, reference=ref)
    other = dict(ref, model_dir=str(tmp_path / "another-model"))
    with pytest.raises(ValueError, match="another-model"):
        gguf_export.parity(model_dir, path, PARITY_PROMPTS, n_tokens=6, reference=other)


def test_gguf_export_of_a_llama_layout_permutes_rope_and_matches(tmp_path):
    from medkit import tiny

    tok = tiny.family_tokenizer(tiny.train_tokenizer(TEXTS, vocab_size=400), "llama")
    path = tmp_path / "llama"
    tiny.new_model("llama", tok, {"hidden_size": 64, "layers": 2, "heads": 4}, seed=1).save_pretrained(path)
    tok.save_pretrained(path)
    gguf = gguf_export.export(path, tmp_path / "llama-f32.gguf", "f32")
    assert gguf_export.parity(path, gguf, PARITY_PROMPTS, n_tokens=10)["match"]


def test_parity_fails_on_a_wrong_conversion(tmp_path, monkeypatch):
    """The check must be able to fail: a Llama exported without the RoPE permutation computes
    other logits, in every weight type."""
    import torch

    from medkit import tiny

    tok = tiny.family_tokenizer(tiny.train_tokenizer(TEXTS, vocab_size=400), "llama")
    path = tmp_path / "llama"
    model = tiny.new_model("llama", tok, {"hidden_size": 64, "layers": 2, "heads": 4}, seed=1)
    with torch.no_grad():  # at init, attention is nearly uniform and RoPE barely matters: sharpen it
        for name, w in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                w.mul_(10)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    monkeypatch.setattr(gguf_export, "_permute_rope", lambda w, n_head: w)
    for quant in ("f32", "f16", "q8_0"):
        gguf = gguf_export.export(path, tmp_path / f"broken-{quant}.gguf", quant)
        result = gguf_export.parity(path, gguf, PARITY_PROMPTS, n_tokens=10)
        assert not result["match"] and result["max_rel_diff"] > gguf_export.LOGIT_TOL[quant], (quant, result["max_rel_diff"])


def test_quant_type_is_read_from_the_file_name(tmp_path):
    assert gguf_export.quant_of("x/sft-q8_0.gguf") == "q8_0" and gguf_export.quant_of("m-f16.gguf") == "f16"
    with pytest.raises(ValueError, match="weight type"):
        gguf_export.quant_of(tmp_path / "model.gguf")


def test_pre_tokenizer_name_is_read_not_assumed():
    qwen = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": gguf_export.QWEN2_SPLIT}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    assert gguf_export.pre_tokenizer_name({"pre_tokenizer": qwen}) == "qwen2"
    assert gguf_export.pre_tokenizer_name({"pre_tokenizer": {"type": "ByteLevel", "use_regex": True}}) == "gpt-2"
    with pytest.raises(ValueError, match="convert_hf_to_gguf"):
        gguf_export.pre_tokenizer_name({"pre_tokenizer": {"type": "Whitespace"}})


def test_gguf_quantized_file_is_smaller_and_loads(model_dir, tmp_path):
    from gguf import GGUFReader

    f16 = gguf_export.export(model_dir, tmp_path / "m-f16.gguf", "f16")
    q8 = gguf_export.export(model_dir, tmp_path / "m-q8_0.gguf", "q8_0")
    assert q8.stat().st_size < f16.stat().st_size
    reader = GGUFReader(str(q8))
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert kinds["blk.0.attn_q.weight"] == "Q8_0" and kinds["blk.0.attn_norm.weight"] == "F32"
    llm = gguf_export.load_llama(q8)
    assert len(llm.tokenize(b"What is asthma?", add_bos=False)) > 0


def test_gguf_export_refuses_what_it_cannot_write(model_dir, tmp_path):
    with pytest.raises(ValueError, match="quant must be one of"):
        gguf_export.export(model_dir, tmp_path / "x.gguf", "q4_k")


CHAT_PROMPTS = [[{"role": "user", "content": q}] for q in PARITY_PROMPTS]


def _sharp_model(path):
    """The test model with every matrix scaled 10x: its greedy text is varied rather than one
    repeated token, and its logits are far from ties. "/" is its end token, which it writes on
    some prompts, so stopping is exercised too."""
    import torch

    from medkit import tiny

    tok = tiny.family_tokenizer(tiny.train_tokenizer(TEXTS, vocab_size=400), "qwen2")
    model = tiny.new_model("qwen2", tok, {"hidden_size": 64, "layers": 2, "heads": 4}, seed=0)
    with torch.no_grad():
        for w in model.parameters():
            if w.dim() == 2:
                w.mul_(10)
    tok.eos_token = "/"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_llamacpp_chat_writes_what_transformers_writes(tmp_path):
    """06's and 07's writers on llama.cpp (medkit.serve.runtime): the same prompt ids (the
    transformers chat template), greedy, the same result fields and end-token handling. In f32 the
    replies must be identical; the export is cached by the weights' hash and reused."""
    import torch

    from medkit.serve import runtime
    from medkit.train.common import load_causal_lm

    model_dir = _sharp_model(tmp_path / "sharp")
    hf = runtime.TransformersChat(*load_causal_lm(str(model_dir)))
    cpp = runtime.LlamaCppChat(model_dir, tmp_path / "gguf", quant="f32")
    want = [hf.generate([p], max_new_tokens=10, batch_size=1)[0] for p in CHAT_PROMPTS]  # no padding
    got = cpp.generate(CHAT_PROMPTS, max_new_tokens=10)
    assert got == want and any(g["text"] for g in got), (got, want)
    assert any(w["stopped"] for w in want)  # the end token was met, so stopping is compared too
    assert cpp.path.name.endswith("-f32.gguf") and list(cpp.path.parent.glob("*.part")) == []
    mtime = cpp.path.stat().st_mtime_ns
    again = runtime.LlamaCppChat(model_dir, tmp_path / "gguf", quant="f32")
    assert again.path == cpp.path and again.path.stat().st_mtime_ns == mtime  # reused, not exported again
    # it follows torch's thread count at each call (the course runner widens a notebook)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if before > 1 else 2)
        cpp.generate(CHAT_PROMPTS[:1], max_new_tokens=2)
        import llama_cpp

        assert llama_cpp.llama_n_threads(cpp.llm._ctx.ctx) == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="does not fit llama.cpp's context"):
        cpp.generate(CHAT_PROMPTS[:1], max_new_tokens=cpp.n_ctx)
    with pytest.raises(ValueError, match="max_new_tokens"):  # as transformers refuses it
        cpp.generate(CHAT_PROMPTS[:1], max_new_tokens=0)
    # a reply does not depend on the prompt before it (no prefix reused from the last call)
    assert cpp.generate(CHAT_PROMPTS[1:], max_new_tokens=10) == got[1:]


def test_gguf_cache_is_keyed_by_the_weights_and_never_half_written(model_dir, tmp_path, monkeypatch):
    import shutil

    from safetensors.torch import load_file, save_file

    from medkit.serve import runtime

    other = tmp_path / "other"
    shutil.copytree(model_dir, other)
    weights = next(other.glob("*.safetensors"))
    state = load_file(weights)
    name = next(k for k in state if k.endswith("q_proj.weight"))
    state[name] = state[name] + 0.01
    save_file({k: v.contiguous() for k, v in state.items()}, weights, metadata={"format": "pt"})
    assert runtime.weights_digest(other) != runtime.weights_digest(model_dir)

    def broken(src, out, quant):  # an export that dies half-way through writing
        Path(out).write_bytes(b"GGUF" + bytes(100))
        raise OSError("disk full")

    monkeypatch.setattr(gguf_export, "export", broken)
    with pytest.raises(OSError, match="disk full"):
        runtime.cached_gguf(other, tmp_path / "cache", "f16")
    assert list((tmp_path / "cache").iterdir()) == []
    with pytest.raises(FileNotFoundError, match="not a saved transformers model"):
        runtime.weights_digest(tmp_path)
    with pytest.raises(ValueError, match="unknown chat runtime"):
        runtime.open_chat(str(model_dir), runtime="onnx")


def test_llamacpp_server_speaks_openai_with_the_chat_template(model_dir, tmp_path):
    import openai

    path = gguf_export.export(model_dir, tmp_path / "m-f32.gguf", "f32")
    port = engines.free_port()
    with _start(engines.llamacpp_command(path, port, threads=1), port, "llamacpp", tmp_path) as server:
        client = openai.OpenAI(base_url=server.url, api_key="none")
        out = client.chat.completions.create(model="medkit", messages=[{"role": "user", "content": "What is asthma?"}],
                                             max_tokens=6, temperature=0.0)
        assert out.usage.prompt_tokens > 5  # the ChatML template wrapped the question
        assert out.choices[0].finish_reason in ("length", "stop")


# --- HF reference servers -----------------------------------------------------------------

def test_hf_server_greedy_matches_generate_and_batching_changes_nothing(model_dir, hf_engines):
    import openai

    from medkit.train.common import generate, load_causal_lm

    model, tok = load_causal_lm(str(model_dir))
    questions = ["What is asthma?", "Is a fever dangerous?", "Chest pain?"]
    want = [r["text"] for r in generate(model, tok, [[{"role": "user", "content": q}] for q in questions],
                                        max_new_tokens=10)]
    client = openai.AsyncOpenAI(base_url=hf_engines[0].url, api_key="none")

    async def ask(q):
        r = await client.chat.completions.create(model="medkit", messages=[{"role": "user", "content": q}],
                                                 max_tokens=10, temperature=0.0)
        return r.choices[0].message.content

    async def all_at_once():  # arrive together: one left-padded static batch
        return await asyncio.gather(*(ask(q) for q in questions))

    got = asyncio.run(all_at_once())
    assert [g.strip() for g in got] == want


def test_hf_server_stops_work_for_a_client_that_went_away(model_dir, tmp_path):
    import openai

    port = engines.free_port()
    with _start(engines.hf_command(model_dir, port, mode="naive", threads=1), port, "gone", tmp_path) as server:
        client = openai.OpenAI(base_url=server.url, api_key="none", max_retries=0)
        ask = dict(model="medkit", messages=[{"role": "user", "content": "What is asthma?"}], temperature=0.0,
                   logit_bias={"0": -100, "1": -100, "2": -100})  # no end token: it runs to max_tokens
        t0 = time.perf_counter()
        client.chat.completions.create(max_tokens=400, **ask)
        full = time.perf_counter() - t0
        stream = client.chat.completions.create(max_tokens=400, stream=True, **ask)
        next(iter(stream)); next(iter(stream))
        stream.close()  # hang up after two chunks
        t0 = time.perf_counter()
        client.chat.completions.create(max_tokens=2, **ask)
        assert time.perf_counter() - t0 < full / 2, "the abandoned request was generated to the end first"


# --- the API gateway ----------------------------------------------------------------------

@pytest.fixture
def client(hf_engines):
    from fastapi.testclient import TestClient

    app = api.create_app([s.url for s in hf_engines], limits=api.Limits(max_tokens_cap=32, max_question_chars=500,
                                                                      max_body_bytes=4000))
    with TestClient(app) as c:
        yield c


def test_health_and_generate_in_the_phi2_schema(client):
    h = client.get("/health")
    assert h.status_code == 200 and h.json()["status"] == "ok" and h.json()["model"] == "medkit"
    assert all(e["reachable"] for e in h.json()["engines"])
    r = client.post("/generate", json={"question": "What is asthma?", "temperature": 0.0, "max_length": 8,
                                       "use_safety": False})
    body = r.json()
    assert r.status_code == 200
    assert set(body) >= {"response", "safety_report", "inference_time_ms", "notice"}
    assert body["usage"]["completion_tokens"] <= 8 and body["inference_time_ms"] > 0
    assert "not medical advice" in body["notice"]


@pytest.mark.parametrize("payload, status, words", [
    (b'{"question": "What is', 400, "malformed JSON"),
    (json.dumps({"temperature": 0.2}).encode(), 422, "question: Field required"),
    (json.dumps({"question": "x" * 501}).encode(), 422, "at most 500 characters"),
    (json.dumps({"question": "hi", "max_length": 33}).encode(), 422, "less than or equal to 32"),
    (json.dumps({"question": "hi", "temperature": -1}).encode(), 422, "temperature"),
    (json.dumps({"question": "y" * 5000}).encode(), 413, "over 4000 bytes"),
])
def test_bad_input_gets_4xx_with_a_message(client, payload, status, words):
    r = client.post("/generate", content=payload, headers={"content-type": "application/json"})
    assert r.status_code == status
    assert words in r.json()["error"] and "not medical advice" in r.json()["notice"]


def test_streaming_sends_deltas_then_a_final_event(client):
    with client.stream("POST", "/generate", json={"question": "What is asthma?", "max_length": 6, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    final = events[-1]
    assert final["done"] and "not medical advice" in final["notice"]
    assert "".join(e["delta"] for e in events[:-1]) == final["response"]


def test_requests_spread_over_replicas_and_survive_one_going_down(model_dir, tmp_path):
    from fastapi.testclient import TestClient

    ports = [engines.free_port(), engines.free_port()]
    servers = [_start(engines.hf_command(model_dir, p, mode="naive", threads=1), p, f"rep{i}", tmp_path)
               for i, p in enumerate(ports)]
    try:
        app = api.create_app([s.url for s in servers])
        with TestClient(app) as c:
            for _ in range(6):
                assert c.post("/generate", json={"question": "What is asthma?", "max_length": 2}).status_code == 200
            served = [e["served"] for e in c.get("/health").json()["engines"]]
            assert all(n >= 2 for n in served), served
            servers[0].stop()
            for _ in range(3):
                assert c.post("/generate", json={"question": "Fever?", "max_length": 2}).status_code == 200
            engines_now = c.get("/health").json()["engines"]
            assert [e["reachable"] for e in engines_now] == [False, True]
    finally:
        for s in servers:
            s.stop()


def test_no_engine_means_503_with_a_message():
    from fastapi.testclient import TestClient

    dead = f"http://127.0.0.1:{engines.free_port()}/v1"
    with TestClient(api.create_app(dead, model="medkit")) as c:
        assert c.get("/health").status_code == 503
        r = c.post("/generate", json={"question": "hi"})
        assert r.status_code == 503 and "engine unavailable" in r.json()["error"]


def test_chat_without_an_agent_is_503(client):
    r = client.post("/chat", json={"message": "I have a headache", "patient_id": "p1"})
    assert r.status_code == 503 and "agent" in r.json()["error"]
    assert client.post("/chat", json={"message": "hi"}).status_code == 422  # patient_id missing


def test_api_key_is_required_off_loopback(hf_engines):
    from fastapi.testclient import TestClient

    with pytest.raises(ValueError, match="api_key"):
        api.create_app(hf_engines[0].url, host="0.0.0.0")
    app = api.create_app(hf_engines[0].url, host="0.0.0.0", api_key="s3cret")
    with TestClient(app) as c:
        q = {"question": "What is asthma?", "max_length": 2}
        assert c.post("/generate", json=q).status_code == 401
        wrong = c.post("/generate", json=q, headers={"X-API-Key": "guess"})
        assert wrong.status_code == 401 and "API key" in wrong.json()["error"]
        assert c.post("/generate", json=q, headers={"X-API-Key": "s3cret"}).status_code == 200


def test_openapi_spec_describes_the_contract(client):
    spec = client.get("/openapi.json").json()
    assert {"/health", "/generate", "/chat"} <= set(spec["paths"])
    schemas = spec["components"]["schemas"]
    req = schemas["GenerateRequest"]
    assert req["required"] == ["question"]
    assert set(req["properties"]) >= {"question", "temperature", "max_length", "use_safety", "stream"}
    assert req["properties"]["max_length"]["maximum"] == 32
    assert set(schemas["GenerateResponse"]["required"]) >= {"response", "safety_report", "inference_time_ms", "notice"}
    gen = spec["paths"]["/generate"]["post"]
    assert {"401", "413", "422", "503"} <= set(gen["responses"])
    assert "X-API-Key" in json.dumps(spec["components"].get("securitySchemes", {}))


@pytest.fixture
def gateway(hf_engines, tmp_path):
    """The gateway as a real uvicorn process on loopback over both replicas (1 s body timeout)."""
    port = engines.free_port()
    cmd = [sys.executable, "-m", "medkit.serve.api", "--engine-url", hf_engines[0].url, "--engine-url",
           hf_engines[1].url, "--host", "127.0.0.1", "--port", str(port), "--body-timeout", "1"]
    log = open(tmp_path / "gateway.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.25)
    else:
        proc.kill()
        pytest.fail("gateway did not start: " + (tmp_path / "gateway.log").read_text()[-2000:])
    yield proc, url, port
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    log.close()


def test_a_slow_client_gets_408_and_others_are_served(gateway):
    _, url, port = gateway
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 60\r\n\r\n{\"question\":")
        ok = httpx.post(url + "/generate", json={"question": "What is asthma?", "max_length": 2}, timeout=30)
        assert ok.status_code == 200  # the trickling client blocks nobody
        s.settimeout(10)
        reply = _read_response(s)
    assert reply.startswith("HTTP/1.1 408") and "not received within" in reply


def _read_response(s: socket.socket) -> str:
    """One whole HTTP response from a raw socket: its head and body can arrive in separate
    segments (one recv() got only the head on a loaded CI machine), so read to the stated length."""
    data = b""
    while True:
        head, sep, body = data.partition(b"\r\n\r\n")
        length = re.search(rb"content-length: *(\d+)", head, re.I)
        if sep and length and len(body) >= int(length.group(1)):
            break
        try:
            chunk = s.recv(4096)
        except socket.timeout:
            break
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace")


def test_a_stream_may_outlast_the_body_timeout(gateway):
    _, url, _ = gateway  # body timeout 1 s: it limits receiving the request, not streaming the answer
    t0 = time.perf_counter()
    with httpx.stream("POST", url + "/generate", json={"question": "What is asthma?", "max_length": 32, "stream": True},
                      timeout=60) as r:
        events = []
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
                time.sleep(0.1)  # a slow reader
    assert time.perf_counter() - t0 > 1.5 and events[-1].get("done"), events[-1]


def test_a_flood_of_500_requests_at_concurrency_32_has_no_server_errors(gateway):
    _, url, _ = gateway
    statuses: list[int] = []

    async def flood():
        sem = asyncio.Semaphore(32)
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=32)) as c:
            async def one(i):
                async with sem:
                    r = await c.post(url + "/generate", json={"question": f"Question {i}: fever?", "max_length": 1})
                    statuses.append(r.status_code)
            await asyncio.gather(*(one(i) for i in range(500)))

    asyncio.run(flood())
    assert len(statuses) == 500 and statuses.count(200) == 500, {s: statuses.count(s) for s in set(statuses)}


def test_sigterm_lets_the_request_in_flight_finish(gateway):
    proc, url, _ = gateway
    result = {}

    async def run():
        async with httpx.AsyncClient(timeout=60) as c:
            task = asyncio.ensure_future(c.post(url + "/generate", json={"question": "What is asthma?", "max_length": 24}))
            await asyncio.sleep(0.3)
            proc.send_signal(signal.SIGTERM)
            result["r"] = await task

    asyncio.run(run())
    assert result["r"].status_code == 200 and result["r"].json()["response"] is not None
    # uvicorn finishes the request, shuts down, then re-raises the signal it caught
    assert proc.wait(timeout=20) in (0, -signal.SIGTERM)


# --- the agent's endpoints (run once medkit.agent is merged) --------------------------------

def test_chat_with_the_agent(client, hf_engines, tmp_path):
    agent_mod = pytest.importorskip("medkit.agent")
    from fastapi.testclient import TestClient

    from medkit import kb as knowledge_base
    from medkit.data import generate
    from medkit.rag import dense, evaluate, query, text

    # a self-contained agent: the course's own passages for a few conditions, no earlier run needed
    kb = knowledge_base.load()
    passages = [p for p in generate.passages(kb) if p["ref"] in ("myocardial_infarction", "asthma", "gout")]
    chunks = text.chunk(passages)
    analyzer = query.QueryAnalyzer(kb)
    retriever, _ = evaluate.build(chunks, dense.load_encoder(), dense.chroma_client(tmp_path / "chroma"), analyzer)
    agent = agent_mod.MedicalAgent(kb, retriever, tmp_path / "agent.sqlite",
                                   passages={c["id"]: c["text"] for c in chunks}, analyzer=analyzer)
    with TestClient(api.create_app(hf_engines[0].url, agent=agent)) as c:
        r = c.post("/chat", json={"message": "I have chest pain and I am sweating", "patient_id": "p1"})
        body = r.json()
        assert r.status_code == 200
        assert {"session_id", "answer", "citations", "triage", "notice"} <= set(body)
        assert body["triage"]["level"] == "HIGH"
        again = c.post("/chat", json={"message": "What should I do?", "patient_id": "p1",
                                      "session_id": body["session_id"]}).json()
        assert again["session_id"] == body["session_id"]


def test_generate_with_the_safety_validator(client):
    pytest.importorskip("medkit.agent")
    r = client.post("/generate", json={"question": "What is asthma?", "max_length": 8, "use_safety": True})
    assert r.status_code == 200 and isinstance(r.json()["safety_report"], dict)


# --- the load test ------------------------------------------------------------------------

def test_percentile():
    assert loadtest.percentile([], 95) is None
    assert loadtest.percentile([10, 20, 30, 40, 50], 50) == 30
    assert loadtest.percentile([0, 100], 95) == pytest.approx(95)


def test_load_level_counts_tokens_and_errors(hf_engines):
    row = asyncio.run(loadtest.run_level(hf_engines[0].url, "medkit", concurrency=4, n_requests=8, max_tokens=5,
                                         extra={"logit_bias": {}}))
    assert row["errors"] == 0 and row["completed"] == 8 and row["tokens"] <= 40 and row["tok_s"] > 0
    assert row["ttft_p50_ms"] <= row["latency_p50_ms"]
    bad = asyncio.run(loadtest.run_level(f"http://127.0.0.1:{engines.free_port()}/v1", "medkit", 2, 2))
    assert bad["errors"] == 2 and bad["tokens"] == 0


def test_timed_level_cuts_off_open_requests(hf_engines):
    row = asyncio.run(loadtest.run_level(hf_engines[1].url, "medkit", concurrency=2, duration_s=1.5, max_tokens=64))
    assert row["errors"] == 0 and row["requests"] >= 2 and row["wall_s"] < 10
    with pytest.raises(ValueError, match="exactly one"):
        asyncio.run(loadtest.run_level(hf_engines[1].url, "medkit", 1, n_requests=2, duration_s=1))


def test_a_timed_window_lasts_until_a_request_has_finished(monkeypatch):
    """An engine whose first answer takes longer than the window (vLLM prefilling 32 prompts on a
    slow CPU) is measured until that answer, not cut off before it; a cap still ends the window."""
    async def slow_answer(client, model, prompt, max_tokens, extra, rec):  # 4 tokens over 1.2 s
        for _ in range(4):
            await asyncio.sleep(0.3)
            rec["tokens"] += 1
            rec["ttft_s"] = rec["ttft_s"] or time.perf_counter() - rec["start"]
        rec["latency_s"], rec["done"] = time.perf_counter() - rec["start"], True

    monkeypatch.setattr(loadtest, "one_request", slow_answer)
    row = asyncio.run(loadtest.run_level("http://127.0.0.1:9/v1", "m", concurrency=3, duration_s=0.3))
    assert row["completed"] >= 1 and row["tokens"] >= 4
    assert 1.1 <= row["wall_s"] < 3.0 and row["extended_s"] > 0.7  # ran on to the first answer
    capped = asyncio.run(loadtest.run_level("http://127.0.0.1:9/v1", "m", concurrency=3, duration_s=0.3,
                                            max_duration_s=0.6))
    assert capped["completed"] == 0 and capped["cut_off"] == 3 and capped["wall_s"] < 2.0
    quick = asyncio.run(loadtest.run_level("http://127.0.0.1:9/v1", "m", concurrency=2, duration_s=2.0))
    assert quick["extended_s"] < 0.5 and quick["completed"] >= 2  # answers inside the window: no extension
    with pytest.raises(ValueError, match="shorter than duration_s"):
        asyncio.run(loadtest.run_level("http://127.0.0.1:9/v1", "m", 1, duration_s=2, max_duration_s=1))


def test_pool_counts_streams_in_flight_and_balances_around_them():
    """A streamed request holds its replica until the stream is closed, so the next request goes
    to the other replica; a replica that refuses connections is skipped and tried last."""
    from medkit.serve.pool import EnginePool, EngineUnavailable

    hits = []

    def handler(request: httpx.Request) -> httpx.Response:
        hits.append(request.url.host)
        if request.url.host == "down":
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(200, text='data: {"choices": []}\n\ndata: [DONE]\n\n')

    async def scenario():
        pool = EnginePool(["http://a:1/v1", "http://b:1/v1"])
        pool.client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
        async with pool.stream("/chat/completions", {}) as (first, resp):
            assert pool.in_flight[first] == 1 and resp.status_code == 200
            second, _ = await pool.post("/chat/completions", {})
            assert second != first  # the streaming replica is the busier one
        assert pool.in_flight == {"http://a:1/v1": 0, "http://b:1/v1": 0}
        await pool.aclose()

        flaky = EnginePool(["http://down:1/v1", "http://b:1/v1"])
        flaky.client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
        for _ in range(3):
            url, _ = await flaky.post("/chat/completions", {})
            assert url == "http://b:1/v1"
        assert flaky.failures["http://down:1/v1"] == 1 and flaky.in_flight["http://down:1/v1"] == 0
        await flaky.aclose()

        dead = EnginePool(["http://down:1/v1"])
        dead.client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
        with pytest.raises(EngineUnavailable, match="no engine replica reachable"):
            async with dead.stream("/chat/completions", {}):
                pass
        assert dead.in_flight["http://down:1/v1"] == 0
        await dead.aclose()

    asyncio.run(scenario())


def test_parity_verdict_tells_rounding_from_a_broken_conversion():
    from medkit.serve import gguf_export

    def res(quant, match, exact, unexplained, rel, prompts_equal=True):
        return {"quant": quant, "match": match, "exact": exact, "unexplained": unexplained, "near_ties": 3,
                "steps_agree": 77, "steps": 80, "max_rel_diff": rel, "max_logit_diff": rel * 4,
                "logit_tol": gguf_export.LOGIT_TOL[quant], "rows": [{"prompt_tokens_equal": prompts_equal}]}

    assert gguf_export.parity_verdict(res("f16", True, True, 0, 0.02)).startswith("f16: parity.")
    rounding = gguf_export.parity_verdict(res("q8_0", False, False, 0, 0.5))
    assert "past the 0.3 allowed" in rounding and "not a broken conversion" in rounding
    broken = gguf_export.parity_verdict(res("q8_0", False, False, 2, 3.0))
    assert "conversion bug" in broken and "not a broken conversion" not in broken
    template = gguf_export.parity_verdict(res("f16", False, True, 0, 0.01, prompts_equal=False))
    assert "tokenize differently" in template and "not a broken conversion" not in template
    f32 = gguf_export.parity_verdict(res("f32", False, False, 0, 0.02))
    assert "greedy tokens differ" in f32 and "not a broken conversion" not in f32
