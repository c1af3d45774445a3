"""Real CUDA-saved checkpoints (made on a GPU by fixtures/cuda_samples.py, committed: a few KB) read on a CPU box."""

import os

import torch
from safetensors.torch import load_file

from ckpttool.checkpoint import open_checkpoint
from ckpttool.tensors import load_tensor
from tests.helpers import cli

DATA = os.path.join(os.path.dirname(__file__), "data", "cuda")


def test_cuda_training_dict_reads_on_cpu():
    path = os.path.join(DATA, "cuda_training.pt")
    ckpt = open_checkpoint(path)
    assert "cuda:0" in ckpt.metadata["saved_on_devices"]
    assert {c.name: c.role for c in ckpt.components} == {"model": "model", "optimizer": "optimizer",
                                                        "scaler": "scaler"}
    expected = torch.load(path, map_location="cpu", weights_only=True)
    for t in ckpt.model.tensors:
        assert torch.equal(load_tensor(t), expected["model"][t.name])


def test_cuda_fp16_weights_convert(tmp_path):
    path = os.path.join(DATA, "cuda_fp16_weights.pt")
    result, _ = cli("convert", path, tmp_path / "w.safetensors")
    assert result.exit_code == 0, result.output
    expected = torch.load(path, map_location="cpu", weights_only=True)
    written = load_file(tmp_path / "w.safetensors")
    assert all(written[k].dtype == torch.float16 and torch.equal(written[k], v) for k, v in expected.items())


def test_accelerate_fp16_dir_with_scaler(tmp_path):
    path = os.path.join(DATA, "accelerate_fp16")
    result, report = cli("verify", "--json", path)
    assert result.exit_code == 0, report
    result, out = cli("convert", "--json", path, tmp_path / "all.pt")
    assert result.exit_code == 0, result.output
    assert "scaler" in out["components"]
    loaded = torch.load(tmp_path / "all.pt", weights_only=False)
    assert loaded["scaler"] == torch.load(os.path.join(path, "scaler.pt"), weights_only=True)
    assert "torch_cuda_manual_seed" in loaded["random_states_0"]
