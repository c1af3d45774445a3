"""Model folders as the libraries' `save_pretrained` writes them, and diffusers pipeline folders.

- transformers (modeling_utils.py save_pretrained): `config.json` and `model.safetensors`, `pytorch_model.bin`, or
  shards with `model.safetensors.index.json` / `pytorch_model.bin.index.json`.
- diffusers (models/modeling_utils.py save_pretrained): `config.json` and `diffusion_pytorch_model.safetensors`
  (`.bin`, or shards with `diffusion_pytorch_model.safetensors.index.json`).
- sentence-transformers: `modules.json` naming each module's folder ("" for the top one), each module's weights a
  transformers or plain `model.safetensors` folder.
- diffusers pipelines (pipelines/pipeline_utils.py DiffusionPipeline.save_pretrained): `model_index.json` maps each
  component name to [library, class] ([null, null] when absent) and each component is a folder of its own: model
  components hold weights; schedulers, tokenizers and feature extractors hold only their configs.

Each folder holding weights becomes one `model` component named after it (the folder itself: `model`). Configs are
parsed into metadata (what they say about the weights is checked by the profile); files are followed through
symlinks, as a Hugging Face cache snapshot's point into its `blobs/`.
"""

from __future__ import annotations

import json
import os
import re

from ckpttool.errors import CkptError
from ckpttool.formats import hub_cache
from ckpttool.formats.pretrained_files import CONFIG, SAFETENSORS_FILE, WEIGHTS, WEIGHTS_IN_WORDS, weights_file
from ckpttool.model import ERROR, Checkpoint, Code

PIPELINE_INDEX = "model_index.json"
MODULES = "modules.json"


def is_model_folder(path: str) -> bool:
    """A config and weights; in a Hugging Face cache snapshot, a config alone (its weights may not have arrived)."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG)) and (
        weights_file(path) is not None or hub_cache.snapshot_of(path) is not None)


def detect(path: str) -> bool:
    return os.path.isdir(path) and (os.path.isfile(os.path.join(path, PIPELINE_INDEX)) or
                                    os.path.isfile(os.path.join(path, MODULES)) or is_model_folder(path))


def read(path: str, *, role: str | None = None, name: str | None = None) -> Checkpoint:
    """A whole checkpoint, which names its own parts (`role` and `name` are not used)."""
    if os.path.isfile(os.path.join(path, PIPELINE_INDEX)):
        ckpt = Checkpoint(path, "pipeline", "diffusers pipeline folder")
        _read_pipeline(ckpt)
    elif os.path.isfile(os.path.join(path, MODULES)):
        ckpt = Checkpoint(path, "pretrained", "sentence-transformers model folder")
        _read_modules(ckpt)
    else:
        ckpt = Checkpoint(path, "pretrained", "model folder (save_pretrained)")
        _read_folder(ckpt, path, "model")
    if hub := hf_cache(path):
        ckpt.metadata["hf_cache"] = hub
    return ckpt


def hf_cache(path: str) -> dict | None:
    """The repo id and revision of a Hugging Face cache snapshot that `path` is (or lies in), else None."""
    snap = hub_cache.snapshot_of(path)
    return {"repo_id": snap["repo_id"], "revision": snap["revision"]} if snap else None


def _json(ckpt: Checkpoint, path: str) -> dict | None:
    """A config or index document; a problem (never an exception) when it is missing, empty or not a JSON object."""
    ckpt.files.append(path)
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except FileNotFoundError:
        ckpt.add_problem(Code.MISSING_FILE, ERROR, f"{os.path.basename(path)} is missing: from_pretrained reads it "
                         "first", path)
        return None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        ckpt.add_problem(Code.CORRUPT, ERROR, f"{os.path.basename(path)} is not valid JSON (cut short or damaged: "
                         f"{e})", path)
        return None
    if not isinstance(doc, dict):
        ckpt.add_problem(Code.CORRUPT, ERROR, f"{os.path.basename(path)} is not a JSON object", path)
        return None
    return doc


def _read_folder(ckpt: Checkpoint, folder: str, name: str):
    """One save_pretrained folder: its config into metadata["configs"][name], its weights as component `name`."""
    from ckpttool.formats import read_file, sharded

    config = _json(ckpt, os.path.join(folder, CONFIG))
    if config is not None:
        ckpt.metadata.setdefault("configs", {})[name] = {
            k: config[k] for k in ("_class_name", "architectures", "model_type", "torch_dtype", "dtype",
                                   "tie_word_embeddings", "_diffusers_version", "transformers_version")
            if k in config}
    weights = weights_file(folder)
    if weights is None:
        link = next((p for p in (os.path.join(folder, w) for w in WEIGHTS) if os.path.islink(p)), None)
        if link is not None:  # a link to nothing: a cache download cut short, or a blob lost
            lost = hub_cache.dangling(link)
            ckpt.add_problem(lost.code, ERROR, f"{name}: {lost.reason}", link, component=name)
            return
        ckpt.add_problem(Code.MISSING_FILE, ERROR, f"{name}: no weights ({WEIGHTS_IN_WORDS}): "
                         "from_pretrained cannot load it", folder, component=name)
        for partial in hub_cache.unfinished(folder):
            ckpt.add_problem(partial.code, ERROR, partial.reason, partial.path, component=name)
        return
    try:
        part = sharded.read(weights, name=name) if weights.endswith(".index.json") else read_file(weights, name=name)
    except CkptError as e:
        ckpt.add_problem(e.code, ERROR, f"{name}: {e.reason}", e.path or weights, component=name)
        ckpt.files.append(weights)
        return
    ckpt.absorb_problems(part)
    ckpt.files.extend(part.files)
    ckpt.components.extend(part.components)


def _read_pipeline(ckpt: Checkpoint):
    """Each component model_index.json names, read by its own folder's layout."""
    index = _json(ckpt, os.path.join(ckpt.path, PIPELINE_INDEX))
    if index is None:
        return
    ckpt.metadata["pipeline"] = {k: index[k] for k in ("_class_name", "_diffusers_version") if k in index}
    non_weights = {}
    for name, spec in sorted(index.items()):
        if name.startswith("_") or not isinstance(spec, list) or len(spec) != 2 or spec == [None, None]:
            continue
        folder = os.path.join(ckpt.path, name)
        if os.path.basename(name) != name or not os.path.isdir(folder):
            ckpt.add_problem(Code.MISSING_FILE, ERROR, f"model_index.json names {name} ({spec[0]}.{spec[1]}), but "
                             f"{name}/ is missing: DiffusionPipeline.from_pretrained raises", folder, component=name)
            continue
        if _holds_no_weights(spec):
            non_weights[name] = f"{spec[0]}.{spec[1]}"  # a scheduler, tokenizer or feature extractor
            continue
        _read_folder(ckpt, folder, name)
    ckpt.metadata["non_weight_parts"] = non_weights


