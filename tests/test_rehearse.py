"""The GPU rehearsal's CPU part (python -m medkit.rehearse --dry-run), run in CI."""
import copy
import subprocess
import sys

import pytest

from conftest import REPO
from medkit import config, rehearse


def test_dry_run_command_builds_meta_models_and_prints_the_plan():
    proc = subprocess.run([sys.executable, "-m", "medkit.rehearse", "--profile", "colab-t4", "--dry-run"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = proc.stdout
    assert "budget 15 GiB, dtype float16" in out
    assert "| deepseek-ai/DeepSeek-R1-Distill-Llama-8B | 8,030.3 M |" in out  # built on the meta device
    assert "| colab-t4 | 05_r1_cot_unsloth | cot: 4-bit training |" in out
    assert "steps fit" in out and "DOES NOT FIT" not in out


def test_dry_run_fails_naming_the_step_that_does_not_fit(monkeypatch, capsys):
    profiles = copy.deepcopy(config.PROFILES)
    profiles["colab-t4"]["stages"]["cot"].update(batch_size=8, seq_len=4096)  # 8 × 4096 tokens on a T4
    monkeypatch.setattr(config, "PROFILES", profiles)
    assert rehearse.main(["--profile", "colab-t4", "--dry-run"]) == 1
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("DOES NOT FIT"))
    assert "cot: 4-bit training" in line and "of 15 GiB" in line and "logits" in line


def test_gpu_rehearsal_refuses_without_a_gpu(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the rehearsal would run")
    assert rehearse.run_gpu("gpu-24gb", tmp_path) == 2
    assert "no CUDA GPU" in capsys.readouterr().err
    assert rehearse.main(["--profile", "gpu-24gb", "--workdir", str(tmp_path)]) == 2
