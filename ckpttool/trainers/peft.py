"""PEFT adapters (peft `PeftModel.save_pretrained`): `adapter_model.safetensors` (or `.bin`) and `adapter_config.json`.

Weights only: resuming the training needs the trainer's state saved with it (a transformers `checkpoint-N` holds the
same adapter files next to optimizer.pt, scheduler.pt and trainer_state.json, and is read as transformers).
"""

from __future__ import annotations

import os

from ckpttool.formats.pretrained_files import ADAPTER_WEIGHTS, pattern
from ckpttool.formats.statedir import role
from ckpttool.trainers.base import Profile, weights_only_problem
from ckpttool.trainers.contract import ADAPTER_CONTENT, JSON, Contract, Part

# PeftModel.from_pretrained / load_adapter (peft 0.21 peft_model.py, config.py PeftConfigMixin.from_pretrained,
# utils/save_and_load.py load_peft_weights): the config first, then the weights.
WEIGHTS = Part("adapter weights (adapter_model.safetensors or adapter_model.bin)", (pattern(ADAPTER_WEIGHTS),),
               why="load_peft_weights raises without them")
CONFIG = Part("adapter config (adapter_config.json)", (r"adapter_config\.json",), kind=JSON, core=True,
              why="PeftConfig.from_pretrained reads it before anything else and raises without it")


class Peft(Profile):
    name = "peft"
    layout = "PEFT adapter dir"
    source = "peft 0.21 PeftModel.save_pretrained (SAFETENSORS_WEIGHTS_NAME, CONFIG_NAME)"
    file_roles = (role(pattern(ADAPTER_WEIGHTS), "model", "adapter"),)

    def claims_path(self, path):
        """Either of its two files (the other one lost is damage this profile then names)."""
        return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, f)) for f in ADAPTER_CONTENT)

    def resume_contract(self, ckpt):
        return Contract("peft 0.21 PeftModel.from_pretrained, load_adapter", (WEIGHTS, CONFIG), model=(WEIGHTS,),
                        model_why="load_peft_weights raises: there is no adapter to load",
                        not_read=((r"README\.md", "the model card"),))

    def resume_problems(self, ckpt):
        return [weights_only_problem(ckpt)]