def _holds_no_weights(spec: list) -> bool:
    """Schedulers, tokenizers, feature extractors and image processors keep a config and no weights."""
    return isinstance(spec[1], str) and bool(re.search(r"Scheduler|Tokenizer|FeatureExtractor|ImageProcessor|"
                                                        r"Processor$", spec[1]))


def _read_modules(ckpt: Checkpoint):
    """sentence-transformers: every module modules.json lists, the ones holding weights as components."""
    from ckpttool.formats import read_file

    try:
        with open(os.path.join(ckpt.path, MODULES), encoding="utf-8") as f:
            modules = json.load(f)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        ckpt.add_problem(Code.CORRUPT, ERROR, f"{MODULES} is not valid JSON ({e})", os.path.join(ckpt.path, MODULES))
        return
    ckpt.files.append(os.path.join(ckpt.path, MODULES))
    for module in modules if isinstance(modules, list) else []:
        rel = module.get("path", "") if isinstance(module, dict) else ""
        name = module.get("name", rel or "model") if isinstance(module, dict) else "model"
        folder = os.path.normpath(os.path.join(ckpt.path, rel))
        if not os.path.isdir(folder):
            ckpt.add_problem(Code.MISSING_FILE, ERROR, f"{MODULES} lists module {name} at {rel}/, which is missing",
                             folder, component=str(name))
        elif is_model_folder(folder):
            _read_folder(ckpt, folder, "model" if not rel else str(name))
        elif os.path.isfile(os.path.join(folder, SAFETENSORS_FILE)):  # a Dense or other plain torch module
            part = read_file(os.path.join(folder, SAFETENSORS_FILE), name=str(name))
            ckpt.absorb_problems(part)
            ckpt.files.extend(part.files)
            ckpt.components.extend(part.components)
