import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


# the tiny-model settings the unit tests build their throwaway bases with (seconds, not minutes)
SMALL_TINY = dict(vocab_size=1024, pretrain_steps=30, pretrain_seq_len=64, pretrain_batch=8, lr=5e-3,
                  families={})  # no per-family budgets: every throwaway base trains 30 steps


@pytest.fixture(scope="session")
def kbase():
    from medkit import kb

    return kb.load()


@pytest.fixture
def out_root(tmp_path, monkeypatch):
    """A private MEDKIT_OUTPUT_DIR so tests never touch the course's outputs/."""
    root = tmp_path / "outputs"
    monkeypatch.setenv("MEDKIT_OUTPUT_DIR", str(root))
    return root


@pytest.fixture(scope="session")
def shared_data():
    """../shared/data (real public datasets), or skip."""
    from medkit import paths

    d = paths.shared_data_dir()
    if d is None:
        pytest.skip("../shared/data is absent")
    return d


def pytest_configure(config):
    os.environ.setdefault("MPLBACKEND", "Agg")
