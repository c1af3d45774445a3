"""The resume contracts proved by the libraries themselves: each file of a real run's newest checkpoint deleted or cut
in turn, then the real resume run on the copy (Accelerator.load_state with the diffusers scripts' load hooks,
transformers.Trainer.train(resume_from_checkpoint=...)). Where the contract says error, the resume raises or loses
state (the Trainer silently skips an optimizer without its scheduler); where it says warning or nothing, the resume
goes through with its state intact."""

import os
import shutil

import pytest

import sweep
from ckpttool.model import ERROR
from ckpttool.synthetic import runs as real_runs
from ckpttool.synthetic.damage import MISSING, TRUNCATED, damage_file

MODES = (MISSING, TRUNCATED)


def damaged_copies(run, tmp_path):
    """(relative file, mode, what the contract expects, the damaged checkpoint) for each file of the newest
    checkpoint of `run`, each in a fresh copy of the run."""
    newest = sweep._newest(run, lambda e: e.startswith("checkpoint"))
    healthy = os.path.join(run, newest)
    for i, rel in enumerate(sweep.files_of(healthy)):
        for mode in MODES:
            copy = tmp_path / f"{i}-{mode}"
            shutil.copytree(run, copy)
            damage_file(os.path.join(copy, newest, rel), mode)
            yield rel, mode, sweep.expectation(healthy, rel, mode)[0], str(copy / newest)


def raises(resume, checkpoint) -> bool:
    try:
        resume(checkpoint)
    except Exception:  # noqa: BLE001 - whatever the library raises is its resume failing
        return True
    return False


@pytest.mark.parametrize("name,resume", [
    ("accelerate", real_runs.resume_accelerate), ("accelerate_two_models", real_runs.resume_two_models),
    ("diffusers_unet_ema", real_runs.resume_unet), ("diffusers_lora", real_runs.resume_lora),
])
def test_accelerate_load_state_fails_exactly_where_the_contract_says_error(runs, tmp_path, name, resume):
    newest = os.path.join(runs[name], sweep._newest(runs[name], lambda e: e.startswith("checkpoint")))
    assert not raises(resume, newest)
    disagree = [(rel, mode, expected, failed) for rel, mode, expected, path in damaged_copies(runs[name], tmp_path)
                if (failed := raises(resume, path)) != (expected == ERROR)]
    assert not disagree


@pytest.mark.parametrize("name,peft", [("transformers", False), ("transformers_peft", True)])
def test_trainer_resume_fails_or_loses_state_exactly_where_the_contract_says_error(runs, tmp_path, name, peft):
    newest = os.path.join(runs[name], sweep._newest(runs[name], lambda e: e.startswith("checkpoint")))
    healthy = real_runs.resume_transformers(newest, peft)
    assert healthy["optimizer_restored"] and healthy["global_step"] >= healthy["saved"]

    def lost(path) -> bool:
        try:
            state = real_runs.resume_transformers(path, peft)
        except Exception:  # noqa: BLE001
            return True
        return {k: state[k] for k in ("global_step", "optimizer_restored", "scheduler_step")} != \
            {k: healthy[k] for k in ("global_step", "optimizer_restored", "scheduler_step")}

    disagree = [(rel, mode, expected) for rel, mode, expected, path in damaged_copies(runs[name], tmp_path)
                if lost(path) != (expected == ERROR)]
    assert not disagree
