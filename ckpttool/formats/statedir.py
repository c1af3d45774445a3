"""Accelerate `save_state` directories and the trainers that write them (diffusers, kohya, SimpleTuner, FSDP).

The directory is read as one checkpoint: every file becomes a component with its role, and every step or epoch the
directory states (its name, train_state.json, training_state.json, optimizer, scheduler) is recorded.
"""

from __future__ import annotations

import json
import os
import re

from ckpttool.errors import CkptError
from ckpttool.model import Checkpoint, StepSource

# file name pattern -> (role, component name template)
FILE_ROLES = [
    (re.compile(r"model(?:_(\d+))?\.safetensors$"), "model", "model"),
    (re.compile(r"pytorch_model(?:_(\d+))?\.bin$"), "model", "model"),
    (re.compile(r"pytorch_model_fsdp(?:_(\d+))?\.bin$"), "model", "model"),
    (re.compile(r"pytorch_model_fsdp_rank(\d+)\.bin$"), "model", "model_rank"),
    (re.compile(r"pytorch_lora_weights\.safetensors$"), "model", "lora"),
    (re.compile(r"optimizer(?:_(\d+))?\.bin$"), "optimizer", "optimizer"),
    (re.compile(r"scheduler(?:_(\d+))?\.bin$"), "scheduler", "scheduler"),
    (re.compile(r"sampler(?:_(\d+))?\.bin$"), "sampler", "sampler"),
    (re.compile(r"dl_state_dict(?:_(\d+))?\.bin$"), "dataloader", "dl_state_dict"),
    (re.compile(r"scaler\.pt$"), "scaler", "scaler"),
    (re.compile(r"random_states_(\d+)\.pkl$"), "rng", "random_states"),
    (re.compile(r"custom_checkpoint_(\d+)\.pkl$"), "custom", "custom_checkpoint"),
]
DIR_ROLES = [
    (re.compile(r"pytorch_model_fsdp(?:_(\d+))?$"), "model", "model"),
    (re.compile(r"optimizer(?:_(\d+))?$"), "optimizer", "optimizer"),
]
SUBFOLDER_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin", "model.safetensors",
                     "pytorch_model.bin", "diffusion_pytorch_model.safetensors.index.json",
                     "model.safetensors.index.json")
MARKERS = ("random_states_0.pkl", "optimizer.bin", "scheduler.bin", "train_state.json", "training_state.json",
           "model.safetensors", "pytorch_model.bin", "pytorch_lora_weights.safetensors", "pytorch_model_fsdp_0",
           "scaler.pt")

DIFFUSERS_NAME = re.compile(r"checkpoint-(\d+)(?:-(.+))?$")
ACCELERATE_AUTO_NAME = re.compile(r"checkpoint_(\d+)$")
KOHYA_STEP_NAME = re.compile(r".*-step(\d+)-state$")
KOHYA_EPOCH_NAME = re.compile(r".*-(\d+)-state$")


def detect(path: str) -> bool:
    return os.path.isdir(path) and any(os.path.exists(os.path.join(path, m)) for m in MARKERS)


def _component_name(template: str, index: str | None) -> str:
    if template == "model_rank":
        return f"model_rank{index}"
    if template in ("random_states", "custom_checkpoint"):
        return f"{template}_{index}"
    return template if not index or index == "0" else f"{template}_{index}"


