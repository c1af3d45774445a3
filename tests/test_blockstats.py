"""diff --values statistics streamed in blocks (ckpttool.blockstats) equal a float64 computation with torch."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

from ckpttool import blockstats
from ckpttool.errors import CkptError
from ckpttool.operations.diff import diff

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int8,
          torch.uint8, torch.bool, torch.float8_e4m3fn]


def _pair(dtype, shape, seed):
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        a = torch.rand(shape, generator=gen) > 0.5
        return a, a ^ (torch.rand(shape, generator=gen) > 0.9)
    if not dtype.is_floating_point:
        a = torch.randint(0, 100, shape, generator=gen).to(dtype)
        return a, (a + torch.randint(0, 3, shape, generator=gen)).to(dtype)
    a = torch.randn(shape, generator=gen, dtype=torch.float32)
    return a.to(dtype), (a + 0.01 * torch.randn(shape, generator=gen)).to(dtype)


def _reference(a, b):
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    delta = a - b
    return {"max_abs": float(delta.abs().max()), "rel_l2": float(delta.norm() / b.norm()),
            "cosine": float(a.dot(b) / (a.norm() * b.norm()))}


def _rows(result):
    return {d["key"]: d for d in result.values["close"] + result.values["different"]}


@pytest.fixture(params=["safetensors", "pt"])
def write(request, tmp_path):
    def write(name, tensors):
        path = tmp_path / f"{name}.{request.param}"
        if request.param == "pt":
            torch.save(tensors, path)
        else:
            save_file(tensors, path)
        return str(path)
    return write


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_statistics_equal_float64_reference(write, dtype, monkeypatch):
    monkeypatch.setattr(blockstats, "BLOCK_ELEMENTS", 1000)  # the big tensor spans many blocks, the small ones batch
    tensors = {name: _pair(dtype, shape, seed) for seed, (name, shape) in
               enumerate([("big", (37, 101)), ("small.0", (7,)), ("small.1", (3, 5)), ("scalar", ())])}
    a = write("a", {k: v[0] for k, v in tensors.items()})
    b = write("b", {k: v[1] for k, v in tensors.items()})
    result = diff(a, b, values=True)
    rows = _rows(result)
    for name, (ta, tb) in tensors.items():
        if torch.equal(ta, tb):
            assert name not in rows
            continue
        want, got = _reference(ta, tb), rows[name]
        assert got["max_abs"] == pytest.approx(want["max_abs"], rel=1e-6), name
        assert got["rel_l2"] == pytest.approx(want["rel_l2"], rel=1e-6), name
        assert got["cosine"] == pytest.approx(want["cosine"], abs=1e-7), name
    assert result.values["equal"] + len(rows) == len(tensors)


def test_identical_and_signed_zero_are_equal_nan_is_different(write):
    base = torch.arange(3000, dtype=torch.float32)
    neg_zero, nan = torch.zeros(5), base.clone()
    nan[1234] = float("nan")
    a = write("a", {"same": base, "zero": torch.zeros(5), "nan": base.clone(), "nan_both": nan})
    b = write("b", {"same": base.clone(), "zero": -neg_zero, "nan": nan, "nan_both": nan.clone()})
    values = diff(a, b, values=True).values
    assert [d["key"] for d in values["different"]] == ["nan"]
    assert math.isnan(values["different"][0]["max_abs"])
    # identical bytes count as equal even where they hold NaN; torch.equal would not say so, the hash never did
    assert values["equal"] == 3 and values["close"] == []


@pytest.mark.parametrize("atol,rtol", [(0.05, 0.0), (0.0, 0.05), (1e-4, 1e-4), (0.0, 0.0)])
def test_tolerance_splits_close_from_different(write, atol, rtol):
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(4000, generator=gen) + 3.0
    tensors = {f"t{i}": base + scale * torch.randn(4000, generator=gen) for i, scale in enumerate([1e-5, 1e-3, 0.1])}
    a = write("a", {k: base.clone() for k in tensors})
    b = write("b", tensors)
    values = diff(a, b, values=True, atol=atol, rtol=rtol).values
    close = {d["key"] for d in values["close"]}
    want = {k for k, t in tensors.items() if bool(((base - t).abs() <= atol + rtol * t.abs()).all())}
    assert close == want
    assert {d["key"] for d in values["different"]} == set(tensors) - want


def test_strided_views_are_measured_through_torch(tmp_path):
    a = torch.randn(40, 30)
    b = a + 0.1
    torch.save({"t": a.t()}, tmp_path / "a.pt")  # a transposed view: not one contiguous run of bytes
    torch.save({"t": b.t().contiguous()}, tmp_path / "b.pt")
    rows = _rows(diff(str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), values=True))
    want = _reference(a.t(), b.t())
    assert rows["t"]["rel_l2"] == pytest.approx(want["rel_l2"], rel=1e-6)
    assert rows["t"]["cosine"] == pytest.approx(want["cosine"], abs=1e-7)


def test_truncated_file_is_refused(tmp_path):
    save_file({"t": torch.randn(5000)}, tmp_path / "a.safetensors")
    save_file({"t": torch.randn(5000)}, tmp_path / "b.safetensors")
    data = (tmp_path / "b.safetensors").read_bytes()
    (tmp_path / "b.safetensors").write_bytes(data[:-100])
    with pytest.raises(CkptError) as e:
        diff(str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), values=True)
    assert e.value.code == "truncated"
