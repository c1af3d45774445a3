import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from ckpttool import hashing
from ckpttool.checksums import MANIFEST_NAME
from ckpttool.formats import safetensors as st_reader
from tests.helpers import cli, codes, copy, flip_byte


def test_manifest_of_real_accelerate_dir_then_verify(corpus, tmp_path):
    d = copy(corpus["accelerate"], tmp_path)
    result, out = cli("manifest", "--json", d)
    assert result.exit_code == 0, result.output
    doc = json.load(open(os.path.join(d, MANIFEST_NAME)))
    assert doc["algorithm"] == "xxh3_128" and doc["format"] == "accelerate" and doc["step"] == 3
    assert set(doc["files"]) == {"model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl",
                                 "custom_checkpoint_0.pkl"}
    assert any(e["names"] == ["linear_1.weight"] for e in doc["tensors"])
    assert doc["tool"].startswith("ckpttool ") and doc["created"]
    result, report = cli("verify", "--json", "--require-manifest", "--for-resume", d)
    assert result.exit_code == 0, result.output
    assert report["ok"] is True and report["step"] == 3 and report["problems"] == []
    assert {c["check"]: c["status"] for c in report["checks"]}["checksums"] == "pass"


def test_existing_manifest_needs_force(corpus, tmp_path):
    d = copy(corpus["accelerate"], tmp_path)
    assert cli("manifest", d)[0].exit_code == 0
    again = cli("manifest", d)[0]
    assert again.exit_code == 2 and "--force" in again.stderr
    assert cli("manifest", "--force", d)[0].exit_code == 0


def test_flipped_tensor_byte_is_named(corpus, tmp_path):
    f = copy(corpus["safetensors"], tmp_path)
    assert cli("manifest", f)[0].exit_code == 0
    assert os.path.exists(f + ".ckpttool-manifest.json")
    target = next(t for t in st_reader.read_header(f)[0] if t.name == "linear_2.weight")
    flip_byte(f, target.location.offset + 5)
    result, report = cli("verify", "--json", f)
    assert result.exit_code == 1 and report["ok"] is False
    mismatch = [p for p in report["problems"] if p["code"] == "checksum_mismatch"]
    assert [p["key"] for p in mismatch] == ["linear_2.weight"]


def test_flip_outside_tensors_reported_as_header(corpus, tmp_path):
    f = copy(corpus["torch_training"], tmp_path)
    assert cli("manifest", f)[0].exit_code == 0
    size = os.path.getsize(f)
    flip_byte(f, size - 10)  # inside the zip's end-of-central-directory record, no tensor bytes
    result, report = cli("verify", "--json", f)
    assert result.exit_code == 1 and "checksum_mismatch" in codes(report)
    assert any("outside tensor data" in p["message"] for p in report["problems"])


def test_unreadable_file_still_checked_against_manifest(corpus, tmp_path):
    f = copy(corpus["safetensors"], tmp_path)
    cli("manifest", f)
    with open(f, "r+b") as fh:
        fh.truncate(os.path.getsize(f) - 100)
    result, report = cli("verify", "--json", f)
    assert result.exit_code == 1 and codes(report) == ["truncated"]
    assert any("manifest recorded" in p["message"] for p in report["problems"])


def test_multi_piece_file_names_the_damaged_tensor(tmp_path, monkeypatch):
    monkeypatch.setattr(hashing, "PIECE_SIZE", 4096)
    f = str(tmp_path / "big.safetensors")
    save_file({f"t{i}": torch.full((1000,), float(i)) for i in range(8)}, f)
    assert cli("manifest", f)[0].exit_code == 0
    doc = json.load(open(f + ".ckpttool-manifest.json"))
    assert len(doc["files"]["big.safetensors"]["pieces"]) == 8
    t5 = next(t for t in st_reader.read_header(f)[0] if t.name == "t5")
    flip_byte(f, t5.location.offset + 100)
    _, report = cli("verify", "--json", f)
    assert [p.get("key") for p in report["problems"]] == ["t5"]


def test_missing_truncated_and_extra_files_after_manifest(corpus, tmp_path):
    d = copy(corpus["accelerate"], tmp_path)
    cli("manifest", d)
    os.remove(os.path.join(d, "scheduler.bin"))
    with open(os.path.join(d, "optimizer.bin"), "r+b") as f:
        f.truncate(100)
    open(os.path.join(d, "stray.txt"), "w").write("x")
    _, report = cli("verify", "--json", d)
    found = {(p["code"], os.path.basename(p.get("path") or "")) for p in report["problems"]}
    assert ("missing_file", "scheduler.bin") in found
    assert ("truncated", "optimizer.bin") in found
    assert ("checksum_mismatch", "stray.txt") in found


