import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from fixtures.generate import TinyNet, _quantized
from tests.helpers import cli, codes


def test_diff_sees_through_each_prefix_combination(corpus):
    for fixture, rule in (("torch_module_prefix", "'module.'"), ("torch_orig_mod_prefix", "'_orig_mod.'"),
                          ("torch_nested_prefix", "'_orig_mod.' and 'module.'")):
        result, report = cli("diff", "--json", corpus[fixture], corpus["safetensors"])
        assert result.exit_code == 0 and report["same"] is True, fixture
        assert rule in report["normalization"][0]
        result, report = cli("diff", "--json", "--no-normalize", corpus[fixture], corpus["safetensors"])
        assert result.exit_code == 1 and len(report["only_a"]) == 6 and "key_mismatch" in codes(report)


def test_diff_common_prefix_on_one_side(tmp_path, corpus):
    weights = load_file(corpus["safetensors"])
    save_file({f"unet.{k}": v for k, v in weights.items()}, tmp_path / "prefixed.safetensors")
    _, report = cli("diff", "--json", tmp_path / "prefixed.safetensors", corpus["safetensors"])
    assert report["same"] and "common prefix 'unet.'" in report["normalization"][0]


def test_diff_across_formats(corpus):
    for other in ("torch_state_dict", "accelerate", "sharded", "torch_legacy", "torch_cuda", "dcp"):
        result, report = cli("diff", "--json", "--values", corpus["safetensors"], corpus[other])
        assert result.exit_code == 0, (other, report["problems"])
        assert report["values"]["equal"] == 6


def test_diff_shape_dtype_and_missing(tmp_path, corpus):
    weights = load_file(corpus["safetensors"])
    changed = dict(weights)
    changed["linear_1.bias"] = torch.zeros(33)
    changed["linear_2.bias"] = weights["linear_2.bias"].half()
    del changed["head.weight"]
    changed["extra.weight"] = torch.zeros(1)
    save_file(changed, tmp_path / "changed.safetensors")
    result, report = cli("diff", "--json", corpus["safetensors"], tmp_path / "changed.safetensors")
    assert result.exit_code == 1 and not report["same"]
    assert report["only_a"] == ["head.weight"] and report["only_b"] == ["extra.weight"]
    assert report["shape_mismatches"] == [{"key": "linear_1.bias", "a": [32], "b": [33]}]
    assert report["dtype_mismatches"] == [{"key": "linear_2.bias", "a": "float32", "b": "float16"}]
    assert codes(report) == ["dtype_mismatch", "key_mismatch", "shape_mismatch"]
    assert report["fix"].startswith("ckpttool remap")


def test_diff_quantized_keys_one_finding_per_module(corpus, tmp_path):
    torch.manual_seed(0)
    plain = TinyNet(width=256)
    save_file(plain.state_dict(), tmp_path / "plain.safetensors")
    result, report = cli("diff", "--json", corpus["quanto_qint8"], tmp_path / "plain.safetensors")
    assert result.exit_code == 1
    assert [(q["module"], q["qtype"]) for q in report["quantized_keys"]] == [("linear_1", "qint8"),
                                                                             ("linear_2", "qint8")]
    assert report["only_a"] == [] and report["only_b"] == [] and codes(report) == ["quantized_keys"]
    assert "--like" in report["fix"]
    text = cli("diff", corpus["quanto_qint8"], tmp_path / "plain.safetensors")[0].stdout
    assert "Quantized on one side only" in text and "Fix: ckpttool remap" in text


def test_diff_values_between_two_trained_steps(corpus):
    a = os.path.join(os.path.dirname(corpus["family"]), "model000003.pt")
    b = os.path.join(os.path.dirname(corpus["family"]), "model000005.pt")
    result, report = cli("diff", "--json", "--values", a, b)
    assert result.exit_code == 1 and codes(report) == ["value_mismatch"]
    different = {d["key"]: d for d in report["values"]["different"]}
    assert "linear_1.weight" in different and "embed.weight" in different
    d = different["linear_1.weight"]
    assert 0 < d["max_abs"] < 0.1 and 0 < d["rel_l2"] < 0.1 and 0.99 < d["cosine"] <= 1.0
    result, report = cli("diff", "--json", "--values", "--atol", "1", a, b)
    assert result.exit_code == 0 and len(report["values"]["close"]) == len(different)


