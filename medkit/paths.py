"""Where things live: the repository's data/, and every output under one configurable root."""
from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def repo_root() -> Path:
    """The course checkout (the folder holding pyproject.toml), or the current folder."""
    candidate = PACKAGE_DIR.parent
    if (candidate / "pyproject.toml").exists():
        return candidate
    return Path.cwd()


def data_dir() -> Path:
    """The course's own data (the knowledge base written for this course)."""
    return Path(os.environ.get("MEDKIT_DATA_DIR", repo_root() / "data"))


def output_root() -> Path:
    """All artifacts go under this root: ``$MEDKIT_OUTPUT_DIR`` or ``<repo>/outputs``."""
    return Path(os.environ.get("MEDKIT_OUTPUT_DIR", repo_root() / "outputs"))


def cache_dir() -> Path:
    """Content-addressed cache shared by runs (tiny models keyed by corpus + config hash)."""
    path = output_root() / "cache"
    path.mkdir(parents=True, exist_ok=True)
    return path


def shared_data_dir() -> Path | None:
    """``../shared/data`` beside the checkout (real public datasets), or None when absent."""
    env = os.environ.get("MEDKIT_SHARED_DATA")
    path = Path(env) if env else repo_root().parent / "shared" / "data"
    return path if path.is_dir() else None
