"""Issue 32, item 4: checkpoints sealed as the real libraries save them (ckpttool.integrations.*: transformers'
ManifestCallback, Lightning's, Accelerate's and DeepSpeed's install_sealing). Every save carries a manifest that
verifies clean, and a file no counter tells stale (an RNG file, the weights) from the run's previous save is then
`checksum_mismatch`, which `latest --for-resume` skips."""

import json
import os
import shutil

import pytest
from click.testing import CliRunner

from ckpttool.checksums import MANIFEST_NAME, MANIFEST_SUFFIX
from ckpttool.cli import main
from ckpttool.operations.verify import verify

DATA = os.path.join(os.path.dirname(__file__), "data")


@pytest.fixture
def sealed(sealed_runs):
    return sealed_runs


def _codes(path, **options):
    return sorted({(p.severity.value, p.code.value) for p in verify(path, for_resume=True, **options).problems})


def _latest(run):
    result = CliRunner().invoke(main, ["latest", "--for-resume", "--json", run])
    return os.path.basename(json.loads(result.stdout)["path"])


def _saves(run):
    return sorted((e for e in os.listdir(run) if e.startswith(("checkpoint", "epoch")) and
                   not e.endswith(MANIFEST_SUFFIX)), key=lambda e: int(e.split("=")[-1].split("-")[-1]
                                                                     .removesuffix(".ckpt")))


@pytest.mark.parametrize("name", ["transformers", "transformers_ddp", "accelerate", "accelerate_ddp",
                                  "accelerate_ddp_main_only"])
def test_every_saved_dir_is_sealed_and_verifies_clean(sealed, name):
    """Accelerate under DDP on 2 processes: save_state on every process, and on the main one only (the diffusers
    scripts' pattern, where a barrier in the hook would hang the run): each save sealed, the run ends."""
    run = sealed[name]
    saves = _saves(run)
    assert len(saves) == (3 if name.startswith("accelerate_ddp") else 2)
    for i, save in enumerate(saves):
        path = os.path.join(run, save)
        assert os.path.isfile(os.path.join(path, MANIFEST_NAME))
        # saved by the main process alone, the first save shows one RNG file and a scheduler at 2x the step (once
        # per process): a warning, until the run's earlier save shows the ratio
        lone_main = name == "accelerate_ddp_main_only" and i == 0
        assert _codes(path, require_manifest=True) == ([("warning", "step_mismatch")] if lone_main else [])


def test_lightning_seals_each_file_and_drops_the_manifest_of_one_it_deletes(sealed):
    """save_top_k=1: ModelCheckpoint deletes the older .ckpt after each save; its manifest goes with it."""
    run = sealed["lightning"]
    files = sorted(os.listdir(run))
    ckpts = [f for f in files if f.endswith(".ckpt")]
    assert ckpts == ["epoch=0-step=6.ckpt", "last.ckpt"]
    assert sorted(f for f in files if f.endswith(MANIFEST_SUFFIX)) == [c + MANIFEST_SUFFIX for c in ckpts]
    for ckpt in ckpts:
        assert _codes(os.path.join(run, ckpt), require_manifest=True) == []


@pytest.mark.parametrize("name, stale", [
    ("transformers", "rng_state.pth"),  # no counter in it: only the manifest tells it
    ("transformers", "model.safetensors"),
    ("transformers_ddp", "rng_state_1.pth"),
    ("accelerate", "model.safetensors"),
    ("accelerate_ddp", "model.safetensors"),
    ("accelerate_ddp_main_only", "optimizer.bin"),
])
def test_a_stale_file_of_a_sealed_save_is_caught_and_skipped(sealed, tmp_path, name, stale):
    run = shutil.copytree(sealed[name], tmp_path / "run")
    older, newest = _saves(run)[-2:]
    shutil.copy(run / older / stale, run / newest / stale)
    assert ("error", "checksum_mismatch") in _codes(str(run / newest))
    assert _latest(str(run)) == older


def test_a_rotted_byte_of_a_sealed_save_is_caught(sealed, tmp_path):
    from tests.helpers import flip_byte

    run = shutil.copytree(sealed["accelerate"], tmp_path / "run")
    newest = run / _saves(run)[-1]
    flip_byte(newest / "random_states_0.pkl", os.path.getsize(newest / "random_states_0.pkl") // 2)
    assert ("error", "checksum_mismatch") in _codes(str(newest))


def test_a_broken_save_is_logged_not_sealed_and_training_goes_on(tmp_path, caplog):
    from ckpttool.integrations.sealing import seal

    broken = tmp_path / "checkpoint-2"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    with caplog.at_level("ERROR", logger="ckpttool.seal"):
        assert seal(str(broken)) is None
    assert "not sealing" in caplog.text and not (broken / MANIFEST_NAME).exists()


def test_deepspeed_sample_sealed_by_install_sealing(tmp_path):
    """tests/data/deepspeed/sealed_zero2: written by DeepSpeed's engine with install_sealing (fixtures/
    deepspeed_runs.py, 2 ranks on CPU): each tag dir holds the manifest, and a rank's partition from the earlier
    tag is caught by its step and its checksum."""
    run = os.path.join(DATA, "deepspeed", "sealed_zero2")
    for tag in ("global_step3", "global_step5"):
        assert os.path.isfile(os.path.join(run, tag, MANIFEST_NAME))
        assert _codes(os.path.join(run, tag), require_manifest=True) == []
    copy = shutil.copytree(run, tmp_path / "run")
    name = "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shutil.copy(copy / "global_step3" / name, copy / "global_step5" / name)
    assert {("error", "checksum_mismatch"), ("error", "step_mismatch")} <= set(_codes(str(copy / "global_step5")))


def test_accelerate_automatic_naming_is_sealed(tmp_path):
    """save_state() with automatic checkpoint naming: each checkpoints/checkpoint_N it returns is sealed, and
    total_limit's deletions take their manifests with the dirs."""
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import ProjectConfiguration

    from ckpttool.integrations.accelerate import install_sealing

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    accelerator = Accelerator(cpu=True, project_config=ProjectConfiguration(
        project_dir=str(tmp_path), automatic_checkpoint_naming=True, total_limit=2))
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    install_sealing(accelerator)
    for _ in range(3):
        model(torch.ones(2, 4)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        accelerator.save_state()
    folder = tmp_path / "checkpoints"
    assert sorted(os.listdir(folder)) == ["checkpoint_1", "checkpoint_2"]
    for name in os.listdir(folder):
        assert (folder / name / MANIFEST_NAME).is_file()
        assert _codes(str(folder / name), require_manifest=True) == []
