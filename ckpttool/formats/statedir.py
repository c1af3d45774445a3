"""State directories (Accelerate `save_state` and the trainers built on it, transformers.Trainer, PEFT, ...): a dir of
files read as one checkpoint. Which file plays which role, and which JSON files hold counters, the trainer profile
says (`ckpttool.trainers`); this reader only reads: every file a role names becomes a component, every counter in
those JSON files a step source, and a `save_pretrained` subfolder (`unet/`, `unet_ema/`, `transformer/`, ...) a
component of its own.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import NamedTuple

from ckpttool import paths
from ckpttool.errors import CkptError
from ckpttool.model import ERROR, Checkpoint, Code, Record, StepSource

JSON_LIMIT = 256 << 20  # a counters file longer than this is read by no trainer here (trainer_state.json logs grow)
ORDER = ["model", "ema", "optimizer", "scheduler", "scaler", "rng", "sampler", "dataloader", "custom"]


@dataclass(frozen=True)
class FileRole:
    """Files (or dirs) named like `pattern` hold the `role` part. In the component `name`, `{_n}` becomes `_N` for
    the pattern's number N (nothing for 0 or none, as Accelerate names model, model_1, ...) and `{n}` the number."""

    pattern: re.Pattern
    role: str
    name: str
    folder: bool = False  # a DCP directory (Accelerate's FSDP sharded state), not a file

    def component_name(self, match: re.Match) -> str:
        index = match.group(1) if match.groups() else None
        return self.name.replace("{_n}", "" if index in (None, "0") else f"_{index}").replace("{n}", index or "0")


def role(pattern: str, part: str, name: str, folder=False) -> FileRole:
    return FileRole(re.compile(pattern + "$"), part, name, folder)


class StateDirFiles(NamedTuple):
    """What this reader reads in a state dir: which files hold which part, and which JSON files hold counters (a
    trainer profile says it: `Profile.state_dir_files`)."""

    roles: tuple  # FileRole
    counters: dict  # JSON file name pattern -> {key: the counter's meaning}
    layout: str | None = None  # the layout's name, shown; None: "state dir"


def _json_counters(path: str, ckpt: Checkpoint, state_files: dict):
    """Counters of the JSON files `state_files` names: a pattern matches an entry of the dir, or of the one folder
    its part before "/" names (diffusers' `unet_ema/config.json`)."""
    folders = {p.split("/")[0] for p in state_files if "/" in p}
    nested = [f"{d}/{e}" for d in sorted(folders) if paths.folder_named(path, d) for e in sorted(os.listdir(
        os.path.join(path, d)))]
    for entry in sorted(os.listdir(path)) + nested:
        fields = next((f for pattern, f in state_files.items() if re.fullmatch(pattern, entry)), None)
        full = os.path.join(path, entry)
        if fields is None or not os.path.isfile(full) or paths.leaves(full, path):
            continue
        ckpt.files.append(full)
        if os.path.getsize(full) > JSON_LIMIT:
            ckpt.add_problem(Code.CORRUPT, ERROR, f"{entry} is {os.path.getsize(full)} bytes, more than any trainer's "
                             f"counters file ({JSON_LIMIT >> 20} MiB): not read", full)
            continue
        try:
            with open(full, encoding="utf-8") as f:
                doc = json.load(f)
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            ckpt.add_problem(Code.CORRUPT, ERROR, f"{entry} is not valid JSON ({e})", full)
            continue
        if not isinstance(doc, dict):
            ckpt.add_problem(Code.CORRUPT, ERROR, f"{entry} is not a JSON object", full)
            continue
        ckpt.metadata[entry] = {k: v for k, v in doc.items() if k != "log_history"}
        for key, meaning in fields.items():
            if type(doc.get(key)) is int:
                ckpt.steps.append(StepSource(f"{entry} {key}", doc[key], meaning, record=Record.STATE_FILE, key=key,
                                             file=entry))


def _nested(path: str, roles) -> list[str]:
    """`folder/file` entries for the roles that name a file inside a folder (OneTrainer's `optimizer/optimizer.pt`):
    only the folders such a role's part before "/" names, one level down, never through a link."""
    heads = {r.pattern.pattern.split("/")[0] for r in roles if "/" in r.pattern.pattern}
    found = []
    for folder in sorted(os.listdir(path)) if heads else ():
        if any(re.fullmatch(head, folder) for head in heads) and paths.folder_named(path, folder):
            found += [f"{folder}/{e}" for e in sorted(os.listdir(os.path.join(path, folder)))]
    return found


def read(path: str, files: StateDirFiles) -> Checkpoint:
    from ckpttool.formats import dcp, deepspeed, read_file, sharded
    from ckpttool.formats.pretrained_files import weights_file

    ckpt = Checkpoint(path, "accelerate", files.layout or "state dir")
    _json_counters(path, ckpt, files.counters)

    def add(part: Checkpoint, files):
        ckpt.absorb_problems(part)
        ckpt.steps.extend(part.steps)
        ckpt.components.extend(part.components)
        ckpt.files.extend(files)

    for entry in sorted(os.listdir(path)) + _nested(path, files.roles):
        full = os.path.join(path, entry)
        name = None
        if paths.unsafe(full, path):
            continue  # never opened: ckpttool.checkpoint reports it (unsafe_path)
        try:
            is_dir = os.path.isdir(full)
            file_role = next(((r, m) for r in files.roles if r.folder == is_dir
                              and (m := r.pattern.match(entry))), None)
            if file_role and not is_dir:
                r, m = file_role
                name = r.component_name(m)
                part = (sharded.read(full, name=name, role=r.role) if entry.endswith(".index.json")
                        else read_file(full, role=r.role, name=name))
                add(part, part.files if entry.endswith(".index.json") else [full])
            elif file_role and dcp.detect(full):
                r, m = file_role
                name = r.component_name(m)
                part = dcp.read(full, name=name, role=r.role)
                add(part, part.files)
            elif file_role and deepspeed.detect(full):  # a DeepSpeed engine's own save (transformers under DeepSpeed)
                part = deepspeed.read(full)
                ckpt.metadata.update({k: part.metadata[k] for k in ("zero_stage", "data_parallel_world_size")
                                      if k in part.metadata})
                for comp in part.components:
                    if comp.role == "model":  # the fp32 master weights, beside the trainer's own weights files
                        comp.name, comp.role = "deepspeed_fp32_master", "extra"
                add(part, part.files)
            elif is_dir:
                sub = weights_file(full)
                if sub:  # a save_pretrained subfolder (unet/, unet_ema/, text_encoder/ ...), read as from_pretrained
                    part_role, name = ("ema" if "ema" in entry else "model"), entry
                    part = (sharded.read(sub, name=entry, role=part_role) if sub.endswith(".index.json")
                            else read_file(sub, role=part_role, name=entry))
                    add(part, part.files)
        except CkptError as e:
            ckpt.add_problem(e.code, ERROR, e.reason, e.path or full, component=name)
            ckpt.files.append(full)
        except OSError as e:  # a link to nothing, a file gone while it was read
            ckpt.add_problem(Code.MISSING_FILE, ERROR, f"{entry} cannot be read ({e.strerror or e})", full,
                             component=name)
    ckpt.components.sort(key=lambda c: (ORDER.index(c.role) if c.role in ORDER else len(ORDER), c.name))
    return ckpt
