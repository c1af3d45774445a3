"""torchtitan (torchtitan/components/checkpoint.py `CheckpointManager`): DCP dirs `{folder}/step-{N}` whose state dict
holds `model`, `optimizer`, `lr_scheduler`, `dataloader` and `train_state` (the step). DCP writes `.metadata` last, so a
dir without it is not a checkpoint. `load_step=-1` loads the highest step-N that has a `.metadata`; `keep_latest_k`
deletes older step dirs.
"""

from __future__ import annotations

import os
import re

from ckpttool.model import ERROR, Code, Problem
from ckpttool.trainers.base import Profile, numbered_dirs
from ckpttool.trainers.dcp_state import COUNTER_MEANINGS

NAME = re.compile(r"step-(\d+)")


class Torchtitan(Profile):
    name = "torchtitan"
    layout = "torchtitan step-N (DCP)"
    source = "torchtitan components/checkpoint.py CheckpointManager (_find_load_step, keep_latest_k)"
    name_pattern = NAME
    saves_rng = False
    counter_meanings = COUNTER_MEANINGS  # train_state.step: the global step
    latest_rule = "load_step=-1: the highest step-N dir that has a .metadata"
    total_limit_rule = "keep_latest_k: older step-N dirs are deleted"

    def claims_path(self, path):
        return self.name_number(path) is not None and os.path.isfile(os.path.join(path, ".metadata"))

    def own_latest(self, run_dir):
        saves = {n: p for n, p in numbered_dirs(run_dir, NAME).items() if os.path.isfile(os.path.join(p, ".metadata"))}
        return saves[max(saves)] if saves else None

    def resume_problems(self, ckpt):
        parts = {t.name.split(".")[0] for c in ckpt.components for t in c.tensors} | \
                {c.name for c in ckpt.components} | {o.split(".")[0] for o in ckpt.metadata.get("objects", [])}
        problems = []
        for part, code in (("optimizer", Code.MISSING_OPTIMIZER), ("lr_scheduler", Code.MISSING_SCHEDULER)):
            if part not in parts:
                problems.append(Problem(code, ERROR, f"the DCP state dict has no {part!r} entry", ckpt.path))
        return problems
