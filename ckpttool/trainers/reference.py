"""ckpttool's own writers: the reference trainer (trainer/checkpoint.py) and `ckpttool convert --to accelerate`.

`checkpoint-{step}` in Accelerate's layout plus `training_state.json` = {"global_step", "epoch"} (the trainer adds
"determinism": the thread count, torch version and device kind it trained under) and a ckpttool manifest. Written
into `checkpoint-{step}.tmp` and renamed into place when complete; the trainer resumes `latest` as `ckpttool latest
--for-resume` picks and prunes with `ckpttool prune`.
"""

from __future__ import annotations

import os
import re

from ckpttool.model import EPOCH, GLOBAL_STEP
from ckpttool.trainers.accelerate import Accelerate, has_accelerate_files
from ckpttool.trainers.base import json_keys

KEYS = {"global_step", "epoch", "determinism"}


class Reference(Accelerate):
    name = "ckpttool"
    layout = "ckpttool checkpoint-N (reference trainer / convert)"
    source = "trainer/checkpoint.py write/publish; ckpttool/operations/convert.py write_accelerate"
    state_files = {"training_state.json": {"global_step": GLOBAL_STEP, "epoch": EPOCH}}
    name_pattern = re.compile(r"checkpoint-(\d+)(?:\.tmp)?")
    latest_rule = "--resume-from-checkpoint latest: ckpttool latest --for-resume (verified)"
    total_limit_rule = "--checkpoints-total-limit: ckpttool prune, never the newest valid checkpoint"

    def claims_path(self, path):
        keys = json_keys(path, "training_state.json") if os.path.isdir(path) else None
        return keys is not None and keys <= KEYS and has_accelerate_files(path)
