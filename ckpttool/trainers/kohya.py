"""kohya-ss sd-scripts (train_network.py, library/train_util.py): `{name}-{epoch:06d}-state` (per epoch),
`{name}-step{step:08d}-state` (per step), `{name}-state` (at the end), written by `accelerator.save_state` with a save
hook that writes `train_state.json` = {"current_epoch", "current_step"} ("+1 is needed because the state is saved
before current_step is set from global_step": current_step is the global step of the save). The weights file beside it
(`{name}-000001.safetensors`) is not resumable. `--resume` loads the path given: there is no "latest".
`--save_last_n_epochs_state` / `--save_last_n_steps_state` delete older state dirs.
"""

from __future__ import annotations

import os
import re

from ckpttool.model import EPOCH, GLOBAL_STEP, Record, StepSource
from ckpttool.trainers.accelerate import LOAD, Accelerate, state_contract
from ckpttool.trainers.contract import JSON, Part

STEP_STATE = re.compile(r".*-step(\d+)-state")
EPOCH_STATE = re.compile(r".*-(\d+)-state")
# train_network.py: load_model_hook keeps only the network among the prepared models (so model.safetensors holds the
# network, loaded by Accelerate), then reads train_state.json "when it exists" for steps_from_state.
TRAIN_STATE = Part("the step counter (train_state.json)", (r"train_state\.json",), kind=JSON,
                   why="train_network.py load_model_hook reads current_step from it when it exists: without it the run "
                   "restarts its step count at 0 (and json.load raises on a damaged one)")


class Kohya(Accelerate):
    name = "kohya"
    layout = "kohya -state dir"
    source = "kohya-ss/sd-scripts train_network.py save_model_hook, library/train_util.py"
    state_files = {"train_state.json": {"current_step": GLOBAL_STEP, "current_epoch": EPOCH}}
    latest_rule = "none: --resume loads the -state dir it is given"
    total_limit_rule = "--save_last_n_epochs_state / --save_last_n_steps_state delete older -state dirs"
    claims_by_shared_files = False  # its own marker files claim it

    def resume_contract(self, ckpt):
        return state_contract(ckpt.path, f"kohya-ss/sd-scripts train_network.py load_model_hook; {LOAD}",
                              "load_state has no network weights to load and raises FileNotFoundError",
                              extra=(TRAIN_STATE,))

    def claims_path(self, path):
        name = os.path.basename(os.path.abspath(path))
        return os.path.isdir(path) and (name.endswith("-state") or
                                        os.path.isfile(os.path.join(path, "train_state.json")))

    def name_counters(self, path):
        name = os.path.basename(os.path.abspath(path))
        if m := STEP_STATE.fullmatch(name):
            return [StepSource("directory name", int(m.group(1)), GLOBAL_STEP, record=Record.NAME)]
        if m := EPOCH_STATE.fullmatch(name):
            return [StepSource("directory name", int(m.group(1)), EPOCH, record=Record.NAME)]
        return []

    def run_saves(self, path):
        folder = os.path.dirname(os.path.abspath(os.path.normpath(path)))
        saves = {}
        for entry in os.listdir(folder):
            if (m := STEP_STATE.fullmatch(entry)) and os.path.isdir(os.path.join(folder, entry)):
                saves[int(m.group(1))] = os.path.join(folder, entry)
        return saves
