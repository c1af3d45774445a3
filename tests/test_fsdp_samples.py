"""FSDP checkpoints the real libraries wrote on 2 GPUs (tests/data/fsdp, made by fixtures/fsdp_runs.sh): each verifies
clean for resume under the right trainer, and Lightning's sharded checkpoint directory is a `lightning` checkpoint
whose meta.pt supplies the counters and schedulers and whose DCP part the model and optimizer."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import cli, codes

DATA = os.path.join(os.path.dirname(__file__), "data", "fsdp")
LIGHTNING = os.path.join(DATA, "lightning_fsdp_sharded")
SAMPLES = {"transformers_fsdp1_full/checkpoint-4": "transformers", "transformers_fsdp1_sharded/checkpoint-4":
           "transformers", "transformers_fsdp2_sharded/checkpoint-4": "transformers",
           "accelerate_fsdp_sharded/checkpoint-4": "diffusers", "accelerate_fsdp_full/checkpoint-4": "diffusers",
           "lightning_fsdp_sharded/epoch=0-step=4.ckpt": "lightning"}


@pytest.mark.parametrize("sample", sorted(SAMPLES))
def test_every_fsdp_sample_verifies_clean_for_resume(sample):
    result, report = cli("verify", "--json", "--for-resume", os.path.join(DATA, sample))
    assert result.exit_code == 0 and report["problems"] == [], report["problems"]
    assert report["trainer"] == SAMPLES[sample] and report["step"] == 4
    made_by = json.load(open(os.path.join(DATA, sample.split("/")[0], "made_by.json")))
    assert made_by["world_size"] == 2  # two ranks wrote it: one data file and one RNG file each


def test_lightning_sharded_dir_reads_as_lightning_with_meta_pt_counters():
    _, report = cli("inspect", "--json", os.path.join(LIGHTNING, "epoch=0-step=4.ckpt"))
    assert report["trainer"] == "lightning" and report["step"] == 4 and report["epoch"] == 0
    sources = {s["source"]: s["meaning"] for s in report["step_sources"]}
    assert sources["training dict 'global_step'"] == "global_step"  # from meta.pt
    assert sources["loops optimizer.step.total.completed"] == "global_step"
    assert sources["optimizer state step"] == "optimizer_updates"  # the DCP optimizer's per-parameter steps: not a
    assert not [s for s in sources if "optimizer_0.state" in s]    # global step each


def test_lightning_sharded_latest_and_convert(tmp_path):
    _, picked = cli("latest", "--json", "--for-resume", LIGHTNING)
    assert picked["path"] == os.path.join(LIGHTNING, "epoch=0-step=4.ckpt") and picked["trainer"] == "lightning"
    out = tmp_path / "model.safetensors"
    assert cli("convert", os.path.join(LIGHTNING, "epoch=0-step=4.ckpt"), out)[0].exit_code == 0
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(os.path.join(LIGHTNING, "epoch=0-step=4.ckpt"), tmp_path / "reference.pt")
    reference = torch.load(tmp_path / "reference.pt", weights_only=True)["model"]
    got = load_file(out)
    assert got.keys() == reference.keys() and all(torch.equal(got[k], reference[k]) for k in got)


@pytest.mark.parametrize("lost", ["meta.pt", ".metadata", "__1_0.distcp"])
def test_lightning_sharded_without_a_part_is_refused_and_latest_falls_back(tmp_path, lost):
    run = shutil.copytree(LIGHTNING, tmp_path / "run")
    os.remove(run / "epoch=0-step=4.ckpt" / lost)
    _, report = cli("verify", "--json", "--for-resume", run / "epoch=0-step=4.ckpt")
    assert "missing_file" in codes(report, "error")
    _, picked = cli("latest", "--json", "--for-resume", run)
    assert picked["path"] == str(run / "epoch=0-step=2.ckpt")
