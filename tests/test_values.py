"""Issue 30, first part: the values ckpttool reads, writes and compares are the ones torch.load gives: conj and neg
bits applied, layouts it cannot carry named (never dropped), complex values whole, casts that change values beyond
rounding refused unless asked for, average weights finite."""

import os
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import cli, codes

warnings.filterwarnings("ignore", message=".*(Sparse|sparse|nested|quantize).*")


@pytest.fixture
def bits(tmp_path):
    """A .pt of a conjugated complex tensor, a negated view, both at once, and a plain tensor beside them."""
    c = torch.tensor([1 + 1j, 2 - 2j, -3 + 0.5j])
    x = torch.tensor([0.19, 1.457, -0.5])
    path = str(tmp_path / "bits.pt")
    torch.save({"conj": c.conj(), "neg": torch._neg_view(x), "both": torch._neg_view(c.conj()),
                "plain": torch.arange(3.0)}, path)
    return path


def loaded(path):
    return {k: v.resolve_conj().resolve_neg() for k, v in torch.load(path, weights_only=True).items()}


@pytest.mark.parametrize("target", ["out.safetensors", "out.pt"])
def test_conj_and_neg_bits_are_applied_when_converting(bits, tmp_path, target):
    out = str(tmp_path / target)
    result, _ = cli("convert", bits, out)
    assert result.exit_code == 0
    got = load_file(out) if target.endswith(".safetensors") else loaded(out)
    for name, value in loaded(bits).items():
        assert torch.equal(got[name], value), name
    assert cli("diff", "--values", bits, out)[0].exit_code == 0


def test_conj_and_neg_bits_are_applied_to_an_accelerate_dir_and_dcp(bits, tmp_path):
    want = loaded(bits)
    for to in ("accelerate", "dcp"):
        out = str(tmp_path / to)
        assert cli("convert", bits, out, "--to", to)[0].exit_code == 0
        assert cli("diff", "--values", bits, out)[0].exit_code == 0, to
    torch.save({"conj": torch.tensor([1 + 1j, 2 - 2j, -3 + 0.5j])}, tmp_path / "unconjugated.pt")
    assert want["conj"][0] == 1 - 1j
    result, _ = cli("diff", "--values", "--component", "model", bits, tmp_path / "unconjugated.pt")
    assert result.exit_code == 1


def test_stats_see_the_negated_values(bits):
    _, report = cli("inspect", "--stats", "--json", bits)
    neg = next(s for s in report["stats"] if s["name"] == "neg")
    assert neg["min"] == pytest.approx(-1.457) and neg["max"] == pytest.approx(0.5)


def test_layouts_ckpttool_cannot_carry_are_named_never_dropped(tmp_path):
    path = str(tmp_path / "layouts.pt")
    coo = torch.sparse_coo_tensor(torch.tensor([[0, 1], [1, 0]]), torch.tensor([3.0, 4.0]), (2, 2))
    torch.save({"dense": torch.ones(2), "coo": coo, "csr": coo.to_sparse_csr(),
                "q": torch.quantize_per_tensor(torch.tensor([1.0, 2.0]), 0.1, 0, torch.qint8),
                "qc": torch.quantize_per_channel(torch.ones(2, 2), torch.tensor([0.1, 0.2]), torch.tensor([0, 0]), 0,
                                                 torch.qint8),
                "nested": torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])}, path)
    assert set(torch.load(path, weights_only=True)) == {"dense", "coo", "csr", "q", "qc", "nested"}
    result, report = cli("inspect", "--json", path)
    assert result.exit_code == 0 and codes(report) == ["unsupported_layout"]  # a warning, and never unsafe_pickle
    message = report["problems"][0]["message"]
    for name in ("coo (sparse_coo)", "csr (sparse_csr)", "q (quantized)", "qc (quantized)", "nested (nested)"):
        assert name in message
    for args in (["convert", path, tmp_path / "out.safetensors"], ["convert", path, tmp_path / "out.pt"],
                 ["diff", path, path]):
        result, _ = cli(*args)
        assert result.exit_code == 1 and "unsupported_layout" in result.stderr and "coo (sparse_coo)" in result.stderr
    assert not os.path.exists(tmp_path / "out.safetensors") and not os.path.exists(tmp_path / "out.pt")


def test_complex_values_are_compared_and_measured_whole(tmp_path):
    torch.save({"z": torch.tensor([1 + 1j, 2 + 2j])}, tmp_path / "a.pt")
    torch.save({"z": torch.tensor([1 - 5j, 2 + 9j])}, tmp_path / "b.pt")  # the same real parts
    result, report = cli("diff", "--values", "--json", tmp_path / "a.pt", tmp_path / "b.pt")
    assert result.exit_code == 1 and report["same"] is False
    _, report = cli("inspect", "--stats", "--json", tmp_path / "b.pt")
    z = report["stats"][0]
    assert (z["min"], z["max"]) == (-5, 9)  # over the real and imaginary parts together
    assert (z["numel"], z["zeros"]) == (2, 0)  # counted as values
    assert z["l2"] == pytest.approx(abs(torch.tensor([1 - 5j, 2 + 9j])).pow(2).sum().sqrt().item())


