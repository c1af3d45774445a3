"""Reading a checkpoint as one unit: the step above the format readers and the trainer profiles, which composes them.

    path -> trainers.for_path (names and files only) -> a formats reader (bytes -> Checkpoint)
         -> profile.interpret (what the parts and counters mean) -> quanto.annotate

Data flows down: `formats/` knows file formats and never trainers; `trainers/` knows what a trainer's files mean and
may use the readers for nested parts; only this module asks both.
"""

from __future__ import annotations

import gc
import os
from contextlib import contextmanager

from ckpttool import trainers
from ckpttool.errors import UsageError
from ckpttool.formats import readers_for
from ckpttool.model import Checkpoint


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
    if not os.path.exists(path):
        raise UsageError(f"{path}: no such file or directory")
    profile = trainers.for_path(path)
    if profile is not None and profile.file_roles and os.path.isdir(path):
        from ckpttool.formats import statedir

        ckpt = statedir.read(path, profile)
    else:
        reader = next((r for r in readers_for(path) if r.detect(path)), None)
        ckpt = reader.read(path) if reader else None
    if ckpt is not None:
        from ckpttool.formats import quanto

        trainers.interpret(ckpt, profile)
        quanto.annotate(ckpt)
        return ckpt
    if os.path.isdir(path):
        raise UsageError(f"{path}: no checkpoint layout recognised in this directory (expected a trainer's state dir "
                         "such as checkpoint-N, a DCP dir or a sharded index); point at a checkpoint file or state dir")
    raise UsageError(f"{path}: not a checkpoint file ckpttool reads (.pt .pth .bin .ckpt .safetensors, an index "
                     "or a state dir)")


def guess_format(path: str) -> str:
    """Best guess of the format name for a path that failed to read."""
    from ckpttool.formats import dcp, deepspeed, safetensors, sharded

    if os.path.isdir(path):
        return ("accelerate" if trainers.is_state_dir(path) else "dcp" if dcp.detect(path) else
                "deepspeed" if deepspeed.detect(path) else "unknown")
    if path.endswith(sharded.INDEX_SUFFIX):
        return "sharded"
    return "safetensors" if safetensors.detect(path) else "torch"
