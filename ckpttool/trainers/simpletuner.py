"""SimpleTuner (simpletuner/helpers/training/trainer.py `save_state`, helpers/utils/checkpoint_manager.py).

`checkpoint-{global_step}` (optionally `-{suffix}`, e.g. `-rolling`), written by `accelerator.save_state` into
`checkpoint-N-tmp` and renamed when `checkpointing_use_tempdir` is set. `training_state.json` (rank 0) and
`training_state-rank{N}.json` (other ranks) hold `global_step`, `epoch_step`, `epoch`, `exhausted_backends`,
`repeats`. Version 3.1.6 (PyPI) writes no completion marker: its `validate_checkpoint` asks only for
training_state.json with `global_step` and one weights file, and `get_latest_checkpoint` takes the highest N among
dirs starting with "checkpoint" and not ending in "tmp". Later versions write `checkpoint_manifest.json` and then
`.guard` ("complete") as the very last file, and `get_latest_checkpoint(require_guard=True)` skips unguarded dirs.
So the guard is required only where this version writes one: beside a checkpoint_manifest.json, or where the run's
other checkpoints carry one. `cleanup_checkpoints(limit)` removes `-tmp` dirs, then the oldest.
"""

from __future__ import annotations

import os
import re

from ckpttool.model import EPOCH, ERROR, GLOBAL_STEP, Code, Problem
from ckpttool.trainers.accelerate import LOAD, Accelerate, state_contract
from ckpttool.trainers.base import json_keys, marker_text, numbered_dirs
from ckpttool.trainers.contract import JSON, Part
from ckpttool.trainers.diffusers import FOLDERS, HOOKED_MODELS, LORA

NAME = re.compile(r"checkpoint-(\d+)(?:-[^/]+)?")
OWN_KEYS = {"epoch_step", "exhausted_backends", "repeats"}
RANK_STATE = re.compile(r"training_state-rank\d+\.json")
GUARD = ".guard"
CHECKPOINT_MANIFEST = "checkpoint_manifest.json"
# helpers/training/save_hooks.py load_model_hook: StateTracker.load_training_state(training_state.json, or this rank's
# training_state-rankN.json, falling back to the rank-0 file), then the LoRA file (load_lora_weights), or the denoiser
# with from_pretrained(input_dir, subfolder=...) and the EMA folder; Accelerate loads the rest.
HOOKS = "SimpleTuner helpers/training/save_hooks.py SaveHookManager.load_model_hook; " + LOAD
TRAINING_STATE = Part("the training state (training_state.json: global_step, epoch, backends)",
                      (r"training_state\.json",), kind=JSON, why="load_model_hook only warns when it is missing and "
                      "the run restarts its step and epoch counts (StateTracker.load_training_state raises on a "
                      "damaged one)")
RANK_STATES = Part("other ranks' training state (training_state-rankN.json)", (r"training_state-rank(\d+)\.json",),
                   absent=None, damaged=ERROR, kind=JSON, why="load_model_hook falls back to training_state.json "
                   "for a rank whose file is missing; json.load raises on a damaged one")


def guarded(path: str) -> bool:
    return (marker_text(path, GUARD) or "").strip() == "complete"


class SimpleTuner(Accelerate):
    name = "simpletuner"
    layout = "SimpleTuner checkpoint-N"
    source = "SimpleTuner 3.1.6 and main: helpers/training/trainer.py, helpers/utils/checkpoint_manager.py"
    name_pattern = NAME
    state_files = {"training_state.json": {"global_step": GLOBAL_STEP, "epoch": EPOCH},
                   r"training_state-rank\d+\.json": {"global_step": GLOBAL_STEP, "epoch": EPOCH}}
    latest_rule = ("get_latest_checkpoint: the highest N among checkpoint* dirs not ending in tmp (newer versions: "
                   "only dirs with a .guard)")
    total_limit_rule = "checkpoints_total_limit: -tmp dirs are removed, then the oldest checkpoint-N"
    claims_by_shared_files = False  # its own marker files claim it

    def claims_path(self, path):
        if not os.path.isdir(path):
            return False
        names = set(os.listdir(path))
        return bool({GUARD, CHECKPOINT_MANIFEST} & names or any(RANK_STATE.fullmatch(n) for n in names)
                    or OWN_KEYS & (json_keys(path, "training_state.json") or set()))

    def resume_contract(self, ckpt):
        return state_contract(ckpt.path, HOOKS, "load_model_hook has no weights to load (no LoRA file, no model "
                              "folder) and raises", models=(HOOKED_MODELS, FOLDERS, LORA),
                              extra=(TRAINING_STATE, RANK_STATES), not_read=((r"\.guard|checkpoint_manifest\.json",
                                                                              "read when choosing the latest "
                                                                              "checkpoint (get_latest_checkpoint), "
                                                                              "not by the resume"),))

    def run_saves(self, path):
        return numbered_dirs(os.path.dirname(os.path.abspath(os.path.normpath(path))), re.compile(r"checkpoint-(\d+)"))

    def completion_problems(self, ckpt):
        if ckpt.path.rstrip("/").endswith("-tmp"):
            return []  # a resume refuses it by name (Profile.resume_problems); its files may still be read
        if guarded(ckpt.path):
            return []
        if os.path.exists(os.path.join(ckpt.path, GUARD)):
            why = ".guard does not say 'complete'"
        elif os.path.isfile(os.path.join(ckpt.path, CHECKPOINT_MANIFEST)):
            why = (f"{CHECKPOINT_MANIFEST} is there but .guard, which this SimpleTuner version writes right after it, "
                   "is not")
        elif any(guarded(p) for p in self.run_saves(ckpt.path).values()):
            why = "the run's other checkpoints carry a .guard, which SimpleTuner writes last, and this one has none"
        else:
            return []  # versions up to 3.1.6 write no guard
        return [Problem(Code.MISSING_FILE, ERROR, f"{why}: SimpleTuner never finished this save",
                        os.path.join(ckpt.path, GUARD))]

    def own_latest(self, run_dir):
        candidates = [d for d in os.listdir(run_dir) if d.startswith("checkpoint") and not d.endswith("tmp")
                      and NAME.fullmatch(d) and os.path.isdir(os.path.join(run_dir, d))]
        if any(guarded(os.path.join(run_dir, d)) for d in candidates):  # a version that writes guards requires them
            candidates = [d for d in candidates if guarded(os.path.join(run_dir, d))]
        return os.path.join(run_dir, max(candidates, key=lambda d: int(d.split("-")[1]))) if candidates else None
