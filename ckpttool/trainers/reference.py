"""ckpttool's own writers: the reference trainer (trainer/checkpoint.py) and `ckpttool convert --to accelerate`.

`checkpoint-{step}` in Accelerate's layout plus `training_state.json` = {"global_step", "epoch"} (the trainer adds
"determinism": the thread count, torch version and device kind it trained under) and a ckpttool manifest. Written
into `checkpoint-{step}.tmp` and renamed into place when complete; the trainer resumes `latest` as `ckpttool latest
--for-resume` picks and prunes with `ckpttool prune`.
"""

from __future__ import annotations

import os
import re

from ckpttool.model import EPOCH, GLOBAL_STEP, Code
from ckpttool.trainers.accelerate import MANIFEST, MODELS, OPTIMIZERS, SCHEDULERS, Accelerate, has_accelerate_files
from ckpttool.trainers.base import json_keys
from ckpttool.trainers.contract import ENGINE, JSON, RUN, Contract, Part

KEYS = {"global_step", "epoch", "determinism"}

# trainer/checkpoint.py load (after train.py gate_and_load, which refuses a checkpoint without this rank's RNG file,
# or without scaler.pt in an fp16 run): every file is loaded with load_file / torch.load, so a damaged one raises.
LOAD = "trainer/train.py gate_and_load, trainer/checkpoint.py load"
RNG = Part("RNG state (random_states_N.pkl, one per process)", (r"random_states_(\d+)\.pkl",), series=True,
           per_rank=True, template="random_states_{n}.pkl", code=Code.MISSING_RNG,
           why="gate_and_load refuses to resume without this rank's file (the resume is bit-exact or refused)")
SCALER = Part("GradScaler state (scaler.pt)", (r"scaler\.pt",), absent=RUN,
              why="gate_and_load refuses an fp16 resume without it: the loss scale would restart")
EMA = Part("EMA weights (ema/model.safetensors)", (r"ema/",), absent=RUN, folders=ENGINE,
           content=("model.safetensors",),
           why="load restores the EMA weights when they are there; without them the EMA restarts from the weights")
STATE = Part("the step and epoch (training_state.json)", (r"training_state\.json",), kind=JSON,
             why="load reads global_step from it and raises without it")


class Reference(Accelerate):
    name = "ckpttool"
    layout = "ckpttool checkpoint-N (reference trainer / convert)"
    source = "trainer/checkpoint.py write/publish; ckpttool/operations/convert.py write_accelerate"
    state_files = {"training_state.json": {"global_step": GLOBAL_STEP, "epoch": EPOCH}}
    name_pattern = re.compile(r"checkpoint-(\d+)(?:\.tmp)?")
    latest_rule = "--resume-from-checkpoint latest: ckpttool latest --for-resume (verified)"
    total_limit_rule = "--checkpoints-total-limit: ckpttool prune, never the newest valid checkpoint"
    claims_by_shared_files = False  # its own marker files claim it

    def resume_contract(self, ckpt):
        return Contract(LOAD, (MODELS, OPTIMIZERS, SCHEDULERS, SCALER, EMA, RNG, STATE), model=(MODELS,),
                        model_why="load raises FileNotFoundError for model.safetensors", not_read=(
                            MANIFEST, (r"quanto_qmap\.json", "the trainer quantizes its model itself; the map is "
                                       "for others who load the weights")))

    def claims_path(self, path):
        keys = json_keys(path, "training_state.json") if os.path.isdir(path) else None
        return keys is not None and keys <= KEYS and has_accelerate_files(path)
