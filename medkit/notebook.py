"""What every notebook does first and last: set up its run folder, print the environment,
seed everything, and record its metrics through one helper."""
from __future__ import annotations

import importlib.metadata as md
import os
import platform
import random
import signal
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import artifacts, config, paths, report

_VERSIONED = ["medkit", "torch", "transformers", "trl", "peft", "datasets", "accelerate", "tokenizers"]


def in_colab() -> bool:
    return "COLAB_RELEASE_TAG" in os.environ or "google.colab" in str(os.environ.get("PYTHONPATH", ""))


def headless() -> bool:
    """True under the papermill runner (or CI): widgets then play a scripted transcript."""
    return os.environ.get("MEDKIT_HEADLESS") == "1" or os.environ.get("CI") == "true"


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "not installed"
    return out


def show_environment() -> dict[str, str]:
    """Print the library versions and the device this notebook will use; return them."""
    import torch

    v = versions()
    device = config.detect_device("auto")
    v.update(device=device, dtype=config.pick_dtype(device), threads=str(torch.get_num_threads()),
             cpu_bf16=str(config.cpu_has_native_bf16()),
             colab=str(in_colab()), headless=str(headless()))
    print(" | ".join(f"{k} {val}" for k, val in v.items()))
    return v


def set_seed(seed: int) -> None:
    random.seed(seed)
    try:
        import numpy as np
        np.random.seed(seed)
    except ImportError:
        pass
    import torch
    torch.manual_seed(seed)


@dataclass
class Session:
    """One notebook's run: its name, profile, seed and folder (``<run_dir>/<name>``)."""

    name: str
    profile: str
    seed: int
    run_dir: Path
    cfg: dict[str, Any] = field(repr=False, default_factory=dict)

    @property
    def dir(self) -> Path:
        d = self.run_dir / self.name
        d.mkdir(parents=True, exist_ok=True)
        return d

    def stage(self, stage: str, **overrides: Any) -> dict[str, Any]:
        """The resolved config of one stage on this session's profile."""
        return config.resolve(self.profile, stage, **overrides)

    def record(self, metrics: dict[str, Any] | None = None, **more: Any) -> dict[str, Any]:
        """Record metrics (dotted keys) into this notebook's ``metrics.json``."""
        merged = dict(metrics or {})
        merged.update(more)
        return report.record(merged, self.dir)

    def savefig(self, fig, name: str) -> Path:
        return report.save_figure(fig, self.dir / "plots", name)

    def put(self, name: str, path: str | Path, **meta: Any) -> Path:
        return artifacts.put(name, path, self.run_dir, profile=self.profile, notebook=self.name, **meta)

    def get(self, name: str) -> Path:
        return artifacts.get(name, self.run_dir, profile=self.profile)


THREAD_CONTROL_ENV = "MEDKIT_THREAD_CONTROL"


def thread_control_pid(control: Path) -> Path:
    """Where a kernel that follows ``control`` writes its pid (the runner signals only that pid)."""
    return control.with_name(control.name + ".pid")


def follow_thread_control() -> bool:
    """Under ``medkit.run --jobs`` a notebook that shares the cores starts with its share of the
    compute threads; when its partner finishes, the runner gives the idle cores back. It writes
    the new count to the file named by ``MEDKIT_THREAD_CONTROL`` and sends SIGUSR1. Python runs
    the handler in the kernel's main thread between two bytecodes (never inside a matrix
    multiply), where ``torch.set_num_threads`` applies to everything that runs next. The handler
    is installed here, then ``<file>.pid`` says so, and a count written before that is applied at
    once. Returns False where there is nothing to follow (no runner, no SIGUSR1 on Windows, or
    not the main thread)."""
    path = os.environ.get(THREAD_CONTROL_ENV)
    if not path or not hasattr(signal, "SIGUSR1") or threading.current_thread() is not threading.main_thread():
        return False
    control = Path(path)

    def apply(*_: Any) -> None:
        try:
            n = int(control.read_text().strip())
        except (OSError, ValueError):  # not written yet, or being written: the next signal brings it
            return
        if n < 1:
            return
        if "torch" in sys.modules:
            import torch

            if torch.get_num_threads() != n:
                torch.set_num_threads(n)
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(n)  # for what loads later

    signal.signal(signal.SIGUSR1, apply)
    thread_control_pid(control).write_text(str(os.getpid()))
    apply()
    return True


def start(name: str, profile: str = config.DEFAULT_PROFILE, seed: int = 0,
          output_dir: str | os.PathLike | None = None, quiet: bool = False) -> Session:
    """Begin a notebook: resolve the profile, seed, create ``<output_dir>/<name>/`` and print
    the versions and device. ``output_dir`` empty means ``outputs/runs/interactive``."""
    run_dir = Path(output_dir) if output_dir else paths.output_root() / "runs" / "interactive"
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = config.resolve(profile)
    set_seed(seed)
    follow_thread_control()
    session = Session(name=name, profile=profile, seed=seed, run_dir=run_dir.resolve(), cfg=cfg)
    config.save_config({k: v for k, v in cfg.items()} | {"seed": seed, "notebook": name}, session.dir)
    if not quiet:
        print(f"{name}: profile={profile} ({cfg['memory_budget']}) device={cfg['device']} "
              f"dtype={cfg['dtype']} seed={seed}\noutputs -> {session.dir}")
    return session
