"""PEFT adapters (peft `PeftModel.save_pretrained`): `adapter_model.safetensors` (or `.bin`) and `adapter_config.json`.

Weights only: resuming the training needs the trainer's state saved with it (a transformers `checkpoint-N` holds the
same adapter files next to optimizer.pt, scheduler.pt and trainer_state.json, and is read as transformers).
"""

from __future__ import annotations

import os

from ckpttool.trainers.base import Profile, role, weights_only_problem


class Peft(Profile):
    name = "peft"
    layout = "PEFT adapter dir"
    source = "peft 0.21 PeftModel.save_pretrained (SAFETENSORS_WEIGHTS_NAME, CONFIG_NAME)"
    file_roles = (role(r"adapter_model\.(?:safetensors|bin)", "model", "adapter"),)

    def claims_path(self, path):
        return os.path.isdir(path) and os.path.isfile(os.path.join(path, "adapter_config.json")) and any(
            os.path.isfile(os.path.join(path, f"adapter_model.{ext}")) for ext in ("safetensors", "bin"))

    def resume_problems(self, ckpt):
        return [weights_only_problem(ckpt)]
