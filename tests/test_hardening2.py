"""Issue 30, beyond values: which checkpoint is newest (the step each file records, not digits a metric put in its
name), and outputs replaced so that an interruption at any moment leaves one whole output."""

import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

from helpers import cli

from ckpttool import atomic

SAMPLES = os.path.join(os.path.dirname(__file__), "data", "fp16", "lightning")


def test_lightning_files_are_ordered_by_the_step_they_record(tmp_path):
    """ModelCheckpoint(filename="{epoch}-{val_loss:.2f}"): the metric's decimals are no step."""
    shutil.copy(os.path.join(SAMPLES, "epoch=0-step=5.ckpt"), tmp_path / "epoch=0-val_loss=0.89.ckpt")
    shutil.copy(os.path.join(SAMPLES, "epoch=0-step=10.ckpt"), tmp_path / "epoch=0-val_loss=0.12.ckpt")
    result, out = cli("latest", "--for-resume", "--json", tmp_path)
    assert result.exit_code == 0 and os.path.basename(out["path"]) == "epoch=0-val_loss=0.12.ckpt"
    assert out["step"] == 10
    from ckpttool.gate import latest_valid

    assert os.path.basename(latest_valid(str(tmp_path))) == "epoch=0-val_loss=0.12.ckpt"
    _, plan = cli("prune", "--keep", "1", "--dry-run", "--json", tmp_path)
    assert [os.path.basename(r["path"]) for r in plan["delete"]] == ["epoch=0-val_loss=0.89.ckpt"]


def _folder(path, value):
    os.makedirs(path)
    save_file({"w": torch.full((4,), float(value))}, os.path.join(path, "model.safetensors"))
    return path


def test_publish_keeps_one_whole_output_when_interrupted_deleting_the_old(tmp_path, monkeypatch):
    dst, new = _folder(str(tmp_path / "out"), 1), _folder(str(tmp_path / "new"), 2)

    def interrupted(path):
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic, "discard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic.publish(new, dst)
    assert os.listdir(dst) == ["model.safetensors"] and not os.path.exists(new)
    aside = [e for e in os.listdir(tmp_path) if atomic.STAGING.match(e)]
    assert len(aside) == 1  # the old output, whole, under a staging name the next write or prune removes


def test_publish_puts_the_old_output_back_when_the_new_cannot_move_in(tmp_path, monkeypatch):
    dst, new = _folder(str(tmp_path / "out"), 1), _folder(str(tmp_path / "new"), 2)
    real = os.rename

    def failing(src, target):
        if src == new:
            raise OSError(28, "No space left on device")
        return real(src, target)

    monkeypatch.setattr(os, "rename", failing)
    with pytest.raises(OSError):
        atomic.publish(new, dst)
    assert sorted(os.listdir(tmp_path)) == ["new", "out"] and os.listdir(dst) == ["model.safetensors"]


def test_convert_force_replaces_a_folder_whole(tmp_path):
    src = str(tmp_path / "src.safetensors")
    save_file({"w": torch.ones(4), "b": torch.zeros(2)}, src)
    out = str(tmp_path / "out")
    assert cli("convert", src, out, "--to", "accelerate")[0].exit_code == 0
    save_file({"w": torch.full((4,), 3.0), "b": torch.zeros(2)}, src)
    assert cli("convert", src, out, "--to", "accelerate", "--force")[0].exit_code == 0
    assert cli("diff", "--values", src, out)[0].exit_code == 0
    assert not [e for e in os.listdir(tmp_path) if atomic.STAGING.match(e)]
