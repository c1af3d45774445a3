import json
import os

import pytest
import torch
from safetensors.torch import load_file

from fixtures.generate import TinyNet, _trained
from tests.helpers import cli, copy


def convert_ok(*args):
    result, out = cli("convert", "--json", *args)
    assert result.exit_code == 0, result.output
    assert out["verified_tensors"] == out["tensors"]
    return out


@pytest.mark.parametrize("fixture", ["torch_state_dict", "torch_training", "torch_legacy", "torch_cuda", "sharded",
                                     "sharded_bin", "accelerate", "accelerate_bin", "diffusers", "kohya_state",
                                     "simpletuner", "dcp", "fsdp", "family", "quanto_qint4", "diffusers_lora"])
def test_every_layout_to_safetensors_and_pt(corpus, tmp_path, fixture):
    from ckpttool.checkpoint import open_checkpoint
    from ckpttool.tensors import load_tensor
    component = {"diffusers": "unet", "diffusers_lora": "lora"}.get(fixture, "model")
    source = {t.name: t for t in open_checkpoint(corpus[fixture]).component(component).tensors}
    st = tmp_path / "out.safetensors"
    convert_ok(corpus[fixture], st)
    written = load_file(st)
    assert sorted(written) == sorted(source)
    assert all(torch.equal(written[k], load_tensor(t)) for k, t in source.items())
    pt = tmp_path / "out.pt"
    convert_ok(corpus[fixture], pt, "--component", component)
    loaded = torch.load(pt, weights_only=True)
    assert sorted(loaded) == sorted(written)
    assert all(torch.equal(loaded[k], written[k]) for k in written)


def test_metadata_carried_into_safetensors(corpus, tmp_path):
    out = tmp_path / "o.safetensors"
    convert_ok(corpus["torch_training"], out)
    from safetensors import safe_open
    with safe_open(out, "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt" and meta["step"] == "3" and meta["source"] == "training.pt"


def test_round_trips_are_bit_exact(corpus, tmp_path):
    src = corpus["torch_state_dict"]
    convert_ok(src, tmp_path / "a.safetensors")
    convert_ok(tmp_path / "a.safetensors", tmp_path / "b.pt")
    convert_ok(tmp_path / "b.pt", tmp_path / "shards", "--shard-size", "3KB")
    convert_ok(tmp_path / "shards", tmp_path / "c.safetensors")
    original = torch.load(src, weights_only=True)
    final = load_file(tmp_path / "c.safetensors")
    assert all(torch.equal(original[k], final[k]) for k in original)
    index = json.load(open(tmp_path / "shards" / "model.safetensors.index.json"))
    assert len(set(index["weight_map"].values())) > 1
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in original.values())


def test_tied_weights(corpus, tmp_path):
    tied = torch.load(corpus["torch_tied"], weights_only=True)
    assert tied["embed.weight"].data_ptr() == tied["head.weight"].data_ptr()
    convert_ok(corpus["torch_tied"], tmp_path / "t.safetensors")
    st = load_file(tmp_path / "t.safetensors")
    assert torch.equal(st["embed.weight"], st["head.weight"])
    model = TinyNet(tied=True)
    model.load_state_dict(st, strict=True)
    convert_ok(corpus["torch_tied"], tmp_path / "t.pt")
    pt = torch.load(tmp_path / "t.pt", weights_only=True)
    assert pt["embed.weight"].data_ptr() == pt["head.weight"].data_ptr()  # still one storage


