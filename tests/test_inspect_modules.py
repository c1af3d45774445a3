"""inspect --modules: the module tree from the keys, with quantized, tied and missing-in-EMA marks."""

from __future__ import annotations

import json

import torch
from click.testing import CliRunner

from ckpttool.cli import main
from ckpttool.operations.inspect import inspect

UNET_KEYS = {  # name -> shape, in model order
    "conv_in.weight": (8, 4, 3, 3), "conv_in.bias": (8,),
    "down_blocks.0.resnets.0.conv1.weight": (8, 8, 3, 3), "down_blocks.0.resnets.0.conv1.bias": (8,),
    "down_blocks.0.resnets.1.conv1.weight": (8, 8, 3, 3), "down_blocks.0.attentions.0.to_q.weight": (8, 8),
    "down_blocks.1.resnets.0.conv1.weight": (16, 8, 3, 3), "mid_block.norm.weight": (16,),
    "logit_scale": (),
}


def _save(path, state):
    torch.save(state, path)
    return str(path)


def test_tree_sums_in_model_order(tmp_path):
    state = {k: torch.zeros(shape, dtype=torch.float16 if "attentions" in k else torch.float32)
             for k, shape in UNET_KEYS.items()}
    rows = inspect(_save(tmp_path / "unet.pt", state), modules=True)["modules"]
    names = [r["module"] for r in rows]
    assert names == ["conv_in", "down_blocks", "down_blocks.0", "down_blocks.0.resnets", "down_blocks.0.resnets.0",
                     "down_blocks.0.resnets.0.conv1", "down_blocks.0.resnets.1", "down_blocks.0.resnets.1.conv1",
                     "down_blocks.0.attentions", "down_blocks.0.attentions.0", "down_blocks.0.attentions.0.to_q",
                     "down_blocks.1", "down_blocks.1.resnets", "down_blocks.1.resnets.0",
                     "down_blocks.1.resnets.0.conv1", "mid_block", "mid_block.norm"]
    by = {r["module"]: r for r in rows}
    leaves = {k: torch.Size(s).numel() for k, s in UNET_KEYS.items()}
    assert by["down_blocks"]["parameters"] == sum(n for k, n in leaves.items() if k.startswith("down_blocks."))
    assert by["down_blocks.0"]["tensors"] == 4
    assert by["down_blocks.0"]["dtypes"] == {"float16": 1, "float32": 3}
    assert by["down_blocks.0"]["bytes"] == 8 * 8 * 9 * 4 * 2 + 8 * 4 + 8 * 8 * 2
    assert by["down_blocks.0.resnets.0.conv1"]["depth"] == 5 and by["conv_in"]["depth"] == 1
    shallow = inspect(str(tmp_path / "unet.pt"), modules=True, depth=2)["modules"]
    assert [r["module"] for r in shallow] == ["conv_in", "down_blocks", "down_blocks.0", "down_blocks.1", "mid_block",
                                              "mid_block.norm"]


def test_quantized_modules_are_marked(corpus):
    rows = {r["module"]: r for r in inspect(corpus["quanto_qint8"], modules=True)["modules"]}
    assert rows["linear_1"]["quantized"] == rows["linear_2"]["quantized"] == "qint8"
    assert rows["embed"]["quantized"] is None and rows["embed"]["quantized_modules"] == 0
    assert "linear_1.weight" not in rows  # `linear_1.weight._data` belongs to linear_1, not to a module "weight"


def test_nested_quantized_modules_are_counted_on_their_ancestors(tmp_path):
    from safetensors.torch import save_file

    save_file({"blocks.0.attn.to_q.weight._data": torch.zeros(4, 4, dtype=torch.int8),
               "blocks.0.attn.to_q.weight._scale": torch.ones(4, 1), "blocks.0.attn.to_q.bias": torch.zeros(4),
               "blocks.0.norm.weight": torch.ones(4)}, tmp_path / "q.safetensors")
    rows = {r["module"]: r for r in inspect(str(tmp_path / "q.safetensors"), modules=True)["modules"]}
    assert rows["blocks.0.attn.to_q"]["quantized"] == "qint8"
    assert rows["blocks"]["quantized_modules"] == rows["blocks.0.attn"]["quantized_modules"] == 1
    assert rows["blocks.0.norm"]["quantized_modules"] == 0


def test_tied_weights_are_marked(corpus):
    rows = {r["module"]: r for r in inspect(corpus["torch_tied"], modules=True)["modules"]}
    assert rows["embed"]["tied"] == ["embed.weight = head.weight"]
    assert rows["head"]["tied"] == ["head.weight = embed.weight"]
    assert rows["linear_1"]["tied"] == []


def test_modules_missing_in_the_ema_are_counted(tmp_path):
    model = {k: torch.zeros(s) for k, s in UNET_KEYS.items()}
    ema = {f"module.{k}": v.clone() for k, v in model.items() if "resnets.1" not in k and "mid_block" not in k}
    rows = {r["module"]: r for r in inspect(_save(tmp_path / "t.pt", {"model": model, "ema": ema}), modules=True)
            ["modules"]}
    assert rows["down_blocks.0.resnets.1"]["missing_in_ema"] == 1
    assert rows["down_blocks"]["missing_in_ema"] == 1 and rows["mid_block"]["missing_in_ema"] == 1
    assert rows["conv_in"]["missing_in_ema"] == 0  # present under the EMA's `module.` prefix
    no_ema = inspect(_save(tmp_path / "m.pt", model), modules=True)["modules"]
    assert all(r["missing_in_ema"] is None for r in no_ema)


def test_cli(tmp_path, corpus):
    runner = CliRunner()
    bad = runner.invoke(main, ["inspect", "--depth", "2", corpus["torch_tied"]])
    assert bad.exit_code == 2 and "--modules" in bad.output
    table = runner.invoke(main, ["inspect", "--modules", corpus["torch_tied"]])
    assert table.exit_code == 0 and "Modules:" in table.stdout and "tied: embed.weight = head.weight" in table.stdout
    state = {k: torch.zeros(s) for k, s in UNET_KEYS.items()}
    text = runner.invoke(main, ["inspect", "--modules", "--depth", "3", _save(tmp_path / "u.pt", state)]).stdout
    assert any(line.startswith("· · resnets ") for line in text.splitlines())  # depth 3: indented twice
    report = json.loads(runner.invoke(main, ["inspect", "--modules", "--json", corpus["torch_tied"]]).stdout)
    assert {"component", "module", "depth", "tensors", "parameters", "bytes", "dtypes", "quantized",
            "quantized_modules", "tied", "missing_in_ema"} <= set(report["modules"][0])
