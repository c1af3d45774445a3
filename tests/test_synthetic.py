"""`ckpttool fixtures` and the pytest plugin `ckpttool.testing` (issue 36): checkpoints written by the trainers' real
libraries, damaged copies each named by the code `verify --for-resume` gives it, healthy ones resumed by their own
library, and a test file outside the repository that uses only the plugin."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from tests.helpers import cli

pytest.importorskip("accelerate")


@pytest.fixture(scope="module")
def listing(tmp_path_factory):
    out = tmp_path_factory.mktemp("fixtures") / "out"
    result, doc = cli("fixtures", str(out), "--trainer", "accelerate", "--trainer", "transformers", "--trainer",
                      "lightning", "--damage", "truncated", "--damage", "missing-optimizer", "--damage", "stale",
                      "--damage", "bit-flip", "--json")
    assert result.exit_code == 0, result.output
    return doc


def test_every_damaged_copy_gives_its_listed_code(listing):
    from ckpttool.gate import ResumeGateError, check_resume

    damaged = [e for e in listing["entries"] if e["damage"]]
    assert {e["damage"] for e in damaged} >= {"truncated-optimizer", "missing-optimizer", "stale-optimizer",
                                             "bit-flip", "truncated-checkpoint"}
    for entry in damaged:
        result, report = cli("verify", "--for-resume", "--json", entry["path"])
        assert result.exit_code == 1, entry
        assert entry["expected_code"] in {p["code"] for p in report["problems"] if p["severity"] == "error"}, entry
        with pytest.raises(ResumeGateError):
            check_resume(entry["path"])
    codes = {e["damage"]: e["expected_code"] for e in damaged if e["trainer"] == "accelerate"}
    assert codes.items() >= {"truncated-optimizer": "truncated", "missing-optimizer": "missing_optimizer",
                             "stale-optimizer": "step_mismatch"}.items()


def test_healthy_ones_verify_and_resume_with_their_own_library(listing):
    from ckpttool.synthetic import runs

    healthy = {e["trainer"]: e["path"] for e in listing["entries"] if not e["damage"]}
    assert set(healthy) == {"accelerate", "transformers", "lightning"}
    for path in healthy.values():
        assert cli("verify", "--for-resume", path)[0].exit_code == 0, path
    runs.resume_accelerate(healthy["accelerate"])  # Accelerator.load_state
    state = runs.resume_transformers(healthy["transformers"])  # Trainer.train(resume_from_checkpoint=...)
    assert state["optimizer_restored"] and state["saved"] == 4 and state["global_step"] >= 4
    import lightning as L

    trainer = L.Trainer(max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(runs.lightning_module(), torch.utils.data.DataLoader(
        [torch.randint(0, 10, (8,)) for _ in range(8)], batch_size=4), ckpt_path=healthy["lightning"])
    assert trainer.global_step == 4


def test_refusals(tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "mine.txt").write_text("keep me")
    result = cli("fixtures", str(tmp_path / "busy"))[0]
    assert result.exit_code == 2 and "nothing is overwritten" in result.output
    assert (tmp_path / "busy" / "mine.txt").read_text() == "keep me"
    result = cli("fixtures", str(tmp_path / "new"), "--trainer", "nonesuch")[0]
    assert result.exit_code == 2 and "accelerate" in result.output


def test_a_trainer_whose_library_is_missing_is_skipped_with_the_reason(tmp_path, monkeypatch):
    from ckpttool.synthetic import catalog

    real = catalog.importlib.util.find_spec
    monkeypatch.setattr(catalog.importlib.util, "find_spec", lambda name: None if name == "lightning" else real(name))
    result, doc = cli("fixtures", str(tmp_path / "out"), "--trainer", "lightning", "--trainer", "dcp", "--json")
    assert result.exit_code == 0
    assert doc["skipped"] == [{"trainer": "lightning", "reason": "lightning not installed (pip install "
                                                                "'ckpttool[fixtures]')"}]
    assert [e["trainer"] for e in doc["entries"]] == ["dcp"]


PLUGIN_USER = '''
import pytest
from ckpttool.gate import ResumeGateError, check_resume
from ckpttool.testing import expected_code


def test_resume_refuses_cut_optimizer(synthetic_checkpoint):
    path = synthetic_checkpoint("accelerate", damage="truncated-optimizer")
    with pytest.raises(ResumeGateError):
        check_resume(path)
    assert expected_code("truncated-optimizer") == "truncated"


def test_healthy_resumes(synthetic_checkpoint):
    check_resume(synthetic_checkpoint("accelerate"))
'''


def test_a_project_uses_only_the_plugin(pytester):
    """A test file outside the repository, in a fresh folder, with nothing but the installed plugin."""
    pytester.makepyfile(test_user=PLUGIN_USER)
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)


def test_the_sweep_uses_the_same_damage_kinds():
    import sweep
    from ckpttool.synthetic import damage

    assert sweep.MODES == (damage.MISSING, damage.TRUNCATED, damage.EMPTY) and sweep.STALE == damage.STALE
    assert sweep.damage_file is damage.damage_file
