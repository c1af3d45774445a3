"""The format layer: one reader module per layout, each with `detect(path)` and `read(path)`: bytes in, a
`Checkpoint` out. Readers know file formats, never trainers (`ckpttool.checkpoint` composes the two).

Readers are asked in `READERS` order: directory layouts before file layouts (a model folder before a bare shard
index), and a consistency_models family member before a plain torch file. A state dir is read by `statedir` with the
file roles its trainer profile names. Adding a layout means adding one module to `READERS`; the profile then says what
the checkpoint means.
"""

from __future__ import annotations

import importlib
import os

from ckpttool.errors import CkptError
from ckpttool.model import Checkpoint

READERS = ("dcp", "deepspeed", "pretrained", "sharded", "family", "safetensors", "torchfile")
DIR_READERS = READERS[:4]
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".tar")  # what torch.save files are named (torchfile)
ZIP_MAGIC = b"PK\x03\x04"  # a zip member's local header: how a torch zip file begins


def readers_for(path: str):
    """The reader modules that could read `path`, in `READERS` order, imported only now: a cheap look at the path
    (a dir, a shard index, a safetensors or a torch name) leaves the others unimported; an unusual name gets all."""
    if os.path.isdir(path):
        names = DIR_READERS
    elif path.endswith(".index.json"):
        names = ("sharded",)
    elif path.endswith(".safetensors"):
        names = ("safetensors",)
    elif path.endswith(TORCH_SUFFIXES):
        names = ("family", "safetensors", "torchfile")
    else:
        names = READERS
    return [importlib.import_module(f"ckpttool.formats.{name}") for name in names]


def read_file(path: str, role: str = "model", name: str | None = None) -> Checkpoint:
    """Read one weights/state file as a component of a larger checkpoint."""
    from ckpttool.formats import safetensors, torchfile

    if safetensors.detect(path):
        ckpt = safetensors.read(path)
        for comp in ckpt.components:
            comp.role, comp.name = role, name or role
        return ckpt
    return torchfile.read(path, role_hint=role, name_hint=name)


__all__ = ["CkptError", "READERS", "TORCH_SUFFIXES", "ZIP_MAGIC", "read_file", "readers_for"]
