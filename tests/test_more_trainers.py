"""Trainers beyond the first ones, proved on files their own libraries wrote (tests/data, with the script that made
them in fixtures/): each healthy resume point verifies clean and is what `latest --for-resume` picks, and each way
the trainer's own resume goes wrong on them is caught by code."""

import os
import shutil

import torch

from ckpttool.gate import check_resume
from tests.helpers import cli, codes

DATA = os.path.join(os.path.dirname(__file__), "data")
TORCHTUNE = os.path.join(DATA, "torchtune")


def _copy_run(name: str, tmp_path) -> str:
    return shutil.copytree(os.path.join(TORCHTUNE, name), tmp_path / name)


# --- torchtune 0.6.1 (fixtures/torchtune_samples.py): HF full fine-tune over 3 epochs, LoRA and Meta over 2 ---

def test_torchtune_newest_intermediate_epoch_verifies_clean():
    for run, folder, epochs_run in (("full", "epoch_1", 2), ("lora", "epoch_0", 1), ("meta", "epoch_0", 1)):
        path = os.path.join(TORCHTUNE, run, folder)
        result, report = cli("inspect", "--json", path)
        assert result.exit_code == 0 and report["trainer"] == "torchtune" and report["epoch"] == epochs_run
        assert {c["role"] for c in report["components"]} >= {"model", "optimizer"}
        result, report = cli("verify", "--json", "--for-resume", path)
        assert result.exit_code == 0 and report["problems"] == [], (path, report["problems"])
        assert check_resume(path).ok


def test_torchtune_recipe_state_belongs_to_one_epoch_folder_only():
    """Every intermediate save overwrites the one recipe_state.pt and the final writes none: the final folder and
    every older one would resume with another epoch's optimizer and counters."""
    final = os.path.join(TORCHTUNE, "full", "epoch_2")
    result, report = cli("verify", "--json", "--for-resume", final)
    assert result.exit_code == 1 and codes(report, "error") == ["step_mismatch"]
    assert "final save" in report["problems"][0]["message"] and "epoch_1" in report["problems"][0]["message"]
    result, report = cli("verify", "--json", "--for-resume", os.path.join(TORCHTUNE, "full", "epoch_0"))
    assert result.exit_code == 1 and codes(report, "error") == ["step_mismatch"]
    assert cli("verify", "--json", final)[0].exit_code == 0  # the weights themselves are whole
    for run, pick, own in (("full", "epoch_1", "epoch_2"), ("lora", "epoch_0", "epoch_1"), ("meta", "epoch_0",
                                                                                              "epoch_1")):
        result, out = cli("latest", "--json", "--for-resume", os.path.join(TORCHTUNE, run))
        assert result.exit_code == 0 and out["trainer"] == "torchtune" and os.path.basename(out["path"]) == pick
        assert os.path.basename(out["trainer_pick"]) == own and "step_mismatch" in out["differs"]


def test_torchtune_lost_recipe_state_adapter_or_keys_are_errors(tmp_path):
    run = _copy_run("lora", tmp_path)
    os.remove(os.path.join(run, "epoch_0", "adapter_model.pt"))
    result, report = cli("verify", "--json", "--for-resume", os.path.join(run, "epoch_0"))
    assert result.exit_code == 1 and "missing_file" in codes(report, "error")
    run = _copy_run("full", tmp_path / "a")
    recipe = os.path.join(run, "recipe_state", "recipe_state.pt")
    state = torch.load(recipe, weights_only=True)
    del state["total_epochs"], state["optimizer"]
    torch.save(state, recipe)
    result, report = cli("verify", "--json", "--for-resume", os.path.join(run, "epoch_1"))
    assert result.exit_code == 1 and set(codes(report, "error")) == {"missing_file", "missing_optimizer"}
    assert "total_epochs" in report["problems"][0]["message"]
    shutil.rmtree(os.path.join(run, "recipe_state"))
    result, report = cli("verify", "--json", "--for-resume", os.path.join(run, "epoch_1"))
    assert result.exit_code == 1 and codes(report, "error") == ["missing_file"]
    assert "recipe_checkpoint file must be provided" in report["problems"][0]["message"]
    result, out = cli("latest", "--json", "--for-resume", run)
    assert out["path"] is None


def test_torchtune_recipe_state_inside_the_folder_is_read(tmp_path):
    """Older torchtune kept recipe_state.pt inside the epoch folder."""
    run = _copy_run("meta", tmp_path)
    shutil.move(os.path.join(run, "recipe_state", "recipe_state.pt"), os.path.join(run, "epoch_0"))
    os.rmdir(os.path.join(run, "recipe_state"))
    result, report = cli("verify", "--json", "--for-resume", os.path.join(run, "epoch_0"))
    assert result.exit_code == 0 and report["problems"] == [] and report["trainer"] == "torchtune"
    result, report = cli("verify", "--json", "--for-resume", os.path.join(run, "epoch_1"))
    assert codes(report, "error") == ["missing_file"]
