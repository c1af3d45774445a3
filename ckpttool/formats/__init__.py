"""The format layer: one reader module per layout, each a `Reader`: bytes in, a `Checkpoint` out. Readers know file
formats, never trainers (`ckpttool.checkpoint` composes the two).

Readers are asked in `READERS` order: directory layouts before file layouts (a model folder before a bare shard
index), and a consistency_models family member before a plain torch file. A state dir is read by `statedir` from a
description of its files (`statedir.StateDirFiles`, which its trainer profile gives). Adding a layout means adding one
module and its entry in `READERS`; the profile then says what the checkpoint means.
"""

from __future__ import annotations

import importlib
import os
from typing import NamedTuple, Protocol

from ckpttool.errors import CkptError
from ckpttool.model import Checkpoint


class Reader(Protocol):
    """What every reader module in READERS is."""

    def detect(self, path: str) -> bool:
        """Whether `path` is this layout, from names and a few bytes at most."""

    def read(self, path: str, *, role: str | None = None, name: str | None = None) -> Checkpoint:
        """Read `path` without loading tensor data; raise CkptError when it is too broken to describe. `role` and
        `name`: what it is as a part of a larger checkpoint (a reader of whole checkpoints ignores them)."""


class ReaderEntry(NamedTuple):
    """A reader module and what it reads, declared here so that choosing readers for a path imports none of them."""

    module: str  # ckpttool.formats.<module>
    folders: bool = False  # reads a folder
    files: bool = False  # reads a file
    named: bool = False  # asked only of a file named as a checkpoint (.safetensors, a torch suffix)


READERS = (ReaderEntry("dcp", folders=True), ReaderEntry("deepspeed", folders=True),
           ReaderEntry("pretrained", folders=True), ReaderEntry("misnamed", files=True, named=True),
           ReaderEntry("sharded", folders=True, files=True),
           ReaderEntry("family", files=True), ReaderEntry("safetensors", files=True),
           ReaderEntry("torchfile", files=True))
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".tar")  # what torch.save files are named (torchfile)
ZIP_MAGIC = b"PK\x03\x04"  # a zip member's local header: how a torch zip file begins


def readers_for(path: str) -> list[Reader]:
    """The reader modules that could read `path`, in `READERS` order, imported only now: a cheap look at the path
    (a dir, a shard index, a safetensors or a torch name) leaves the others unimported; an unusual name gets every
    file reader."""
    if os.path.isdir(path):
        names = [r.module for r in READERS if r.folders]
    elif path.endswith(".index.json"):
        names = ["sharded"]
    elif path.endswith(".safetensors"):  # a checkpoint's name: first, whether it is text instead (misnamed)
        names = ["misnamed", "safetensors"]
    elif path.endswith(TORCH_SUFFIXES):
        names = ["misnamed", "family", "safetensors", "torchfile"]
    else:
        names = [r.module for r in READERS if r.files and not r.named]
    return [importlib.import_module(f"ckpttool.formats.{name}") for name in names]


def read_file(path: str, *, role: str = "model", name: str | None = None) -> Checkpoint:
    """Read one weights/state file as a component of a larger checkpoint."""
    from ckpttool.formats import safetensors, torchfile

    from ckpttool.formats import misnamed

    reader = misnamed if misnamed.is_text(path) else safetensors if safetensors.detect(path) else torchfile
    return reader.read(path, role=role, name=name)


__all__ = ["CkptError", "READERS", "TORCH_SUFFIXES", "ZIP_MAGIC", "Reader", "read_file", "readers_for"]
