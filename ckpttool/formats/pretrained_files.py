"""The file names save_pretrained writes: their one home (the model-folder reader, state dirs, trainer profiles and
resume contracts import them; a module of names alone, so a profile that needs them loads no reader).

transformers modeling_utils.py (SAFE_WEIGHTS_NAME, WEIGHTS_NAME and their _INDEX_NAMEs, CONFIG_NAME), diffusers
utils/constants.py (SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME, their index names), peft utils/constants.py
(SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME, CONFIG_NAME).
"""

from __future__ import annotations

import os

# Weights in from_pretrained's order: a shard index before a single file, safetensors first.
CONFIG = "config.json"
TRANSFORMERS_WEIGHTS = ("model.safetensors.index.json", "pytorch_model.bin.index.json", "model.safetensors",
                        "pytorch_model.bin")
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.bin.index.json",
                     "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
WEIGHTS = TRANSFORMERS_WEIGHTS + DIFFUSERS_WEIGHTS
WEIGHTS_IN_WORDS = f"{WEIGHTS[2]}, {WEIGHTS[3]}, {WEIGHTS[6]}, {WEIGHTS[7]} or a shard index"
# PEFT's PeftModel.save_pretrained (peft utils/constants.py SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME, CONFIG_NAME)
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def weights_file(folder: str, names=WEIGHTS) -> str | None:
    """The weights a folder's from_pretrained loads: the first of `names` there (WEIGHTS: a shard index before a
    single file, safetensors before .bin)."""
    return next((os.path.join(folder, w) for w in names if os.path.isfile(os.path.join(folder, w))), None)