def is_simpletuner(path: str) -> bool:
    """SimpleTuner writes `.guard` last; its training_state.json also carries keys no other trainer writes."""
    if os.path.exists(os.path.join(path, ".guard")) or os.path.exists(os.path.join(path, "checkpoint_manifest.json")):
        return True
    try:
        with open(os.path.join(path, "training_state.json"), encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and bool({"epoch_step", "exhausted_backends"} & set(doc))


def layout_of(path: str) -> tuple[str, list[StepSource]]:
    """Which trainer wrote this dir, and the step or epoch its name states."""
    name = os.path.basename(os.path.normpath(path))
    if m := DIFFUSERS_NAME.match(name):
        trainer = "SimpleTuner" if is_simpletuner(path) else "diffusers"
        return f"{trainer} checkpoint-N", [StepSource("directory name", int(m.group(1)))]
    if m := ACCELERATE_AUTO_NAME.match(name):
        # Accelerate's automatic naming counts saves, not steps: not a step source.
        return f"Accelerate automatic checkpoint_N (save #{m.group(1)})", []
    if m := KOHYA_STEP_NAME.match(name):
        return "kohya -state dir", [StepSource("directory name", int(m.group(1)))]
    if m := KOHYA_EPOCH_NAME.match(name):
        return "kohya -state dir", [StepSource("directory name", int(m.group(1)), kind="epoch")]
    if name.endswith("-state"):
        return "kohya -state dir", []
    return "Accelerate save_state dir", []


def _json_steps(path: str, ckpt: Checkpoint):
    for fname, fields in (("train_state.json", {"current_step": "step", "current_epoch": "epoch"}),
                          ("training_state.json", {"global_step": "step", "epoch": "epoch"})):
        full = os.path.join(path, fname)
        if not os.path.isfile(full):
            continue
        ckpt.files.append(full)
        try:
            with open(full, encoding="utf-8") as f:
                doc = json.load(f)
        except (UnicodeDecodeError, ValueError) as e:
            ckpt.add_problem("corrupt", "error", f"{fname} is not valid JSON ({e})", full)
            continue
        if not isinstance(doc, dict):
            ckpt.add_problem("corrupt", "error", f"{fname} is not a JSON object", full)
            continue
        ckpt.metadata[fname] = doc
        for key, kind in fields.items():
            if type(doc.get(key)) is int:
                ckpt.steps.append(StepSource(f"{fname} {key}", doc[key], kind))


def read(path: str) -> Checkpoint:
    from ckpttool.formats import dcp, read_file, sharded

    layout, name_steps = layout_of(path)
    ckpt = Checkpoint(path, "accelerate", layout, steps=list(name_steps))
    guard = os.path.join(path, ".guard")
    if os.path.isfile(guard):
        with open(guard, encoding="utf-8", errors="replace") as f:
            ckpt.metadata["guard"] = f.read().strip()
    _json_steps(path, ckpt)

    def add(part: Checkpoint, files):
        ckpt.absorb_problems(part)
        ckpt.steps.extend(part.steps)
        ckpt.components.extend(part.components)
        ckpt.files.extend(files)

    for entry in sorted(os.listdir(path)):
        full = os.path.join(path, entry)
        name = None
        try:
            if os.path.isfile(full):
                for pattern, role, template in FILE_ROLES:
                    if m := pattern.match(entry):
                        name = _component_name(template, m.group(1) if m.groups() else None)
                        add(read_file(full, role=role, name=name), [full])
                        break
            elif os.path.isdir(full):
                for pattern, role, template in DIR_ROLES:
                    if (m := pattern.match(entry)) and dcp.detect(full):
                        name = _component_name(template, m.group(1))
                        part = dcp.read(full, name=name, role=role)
                        add(part, part.files)
                        break
                else:
                    weights = next((w for w in SUBFOLDER_WEIGHTS if os.path.isfile(os.path.join(full, w))), None)
                    if weights:  # diffusers save_pretrained subfolder (unet/, unet_ema/, text_encoder/ ...)
                        role, name = ("ema" if "ema" in entry else "model"), entry
                        sub = os.path.join(full, weights)
                        part = (sharded.read(sub, name=entry, role=role) if weights.endswith(".index.json")
                                else read_file(sub, role=role, name=entry))
                        add(part, part.files)
        except CkptError as e:
            ckpt.add_problem(e.code, "error", e.reason, e.path or full, component=name)
            ckpt.files.append(full)
    _order_components(ckpt)
    return ckpt


def _order_components(ckpt: Checkpoint):
    order = ["model", "ema", "optimizer", "scheduler", "scaler", "rng", "sampler", "dataloader", "custom"]
    ckpt.components.sort(key=lambda c: (order.index(c.role) if c.role in order else len(order), c.name))
