"""transformers.Trainer (transformers 5.x trainer.py `_save_checkpoint`, trainer_utils.py).

`{output_dir}/checkpoint-{global_step}`: the model (`model.safetensors`, sharded with an index for large models,
`pytorch_model.bin` from versions with save_safetensors=False, or `adapter_model.safetensors` for a PEFT model),
`training_args.bin` (a pickled TrainingArguments: never read here), `optimizer.pt` (under FSDP Accelerate's
`optimizer.bin` or `optimizer_0/`; under DeepSpeed the engine's own `global_step{N}/` save, which holds the optimizer
and, when DeepSpeed's config names the scheduler, the scheduler: `_save_optimizer_and_scheduler` then writes no
scheduler.pt), `scheduler.pt`,
`scaler.pt` (the Accelerate GradScaler, with fp16), `rng_state.pth` (`rng_state_{rank}.pth` with several
processes), and last `trainer_state.json` (`global_step`: optimizer steps attempted, fp16-skipped ones included;
`epoch` is a float).
The scheduler steps only `if not self.accelerator.optimizer_step_was_skipped`, and earlier versions stepped it every
step: it may equal the optimizer's updates or the global step. `resume_from_checkpoint=True`: `get_last_checkpoint`,
the highest N among dirs matching `^checkpoint-(\\d+)$`, unverified. `save_total_limit`: `rotate_checkpoints` deletes
the oldest (by mtime), keeping the newest and the best.
"""

from __future__ import annotations

import os
import re

from ckpttool.model import ERROR, GLOBAL_STEP, Problem
from ckpttool.trainers.accelerate import FSDP_PARTS
from ckpttool.trainers.base import Profile, role
from ckpttool.trainers.deepspeed import ENGINE_COUNTERS
from ckpttool.trainers.diffusers import highest_checkpoint

FILES = (
    role(r"model\.safetensors", "model", "model"),
    role(r"pytorch_model\.bin", "model", "model"),
    role(r"(?:model\.safetensors|pytorch_model\.bin)\.index\.json", "model", "model"),
    role(r"adapter_model\.(?:safetensors|bin)", "model", "adapter"),
    role(r"optimizer\.pt", "optimizer", "optimizer"),
    role(r"scheduler\.pt", "scheduler", "scheduler"),
    role(r"scaler\.pt", "scaler", "scaler"),
    role(r"rng_state\.pth", "rng", "rng_state"),
    role(r"rng_state_(\d+)\.pth", "rng", "rng_state_{n}"),
    role(r"optimizer\.bin", "optimizer", "optimizer"),  # FSDP full state, through Accelerate's save_fsdp_optimizer
    role(r"global_step(\d+)", "optimizer", "deepspeed", folder=True),  # the DeepSpeed engine's save
) + FSDP_PARTS
OWN_FILES = ("trainer_state.json", "optimizer.pt", "scheduler.pt", "rng_state.pth", "rng_state_0.pth",
             "training_args.bin")
TRAINER_STATE = "trainer_state.json"
WEIGHTS = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "adapter_model.safetensors")


class Transformers(Profile):
    name = "transformers"
    layout = "transformers.Trainer checkpoint-N"
    source = "transformers 5.x trainer.py _save_checkpoint / _inner_training_loop, trainer_utils.py get_last_checkpoint"
    file_roles = FILES
    state_files = {TRAINER_STATE: {"global_step": GLOBAL_STEP}}
    counter_meanings = ENGINE_COUNTERS  # the DeepSpeed engine's step counts optimizer steps as global_step does
    name_pattern = re.compile(r"checkpoint-(\d+)")
    latest_rule = "resume_from_checkpoint=True: get_last_checkpoint, the highest N among checkpoint-N dirs, unverified"
    total_limit_rule = "save_total_limit: rotate_checkpoints deletes the oldest, keeping the newest and the best"

    def claims_path(self, path):
        """Its own files; or, cut short right after `save_model`, a top-level config.json beside the weights
        (Accelerate and diffusers dirs keep configs only inside save_pretrained subfolders)."""
        if not os.path.isdir(path):
            return False
        if any(os.path.exists(os.path.join(path, f)) for f in OWN_FILES):
            return True
        return self.name_number(path) is not None and os.path.isfile(os.path.join(path, "config.json")) and any(
            os.path.isfile(os.path.join(path, w)) for w in WEIGHTS) and not os.path.exists(
            os.path.join(path, "random_states_0.pkl"))

    def completion_problems(self, ckpt):
        if os.path.isfile(os.path.join(ckpt.path, TRAINER_STATE)):
            return []
        return [Problem("missing_file", ERROR, f"no {TRAINER_STATE}: Trainer writes it last, after the model, "
                        "optimizer, scheduler and RNG state, so this save never finished (and a resume could not "
                        "restore the global step)", os.path.join(ckpt.path, TRAINER_STATE))]

    def own_latest(self, run_dir):
        return highest_checkpoint(run_dir, self.name_pattern)
