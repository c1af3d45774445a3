"""verify recalls a clean report while names and bytes are unchanged (ckpttool.operations.verify_cache), manifest
seeds it, and a recalled report is never a stale one."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from click.testing import CliRunner

from ckpttool import checksums
from ckpttool.cli import main
from ckpttool.operations import manifest, verify_cache
from ckpttool.operations import verify as verify_module
from ckpttool.operations.verify import verify
from tests.helpers import copy, flip_byte
from tests.test_trainers import HEALTHY as TRAINER_RUNS
from tests.test_trainers import run_dir


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("CKPTTOOL_CACHE_DIR", str(folder))
    return folder


@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "run" / "model.pt"
    path.parent.mkdir()
    torch.save({"w": torch.randn(64, 64), "b": torch.zeros(64)}, path)
    return str(path)


@pytest.fixture
def full_runs(monkeypatch):
    """How many full (parsing) verifies ran."""
    calls = []
    real = verify_module._verify

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(verify_module, "_verify", counting)
    return calls


def _seeded_equals_full(path, full_runs):
    """After `manifest`, verify (with and without --for-resume) recalls without a parse exactly when a full verify is
    clean, and then gives the full verify's report."""
    manifest.write(path)
    for for_resume in (False, True):
        before = len(full_runs)
        recalled = verify(path, for_resume=for_resume).to_json()
        full = verify(path, for_resume=for_resume, recall=False).to_json()
        clean = full["ok"] and not full["problems"]
        assert recalled.pop("recalled", False) is clean, (for_resume, full["problems"])
        assert recalled == full
        assert len(full_runs) == before + 1 + (not clean)  # the recall parsed nothing


LAYOUTS = ["safetensors", "torch_state_dict", "torch_training", "torch_legacy", "torch_cuda", "torch_tied", "sharded",
           "sharded_bin", "accelerate", "accelerate_bin", "diffusers", "kohya_state", "simpletuner", "dcp", "family"]


@pytest.mark.parametrize("name", LAYOUTS)
def test_manifest_seeds_the_report_a_full_verify_gives(cache, corpus, tmp_path, full_runs, name):
    folder = copy(os.path.dirname(corpus[name]), str(tmp_path))
    path = os.path.join(folder, os.path.basename(corpus[name]))
    _seeded_equals_full(path, full_runs)
    assert verify(path).recalled  # every healthy layout verifies clean


@pytest.mark.parametrize("key,name", [(k, n) for k, n, _, _ in TRAINER_RUNS[::2]],
                         ids=[f"{k}/{n}" for k, n, _, _ in TRAINER_RUNS[::2]])
def test_manifest_seeds_real_trainer_runs(cache, runs, tmp_path, full_runs, key, name):
    """Real runs: the seeded report needs the run's other saves (step judging), which stay beside it."""
    folder = copy(run_dir(runs, key), str(tmp_path))
    path = os.path.join(folder, name)
    _seeded_equals_full(path, full_runs)
    assert verify(path, for_resume=True).recalled  # every real healthy save is clean for a resume


@pytest.mark.parametrize("name,inside", [("deepspeed/zero3", ""), ("deepspeed/fp16_zero2", ""),
                                         ("deepspeed/transformers_zero2", "checkpoint-6"), ("peft", "")])
def test_manifest_seeds_deepspeed_and_peft_saves(cache, runs, tmp_path, full_runs, name, inside):
    """Saves DeepSpeed wrote (ZeRO-3, fp16 on an H100, under transformers.Trainer) and a PEFT adapter."""
    source = runs["peft"] if name == "peft" else os.path.join(os.path.dirname(__file__), "data", name)
    (tmp_path / "run").mkdir()  # not beside the cache folder: a name added there is a change
    path = os.path.join(copy(source, str(tmp_path / "run")), inside)
    _seeded_equals_full(path, full_runs)
    assert verify(path).recalled  # each verifies clean


def test_first_verify_after_manifest_is_a_recall(cache, checkpoint, full_runs):
    manifest.write(checkpoint)
    report = verify(checkpoint, require_manifest=True)  # --require-manifest shares the entry
    assert report.recalled and report.ok and full_runs == []
    kept = verify_cache._entry_path(checkpoint, None, {"expect_step": None, "for_resume": False, "finite": False})
    assert [str(e) for e in cache.iterdir()] == [kept]  # for a resume, weights alone are refused: not clean, not kept


def test_a_full_verify_is_remembered(cache, checkpoint, full_runs):
    manifest.write(checkpoint)
    shutil.rmtree(cache)
    first = verify(checkpoint).to_json()
    second = verify(checkpoint).to_json()
    assert first["ok"] and len(full_runs) == 1
    assert second.pop("recalled") is True and second == first


