"""The trainer's CUDA path (autocast, GradScaler, CUDA RNG restore): runs where a GPU is, skips cleanly elsewhere."""

import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

ARGS = ["--max-steps", "12", "--checkpointing-steps", "4", "--device", "cuda"]


def train(out, *extra, fault=""):
    return subprocess.run([sys.executable, "-m", "trainer", "--output-dir", str(out), *ARGS, *extra],
                          capture_output=True, text=True, env=dict(os.environ, TRAINER_FAULT=fault), timeout=300)


@pytest.mark.parametrize("precision", ["no", "bf16", "fp16"])
def test_cuda_resume_is_bit_exact(tmp_path, precision):
    base = train(tmp_path / "base", "--mixed-precision", precision)
    assert base.returncode == 0, base.stderr
    killed = train(tmp_path / "run", "--mixed-precision", precision, fault="mid-save:8")
    assert killed.returncode == -signal.SIGKILL
    resumed = train(tmp_path / "run", "--mixed-precision", precision, "--resume-from-checkpoint", "latest")
    assert resumed.returncode == 0, resumed.stderr
    rng = torch.load(tmp_path / "base" / "checkpoint-12" / "random_states_0.pkl", weights_only=False)
    assert "torch_cuda_manual_seed" in rng
    if precision == "fp16":
        assert (tmp_path / "run" / "checkpoint-12" / "scaler.pt").exists()
    a = load_file(tmp_path / "base" / "checkpoint-12" / "model.safetensors")
    b = load_file(tmp_path / "run" / "checkpoint-12" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
