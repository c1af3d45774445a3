"""The format layer: one reader module per layout, each with `detect(path)` and `read(path)`.

`open_checkpoint` asks each reader in turn; directory layouts come before file layouts, and a consistency_models
family member before a plain torch file. Adding a layout means adding one module to `READERS`.
"""

from __future__ import annotations

import os

from ckpttool.errors import CkptError, UsageError
from ckpttool.formats import dcp, family, quanto, safetensors, sharded, statedir, torchfile
from ckpttool.model import Checkpoint

READERS = (statedir, dcp, sharded, family, safetensors, torchfile)


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
    if not os.path.exists(path):
        raise UsageError(f"{path}: no such file or directory")
    for reader in READERS:
        if reader.detect(path):
            ckpt = reader.read(path)
            quanto.annotate(ckpt)
            return ckpt
    if os.path.isdir(path):
        raise UsageError(f"{path}: no checkpoint layout recognised in this directory (expected an Accelerate state "
                         "dir, a DCP dir or a sharded index); point at a checkpoint file or state dir")
    raise UsageError(f"{path}: not a checkpoint file ckpttool reads (.pt .pth .bin .ckpt .safetensors, an index "
                     "or a state dir)")


def guess_format(path: str) -> str:
    """Best guess of the format name for a path that failed to read."""
    if os.path.isdir(path):
        return "accelerate" if statedir.detect(path) else "dcp" if dcp.detect(path) else "unknown"
    if path.endswith(sharded.INDEX_SUFFIX):
        return "sharded"
    return "safetensors" if safetensors.detect(path) else "torch"


__all__ = ["CkptError", "open_checkpoint", "read_file", "guess_format"]
