"""diffusers example scripts (examples/text_to_image/train_text_to_image.py and the other training scripts).

They call `accelerator.save_state(f"{output_dir}/checkpoint-{global_step}")` with save hooks that pop the weights
and write them with `save_pretrained` (`unet/`, `unet_ema/`, `transformer/`, ...) or `pytorch_lora_weights.safetensors`
(LoRA scripts). `global_step` advances on every sync step (`accelerator.sync_gradients`), skipped fp16 updates
included; the LR scheduler is prepared, so it lags the global step by the skipped updates. No completion marker.
`--resume_from_checkpoint latest`: `dirs = [d for d in os.listdir(output_dir) if d.startswith("checkpoint")]`, sorted
by `int(d.split("-")[1])`, the last one, unverified. `checkpoints_total_limit` removes the oldest before each save.
"""

from __future__ import annotations

import os
import re

from ckpttool.formats import pretrained_files
from ckpttool.model import EMA_UPDATES
from ckpttool.trainers.accelerate import LOAD, MODELS, Accelerate, has_accelerate_files, state_contract
from ckpttool.trainers.base import numbered_dirs
from ckpttool.trainers.contract import PRETRAINED, PRETRAINED_CONTENT, RUN, Part

CHECKPOINT_N = re.compile(r"checkpoint-(\d+)")


# The scripts' load_model_hook pops the prepared models and loads them itself: from the save_pretrained folders
# (train_text_to_image.py: UNet2DConditionModel.from_pretrained(input_dir, subfolder="unet"),
# EMAModel.from_pretrained(os.path.join(input_dir, "unet_ema"), ...)), or from the LoRA file (train_dreambooth_lora.py:
# lora_state_dict(input_dir), which reads pytorch_lora_weights.safetensors). Scripts without hooks leave the
# weights to Accelerate (model.safetensors).
SCRIPTS = "diffusers examples: train_text_to_image.py and train_dreambooth_lora.py load_model_hook; " + LOAD
FOLDERS = Part("save_pretrained model folders (unet/, unet_ema/, transformer/, ...)", (r"[^/]+/",), absent=RUN,
               folders=PRETRAINED, content=PRETRAINED_CONTENT,
               why="the script's load_model_hook calls from_pretrained on each (unet/, and unet_ema/ with --use_ema), "
               "which raises")
LORA = Part("LoRA weights (pytorch_lora_weights.safetensors)", (r"pytorch_lora_weights\.safetensors",), absent=RUN,
            why="the LoRA scripts' load_model_hook calls lora_state_dict(input_dir), which raises without it")
HOOKED_MODELS = Part(MODELS.what, MODELS.names, absent=RUN, series=True, template=MODELS.template, why=MODELS.why)


def has_pretrained_subfolder(path: str) -> bool:
    try:
        return any(os.path.isfile(os.path.join(path, entry, w)) for entry in os.listdir(path)
                   for w in pretrained_files.DIFFUSERS_WEIGHTS)
    except OSError:
        return False


def highest_checkpoint(run_dir: str, pattern=CHECKPOINT_N) -> str | None:
    saves = numbered_dirs(run_dir, pattern)
    return saves[max(saves)] if saves else None


class Diffusers(Accelerate):
    name = "diffusers"
    layout = "diffusers checkpoint-N"
    source = "diffusers examples/*/train_*.py: save_state, --resume_from_checkpoint latest, checkpoints_total_limit"
    name_pattern = CHECKPOINT_N
    # train_text_to_image.py --use_ema: `ema_unet.step` on every sync step, and EMAModel.save_pretrained writes its
    # optimization_step into unet_ema/config.json (diffusers training_utils.py EMAModel.save_pretrained), which the
    # load hook restores (EMAModel.from_pretrained): it is the global step
    state_files = {r"unet_ema/config\.json": {"optimization_step": EMA_UPDATES}}
    latest_rule = "--resume_from_checkpoint latest: the highest N among dirs named checkpoint*, not verified"
    total_limit_rule = "checkpoints_total_limit: before each save the oldest checkpoint-N dirs are removed"

    def claims_path(self, path):
        return self.name_number(path) is not None and (has_accelerate_files(path) or has_pretrained_subfolder(path))

    def resume_contract(self, ckpt):
        return state_contract(ckpt.path, SCRIPTS, "the load hook (or load_state itself, without one) has no weights "
                              "to load and raises", models=(HOOKED_MODELS, FOLDERS, LORA))

    def own_latest(self, run_dir):
        return highest_checkpoint(run_dir)