def test_bit_rot_is_caught(cache, checkpoint, full_runs):
    manifest.write(checkpoint)
    flip_byte(checkpoint, os.path.getsize(checkpoint) - 200)  # inside the zip directory: no CRC covers it
    report = verify(checkpoint)
    assert not report.recalled and not report.ok and len(full_runs) == 1
    assert "checksum_mismatch" in {p.code for p in report.problems}


@pytest.mark.parametrize("change", ["sibling", "removed", "subfolder", "manifest"])
def test_a_changed_name_or_manifest_means_a_full_verify(cache, checkpoint, full_runs, change):
    folder = os.path.dirname(checkpoint)
    other = os.path.join(folder, "opt.pt")
    open(other, "wb").close()
    manifest.write(checkpoint)
    if change == "sibling":  # a new file beside it could change which trainer or family it belongs to
        open(os.path.join(folder, "ema.pt"), "wb").close()
    elif change == "removed":
        os.remove(other)
    elif change == "subfolder":  # a file turned folder: kohya's `-state` dirs, diffusers' checkpoint-N
        os.remove(other)
        os.mkdir(other)
    else:  # the same digests, other bytes: it is not the manifest the report was checked against
        target = checkpoint + checksums.MANIFEST_SUFFIX
        doc = json.load(open(target))
        doc["note"] = "edited"
        json.dump(doc, open(target, "w"))
    assert not verify(checkpoint).recalled
    assert len(full_runs) == 1


def test_a_touch_is_no_change(cache, checkpoint, full_runs):
    """Nothing trusts a timestamp: the same names and bytes recall, whatever the clock says."""
    manifest.write(checkpoint)
    os.utime(checkpoint, ns=(1, 1))
    assert verify(checkpoint).recalled and full_runs == []


def test_a_name_that_comes_while_verify_reads_is_not_remembered(cache, checkpoint, monkeypatch):
    manifest.write(checkpoint)
    shutil.rmtree(cache)
    real = verify_module.check_steps

    def sibling_appears(*args, **kwargs):
        open(os.path.join(os.path.dirname(checkpoint), "opt.pt"), "wb").close()
        return real(*args, **kwargs)

    monkeypatch.setattr(verify_module, "check_steps", sibling_appears)
    assert verify(checkpoint).ok
    assert not cache.exists() or not list(cache.iterdir())


def test_other_options_are_kept_apart(cache, checkpoint, full_runs):
    manifest.write(checkpoint)
    assert not verify(checkpoint, finite=True).recalled
    assert verify(checkpoint, finite=True).recalled and verify(checkpoint).recalled
    assert not verify(checkpoint, expect_step=5).recalled  # fails (no step recorded): not kept either
    assert not verify(checkpoint, expect_step=5).recalled
    assert len(full_runs) == 3


def test_only_clean_reports_checked_against_a_manifest_are_kept(cache, tmp_path):
    bare = tmp_path / "bare.pt"
    torch.save({"w": torch.randn(4)}, bare)
    verify(str(bare))  # no manifest: nothing to re-hash against
    assert not cache.exists() or not list(cache.iterdir())


def test_oldest_entries_are_evicted(cache, checkpoint, monkeypatch, full_runs):
    monkeypatch.setattr(verify_cache, "MAX_ENTRIES", 1)
    manifest.write(checkpoint)
    (seeded,) = cache.iterdir()
    os.utime(seeded, ns=(1, 1))  # older than the next by more than the clock's tick
    verify(checkpoint, finite=True)
    assert len(list(cache.iterdir())) == 1
    assert verify(checkpoint, finite=True).recalled and not verify(checkpoint).recalled
    assert len(full_runs) == 2


def test_unwritable_cache_folder_is_no_error(tmp_path, checkpoint, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("CKPTTOOL_CACHE_DIR", str(blocker / "verify"))
    manifest.write(checkpoint)
    assert verify(checkpoint).ok and verify(checkpoint).ok


def test_cli_recalls_and_says_so(cache, checkpoint):
    runner = CliRunner()
    assert runner.invoke(main, ["manifest", checkpoint]).exit_code == 0
    recalled = runner.invoke(main, ["verify", "--json", checkpoint])
    full = runner.invoke(main, ["verify", "--json", checkpoint], env={"CKPTTOOL_CACHE_DIR": ""})
    assert recalled.exit_code == full.exit_code == 0
    report = json.loads(recalled.stdout)
    assert report.pop("recalled") is True and report == json.loads(full.stdout)
    text = runner.invoke(main, ["verify", checkpoint]).stdout
    assert "recalled" in text and "OK: verified" in text