def test_views_and_non_contiguous_materialised(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    torch.save({"t": base.t(), "slice": base[1:3, 2:5], "whole": base}, tmp_path / "v.pt")
    convert_ok(tmp_path / "v.pt", tmp_path / "v.safetensors")
    st = load_file(tmp_path / "v.safetensors")
    assert torch.equal(st["t"], base.t()) and torch.equal(st["slice"], base[1:3, 2:5])


def test_dtype_cast_only_floating_weights(corpus, tmp_path):
    out = convert_ok(corpus["torch_training"], tmp_path / "bf.pt", "--dtype", "bf16")
    assert out["dtype"] == "bfloat16"
    loaded = torch.load(tmp_path / "bf.pt", weights_only=True)
    assert loaded["model"]["linear_1.weight"].dtype == torch.bfloat16
    assert loaded["optimizer"]["state"][0]["exp_avg"].dtype == torch.float32  # optimizer keeps its precision
    torch.save({"w": torch.ones(2), "idx": torch.arange(3)}, tmp_path / "mixed.pt")
    convert_ok(tmp_path / "mixed.pt", tmp_path / "mixed.safetensors", "--dtype", "fp16")
    st = load_file(tmp_path / "mixed.safetensors")
    assert st["w"].dtype == torch.float16 and st["idx"].dtype == torch.int64


def test_training_dict_to_accelerate_dir_resumes_with_real_accelerator(tmp_path):
    from accelerate import Accelerator
    model, opt, sched = _trained(steps=4)
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "lr_scheduler": sched.state_dict(),
                "global_step": 4, "epoch": 0}, tmp_path / "train.pt")
    out = tmp_path / "checkpoint-4"
    convert_ok(tmp_path / "train.pt", out, "--to", "accelerate")
    assert json.load(open(out / "training_state.json"))["global_step"] == 4
    accelerator = Accelerator(cpu=True)
    fresh, fresh_opt, fresh_sched = _trained(steps=0)
    fresh, fresh_opt, fresh_sched = accelerator.prepare(fresh, fresh_opt, fresh_sched)
    accelerator.load_state(str(out))
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    assert fresh_opt.state_dict()["state"][0]["step"] == 4
    assert fresh_sched.scheduler.last_epoch == 4
    _, report = cli("verify", "--json", "--for-resume", out)
    assert report["step"] == 4 and "step_mismatch" not in {p["code"] for p in report["problems"]}


def test_accelerate_dir_to_pt_and_back_keeps_every_part(corpus, tmp_path):
    out = convert_ok(corpus["accelerate"], tmp_path / "all.pt")
    assert out["components"] == ["model", "optimizer", "scheduler", "random_states_0", "custom_checkpoint_0"]
    import numpy as np
    loaded = torch.load(tmp_path / "all.pt", weights_only=False)
    original = torch.load(os.path.join(corpus["accelerate"], "random_states_0.pkl"), weights_only=False)
    assert np.array_equal(loaded["random_states_0"]["numpy_random_seed"][1], original["numpy_random_seed"][1])
    assert loaded["global_step"] == 3 and loaded["custom_checkpoint_0"] == {"epoch": 1}
    convert_ok(tmp_path / "all.pt", tmp_path / "again", "--to", "accelerate")
    for name in ("model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl",
                 "custom_checkpoint_0.pkl"):
        assert (tmp_path / "again" / name).exists(), name
    assert cli("diff", "--values", "--component", "optimizer", corpus["accelerate"], tmp_path / "again")[0].exit_code == 0


def test_to_dcp_loads_with_torch_distributed_checkpoint(corpus, tmp_path):
    out = tmp_path / "dcp"
    convert_ok(corpus["torch_training"], out, "--to", "dcp")
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    dcp_to_torch_save(str(out), str(tmp_path / "back.pt"))
    back = torch.load(tmp_path / "back.pt", weights_only=False)
    original = torch.load(corpus["torch_training"], weights_only=True)
    assert all(torch.equal(back["model"][k], v) for k, v in original["model_state_dict"].items())
    assert back["step"] == 3


def test_failures_leave_no_output(corpus, tmp_path):
    for fixture in ("safetensors_truncated", "torch_truncated", "sharded_missing", "diffusers_truncated_newest"):
        out = tmp_path / f"{fixture}.safetensors"
        result, _ = cli("convert", corpus[fixture], out)
        assert result.exit_code == 1 and "Traceback" not in result.output, fixture
        assert not out.exists()
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]
    out = tmp_path / "exists.safetensors"
    out.write_bytes(b"old")
    assert cli("convert", corpus["safetensors"], out)[0].exit_code == 2 and out.read_bytes() == b"old"
    assert cli("convert", "--force", corpus["safetensors"], out)[0].exit_code == 0
    assert cli("convert", corpus["safetensors"], tmp_path / "noext")[0].exit_code == 2
    assert cli("convert", corpus["safetensors"], tmp_path / "x.safetensors", "--shard-size", "lots")[0].exit_code == 2
    model, opt, _ = _trained(1)
    state = opt.state_dict()
    state["param_groups"][0]["config"] = OwnConfig()  # a class of the user's own: never rebuilt
    torch.save({"model": model.state_dict(), "optimizer": state}, tmp_path / "own.pt")
    result, _ = cli("convert", tmp_path / "own.pt", tmp_path / "own_out.pt")
    assert result.exit_code == 1 and "unsafe_pickle" in result.stderr and "OwnConfig" in result.stderr
    assert not (tmp_path / "own_out.pt").exists()
    assert cli("convert", "--component", "model", tmp_path / "own.pt", tmp_path / "w.pt")[0].exit_code == 0


