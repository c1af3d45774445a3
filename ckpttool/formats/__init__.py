"""The format layer: one reader module per layout, each with `detect(path)` and `read(path)`: bytes in, a
`Checkpoint` out. Readers know file formats, never trainers (`ckpttool.checkpoint` composes the two).

Readers are asked in `READERS` order: directory layouts before file layouts (a model folder before a bare shard
index), and a consistency_models family member before a plain torch file. A state dir is read by `statedir` with the file roles its trainer profile names. Adding a
layout means adding one module to `READERS`; the profile then says what the checkpoint means.
"""

from __future__ import annotations

from ckpttool.errors import CkptError
from ckpttool.formats import dcp, deepspeed, family, pretrained, safetensors, sharded, torchfile
from ckpttool.model import Checkpoint

READERS = (dcp, deepspeed, pretrained, sharded, family, safetensors, torchfile)


def read_file(path: str, role: str = "model", name: str | None = None) -> Checkpoint:
    """Read one weights/state file as a component of a larger checkpoint."""
    if safetensors.detect(path):
        ckpt = safetensors.read(path)
        for comp in ckpt.components:
            comp.role, comp.name = role, name or role
        return ckpt
    return torchfile.read(path, role_hint=role, name_hint=name)


__all__ = ["CkptError", "READERS", "read_file"]
