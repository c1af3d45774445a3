import os

import pytest
import torch

from tests.helpers import cli, copy, state_dir


def test_latest_skips_truncated_newest_diffusers(corpus):
    run = os.path.dirname(corpus["diffusers"])
    result, out = cli("latest", "--json", run)
    assert result.exit_code == 0
    assert out["path"] == corpus["diffusers"] and out["step"] == 3
    assert out["skipped"] == [{"path": corpus["diffusers_truncated_newest"], "codes": ["truncated"],
                               "reason": out["skipped"][0]["reason"], "trainer": "diffusers"}]
    # diffusers' own `--resume_from_checkpoint latest` would take the truncated checkpoint-5: said, with why
    assert out["trainer"] == "diffusers" and out["trainer_pick"] == corpus["diffusers_truncated_newest"]
    assert "truncated" in out["differs"] and "checkpoint-5" in out["differs"]
    text = cli("latest", run)[0]
    assert text.stdout.strip() == corpus["diffusers"] and "skipped" in text.stderr


def test_latest_skips_simpletuner_tmp(corpus):
    _, out = cli("latest", "--json", os.path.dirname(corpus["simpletuner"]))
    assert out["path"] == corpus["simpletuner"]
    assert [s["path"] for s in out["skipped"]] == [corpus["simpletuner_tmp"]]


def test_latest_family_newest_complete_step(corpus):
    _, out = cli("latest", "--json", os.path.dirname(corpus["family"]))
    assert out["step"] == 3 and os.path.basename(out["path"]) == "model000003.pt"
    assert out["skipped"][0]["codes"] == ["missing_file"]


def test_latest_accelerate_automatic_naming(corpus):
    project = os.path.dirname(os.path.dirname(corpus["accelerate_auto"]))
    _, out = cli("latest", "--json", project)
    assert out["path"] == corpus["accelerate_auto"]


def test_latest_kohya_and_for_resume(corpus):
    run = os.path.dirname(corpus["kohya_state"])
    _, out = cli("latest", "--json", "--for-resume", run)
    assert out["path"] == corpus["kohya_step_state"]


def test_latest_bare_files_and_none_valid(tmp_path):
    from fixtures.generate import _trained
    for step in (10, 20):
        model, opt, sched = _trained(1)
        torch.save({"model": model.state_dict(), "step": step}, tmp_path / f"ckpt_step{step}.pt")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    _, out = cli("latest", "--json", tmp_path)
    assert out["path"].endswith("ckpt_step20.pt") and out["step"] == 20
    empty = tmp_path / "empty"
    empty.mkdir()
    result, out = cli("latest", "--json", empty)
    assert result.exit_code == 1 and out["path"] is None
    assert cli("latest", tmp_path / "notes.txt")[0].exit_code == 2


@pytest.fixture
def run_dir(tmp_path):
    """checkpoint-1 .. checkpoint-6 (real state after that many steps), a broken checkpoint-7, and other files."""
    run = tmp_path / "run"
    run.mkdir()
    for step in range(1, 7):
        state_dir(str(run / f"checkpoint-{step}"), step)
    broken = state_dir(str(run / "checkpoint-7"), 7)
    with open(os.path.join(broken, "optimizer.bin"), "r+b") as f:
        f.truncate(200)
    (run / "logs").mkdir()
    (run / "config.yaml").write_text("lr: 1")
    return run


def remaining(run):
    return sorted(os.listdir(run))


def test_prune_keeps_newest_valid_and_non_checkpoints(run_dir):
    result, out = cli("prune", "--json", "--keep", "2", run_dir)
    assert result.exit_code == 0
    assert remaining(run_dir) == ["checkpoint-5", "checkpoint-6", "checkpoint-7", "config.yaml", "logs"]
    assert sorted(os.path.basename(d["path"]) for d in out["delete"]) == [f"checkpoint-{i}" for i in range(1, 5)]
    kept = {os.path.basename(k["path"]): k["reason"] for k in out["keep"]}
    assert kept["checkpoint-6"].startswith("newest valid")
    assert "may still be being written" in kept["checkpoint-7"]


def test_prune_keep_every_and_dry_run(run_dir):
    result, out = cli("prune", "--json", "--keep", "1", "--keep-every", "2", "--dry-run", run_dir)
    assert result.exit_code == 0 and out["dry_run"] is True
    assert sorted(os.path.basename(d["path"]) for d in out["delete"]) == ["checkpoint-1", "checkpoint-3",
                                                                         "checkpoint-5"]
    assert len(remaining(run_dir)) == 9  # nothing deleted
    cli("prune", "--keep", "1", "--keep-every", "2", run_dir)
    assert remaining(run_dir) == ["checkpoint-2", "checkpoint-4", "checkpoint-6", "checkpoint-7", "config.yaml",
                                  "logs"]


def test_prune_usage_errors(run_dir):
    assert cli("prune", "--keep", "0", run_dir)[0].exit_code == 2
    assert cli("prune", run_dir)[0].exit_code == 2
    assert len(remaining(run_dir)) == 9


def test_prune_family_removes_every_member(tmp_path):
    from fixtures.generate import _trained
    for step in (1, 2, 3):
        model, opt, _ = _trained(step)
        torch.save(model.state_dict(), tmp_path / f"model{step:06d}.pt")
        torch.save(model.state_dict(), tmp_path / f"ema_0.999_{step:06d}.pt")
        torch.save(opt.state_dict(), tmp_path / f"opt{step:06d}.pt")
    assert cli("manifest", tmp_path / "model000001.pt")[0].exit_code == 0
    result, out = cli("prune", "--json", "--keep", "1", tmp_path)
    assert result.exit_code == 0
    assert remaining(tmp_path) == ["ema_0.999_000003.pt", "model000003.pt", "opt000003.pt"]


def test_prune_keeps_invalid_newest_family_step(corpus, tmp_path):
    fam = copy(os.path.dirname(corpus["family"]), tmp_path)
    # step 5 lacks its optimizer file and is newer than the only valid step: nothing may go
    _, out = cli("prune", "--json", "--keep", "1", fam)
    assert out["delete"] == [] and len(out["keep"]) == 2