class OwnConfig:
    """A training script's own class, pickled with its instances."""


def test_convert_to_pt_writes_inert_objects_as_data_weights_only_loads(tmp_path):
    """A Namespace, paths, numpy scalars and dtypes, datetimes and durations, at the top level or inside a part,
    become the plain data torch.load(weights_only=True) takes, and the output says so."""
    import argparse
    import datetime
    import pathlib

    import numpy as np

    model, opt, _ = _trained(1)
    state = opt.state_dict()
    state["param_groups"][0]["lr"] = np.float64(0.001)
    torch.save({"model": model.state_dict(), "optimizer": state, "epoch": 2, "global_step": 7,
                "args": argparse.Namespace(lr=0.1, out=pathlib.PurePosixPath("/runs/a"), seed=np.int64(3),
                                           dtype=np.dtype("float32")),
                "best": np.float32(0.5), "elapsed": datetime.timedelta(minutes=2),
                "started": datetime.datetime(2026, 1, 2, 3, 4, 5)}, tmp_path / "train.pt")
    result, _ = cli("convert", tmp_path / "train.pt", tmp_path / "out.pt")
    assert result.exit_code == 0, result.output
    assert "weights_only=True" in result.output and "args: argparse.Namespace as a dict" in result.output
    assert "kept as they were" not in result.output
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    assert out["args"] == {"lr": 0.1, "out": "/runs/a", "seed": 3, "dtype": "f4"}
    assert out["best"] == 0.5 and out["elapsed"] == 120.0 and out["started"] == "2026-01-02T03:04:05"
    assert out["epoch"] == 2 and out["global_step"] == 7
    assert out["optimizer"]["param_groups"][0]["lr"] == 0.001 and type(out["optimizer"]["param_groups"][0]["lr"]) \
        is float
    assert all(torch.equal(out["model"][k], v) for k, v in model.state_dict().items())


def test_input_never_modified(corpus, tmp_path):
    src = copy(corpus["accelerate"], tmp_path)
    before = {f: open(os.path.join(src, f), "rb").read() for f in os.listdir(src)}
    convert_ok(src, tmp_path / "o.pt")
    assert {f: open(os.path.join(src, f), "rb").read() for f in os.listdir(src)} == before


def test_parts_an_accelerate_dir_cannot_hold_are_refused(corpus, tmp_path):
    result, _ = cli("convert", corpus["family"], tmp_path / "acc", "--to", "accelerate")
    assert result.exit_code == 2 and "target_model" in result.stderr and "--component" in result.stderr
    assert os.listdir(tmp_path) == []
    out = convert_ok(corpus["family"], tmp_path / "family.pt")  # a .pt keeps every part
    assert out["components"] == ["model", "ema_0.9999", "opt", "target_model"]


def test_safetensors_to_pt_of_every_dtype_copies_bytes_without_torch(tmp_path):
    """The archive is written without importing torch (tensor bytes copied file to file) and names the globals
    torch.save names, so weights_only loads it: float8 (an untyped storage), bool, bf16, int64, a 0-d tensor."""
    import subprocess
    import sys

    from safetensors.torch import save_file

    state = {"f8": torch.randn(4, 4).to(torch.float8_e4m3fn), "b": torch.tensor([True, False]),
             "bf": torch.randn(3).bfloat16(), "i": torch.arange(5), "scalar": torch.tensor(3.0)}
    save_file(state, tmp_path / "in.safetensors")
    code = ("import sys; from ckpttool.operations.convert import convert; convert(sys.argv[1], sys.argv[2], "
            "verify=False); assert 'torch' not in sys.modules, 'torch imported'")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "in.safetensors"), str(tmp_path / "out.pt")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for mmap in (False, True):
        loaded = torch.load(tmp_path / "out.pt", weights_only=True, mmap=mmap)
        assert loaded.keys() == state.keys()
        for key, value in state.items():
            assert loaded[key].dtype == value.dtype and loaded[key].shape == value.shape
            assert torch.equal(loaded[key].view(torch.uint8), value.view(torch.uint8)) if value.dim() else \
                torch.equal(loaded[key], value)