def test_diff_against_model(corpus, tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(
        "from fixtures.generate import TinyNet\n"
        "def build():\n    return TinyNet()\n"
        "def build_wide():\n    return TinyNet(width=24)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    result, report = cli("diff", "--json", corpus["safetensors"], "--model", "my_models:build")
    assert result.exit_code == 0 and report["same"]
    result, report = cli("diff", "--json", corpus["torch_module_prefix"], "--model", "my_models:build")
    assert result.exit_code == 1 and "load_state_dict(strict=True)" in report["problems"][0]["message"]
    assert "--model my_models:build" in report["fix"]
    _, report = cli("diff", "--json", corpus["safetensors"], "--model", "my_models:build_wide")
    assert "shape_mismatch" in codes(report)
    assert cli("diff", corpus["safetensors"], "--model", "nope_module:x")[0].exit_code == 2


def test_diff_usage(corpus):
    assert cli("diff", corpus["safetensors"])[0].exit_code == 2
    assert cli("diff", "--component", "optimizer", corpus["safetensors"], corpus["safetensors"])[0].exit_code == 2
    result, report = cli("diff", "--json", "--component", "optimizer", corpus["torch_training"], corpus["accelerate"])
    assert result.exit_code == 0, report


@pytest.mark.parametrize("fixture", ["torch_module_prefix", "torch_orig_mod_prefix", "torch_nested_prefix"])
def test_remap_like_reference_then_strict_load(corpus, tmp_path, fixture):
    out = tmp_path / "fixed.safetensors"
    result, _ = cli("remap", corpus[fixture], out, "--like", corpus["safetensors"])
    assert result.exit_code == 0, result.output
    model = TinyNet()
    model.load_state_dict(load_file(out), strict=True)


def test_remap_ops_apply_in_order(corpus, tmp_path):
    out = tmp_path / "o.pt"
    result, summary = cli("remap", "--json", corpus["torch_module_prefix"], out, "--strip-prefix", "module.",
                          "--add-prefix", "net.", "--rename", r"^net\.linear_(\d)=net.fc\1", "--drop", "head")
    assert result.exit_code == 0, result.output
    loaded = torch.load(out, weights_only=True)
    assert sorted(loaded) == ["net.embed.weight", "net.fc1.bias", "net.fc1.weight", "net.fc2.bias", "net.fc2.weight"]
    assert summary["changes"][-1] == "--drop head: 0 renamed, 1 dropped"
    # the other order gives a different result: add then strip leaves the prefix
    result, _ = cli("remap", corpus["torch_module_prefix"], tmp_path / "p.pt", "--add-prefix", "x.",
                    "--strip-prefix", "module.")
    assert sorted(torch.load(tmp_path / "p.pt", weights_only=True))[0].startswith("x.module.")


def test_remap_collision_and_unalignable_fail_cleanly(corpus, tmp_path):
    out = tmp_path / "c.safetensors"
    result, _ = cli("remap", corpus["safetensors"], out, "--rename", ".*=same")
    assert result.exit_code == 1 and "key_mismatch" in result.stderr and not out.exists()
    wide = tmp_path / "wide.safetensors"
    save_file(TinyNet(width=24).state_dict(), wide)
    result, _ = cli("remap", corpus["safetensors"], out, "--like", wide)
    assert result.exit_code == 1 and "cannot align" in result.stderr and not out.exists()
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_remap_refuses_existing_output_and_broken_input(corpus, tmp_path):
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"keep me")
    assert cli("remap", corpus["safetensors"], out)[0].exit_code == 2
    assert out.read_bytes() == b"keep me"
    assert cli("remap", "--force", corpus["safetensors"], out)[0].exit_code == 0
    result, _ = cli("remap", corpus["sharded_missing"], tmp_path / "x.safetensors")
    assert result.exit_code == 1 and not (tmp_path / "x.safetensors").exists()
    assert cli("remap", corpus["safetensors"], tmp_path / "x.txt")[0].exit_code == 2
    assert cli("remap", corpus["safetensors"], corpus["safetensors"], "--force")[0].exit_code == 2


TOLERANCE = {"qint8": 0.02, "qfloat8": 0.1, "qint4": 0.2, "qint2": 0.6}  # relative output error


@pytest.mark.parametrize("qtype", ["qint8", "qint4", "qfloat8", "qint2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantize_then_plain_model_loads_strictly(tmp_path, qtype, dtype):
    from optimum.quanto import freeze, qtypes, quantize
    torch.manual_seed(0)
    original = TinyNet(width=256).to(dtype)
    quantized = TinyNet(width=256).to(dtype)
    quantized.load_state_dict(original.state_dict())
    qname = {"qfloat8": "qfloat8_e4m3fn"}.get(qtype, qtype)
    quantize(quantized, weights=qtypes[qname], exclude=["embed", "head"])
    freeze(quantized)
    src = tmp_path / "q.pt"
    torch.save(quantized.state_dict(), src)  # no quantization map beside it: qtype and shapes inferred
    out = tmp_path / "plain.safetensors"
    result, _ = cli("remap", src, out, "--dequantize")
    assert result.exit_code == 0, result.output
    plain = TinyNet(width=256).to(dtype)
    plain.load_state_dict(load_file(out), strict=True)
    assert plain.linear_1.weight.dtype == dtype
    expected = quantized.linear_1.weight.dequantize()
    assert torch.equal(plain.linear_1.weight, expected.to(dtype))
    x = torch.randint(0, 10, (16,))
    with torch.no_grad():
        err = (plain(x).float() - original(x).float()).abs().max() / original(x).float().abs().max()
    assert err < TOLERANCE[qtype]


@pytest.mark.parametrize("qtype", ["qint8", "qint4", "qfloat8"])
def test_quantize_round_trip_with_requantize(tmp_path, qtype):
    from optimum.quanto import requantize
    sd, qmap = _quantized(qtype)
    torch.manual_seed(0)
    plain = TinyNet(width=256)
    save_file(plain.state_dict(), tmp_path / "plain.safetensors")
    (tmp_path / "qmap.json").write_text(json.dumps(qmap))
    out = tmp_path / "quantized.safetensors"
    result, _ = cli("remap", tmp_path / "plain.safetensors", out, "--quantize", tmp_path / "qmap.json")
    assert result.exit_code == 0, result.output
    written = load_file(out)
    assert set(written) == set(sd)
    for key in sd:
        assert torch.equal(written[key].float(), sd[key].float()), key
    written_map = json.load(open(tmp_path / "quantized_quanto_qmap.json"))
    model = TinyNet(width=256)
    requantize(model, written, written_map)
    x = torch.randint(0, 10, (4,))
    reference = TinyNet(width=256)
    requantize(reference, sd, qmap)
    assert torch.equal(model(x), reference(x))
    _, report = cli("inspect", "--json", out)
    assert report["quantization"]["quantization_map"].endswith("quantized_quanto_qmap.json")


def test_like_quantized_reference_quantizes_and_like_plain_dequantizes(corpus, tmp_path):
    torch.manual_seed(0)
    save_file({f"module.{k}": v for k, v in TinyNet(width=256).state_dict().items()}, tmp_path / "ddp.safetensors")
    out = tmp_path / "q.safetensors"
    result, _ = cli("remap", tmp_path / "ddp.safetensors", out, "--like", corpus["quanto_qint4"])
    assert result.exit_code == 0, result.output
    sd, _ = _quantized("qint4")
    assert set(load_file(out)) == set(sd)
    back = tmp_path / "back.safetensors"
    result, _ = cli("remap", out, back, "--like", tmp_path / "ddp.safetensors")
    assert result.exit_code == 0, result.output
    assert sorted(load_file(back)) == sorted(load_file(tmp_path / "ddp.safetensors"))


def test_remap_cuda_saved_input_on_cpu(corpus, tmp_path):
    out = tmp_path / "from_cuda.safetensors"
    result, _ = cli("remap", corpus["torch_cuda"], out)
    assert result.exit_code == 0, result.output
    expected = torch.load(corpus["torch_cuda"], map_location="cpu", weights_only=True)["model"]
    written = load_file(out)
    assert all(torch.equal(written[k], v) for k, v in expected.items())


def test_remap_component_and_dequantize_without_quantization(corpus, tmp_path):
    out = tmp_path / "opt.pt"
    assert cli("remap", "--component", "optimizer", corpus["torch_training"], out)[0].exit_code == 0
    assert "state.0.exp_avg" in torch.load(out, weights_only=True)
    assert cli("remap", "--dequantize", corpus["safetensors"], tmp_path / "d.safetensors")[0].exit_code == 2
