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


@pytest.mark.parametrize("name", ["transformers", "transformers_ddp", "accelerate"])
def test_every_saved_dir_is_sealed_and_verifies_clean(sealed, name):
    run = sealed[name]
    saves = _saves(run)
    assert len(saves) == 2
    for save in saves:
        path = os.path.join(run, save)
        assert os.path.isfile(os.path.join(path, MANIFEST_NAME))
        assert _codes(path, require_manifest=True) == []


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
])
def test_a_stale_file_of_a_sealed_save_is_caught_and_skipped(sealed, tmp_path, name, stale):
    run = shutil.copytree(sealed[name], tmp_path / "run")
    older, newest = _saves(run)
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
