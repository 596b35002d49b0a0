"""Colab set-up, run by each notebook's first cell (standard library only: it runs before
``medkit`` is installed, through ``runpy.run_path``).

- Colab's own torch is kept: the course pins torch only in the ``cpu`` extra, and the install
  runs with a constraint that holds the installed torch at its version.
- llama.cpp (``serve`` extra) is installed only by 09, which needs it, from prebuilt wheels where
  they exist; Unsloth (``gpu`` extra, 05) and vLLM (``vllm`` extra, 09) only on a GPU runtime.
- Safe to run twice: a stamp in the clone records what was installed; a second run installs
  nothing new. When the install changed a package this Python has already imported, or the
  fresh editable install is not importable yet, it stops with :class:`RestartNeeded`, which tells
  the learner to restart the runtime and run the notebook again.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.metadata as md
import importlib.util
import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

STAMP = ".colab-install.json"
GPU_ONLY = ("gpu", "vllm")  # extras that make sense only with an NVIDIA GPU
LLAMA_CPP_WHEELS = "https://abetlen.github.io/llama-cpp-python/whl/cpu"  # prebuilt CPU wheels
RESTART = ("Restart needed: the install changed {what}. Use Runtime > Restart session, then run the "
           "notebook again (this cell will not install again).")


class RestartNeeded(RuntimeError):
    """The runtime must restart before the course can be imported."""


def has_gpu() -> bool:
    return shutil.which("nvidia-smi") is not None


def loaded_versions() -> dict[str, str]:
    """Versions of the installed distributions whose modules this Python has imported."""
    top = {m.split(".")[0] for m in list(sys.modules)}
    out = {}
    for dist, mods in _packages().items():
        if top & set(mods):
            try:
                out[dist] = md.version(dist)
            except md.PackageNotFoundError:
                pass
    return out


def _packages() -> dict[str, list[str]]:
    inverted: dict[str, list[str]] = {}
    for mod, dists in md.packages_distributions().items():
        for d in dists:
            inverted.setdefault(d, []).append(mod)
    return inverted


def install_command(home: str, extras: list[str], constraint: str | None, python: str = sys.executable) -> list[str]:
    target = f"{home}[{','.join(extras)}]" if extras else home
    cmd = [python, "-m", "pip", "install", "-q", "--prefer-binary", "-e", target]
    if constraint:
        cmd += ["-c", constraint]
    if "serve" in extras:  # llama-cpp-python: a prebuilt wheel where one exists, else it compiles
        cmd += ["--extra-index-url", LLAMA_CPP_WHEELS]
    return cmd


def _fingerprint(home: Path) -> str:
    return hashlib.sha256((home / "pyproject.toml").read_bytes()).hexdigest()[:16]


def setup(home: str = "/content/medkit", extras: list[str] | tuple[str, ...] = (), gpu: bool | None = None,
          quiet: bool = False) -> dict:
    """Install the course into this Colab runtime (see the module docstring); returns what it did."""
    home_p = Path(home)
    gpu = has_gpu() if gpu is None else gpu
    wanted = sorted(e for e in extras if gpu or e not in GPU_ONLY)
    skipped = sorted(set(extras) - set(wanted))
    stamp_p = home_p / STAMP
    stamp = json.loads(stamp_p.read_text()) if stamp_p.exists() else {}
    report = {"extras": wanted, "skipped_without_gpu": skipped, "installed": False, "gpu": gpu}
    if stamp.get("restart_pid") == os.getpid():  # installed by this very process: still not restarted
        raise RestartNeeded(RESTART.format(what=stamp.get("changed") or "the environment"))
    done = set(stamp.get("extras", [])) if stamp.get("pyproject") == _fingerprint(home_p) else None
    if done is None or not set(wanted) <= done:
        before = loaded_versions()
        constraint = None
        if "vllm" not in wanted:  # vLLM brings the torch it was built for; nothing else may change it
            try:
                constraint = str(home_p / ".colab-constraints.txt")
                Path(constraint).write_text(f"torch=={md.version('torch')}\n")
            except md.PackageNotFoundError:
                constraint = None
        subprocess.run(install_command(home, wanted, constraint), check=True)
        report["installed"] = True
        after = loaded_versions()
        changed = sorted(d for d, v in before.items() if after.get(d, v) != v)
        importlib.invalidate_caches()
        for d in site.getsitepackages():  # pick up the editable install's .pth without a restart
            site.addsitedir(d)
        importable = importlib.util.find_spec("medkit") is not None
        what = ", ".join(changed) if changed else ("medkit (not importable yet)" if not importable else "")
        new = {"extras": sorted(set(wanted) | (done or set())), "pyproject": _fingerprint(home_p)}
        if what:
            new.update(restart_pid=os.getpid(), changed=what)
        stamp_p.write_text(json.dumps(new) + "\n")
        if what:
            raise RestartNeeded(RESTART.format(what=what))
    if not quiet:
        msg = f"medkit ready on Colab (extras: {', '.join(wanted) or 'none'})"
        if skipped:
            msg += f"; no GPU in this runtime, so not installed: {', '.join(skipped)} (Runtime > Change runtime type)"
        print(msg)
    return report
