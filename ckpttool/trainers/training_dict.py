"""A training dict saved with torch.save by a custom trainer (Z-Image style and countless others):
{"model": ..., "optimizer": ..., "lr_scheduler": ..., "global_step": N, "epoch": E, ...}. The key names are a
convention, not a format: `global_step`, `step`, `iteration`, ... are read as the global step (see torchtree's
STEP_KEYS), `epoch` as the epoch. Such trainers resume from the file or config they are given: no "latest".
"""

from __future__ import annotations

from ckpttool.formats.torchtree import EPOCH_KEYS
from ckpttool.model import EPOCH, GLOBAL_STEP, Record
from ckpttool.trainers.base import Profile


class TrainingDict(Profile):
    name = "training_dict"
    layout = "training dict .pt (custom trainer)"
    source = "no library: the convention of custom trainers (Z-Image style train.py: global_step, epoch keys)"
    counter_meanings = ((Record.TRAINING_DICT, "|".join(EPOCH_KEYS), EPOCH), (Record.TRAINING_DICT, ".*", GLOBAL_STEP))

    def claims(self, ckpt):
        return ckpt.format == "torch" and (any(s.record is Record.TRAINING_DICT for s in ckpt.steps) or
                                           any(c.role in ("optimizer", "scheduler") for c in ckpt.components))
