"""ckpttool average: uniform, weighted and EMA averages equal the float64 computation rounded to each dtype."""

from __future__ import annotations

import json
import os

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from ckpttool.cli import main
from ckpttool.errors import CkptError, UsageError
from ckpttool.operations.average import average, ema_weights


def _state(seed, prefix=""):
    gen = torch.Generator().manual_seed(seed)
    return {f"{prefix}linear.weight": torch.randn(33, 17, generator=gen),
            f"{prefix}linear.bias": torch.randn(17, generator=gen).to(torch.bfloat16),
            f"{prefix}norm.weight": torch.randn(17, generator=gen).to(torch.float16),
            f"{prefix}norm.num_batches_tracked": torch.tensor(100 + seed)}


def _write(tmp_path, name, state, step=None):
    path = tmp_path / name
    if name.endswith(".safetensors"):
        save_file(state, path)
    else:
        torch.save({"model": state, "global_step": step} if step is not None else state, path)
    return str(path)


def _load(path):
    return load_file(path) if path.endswith(".safetensors") else torch.load(path, weights_only=True)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_copies_of_one_checkpoint_average_to_it_bit_for_bit(tmp_path, suffix):
    src = _write(tmp_path, "a.safetensors", _state(0))
    out = str(tmp_path / f"out{suffix}")
    average([src] * 5, out)
    got, want = _load(out), _state(0)
    assert set(got) == set(want)
    for key in want:
        bits = [t.reshape(-1).view(torch.uint8) for t in (got[key], want[key])]
        assert got[key].dtype == want[key].dtype and torch.equal(*bits), key


def test_different_checkpoints_give_the_float64_mean_rounded(tmp_path):
    states = [_state(s) for s in range(3)]
    paths = [_write(tmp_path, f"{i}.safetensors", s) for i, s in enumerate(states)]
    paths[1] = _write(tmp_path, "1.pt", states[1])  # formats may differ
    out = str(tmp_path / "mean.safetensors")
    result = average(paths, out)
    got = load_file(out)
    for key in ("linear.weight", "linear.bias", "norm.weight"):
        want = torch.stack([s[key].double() for s in states]).mean(0).to(states[0][key].dtype)
        assert torch.equal(got[key], want), key
    assert result["taken_from_newest"] == ["norm.num_batches_tracked"] and result["averaged"] == 3
    assert torch.equal(got["norm.num_batches_tracked"], states[2]["norm.num_batches_tracked"])


def test_weighted_average(tmp_path):
    states = [_state(s) for s in range(3)]
    paths = [_write(tmp_path, f"{i}.safetensors", s) for i, s in enumerate(states)]
    out = str(tmp_path / "w.safetensors")
    result = average(paths, out, weights=[1, 2, 5])
    want = (states[0]["linear.weight"].double() + 2 * states[1]["linear.weight"].double()
            + 5 * states[2]["linear.weight"].double()) / 8
    assert torch.equal(load_file(out)["linear.weight"], want.float())
    assert [s["weight"] for s in result["sources"]] == [1 / 8, 2 / 8, 5 / 8]


def test_ema_follows_step_order(tmp_path):
    states = {step: _state(step) for step in (300, 100, 200)}
    paths = [_write(tmp_path, f"step{step}.pt", state, step) for step, state in states.items()]
    out = str(tmp_path / "ema.safetensors")
    result = average(paths, out, ema=0.9)
    ema = states[100]["linear.weight"].double()
    for step in (200, 300):
        ema = 0.9 * ema + 0.1 * states[step]["linear.weight"].double()
    assert torch.allclose(load_file(out)["linear.weight"].double(), ema, rtol=0, atol=1e-6)
    assert [s["step"] for s in result["sources"]] == [100, 200, 300] and result["newest"].endswith("step300.pt")
    assert sum(ema_weights(5, 0.99)) == pytest.approx(1.0)


def test_wrapper_prefixes_are_aligned_and_named_as_the_newest(tmp_path):
    a = _write(tmp_path, "a.safetensors", _state(0, prefix="module."))
    b = _write(tmp_path, "b.safetensors", _state(1, prefix="_orig_mod."))
    out = str(tmp_path / "out.safetensors")
    result = average([a, b], out)
    assert set(load_file(out)) == set(_state(1, prefix="_orig_mod."))
    assert result["normalization"]


@pytest.mark.parametrize("change", ["extra key", "shape"])
def test_other_models_are_refused_with_diffs_explanation_and_nothing_written(tmp_path, change):
    other = _state(1)
    if change == "extra key":
        other["extra.weight"] = torch.zeros(3)
    else:
        other["linear.weight"] = torch.zeros(34, 17)
    a, b = _write(tmp_path, "a.safetensors", _state(0)), _write(tmp_path, "b.safetensors", other)
    out = tmp_path / "out.safetensors"
    with pytest.raises(CkptError) as e:
        average([a, b], str(out))
    assert e.value.code in ("key_mismatch", "shape_mismatch") and "ckpttool diff" in str(e.value)
    assert ("extra.weight" if change == "extra key" else "linear.weight") in str(e.value)
    assert not out.exists() and not [n for n in os.listdir(tmp_path) if n.startswith(".out")]


def test_cli(tmp_path):
    runner = CliRunner()
    a, b = _write(tmp_path, "a.safetensors", _state(0)), _write(tmp_path, "b.safetensors", _state(1))
    out = str(tmp_path / "out.safetensors")
    result = runner.invoke(main, ["average", a, b, out, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["mode"] == "uniform"
    again = runner.invoke(main, ["average", a, b, out])
    assert again.exit_code == 2 and "--force" in again.output
    text = runner.invoke(main, ["average", a, b, out, "--force", "--weights", "1,3"])
    assert text.exit_code == 0 and "weighted average of 2 checkpoints" in text.stdout
    assert "num_batches_tracked" in text.stdout  # taken from the newest, and said so
    assert runner.invoke(main, ["average", a, out]).exit_code == 2
    assert runner.invoke(main, ["average", a, b, out, "--force", "--weights", "1"]).exit_code == 2
    assert runner.invoke(main, ["average", a, b, out, "--force", "--ema", "0.9"]).exit_code == 2  # no steps


def test_quantized_checkpoints_are_refused(tmp_path, corpus):
    q = corpus["quanto_qint8"]
    with pytest.raises(UsageError) as e:
        average([q, q], str(tmp_path / "out.safetensors"))
    assert "--dequantize" in str(e.value) and not (tmp_path / "out.safetensors").exists()
