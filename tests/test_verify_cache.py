"""verify recalls a clean report of unchanged files (ckpttool.operations.verify_cache) and never a stale one."""

from __future__ import annotations

import json
import os

import pytest
import torch
from click.testing import CliRunner

from ckpttool.cli import main
from ckpttool.operations import manifest, verify as verify_module, verify_cache
from ckpttool.operations.verify import verify


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("CKPTTOOL_CACHE_DIR", str(folder))
    monkeypatch.setattr(verify_cache, "RACY_SECONDS", 0.0)  # the files were written a moment ago
    return folder


@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "run" / "model.pt"
    path.parent.mkdir()
    torch.save({"w": torch.randn(64, 64), "b": torch.zeros(64)}, path)
    manifest.write(str(path))
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


def test_unchanged_checkpoint_is_recalled_without_a_parse(cache, checkpoint, full_runs):
    first = verify(checkpoint)
    second = verify(checkpoint)
    assert first["ok"] and len(full_runs) == 1
    assert second.pop("recalled") is True and second == first
    assert len(list(cache.iterdir())) == 1


def test_bit_rot_that_keeps_the_identity_is_still_caught(cache, checkpoint, full_runs):
    verify(checkpoint)
    data = bytearray(open(checkpoint, "rb").read())
    data[-200] ^= 0xFF  # inside the zip directory: the bytes differ, the hash says so
    with open(checkpoint, "wb") as f:
        f.write(data)
    (entry,) = cache.iterdir()
    doc = json.loads(entry.read_text())
    for path in doc["identity"]:  # as if the flip had left size, times and inode alone
        doc["identity"][path] = verify_cache._identity(path)
    entry.write_text(json.dumps(doc))
    report = verify(checkpoint)
    assert "recalled" not in report and not report["ok"] and len(full_runs) == 2
    assert "checksum_mismatch" in {p["code"] for p in report["problems"]}


@pytest.mark.parametrize("change", ["touch", "sibling", "manifest"])
def test_any_change_to_what_verify_read_means_a_full_verify(cache, checkpoint, full_runs, change):
    verify(checkpoint)
    if change == "touch":
        os.utime(checkpoint, ns=(1, 1))
    elif change == "sibling":  # a new file beside it could change which trainer or family it belongs to
        open(os.path.join(os.path.dirname(checkpoint), "opt.pt"), "wb").close()
    else:
        manifest.write(checkpoint, force=True)
    assert "recalled" not in verify(checkpoint)
    assert len(full_runs) == 2


def test_other_options_are_kept_apart(cache, checkpoint, full_runs):
    verify(checkpoint)
    assert "recalled" not in verify(checkpoint, expect_step=None, finite=True)
    assert verify(checkpoint, finite=True)["recalled"] and verify(checkpoint)["recalled"]
    assert len(full_runs) == 2


def test_only_clean_reports_checked_against_a_manifest_are_kept(cache, tmp_path, checkpoint):
    bare = tmp_path / "bare.pt"
    torch.save({"w": torch.randn(4)}, bare)
    verify(str(bare))  # no manifest: nothing to re-hash against
    verify(checkpoint, expect_step=5)  # fails: no step recorded
    assert not cache.exists() or not list(cache.iterdir())


def test_recently_changed_files_are_not_kept(tmp_path, checkpoint, monkeypatch):
    monkeypatch.setenv("CKPTTOOL_CACHE_DIR", str(tmp_path / "cache"))
    verify(checkpoint)  # written this instant: a second write in the same tick would keep its identity
    assert not (tmp_path / "cache").exists()


def test_unwritable_cache_folder_is_no_error(tmp_path, checkpoint, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("CKPTTOOL_CACHE_DIR", str(blocker / "verify"))
    monkeypatch.setattr(verify_cache, "RACY_SECONDS", 0.0)
    assert verify(checkpoint)["ok"] and verify(checkpoint)["ok"]


def test_cli_recalls_and_says_so(cache, checkpoint):
    runner = CliRunner()
    first = runner.invoke(main, ["verify", "--json", checkpoint])
    second = runner.invoke(main, ["verify", "--json", checkpoint])
    assert first.exit_code == second.exit_code == 0
    recalled = json.loads(second.stdout)
    assert recalled.pop("recalled") is True and recalled == json.loads(first.stdout)
    text = runner.invoke(main, ["verify", checkpoint]).stdout
    assert "recalled" in text and "OK: verified" in text
