"""openai/consistency_models (cm/train_util.py `TrainLoop.save`, `CMTrainLoop.run_step`).

A save is a family of files at one step: `model{step:06d}.pt`, `ema_{rate}_{step:06d}.pt`, `opt{step:06d}.pt`,
`target_model...`/`teacher_model...`. `run_step` advances `step` and `global_step` only when the update was taken
(`took_step = self.mp_trainer.optimize(self.opt)`), so the optimizer's step equals the file's step, except that
progressive distillation re-creates the optimizer at every scale change (`reset_training_for_progdist`) and a resume
whose `opt*.pt` was missing starts a fresh optimizer without a word. The learning rate is derived from the step
(`_anneal_lr`): no scheduler state. No RNG state. `find_resume_checkpoint` returns None: there is no "latest".
"""

from __future__ import annotations

import os

from ckpttool.formats import family
from ckpttool.model import ERROR, GLOBAL_STEP, Code, Problem, Record
from ckpttool.trainers.base import Profile


class ConsistencyModels(Profile):
    name = "consistency_models"
    layout = "consistency_models file family"
    source = "openai/consistency_models cm/train_util.py TrainLoop.save, CMTrainLoop.run_step"
    counter_meanings = ((Record.NAME, ".*", GLOBAL_STEP),)
    skips_advance_global_step = False
    needs_scheduler = False
    saves_rng = False
    latest_rule = "none: find_resume_checkpoint returns None; the run is resumed from the file given"

    def claims_path(self, path):
        return family.detect(path)

    def run_saves(self, path):
        folder = os.path.dirname(os.path.abspath(path))
        return {step: next(iter(members.values())) for step, members in family.members(folder).items()}

    def resume_problems(self, ckpt):
        """A family is a training state even when its opt file is gone: the loader would skip it silently."""
        if any(c.role == "optimizer" for c in ckpt.components):
            return []
        return [Problem(Code.MISSING_OPTIMIZER, ERROR, "no opt file at this step: consistency_models' loader skips it "
                        "without a word and restarts the optimizer", ckpt.path)]