def test_manifest_refused_for_broken_checkpoint(corpus, tmp_path):
    d = copy(corpus["sharded_missing"], tmp_path)
    result, _ = cli("manifest", d)
    assert result.exit_code == 1 and "missing_file" in result.stderr
    assert not os.path.exists(os.path.join(d, MANIFEST_NAME))
    assert not [f for f in os.listdir(d) if f.endswith(".tmp")]


def test_family_manifest(corpus, tmp_path):
    fam = copy(os.path.dirname(corpus["family"]), tmp_path)
    member = os.path.join(fam, "model000003.pt")
    assert cli("manifest", member)[0].exit_code == 0
    assert os.path.exists(os.path.join(fam, "family000003.ckpttool-manifest.json"))
    flip_byte(os.path.join(fam, "opt000003.pt"), 2000)
    _, report = cli("verify", "--json", os.path.join(fam, "ema_0.9999_000003.pt"))
    assert not report["ok"]


def test_require_manifest(corpus):
    result, report = cli("verify", "--json", "--require-manifest", corpus["safetensors"])
    assert result.exit_code == 1 and codes(report) == ["no_manifest"]
    result, report = cli("verify", "--json", corpus["safetensors"])
    assert result.exit_code == 0 and report["ok"]


def test_torch_zip_crc_catches_flip_without_manifest(corpus, tmp_path):
    f = copy(corpus["torch_state_dict"], tmp_path)
    from ckpttool.formats.torchfile import read
    t = read(f).model.tensors[0]
    flip_byte(f, t.location.offset + 3)
    result, report = cli("verify", "--json", f)
    assert result.exit_code == 1 and codes(report) == ["corrupt"]
    assert "CRC" in report["problems"][0]["message"]


def test_crcs_are_checked_once_when_the_manifest_is_written(corpus, tmp_path):
    """A manifest records that every zip CRC held; while every byte still matches it, verify does not re-read them
    for their CRCs (the 128-bit hashes already cover every byte). A manifest is never written over a bad CRC, and an
    older manifest without the record gets the CRC pass as before."""
    from ckpttool.formats.torchfile import read

    f = copy(corpus["torch_state_dict"], tmp_path)
    assert cli("manifest", f)[0].exit_code == 0
    _, report = cli("verify", "--json", f)
    integrity = next(c for c in report["checks"] if c["check"] == "integrity")
    assert report["ok"] and integrity["detail"].endswith("zip CRCs checked when the manifest was written")
    manifest = f + ".ckpttool-manifest.json"
    doc = json.load(open(manifest))
    assert doc["crcs_checked"] is True
    del doc["crcs_checked"]
    json.dump(doc, open(manifest, "w"))
    _, report = cli("verify", "--json", f)
    assert "torch zip CRCs good" in next(c for c in report["checks"] if c["check"] == "integrity")["detail"]
    os.remove(manifest)
    flip_byte(f, read(f).model.tensors[0].location.offset + 3)  # damage the reader alone does not see
    result, _ = cli("manifest", f)
    assert result.exit_code == 1 and "CRC-32" in result.stderr and not os.path.exists(manifest)


@pytest.mark.parametrize("fixture,code", [
    ("torch_step_mismatch", "step_mismatch"), ("simpletuner_step_mismatch", "step_mismatch"),
    ("safetensors_truncated", "truncated"), ("sharded_missing", "missing_file"),
    ("torch_malicious", "unsafe_pickle"), ("diffusers_truncated_newest", "truncated"),
])
def test_verify_failures(corpus, fixture, code, no_payload):
    result, report = cli("verify", "--json", corpus[fixture])
    assert result.exit_code == 1 and report["ok"] is False and code in codes(report, "error")


@pytest.mark.parametrize("fixture", ["accelerate", "accelerate_bin", "accelerate_auto", "diffusers", "kohya_state",
                                     "kohya_step_state", "simpletuner", "fsdp", "family", "torch_training"])
def test_real_checkpoints_verify(corpus, fixture):
    result, report = cli("verify", "--json", corpus[fixture])
    assert result.exit_code == 0, report["problems"]


def test_step_mismatch_names_sources(corpus):
    _, report = cli("verify", "--json", corpus["torch_step_mismatch"])
    message = next(p["message"] for p in report["problems"] if p["code"] == "step_mismatch")
    assert "optimizer state step is 3, 7 behind the global step 10" in message and "another save" in message
    # Accelerate's RNG `step` (an accumulation counter, 0 here) is never compared
    _, report = cli("verify", "--json", corpus["accelerate"])
    assert "step_mismatch" not in codes(report)


def test_scheduler_stepping_per_process_is_a_warning(tmp_path):
    from fixtures.generate import _trained
    model, opt, sched = _trained(2)
    state = sched.state_dict()
    state["last_epoch"], state["_step_count"] = 4, 5
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "lr_scheduler": state,
                "global_step": 2}, tmp_path / "x.pt")
    result, report = cli("verify", "--json", tmp_path / "x.pt")
    assert result.exit_code == 0 and codes(report, "warning") == ["step_mismatch"]


