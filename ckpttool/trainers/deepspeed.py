"""DeepSpeed (deepspeed/runtime/engine.py `save_checkpoint`, `load_checkpoint`, `_take_model_step`): a save dir of
tag dirs, `global_step{N}` unless the caller names the tag, and a `latest` file rank 0 writes with the tag after its
own files. `load_checkpoint(tag=None)` loads the tag `latest` names; DeepSpeed deletes nothing.

Counters (`_take_model_step`): `global_steps` advances on every optimizer step, fp16-overflow ones included;
`skipped_steps` counts those overflows, which neither update the optimizer nor step the LR scheduler. DeepSpeed's
own schedulers (runtime/lr_schedules.py) start at last_batch_iteration -1 and add one per step. The engine saves no
RNG state, and `lr_scheduler: None` when the run has no scheduler.
"""

from __future__ import annotations

import os
import re

from ckpttool.formats import deepspeed as ds_format
from ckpttool.formats.torchtree import EPOCH_KEYS
from ckpttool.model import EPOCH, GLOBAL_STEP, SCHEDULER_STEPS, SKIPPED_UPDATES, Record
from ckpttool.trainers.base import Profile


# The engine's counters (formats/deepspeed.py names them), also where a trainer wraps the engine (transformers).
ENGINE_COUNTERS = ((Record.ENGINE, "global_steps", GLOBAL_STEP), (Record.ENGINE, "skipped_steps", SKIPPED_UPDATES),
                   (Record.SCHEDULER, r"lr_scheduler\.(?:last_batch_iteration|last_epoch)", SCHEDULER_STEPS))


class DeepSpeed(Profile):
    name = "deepspeed"
    source = "deepspeed runtime/engine.py (save_checkpoint, load_checkpoint, _take_model_step), zero_to_fp32.py"
    name_pattern = re.compile(r"global_step(\d+)")
    counter_meanings = ENGINE_COUNTERS + ((Record.CLIENT_STATE, "|".join(EPOCH_KEYS), EPOCH),)
    saves_rng = False
    needs_scheduler = False  # lr_scheduler None: the run had none, nothing is lost
    scheduler_rule = "after each applied optimizer step"
    latest_rule = "load_checkpoint(tag=None): the tag named in the save dir's `latest` file"

    def claims_path(self, path):
        return ds_format.detect(path)

    def own_latest(self, run_dir):
        folder = ds_format.tag_dir(run_dir)
        return folder if folder and folder != os.path.normpath(run_dir) else None
