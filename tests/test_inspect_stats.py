"""inspect --stats equals torch's own statistics (aminmax, mean, std, isfinite, vector_norm) on every layout."""

from __future__ import annotations

import json
import math
import os
import warnings

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from ckpttool import blockstats
from ckpttool.checkpoint import open_checkpoint
from ckpttool.cli import main
from ckpttool.operations.inspect import has_errors, inspect, tensor_stats
from ckpttool.tensors import load_tensor

CUDA_DATA = os.path.join(os.path.dirname(__file__), "data", "cuda")


def _reference(t: torch.Tensor) -> dict:
    """torch's own statistics, in float64 where float32 would round (mean, std, norm)."""
    wide = t.detach().double().reshape(-1)
    finite = torch.isfinite(wide)
    low, high = torch.aminmax(t.detach().float() if t.dtype.is_floating_point else wide)
    with warnings.catch_warnings():  # std of one element is NaN, with a warning
        warnings.simplefilter("ignore")
        std = float(wide.std())
    return {"min": float(low), "max": float(high), "mean": float(wide.mean()), "std": std,
            "l2": float(torch.linalg.vector_norm(wide)), "nan": int(wide.isnan().sum()),
            "inf": int((~finite & ~wide.isnan()).sum()), "zeros": int((wide == 0).sum()), "numel": wide.numel()}


def _check(row: dict, want: dict, label: str, precision: float = 1e-6):
    scale = max(abs(want["min"]), abs(want["max"]), 1e-30) if math.isfinite(want["min"]) else 1.0
    for key in ("nan", "inf", "zeros", "numel"):
        assert row[key] == want[key], (label, key)
    for key in ("min", "max", "mean", "std", "l2"):
        got, expected = row[key], want[key]
        if isinstance(got, str) or not math.isfinite(expected):
            assert str(got) == str(expected), (label, key, got, expected)
            continue
        tolerance = precision * (math.sqrt(want["numel"]) * scale if key == "l2" else scale)
        assert abs(got - expected) <= tolerance, (label, key, got, expected)


DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int8,
          torch.uint8, torch.bool, torch.float8_e4m3fn]