def test_config_cross_check(corpus, monkeypatch):
    result, report = cli("verify", "--json", "--config", corpus["config_step_mismatch"])
    assert result.exit_code == 1
    message = next(p["message"] for p in report["problems"] if p["code"] == "step_mismatch")
    assert "global_step is 10000" in message and "at step 3" in message
    monkeypatch.setenv("CKPT_ROOT", corpus["_root"])
    result, report = cli("verify", "--json", "--config", corpus["config_step_match"])
    assert result.exit_code == 0 and report["path"].endswith("checkpoint-3")
    monkeypatch.delenv("CKPT_ROOT")
    result, _ = cli("verify", "--config", corpus["config_step_match"])
    assert result.exit_code == 2 and "CKPT_ROOT" in result.stderr


def test_expect_step(corpus):
    assert cli("verify", "--expect-step", "3", corpus["kohya_state"])[0].exit_code == 0
    result, report = cli("verify", "--json", "--expect-step", "5", corpus["kohya_state"])
    assert result.exit_code == 1 and codes(report) == ["step_mismatch"]


def test_for_resume_weights_only_names_state_dir(corpus):
    result, report = cli("verify", "--json", "--for-resume", corpus["kohya_weights"])
    assert result.exit_code == 1 and codes(report) == ["weights_only"]
    assert "run-000001-state" in report["problems"][0]["message"]


def test_for_resume_missing_parts(corpus, tmp_path):
    from fixtures.generate import _trained
    model, opt, sched = _trained(2)
    torch.save({"model": model.state_dict(), "lr_scheduler": sched.state_dict(), "global_step": 2}, tmp_path / "a.pt")
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "global_step": 2}, tmp_path / "b.pt")
    assert codes(cli("verify", "--json", "--for-resume", tmp_path / "a.pt")[1], "error") == ["missing_optimizer"]
    assert codes(cli("verify", "--json", "--for-resume", tmp_path / "b.pt")[1], "error") == ["missing_scheduler"]
    d = copy(corpus["accelerate"], tmp_path)
    os.remove(os.path.join(d, "random_states_0.pkl"))
    result, report = cli("verify", "--json", "--for-resume", d)
    assert result.exit_code == 0 and codes(report, "warning") == ["missing_rng"]


def test_for_resume_incomplete_simpletuner(corpus, tmp_path):
    result, report = cli("verify", "--json", "--for-resume", corpus["simpletuner_tmp"])
    assert result.exit_code == 1 and "missing_file" in codes(report)
    # SimpleTuner up to 3.1.6 writes no .guard: an unguarded dir alone is fine ...
    d = copy(corpus["simpletuner"], tmp_path)
    os.remove(os.path.join(d, ".guard"))
    assert cli("verify", "--json", "--for-resume", d)[0].exit_code == 0
    # ... but not where this version writes one: beside its checkpoint_manifest.json, or in a run whose other
    # checkpoints carry one
    with open(os.path.join(d, "checkpoint_manifest.json"), "w") as f:
        f.write("{}")
    assert "missing_file" in codes(cli("verify", "--json", d)[1], "error")
    os.remove(os.path.join(d, "checkpoint_manifest.json"))
    copy(corpus["simpletuner"], tmp_path, "checkpoint-6")
    report = cli("verify", "--json", d)[1]
    assert "missing_file" in codes(report, "error") and "other checkpoints carry a .guard" in str(report)


def test_finite_scan(tmp_path):
    good = {"a": torch.ones(3), "b": torch.zeros(2, dtype=torch.bfloat16)}
    save_file(good, tmp_path / "good.safetensors")
    bad = dict(good, c=torch.tensor([1.0, float("nan")]), d=torch.tensor([float("inf")], dtype=torch.float16))
    save_file(bad, tmp_path / "bad.safetensors")
    assert cli("verify", "--finite", tmp_path / "good.safetensors")[0].exit_code == 0
    result, report = cli("verify", "--json", "--finite", tmp_path / "bad.safetensors")
    assert result.exit_code == 1 and codes(report) == ["nonfinite"]
    assert "model/c" in report["problems"][0]["message"] and "model/d" in report["problems"][0]["message"]


def test_verify_with_manifest_does_not_import_torch(corpus, tmp_path):
    f = copy(corpus["safetensors"], tmp_path)
    cli("manifest", f)
    code = ("import sys, runpy; sys.argv = ['ckpttool', 'verify', '--require-manifest', %r]\n"
            "try:\n    runpy.run_module('ckpttool', run_name='__main__')\nexcept SystemExit as e:\n"
            "    assert e.code == 0, e.code\nassert 'torch' not in sys.modules\n") % f
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_verify_usage_errors(corpus, tmp_path):
    assert cli("verify")[0].exit_code == 2
    assert cli("verify", tmp_path / "nope")[0].exit_code == 2
    assert cli("verify", "--expect-step", "x", corpus["safetensors"])[0].exit_code == 2
