"""Model folders as `save_pretrained` writes them (transformers, diffusers, sentence-transformers) and diffusers
pipeline folders (`ckpttool/formats/pretrained.py` reads them): weights for inference or fine-tuning, not a training
state. What a folder's config.json says about its weights is checked against them: a `torch_dtype` the weights do
not have is a warning (from_pretrained casts to it).
"""

from __future__ import annotations

import os
from collections import Counter

from ckpttool.formats import pretrained
from ckpttool.formats.pretrained_files import CONFIG
from ckpttool.model import WARNING, Code, Problem
from ckpttool.trainers.base import Profile


class ModelFolder(Profile):
    name = None  # no trainer wrote it: the layout names the library
    source = ("transformers modeling_utils.py save_pretrained, diffusers models/modeling_utils.py save_pretrained, "
              "pipelines/pipeline_utils.py DiffusionPipeline.save_pretrained, sentence-transformers modules.json")
    saves_rng = False

    def claims_path(self, path):
        return pretrained.detect(path)

    def interpret(self, ckpt):
        super().interpret(ckpt)
        ckpt.trainer = None
        library = _library(ckpt)
        if ckpt.format == "pretrained" and library:
            ckpt.layout = f"{library} model folder (save_pretrained)"
        ckpt.problems.extend(_config_problems(ckpt))


def _library(ckpt) -> str | None:
    if "sentence-transformers" in ckpt.layout:
        return "sentence-transformers"
    config = (ckpt.metadata.get("configs") or {}).get("model") or {}
    if "_diffusers_version" in config or "_class_name" in config:
        return "diffusers"
    if "transformers_version" in config or "architectures" in config or "model_type" in config:
        return "transformers"
    return None


def _config_problems(ckpt) -> list[Problem]:
    """Each folder's config against its weights: the dtype it declares."""
    problems = []
    for name, config in (ckpt.metadata.get("configs") or {}).items():
        declared = config.get("torch_dtype") or config.get("dtype")
        comp = next((c for c in ckpt.components if c.name == name), None)
        if not isinstance(declared, str) or comp is None or not comp.tensors:
            continue
        floats = Counter(t.dtype for t in comp.tensors if "float" in t.dtype)
        held = floats.most_common(1)[0][0] if floats else None
        if held and held != declared.removeprefix("torch."):
            folder = ckpt.path if name == "model" else os.path.join(ckpt.path, name)
            problems.append(Problem(Code.DTYPE_MISMATCH, WARNING, f"{name}: config.json says torch_dtype {declared}, "
                                    f"the weights are {held}: from_pretrained casts them to {declared} by default",
                                    os.path.join(folder, CONFIG), component=name))
    return problems