@pytest.mark.parametrize("kind", ["safetensors", "pt"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_dtype_matches_torch(tmp_path, monkeypatch, dtype, kind):
    monkeypatch.setattr(blockstats, "BLOCK_ELEMENTS", 1000)  # "big" spans many blocks, the small ones batch
    gen = torch.Generator().manual_seed(1)
    tensors = {}
    for name, shape in (("big", (37, 101)), ("small", (5, 3)), ("one", (1,)), ("scalar", ())):
        values = torch.randn(shape, generator=gen) * 3 + 1
        tensors[name] = (values > 1) if dtype == torch.bool else values.to(dtype)
    path = tmp_path / f"m.{kind}"
    save_file(tensors, path) if kind == "safetensors" else torch.save(tensors, path)
    rows = {r["name"]: r for r in inspect(str(path), stats=True)["stats"]}
    for name, t in tensors.items():
        _check(rows[name], _reference(t), name)


def test_nan_and_inf_are_counted_and_propagate_as_in_torch(tmp_path):
    t = torch.arange(3000, dtype=torch.float32)
    t[5], t[7], t[9], t[11] = float("nan"), float("inf"), float("-inf"), 0.0
    only_inf = torch.tensor([1.0, float("inf"), 0.0])
    save_file({"t": t, "only_inf": only_inf}, tmp_path / "m.safetensors")
    rows = {r["name"]: r for r in inspect(str(tmp_path / "m.safetensors"), stats=True)["stats"]}
    assert (rows["t"]["nan"], rows["t"]["inf"], rows["t"]["zeros"]) == (1, 2, 2)
    assert rows["t"]["min"] == rows["t"]["max"] == rows["t"]["mean"] == rows["t"]["std"] == "nan"
    assert torch.aminmax(t)[0].isnan() and t.mean().isnan()
    assert rows["only_inf"]["max"] == "inf" and rows["only_inf"]["mean"] == "inf" == str(float(only_inf.mean()))
    assert rows["only_inf"]["std"] == "nan" and only_inf.std().isnan()
    json.dumps(rows, allow_nan=False)  # strict JSON: no NaN literals


HEALTHY = ["safetensors", "torch_state_dict", "torch_training", "torch_legacy", "torch_cuda", "torch_tied", "sharded",
           "sharded_bin", "accelerate", "accelerate_bin", "diffusers", "kohya_state", "simpletuner", "dcp", "family"]


@pytest.mark.parametrize("name", HEALTHY)
def test_every_layout_matches_torch(corpus, name):
    ckpt = open_checkpoint(corpus[name])
    stats = tensor_stats(ckpt)
    infos = {(c.name, t.name): t for c in ckpt.components for t in c.tensors}
    assert stats and len(stats) == len(infos)
    for row in stats:
        _check(row, _reference(load_tensor(infos[(row["component"], row["name"])])), f"{name}:{row['name']}")


def test_chunked_dcp_and_deepspeed_tensors_match_torch(tmp_path):
    deepspeed = os.path.join(os.path.dirname(__file__), "data", "deepspeed", "zero3")
    reference = torch.load(deepspeed + ".reference.pt", weights_only=True)
    rows = {r["name"]: r for r in inspect(deepspeed, stats=True)["stats"] if r["component"] == "model"}
    for key, t in reference.items():
        _check(rows[key], _reference(t), key)


def test_cuda_saved_files_match_torch():
    for name in ("cuda_fp16_weights.pt", "cuda_training.pt"):
        path = os.path.join(CUDA_DATA, name)
        loaded = torch.load(path, map_location="cpu", weights_only=False)
        weights = loaded.get("model", loaded) if isinstance(loaded, dict) else loaded
        rows = {r["name"]: r for r in inspect(path, stats=True)["stats"]}
        checked = 0
        for key, t in weights.items():
            if isinstance(t, torch.Tensor) and key in rows:
                _check(rows[key], _reference(t), f"{name}:{key}")
                checked += 1
        assert checked


@pytest.mark.parametrize("qtype", ["qint8", "qint4", "qint2", "qfloat8"])
def test_quantized_weights_are_dequantized_by_optimum_quanto(corpus, qtype):
    """The reference is the live quanto model the fixture was saved from, dequantized by its own modules."""
    from optimum.quanto import freeze, qfloat8, qint2, qint4, qint8, quantize

    from fixtures.generate import TinyNet

    torch.manual_seed(0)
    model = TinyNet(width=256)
    quantize(model, weights={"qint8": qint8, "qint4": qint4, "qint2": qint2, "qfloat8": qfloat8}[qtype],
             exclude=["embed", "head"])
    freeze(model)
    rows = {r["name"]: r for r in inspect(corpus[f"quanto_{qtype}"], stats=True)["stats"]}
    dequantized = [r for r in rows.values() if r.get("dequantized")]
    assert dequantized and all(r["dequantized"].startswith(qtype) for r in dequantized)  # qfloat8_e4m3fn
    assert not any("._data" in name or "._scale" in name for name in rows)
    for row in dequantized:
        module = model.get_submodule(row["name"].removesuffix(".weight"))
        # two routes to the same dequantization (the live module, the saved keys) round apart by a few ulps
        _check(row, _reference(module.weight.dequantize().detach()), row["name"], precision=1e-5)


def test_cli_table_filter_and_json(corpus):
    runner = CliRunner()
    path = corpus["safetensors"]
    table = runner.invoke(main, ["inspect", "--stats", "--filter", r"\.bias$", path])
    assert table.exit_code == 0 and "Statistics:" in table.stdout and "std" in table.stdout
    names = [t.name for c in open_checkpoint(path).components for t in c.tensors]
    shown = [n for n in names if n in table.stdout]
    assert shown and all(n.endswith(".bias") for n in shown)
    report = json.loads(runner.invoke(main, ["inspect", "--stats", "--json", path]).stdout)
    assert {"component", "name", "dtype", "shape", "numel", "min", "max", "mean", "std", "l2", "nan", "inf",
            "zeros"} <= set(report["stats"][0])
    assert len(report["stats"]) == len(names) and not has_errors(report)
    assert "tensor_list" not in report  # --stats alone lists statistics, not the tensor table