def test_a_cast_beyond_rounding_is_refused_unless_asked_for(tmp_path):
    src = str(tmp_path / "bf16.safetensors")
    save_file({"w": torch.tensor([1e5, 1.0, 1e-30, 0.5], dtype=torch.bfloat16)}, src)
    out = str(tmp_path / "fp16.safetensors")
    result, _ = cli("convert", src, out, "--dtype", "fp16")
    assert result.exit_code == 1 and "lossy_cast" in result.stderr and not os.path.exists(out)
    assert "1 finite values beyond" in result.stderr and "1 nonzero values below" in result.stderr
    result, report = cli("convert", "--json", src, out, "--dtype", "fp16", "--allow-lossy-cast")
    assert result.exit_code == 0 and report["lossy_cast"] == {"overflowed": 1, "underflowed": 1, "tensors": ["w"]}
    assert torch.isinf(load_file(out)["w"][0])
    assert cli("convert", src, tmp_path / "plain.safetensors", "--allow-lossy-cast")[0].exit_code == 2
    fine = str(tmp_path / "fine.safetensors")
    save_file({"w": torch.tensor([1.0, 0.5], dtype=torch.bfloat16)}, fine)
    result, report = cli("convert", "--json", fine, tmp_path / "fine16.safetensors", "--dtype", "fp16")
    assert result.exit_code == 0 and report["lossy_cast"] is None


@pytest.mark.parametrize("weights", ["inf,1", "nan,1", "1e308,1e308"])
def test_average_refuses_weights_that_are_not_finite(tmp_path, weights):
    for name in ("a", "b"):
        save_file({"w": torch.ones(2)}, str(tmp_path / f"{name}.safetensors"))
    result, _ = cli("average", tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "avg.safetensors",
                    "--weights", weights)
    assert result.exit_code == 2 and "must be finite" in result.stderr
    assert not os.path.exists(tmp_path / "avg.safetensors")


def test_views_read_only_their_own_span_in_bounded_pieces(tmp_path, monkeypatch):
    from ckpttool import tensors
    from ckpttool.checkpoint import open_checkpoint  # never the whole 1.2 MB storage for a smaller view

    base = torch.randn(1000, 300)
    views = {"t": base.t(), "col": base[:, 5], "block": base[10:20, 3:9], "every": base[::7, ::3], "one": base[3, 4],
             "row": base[2], "whole": base, "expanded": torch.randn(5, 1).expand(5, 4), "empty": torch.zeros(0, 3),
             "bf16": torch.randn(8, 8).to(torch.bfloat16)[:, 1],
             "8d": torch.randn(2, 1, 2, 1, 2, 1, 2, 3).permute(7, 6, 5, 4, 3, 2, 1, 0)}
    path = str(tmp_path / "views.pt")
    torch.save(views, path)
    want = torch.load(path, weights_only=True)
    read, real = [], tensors.read_storage

    def recording(info, start=0, length=None):
        out = real(info, start, length)
        read.append(out.numel())
        return out

    monkeypatch.setattr(tensors, "read_storage", recording)
    monkeypatch.setattr(tensors, "VIEW_SPAN", 4096)
    for t in open_checkpoint(path).model.tensors:
        read.clear()
        got = tensors.load_tensor(t)
        assert torch.equal(got, want[t.name]) and got.shape == want[t.name].shape, t.name
        own = got.numel() * got.element_size()  # a contiguous tensor reads exactly its bytes, a view bounded pieces
        assert max(read, default=0) <= (own if got.is_contiguous() and t.name in ("whole", "row") else 4096), t.name
        if t.name == "block":  # ten rows of the block: its span, not the storage
            assert sum(read) < 10 * 300 * 4


def test_jagged_and_meta_tensors_are_named_and_complex32_reads(tmp_path):
    path = str(tmp_path / "more.pt")
    torch.save({"w": torch.ones(2), "jagged": torch.nested.nested_tensor([torch.ones(2), torch.ones(3)],
                                                                        layout=torch.jagged),
                "meta": torch.empty(4, device="meta")}, path)
    result, report = cli("verify", "--json", path)
    assert result.exit_code == 0 and codes(report) == ["unsupported_layout"]  # never unsafe_pickle: torch loads it
    result, _ = cli("convert", path, tmp_path / "out.safetensors")
    assert result.exit_code == 1 and "jagged (jagged)" in result.stderr and "meta (meta)" in result.stderr
    half = str(tmp_path / "chalf.pt")
    torch.save({"z": torch.tensor([1 + 2j, 3 - 4j], dtype=torch.complex32)}, half)
    assert cli("verify", half)[0].exit_code == 0
    assert cli("convert", half, tmp_path / "chalf-out.pt")[0].exit_code == 0
    result, _ = cli("convert", half, tmp_path / "chalf.safetensors")
    assert result.exit_code == 2 and "no safetensors equivalent" in result.stderr


def test_stats_of_a_dtype_torch_cannot_widen_say_nothing_rather_than_fail(tmp_path):
    torch.save({"f4": torch.zeros(4, dtype=torch.uint8).view(torch.float4_e2m1fn_x2)}, tmp_path / "f4.pt")
    result, report = cli("inspect", "--stats", "--json", tmp_path / "f4.pt")
    assert result.exit_code == 0 and report["stats"][0]["numel"] == 4 and report["stats"][0]["min"] == "nan"
