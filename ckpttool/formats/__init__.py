"""The format layer: one reader module per layout, each with `detect(path)` and `read(path)`.

`open_checkpoint` first asks the trainer profiles (`ckpttool.trainers`) whose output a path is: a state dir is read
with the file roles its trainer names. Otherwise each reader is asked in turn; directory layouts come before file
layouts, and a consistency_models family member before a plain torch file. Adding a layout means adding one module to
`READERS`; the profile then says what the checkpoint means.
"""

from __future__ import annotations

import gc
import os
from contextlib import contextmanager

from ckpttool.errors import CkptError, UsageError
from ckpttool.formats import dcp, deepspeed, family, quanto, safetensors, sharded, statedir, torchfile
from ckpttool.model import Checkpoint

READERS = (dcp, deepspeed, sharded, family, safetensors, torchfile)


def read_file(path: str, role: str = "model", name: str | None = None) -> Checkpoint:
    """Read one weights/state file as a component of a larger checkpoint."""
    if safetensors.detect(path):
        ckpt = safetensors.read(path)
        for comp in ckpt.components:
            comp.role, comp.name = role, name or role
        return ckpt
    return torchfile.read(path, role_hint=role, name_hint=name)


def open_checkpoint(path: str) -> Checkpoint:
    """Read what is at `path` without loading tensor data. Raises UsageError (no such path, unknown layout) or
    CkptError (a single file too broken to read)."""
    with _cycle_collector_paused():
        return _open(path)


@contextmanager
def _cycle_collector_paused():
    """Reading a file of 100,000 tensors makes millions of acyclic objects; the cycle collector's passes over them
    took half the parse. Paused while a checkpoint is read (the CLI pauses it for the whole command)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _open(path: str) -> Checkpoint:
    from ckpttool import trainers

    if not os.path.exists(path):
        raise UsageError(f"{path}: no such file or directory")
    profile = trainers.for_path(path)
    if profile is not None and profile.file_roles and os.path.isdir(path):
        ckpt = statedir.read(path, profile)
    else:
        reader = next((r for r in READERS if r.detect(path)), None)
        ckpt = reader.read(path) if reader else None
    if ckpt is not None:
        trainers.interpret(ckpt, profile)
        quanto.annotate(ckpt)
        return ckpt
    if os.path.isdir(path):
        raise UsageError(f"{path}: no checkpoint layout recognised in this directory (expected a trainer's state dir "
                         "such as checkpoint-N, a DCP dir or a sharded index); point at a checkpoint file or state dir")
    raise UsageError(f"{path}: not a checkpoint file ckpttool reads (.pt .pth .bin .ckpt .safetensors, an index "
                     "or a state dir)")


def is_state_dir(path: str) -> bool:
    """Whether `path` is a dir of checkpoint files that a trainer profile names the roles of."""
    from ckpttool import trainers

    profile = trainers.for_path(path) if os.path.isdir(path) else None
    return bool(profile and profile.file_roles)


def guess_format(path: str) -> str:
    """Best guess of the format name for a path that failed to read."""
    if os.path.isdir(path):
        return ("accelerate" if is_state_dir(path) else "dcp" if dcp.detect(path) else
                "deepspeed" if deepspeed.detect(path) else "unknown")
    if path.endswith(sharded.INDEX_SUFFIX):
        return "sharded"
    return "safetensors" if safetensors.detect(path) else "torch"


__all__ = ["CkptError", "open_checkpoint", "read_file", "guess_format", "is_state_dir"]
