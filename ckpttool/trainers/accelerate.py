"""Accelerate `save_state` dirs (accelerate/checkpointing.py `save_accelerator_state`, accelerator.py `save_state`).

Files: `model{_i}.safetensors` / `pytorch_model{_i}.bin`, `optimizer{_i}.bin`, `scheduler{_i}.bin`, `sampler{_i}.bin`,
`dl_state_dict{_i}.bin`, `scaler.pt`, `random_states_{rank}.pkl` (one per process), `custom_checkpoint_{i}.pkl`;
FSDP: `pytorch_model_fsdp_{i}/` and `optimizer_{i}/` DCP dirs. No completion marker is written.
Counters: the RNG file's `step` is `Accelerator.step`, the gradient-accumulation micro-step counter (never the
optimizer step). A prepared scheduler is an `AcceleratedScheduler` (accelerate/scheduler.py `step`): it returns early
when `optimizer.step_was_skipped` (fp16 overflow), and otherwise steps once per process unless `split_batches`.
Automatic naming (`ProjectConfiguration(automatic_checkpoint_naming=True)`) writes `checkpoints/checkpoint_{N}`, N
counting saves; `load_state()` with no dir loads the highest N, and `total_limit` deletes the oldest first.
"""

from __future__ import annotations

import os
import re

from ckpttool.model import MICRO_STEPS, SAVES
from ckpttool.trainers.base import Profile, numbered_dirs, role

# FSDP (accelerate.utils save_fsdp_model / save_fsdp_optimizer): full `optimizer.bin`, sharded DCP dirs
FSDP_PARTS = (
    role(r"pytorch_model_fsdp(?:_(\d+))?", "model", "model{_n}", folder=True),
    role(r"optimizer(?:_(\d+))?", "optimizer", "optimizer{_n}", folder=True),
)
FILES = (
    role(r"model(?:_(\d+))?\.safetensors", "model", "model{_n}"),
    role(r"pytorch_model(?:_(\d+))?\.bin", "model", "model{_n}"),
    role(r"pytorch_model_fsdp(?:_(\d+))?\.bin", "model", "model{_n}"),
    role(r"pytorch_model_fsdp_rank(\d+)\.bin", "model", "model_rank{n}"),
    role(r"pytorch_lora_weights\.safetensors", "model", "lora"),
    role(r"optimizer(?:_(\d+))?\.bin", "optimizer", "optimizer{_n}"),
    role(r"scheduler(?:_(\d+))?\.bin", "scheduler", "scheduler{_n}"),
    role(r"sampler(?:_(\d+))?\.bin", "sampler", "sampler{_n}"),
    role(r"dl_state_dict(?:_(\d+))?\.bin", "dataloader", "dl_state_dict{_n}"),
    role(r"scaler\.pt", "scaler", "scaler"),
    role(r"random_states_(\d+)\.pkl", "rng", "random_states_{n}"),
    role(r"custom_checkpoint_(\d+)\.pkl", "custom", "custom_checkpoint_{n}"),
) + FSDP_PARTS
MARKERS = ("random_states_0.pkl", "optimizer.bin", "scheduler.bin", "model.safetensors", "pytorch_model.bin",
           "pytorch_lora_weights.safetensors", "pytorch_model_fsdp_0", "scaler.pt")
RNG_FILE = re.compile(r"random_states_(\d+)\.pkl")


def has_accelerate_files(path: str) -> bool:
    return os.path.isdir(path) and any(os.path.exists(os.path.join(path, m)) for m in MARKERS)


class Accelerate(Profile):
    name = "accelerate"
    layout = "Accelerate save_state dir"
    source = "accelerate 1.15: checkpointing.py save_accelerator_state, scheduler.py AcceleratedScheduler.step"
    file_roles = FILES
    counter_meanings = ((r"^random_states_\d+ step$", MICRO_STEPS),)
    scheduler_rule = "AcceleratedScheduler: skipped with the optimizer on fp16 overflow, else once per process"

    def claims_path(self, path):
        return has_accelerate_files(path)

    def scheduler_multiples(self, ckpt):
        """Without split_batches a prepared scheduler steps once per process: one RNG file per process."""
        processes = sum(1 for f in ckpt.files if RNG_FILE.fullmatch(os.path.basename(f)))
        return {1, max(1, processes)}


class AccelerateAutomatic(Accelerate):
    layout = "Accelerate automatic checkpoint_N"
    name_pattern = re.compile(r"checkpoint_(\d+)")
    name_meaning = SAVES
    latest_rule = "Accelerator.load_state() with automatic naming: the highest checkpoint_N under checkpoints/"
    total_limit_rule = "ProjectConfiguration.total_limit: the oldest checkpoint_N dirs are deleted before a save"

    def claims_path(self, path):
        return self.name_number(path) is not None and has_accelerate_files(path)

    def own_latest(self, run_dir):
        folder = os.path.join(run_dir, "checkpoints") if os.path.isdir(os.path.join(run_dir, "checkpoints")) \
            else run_dir
        saves = numbered_dirs(folder, self.name_pattern)
        return saves[max(saves)] if saves else None
