"""kohya-ss/musubi-tuner (src/musubi_tuner/training/trainer_base.py, utils/train_utils.py, read at 30c658c): the same
state dirs as kohya sd-scripts (`{name}-step{step:08d}-state`, `{name}-{epoch:06d}-state`, `{name}-state`, written by
`accelerator.save_state`, the same removal arithmetic), with one difference that matters: its save hook writes no
`train_state.json`, and `_run_training_loop` sets `global_step = 0` and `epoch_to_start = 0` whatever `--resume`
loaded (kohya-ss/musubi-tuner #126, #461, #927; the fix proposed in #915 was closed unmerged). A resume restores the
weights, optimizer, LR scheduler and RNG, then trains the whole run again: the schedule runs past its end and new
saves reuse, and may delete, the first run's names. So a musubi state dir is told from a kohya one that lost its
train_state.json by its run: no state dir there has one. Its step survives in the dir name and the scheduler.
"""

from __future__ import annotations

import os

from ckpttool.model import WARNING, Code, Problem
from ckpttool.trainers.accelerate import LOAD, state_contract
from ckpttool.trainers.kohya import Kohya

TRAIN_STATE = "train_state.json"


class Musubi(Kohya):
    name = "musubi-tuner"
    layout = "musubi-tuner -state dir"
    source = ("kohya-ss/musubi-tuner src/musubi_tuner/training/trainer_base.py (_register_hooks_and_resume, "
              "resume_from_local_or_hf_if_specified, _run_training_loop), utils/train_utils.py (STEP_STATE_NAME)")
    state_files = {}
    latest_rule = "none: --resume loads the -state dir it is given"

    def claims_path(self, path):
        """A -state dir without train_state.json in a run where no -state dir has one."""
        if not super().claims_path(path) or os.path.isfile(os.path.join(path, TRAIN_STATE)):
            return False
        folder = os.path.dirname(os.path.abspath(os.path.normpath(path)))
        try:
            siblings = [e for e in os.listdir(folder) if e.endswith("-state")]
        except OSError:
            return False
        return not any(os.path.isfile(os.path.join(folder, e, TRAIN_STATE)) for e in siblings)

    def resume_contract(self, ckpt):
        return state_contract(ckpt.path, f"musubi-tuner trainer_base.py _register_hooks_and_resume; {LOAD}",
                              "load_state has no network weights to load and raises FileNotFoundError")

    def resume_problems(self, ckpt):
        steps = next((s.value for s in self.name_counters(ckpt.path)), None)
        where = f" (this state was saved at step {steps})" if steps is not None else ""
        return super().resume_problems(ckpt) + [Problem(
            Code.STEP_MISMATCH, WARNING, "musubi-tuner saves no step counter and its --resume starts global_step and "
            f"the epoch at 0 (trainer_base.py _run_training_loop){where}: the weights, optimizer, LR scheduler and RNG "
            "are restored, then the whole run is trained again, the schedule runs past its end and new saves reuse "
            "the first run's names; lower max_train_steps by the steps already done before resuming", ckpt.path)]
