"""A state dict saved with torch.distributed.checkpoint by a custom FSDP2/DTensor training loop:
`dcp.save({"model": ..., "optimizer": ..., "step": N, ...})`. As with a torch.save training dict, the key names are a
convention: a `step` (or `global_step`, `iteration`, ... : torchtree's STEP_KEYS) item at any depth is read as the
global step, the way torchtitan's TrainState saves it (train.py `TrainState.state_dict`), `epoch` as the epoch.
"""

from __future__ import annotations

from ckpttool.formats.torchtree import EPOCH_KEYS
from ckpttool.model import EPOCH, GLOBAL_STEP, Record
from ckpttool.trainers.base import Profile

COUNTER_MEANINGS = ((Record.DCP_STATE, rf"(?:.*\.)?(?:{'|'.join(EPOCH_KEYS)})", EPOCH),
                    (Record.DCP_STATE, ".*", GLOBAL_STEP))


class DcpState(Profile):
    name = "dcp_state"
    source = ("torch.distributed.checkpoint (state_dict_saver.save; non-tensor items as torch.save blobs, "
              "default_planner.py); torchtitan train.py TrainState for the `step` convention")
    counter_meanings = COUNTER_MEANINGS

    def claims(self, ckpt):
        return ckpt.format == "dcp"
