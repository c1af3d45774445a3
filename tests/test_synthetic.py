"""`ckpttool fixtures` and the pytest plugin `ckpttool.testing` (issue 36): checkpoints written by the trainers' real
libraries, damaged copies each named by the code `verify --for-resume` gives it, healthy ones resumed by their own
library, and a test file outside the repository that uses only the plugin."""

from __future__ import annotations

import os

import pytest
import torch

from tests.helpers import cli

pytest.importorskip("accelerate")


@pytest.fixture(scope="module")
def listing(tmp_path_factory):
    out = tmp_path_factory.mktemp("fixtures") / "out"
    result, doc = cli("fixtures", str(out), "--trainer", "accelerate", "--trainer", "transformers", "--trainer",
                      "transformers-peft", "--trainer", "lightning", "--damage", "truncated", "--damage", "missing-optimizer", "--damage", "stale",
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
    assert set(healthy) == {"accelerate", "transformers", "transformers-peft", "lightning"}
    for path in healthy.values():
        assert cli("verify", "--for-resume", path)[0].exit_code == 0, path
    runs.resume_accelerate(healthy["accelerate"])  # Accelerator.load_state
    state = runs.resume_transformers(healthy["transformers"])  # Trainer.train(resume_from_checkpoint=...)
    assert state["optimizer_restored"] and state["saved"] == 4 and state["global_step"] >= 4
    state = runs.resume_transformers(healthy["transformers-peft"], peft=True)  # the adapter, through PEFT
    assert state["optimizer_restored"] and state["saved"] == 4
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
from ckpttool.testing import expected_code, world_size


def test_resume_refuses_cut_optimizer(synthetic_checkpoint):
    path = synthetic_checkpoint("accelerate", damage="truncated-optimizer")
    with pytest.raises(ResumeGateError):
        check_resume(path)
    assert expected_code("truncated-optimizer") == "truncated"


def test_healthy_resumes(synthetic_checkpoint):
    check_resume(synthetic_checkpoint("accelerate"))


def test_two_ranks_wrote_deepspeeds(synthetic_checkpoint):
    path = synthetic_checkpoint("deepspeed", damage="stale-mp_rank_00_model_states")
    with pytest.raises(ResumeGateError, match="step_mismatch"):
        check_resume(path, world_size=world_size("deepspeed"))
    check_resume(synthetic_checkpoint("deepspeed"), world_size=world_size("deepspeed"))
'''


def test_a_project_uses_only_the_plugin(pytester):
    """A test file outside the repository, in a fresh folder, with nothing but the installed plugin."""
    pytester.makepyfile(test_user=PLUGIN_USER)
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)


def test_the_sweep_uses_the_same_damage_kinds():
    import sweep
    from ckpttool.synthetic import damage

    assert sweep.MODES == (damage.MISSING, damage.TRUNCATED, damage.EMPTY) and sweep.STALE == damage.STALE
    assert sweep.damage_file is damage.damage_file


def test_the_reference_trainer_is_never_the_callers_trainer_py(tmp_path, monkeypatch):
    """`python -m trainer` runs from the new folder it writes, so a trainer.py in the caller's folder never runs."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "trainer.py").write_text("open('RAN', 'w').write('x')\nraise SystemExit(1)\n")
    monkeypatch.chdir(project)
    result, doc = cli("fixtures", "out", "--trainer", "reference", "--json")
    assert result.exit_code == 0, result.output
    assert not (project / "RAN").exists()
    assert all(os.path.isabs(e["path"]) for e in doc["entries"])  # absolute, wherever they are read from
    assert not os.path.exists(os.path.join(doc["out"], ".ckpttool-fixtures-incomplete"))


def test_odd_options_are_usage_errors_or_deduplicated(tmp_path):
    for damage in ("trunacted", "", "all", "bit", "missing-"):
        result = cli("fixtures", str(tmp_path / "o"), "--trainer", "dcp", "--damage", damage)[0]
        assert result.exit_code == 2 and "not a damage kind" in result.output, damage
    os.symlink(tmp_path / "nowhere" / "deep", tmp_path / "dangling")
    assert cli("fixtures", str(tmp_path / "dangling"))[0].exit_code == 2
    result, doc = cli("fixtures", str(tmp_path / "dup"), "--trainer", "dcp", "--trainer", "dcp", "--damage",
                      "truncated", "--damage", "truncated", "--json")
    assert result.exit_code == 0 and len([e for e in doc["entries"] if not e["damage"]]) == 1


def test_a_library_that_fails_to_import_skips_its_trainer(tmp_path, monkeypatch):
    from ckpttool.synthetic import catalog

    real = catalog.importlib.import_module

    def broken(name, *args):
        if name == "lightning":
            raise ImportError("a broken install")
        return real(name, *args)

    monkeypatch.setattr(catalog.importlib, "import_module", broken)
    result, doc = cli("fixtures", str(tmp_path / "out"), "--trainer", "lightning", "--trainer", "dcp", "--json")
    assert result.exit_code == 0
    assert doc["skipped"] == [{"trainer": "lightning", "reason": "lightning fails to import (ImportError: a broken "
                                                                "install)"}]


PLUGIN_ORDER = '''
from ckpttool.testing import expected_code


def test_one(synthetic_checkpoint):
    synthetic_checkpoint("accelerate", damage="bit-flip")
    assert expected_code("bit-flip") == expected_code("bit-flip", "accelerate")


def test_two(synthetic_checkpoint):
    synthetic_checkpoint("diffusers-lora", damage="bit-flip")
    assert expected_code("bit-flip") == "checksum_mismatch"
    synthetic_checkpoint("accelerate", damage="bit-flip")
    assert expected_code("bit-flip") == expected_code("bit-flip", "accelerate")
'''


def test_expected_code_follows_the_last_ask_not_the_test_order(pytester):
    pytester.makepyfile(test_order=PLUGIN_ORDER)
    pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider", "-p", "no:randomly").assert_outcomes(passed=2)


def test_replicas_are_read_as_their_trainers_and_said_so(tmp_path):
    """kohya's and SimpleTuner's saves (applications, not libraries): Accelerate's real save_state completed as their
    save hooks complete it; inspect tells their trainer and step, and the listing says they are replicas."""
    result, doc = cli("fixtures", str(tmp_path / "out"), "--trainer", "kohya", "--trainer", "simpletuner",
                      "--damage", "stale-train_state", "--damage", "missing-training_state", "--json")
    assert result.exit_code == 0, result.output
    healthy = {e["trainer"]: e for e in doc["entries"] if not e["damage"]}
    for name, entry in healthy.items():
        assert entry["made_by"].startswith("a replica:")
        assert cli("inspect", "--json", entry["path"])[1]["trainer"] == name
    assert {(e["trainer"], e["damage"], e["expected_code"]) for e in doc["entries"] if e["damage"]} == {
        ("kohya", "stale-train_state", "step_mismatch"), ("simpletuner", "missing-training_state", "missing_file")}


OTHERS = ("megatron", "nemo", "torchtune", "composer", "deepspeed", "ai-toolkit", "onetrainer", "musubi-tuner")


def test_the_other_trainers_copies_and_replicas_verify_and_every_damage_is_refused(tmp_path):
    """The trainers whose libraries cannot run here: copies of runs their own code wrote (Megatron, NeMo, torchtune,
    Composer, DeepSpeed), replicas of applications' saves (ai-toolkit, OneTrainer, musubi-tuner); each healthy one
    is read as its trainer's and resumable, each damaged copy gives its listed code and the gate refuses it."""
    from ckpttool.gate import ResumeGateError, check_resume
    from ckpttool.synthetic import catalog

    args = [a for name in OTHERS for a in ("--trainer", name)]
    result, doc = cli("fixtures", str(tmp_path / "out"), *args, *[a for kind in ("missing", "truncated", "empty",
                      "stale", "bit-flip") for a in ("--damage", kind)], "--json")
    assert result.exit_code == 0, result.output
    assert doc["skipped"] == []
    made = {t.name: t.made for t in catalog.TRAINERS}
    healthy = {e["trainer"]: e for e in doc["entries"] if not e["damage"]}
    assert set(healthy) == set(OTHERS)
    for name, entry in healthy.items():
        assert entry["made"] == made[name] and entry["made"] in (catalog.SAMPLE, catalog.REPLICA)
        result, report = cli("verify", "--for-resume", "--json", entry["path"])
        assert result.exit_code == 0 and report["trainer"] == name, (name, report["problems"])
        check_resume(entry["path"], world_size=entry["world_size"])
    damaged = [e for e in doc["entries"] if e["damage"]]
    assert {e["trainer"] for e in damaged} == set(OTHERS)
    for entry in damaged:
        result, report = cli("verify", "--for-resume", "--json", entry["path"])
        assert result.exit_code == 1, entry
        assert entry["expected_code"] in {p["code"] for p in report["problems"] if p["severity"] == "error"}, entry
        with pytest.raises(ResumeGateError) as refused:
            check_resume(entry["path"], world_size=entry["world_size"])
        assert "world_size_mismatch" not in str(refused.value), entry
    listed = {(e["trainer"], e["damage"]): e["expected_code"] for e in damaged}
    assert listed.items() >= {
        ("megatron", "stale-common"): "step_mismatch",  # common.pt of iter 5 carries its iteration
        ("megatron", "missing-metadata.json"): "missing_file",
        ("torchtune", "missing-recipe_state"): "missing_file",  # ../recipe_state/recipe_state.pt, beside the save
        ("torchtune", "bit-flip"): "checksum_mismatch",  # the manifest inside epoch_1 covers its own files only
        ("deepspeed", "stale-zero_pp_rank_1_mp_rank_00_optim_states"): "step_mismatch",
        ("composer", "stale-checkpoint"): "step_mismatch",
        ("ai-toolkit", "stale-checkpoint"): "step_mismatch",
        ("ai-toolkit", "missing-optimizer"): "missing_optimizer",  # optimizer.pt, beside the weights file
        ("composer", "bit-flip"): "checksum_mismatch",  # damage first, though the flip also makes odd opcodes
        ("onetrainer", "missing-optimizer"): "missing_optimizer",
        ("musubi-tuner", "missing-scheduler"): "missing_scheduler",
    }.items()
    composer_run = os.path.dirname(healthy["composer"]["path"])
    assert os.readlink(os.path.join(composer_run, "latest-rank0.pt")) == "ep0-ba6-rank0.pt"


def test_a_copied_sample_gets_its_links_back_where_a_wheel_made_them_files(tmp_path, monkeypatch):
    """A wheel stores Composer's latest-rank0.pt link as a copy of its target: the copy made from it is a link
    again, so `latest` follows it as Composer's own resume does."""
    import shutil

    from ckpttool.synthetic import catalog

    installed = tmp_path / "installed"
    shutil.copytree(os.path.join(catalog.SAMPLES, "composer"), installed / "composer", symlinks=False)
    assert not os.path.islink(installed / "composer" / "run" / "latest-rank0.pt")
    monkeypatch.setattr(catalog, "SAMPLES", str(installed))
    run = catalog.copy_sample("composer/run", str(tmp_path / "run"))
    assert os.readlink(os.path.join(run, "latest-rank0.pt")) == "ep0-ba6-rank0.pt"
    result, out = cli("latest", "--json", "--for-resume", run)
    assert result.exit_code == 0 and out["trainer_pick"].endswith("ep0-ba6-rank0.pt")


def test_out_inside_the_samples_or_one_that_cannot_be_made_is_a_usage_error(tmp_path):
    from ckpttool.synthetic import catalog

    (tmp_path / "afile").write_text("")
    for out, said in ((os.path.join(catalog.SAMPLES, "composer", "run", "x"), "inside ckpttool's own samples"),
                      (str(tmp_path / "afile" / "sub"), "cannot be made"), ("", "OUT is empty")):
        result = cli("fixtures", out, "--trainer", "composer")[0]
        assert result.exit_code == 2 and said in result.output, (out, result.output)
    assert not os.path.exists(os.path.join(catalog.SAMPLES, "composer", "run", "x"))


def test_a_read_only_install_gives_writable_copies(tmp_path, monkeypatch):
    """Package data installed read-only (a system image, Nix): the copies are writable, so damage can be applied
    and the folder removed."""
    import shutil
    import stat

    from ckpttool.synthetic import catalog

    installed = tmp_path / "installed"
    shutil.copytree(os.path.join(catalog.SAMPLES, "deepspeed"), installed / "deepspeed")
    for folder, _, files in os.walk(installed, topdown=False):
        for name in files:
            os.chmod(os.path.join(folder, name), 0o444)
        os.chmod(folder, 0o555)
    monkeypatch.setattr(catalog, "SAMPLES", str(installed))
    try:
        run = catalog.copy_sample("deepspeed/zero2", str(tmp_path / "run"))
        for folder, _, files in os.walk(run):
            assert os.stat(folder).st_mode & stat.S_IWUSR, folder
            assert all(os.stat(os.path.join(folder, f)).st_mode & stat.S_IWUSR for f in files), folder
    finally:
        for folder, _, _ in os.walk(installed):
            os.chmod(folder, 0o755)


def test_a_full_disk_while_copying_a_sample_is_one_line_naming_the_file(tmp_path, monkeypatch):
    import errno
    import shutil

    def full(src, dst, **_):
        raise OSError(errno.ENOSPC, "No space left on device", dst)

    monkeypatch.setattr(shutil, "copyfile", full)
    result = cli("fixtures", str(tmp_path / "out"), "--trainer", "composer")[0]
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
    assert str(tmp_path / "out") in result.output and "No space left" in result.output
    assert "could not copy ckpttool's composer/run sample" in result.output
    monkeypatch.undo()
    real = shutil.copytree

    def copy_to_full_disk(src, dst, **kwargs):  # the damaged copies of a run written here
        if "healthy" not in str(dst):
            raise shutil.Error([(os.path.join(src, f), os.path.join(dst, f), "[Errno 28] No space left on device")
                                for f in sorted(os.listdir(src))])
        return real(src, dst, **kwargs)

    monkeypatch.setattr(shutil, "copytree", copy_to_full_disk)
    result = cli("fixtures", str(tmp_path / "out2"), "--trainer", "dcp", "--damage", "truncated")[0]
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
    assert "could not copy dcp's healthy run" in result.output and str(tmp_path / "out2") in result.output

    def full_save(out, **_):
        raise OSError(errno.ENOSPC, "No space left on device", os.path.join(out, "step-2", "__0_0.distcp"))

    from ckpttool.synthetic import runs

    monkeypatch.setattr(runs, "torchtitan_run", full_save)  # the library's own save
    result = cli("fixtures", str(tmp_path / "out3"), "--trainer", "dcp")[0]
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
    assert "__0_0.distcp: dcp's run could not be written (No space left on device)" in result.output


def test_the_help_names_every_trainer():
    from ckpttool.synthetic import catalog

    result = cli("fixtures", "--help")[0]
    text = " ".join(result.output.split())
    assert all(t.name + "," in text or t.name + "." in text for t in catalog.TRAINERS), text
