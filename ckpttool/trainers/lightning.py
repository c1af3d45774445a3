"""Lightning `.ckpt` files (lightning/pytorch/trainer/connectors/checkpoint_connector.py `dump_checkpoint`).

Top-level keys: `epoch`, `global_step` (`fit_loop.epoch_loop.global_step`: optimizer steps Lightning called, skipped
fp16 updates included), `pytorch-lightning_version`, `state_dict` (model), `loops` (progress counters), `callbacks`
(ModelCheckpoint state ...), `optimizer_states` (list), `lr_schedulers` (list, empty when none is configured),
the precision plugin's state under its class name (`MixedPrecision`: the GradScaler), `hparams_name` and
`hyper_parameters`. No RNG state is saved. Schedulers step per step or per epoch (`interval`, not saved).
`ModelCheckpoint` names files `epoch={epoch}-step={step}.ckpt` (`-v1` on clashes) and `last.ckpt`;
`ckpt_path="last"` loads the `last*.ckpt` with the newest mtime. `save_top_k` deletes the worst-scoring.
"""

from __future__ import annotations

import os
import re

from ckpttool.model import EPOCH, ERROR, GLOBAL_STEP, Problem, StepSource
from ckpttool.trainers.base import Profile, weights_only_problem

STEP_IN_NAME = re.compile(r".*step=(\d+)(?:-v\d+)?\.ckpt")
LAST = re.compile(r"last(?:-v?\d+)?\.ckpt")
LOOP_OPTIMIZER_PROGRESS = "epoch_loop.automatic_optimization.optim_progress"  # under loops["fit_loop"]


class Lightning(Profile):
    name = "lightning"
    layout = "Lightning .ckpt"
    source = "lightning 2.6 trainer/connectors/checkpoint_connector.py dump_checkpoint, callbacks/model_checkpoint.py"
    key_roles = {"callbacks": "callbacks", "MixedPrecision": "scaler", "hyper_parameters": "config",
                 "datamodule_hyper_parameters": "config"}
    counter_meanings = ((r"^training dict 'global_step'$", GLOBAL_STEP), (r"^training dict 'epoch'$", EPOCH),
                        (r"^loops ", GLOBAL_STEP))
    name_pattern = STEP_IN_NAME
    saves_rng = False
    scheduler_rule = "per step or per epoch, as configured (the interval is not saved)"
    scheduler_may_step_per_epoch = True
    latest_rule = 'ckpt_path="last": the last*.ckpt with the newest modification time'
    total_limit_rule = "ModelCheckpoint(save_top_k=k) deletes all but the k best-scoring files"

    def claims(self, ckpt):
        return ckpt.format == "torch" and "pytorch-lightning_version" in ckpt.metadata

    def interpret(self, ckpt):
        completed = _dig(ckpt.metadata.get("loops"), "fit_loop", LOOP_OPTIMIZER_PROGRESS, "optimizer", "step", "total",
                         "completed")
        if type(completed) is int:
            ckpt.steps.append(StepSource("loops optimizer.step.total.completed", completed))
        super().interpret(ckpt)

    def run_saves(self, path):
        folder = os.path.dirname(os.path.abspath(path))
        saves = {}
        for entry in os.listdir(folder):
            if m := STEP_IN_NAME.fullmatch(entry):
                saves[int(m.group(1))] = os.path.join(folder, entry)
        return saves

    def own_latest(self, run_dir):
        last = [os.path.join(run_dir, e) for e in os.listdir(run_dir) if LAST.fullmatch(e)]
        return max(last, key=os.path.getmtime) if last else None

    def resume_problems(self, ckpt):
        keys = set(ckpt.metadata.get("top_level_keys", []))
        if not {"optimizer_states", "lr_schedulers"} & keys:  # save_weights_only=True writes neither
            return [weights_only_problem(ckpt)] if "state_dict" in keys else super().resume_problems(ckpt)
        problems = []
        if not [c for c in ckpt.components if c.role == "optimizer"]:
            problems.append(Problem("missing_optimizer", ERROR, "no optimizer_states: a resume would restart the "
                                    "optimizer", ckpt.path))
        if "lr_schedulers" not in keys:  # an empty list means no scheduler was configured
            problems.append(Problem("missing_scheduler", ERROR, "no lr_schedulers key: a resume would restart "
                                    "the LR schedule", ckpt.path))
        return problems


def _dig(obj, *keys):
    """obj[k1][k2]... of plain dicts, or None where a level is missing or not a dict (the file is untrusted)."""
    for key in keys:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj
