"""The file names save_pretrained writes: their one home (the model-folder reader, state dirs, trainer profiles and
resume contracts import them; a module of names alone, so a profile that needs them loads no reader).

transformers modeling_utils.py (SAFE_WEIGHTS_NAME, WEIGHTS_NAME and their _INDEX_NAMEs, CONFIG_NAME), diffusers
utils/constants.py (SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME, their index names), peft utils/constants.py
(SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME, CONFIG_NAME).
"""

from __future__ import annotations

import os
import re

# Weights in from_pretrained's own order, the first one there being what it loads: transformers (modeling_utils.py
# _get_resolved_checkpoint_files) takes safetensors, then its index, then .bin, then its index; diffusers
# (ModelMixin.from_pretrained, _fetch_index_file) takes the safetensors index, then safetensors, then .bin (a .bin
# index only with use_safetensors=False: last here). The two families' names never meet in one folder.
CONFIG = "config.json"
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.safetensors",
                     "diffusion_pytorch_model.bin", "diffusion_pytorch_model.bin.index.json")
SAFETENSORS_FILE, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
TRANSFORMERS_WEIGHTS = (SAFETENSORS_FILE, SAFETENSORS_INDEX, "pytorch_model.bin", "pytorch_model.bin.index.json")
WEIGHTS = DIFFUSERS_WEIGHTS + TRANSFORMERS_WEIGHTS
WEIGHTS_IN_WORDS = "model.safetensors, pytorch_model.bin, diffusion_pytorch_model.safetensors or .bin, or a shard index"
# PEFT's PeftModel.save_pretrained (peft utils/constants.py SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME, CONFIG_NAME)
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def weights_file(folder: str, names=WEIGHTS) -> str | None:
    """The weights a folder's from_pretrained loads: the first of `names` there (WEIGHTS: in from_pretrained's
    order)."""
    return next((os.path.join(folder, w) for w in names if os.path.isfile(os.path.join(folder, w))), None)


def pattern(names) -> str:
    """A regular expression matching exactly these file names (for a profile's file roles and contract parts): one
    group, so an anchor after it binds every name, and not a capturing one, so a role's numbering is untouched."""
    return "(?:" + "|".join(re.escape(name) for name in names) + ")"
