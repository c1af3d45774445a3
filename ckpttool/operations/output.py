"""Writing outputs safely, shared by remap and convert: format from the destination, never over an existing file
without --force, never a partial file (temporary sibling, renamed into place only when complete)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ckpttool import atomic
from ckpttool.errors import CkptError, UsageError
from ckpttool.model import ERROR, Code, dtype_bytes, uncarried_tensors

FILE_FORMATS = {".safetensors": "safetensors", ".pt": "torch", ".pth": "torch", ".bin": "torch", ".ckpt": "torch"}
FORMAT_NAMES = {"safetensors": "safetensors", "torch": "torch", "pt": "torch"}


def target_format(dst: str, to: str | None) -> str:
    if to:
        if to not in FORMAT_NAMES:
            raise UsageError(f"--to {to}: choose one of {', '.join(sorted(FORMAT_NAMES))}")
        return FORMAT_NAMES[to]
    fmt = FILE_FORMATS.get(os.path.splitext(dst)[1].lower())
    if fmt is None:
        raise UsageError(f"{dst}: cannot tell the output format from its suffix; use .safetensors or .pt, or --to")
    return fmt


def check_destination(src: str, dst: str, *, force: bool):
    """DST may not be SRC, lie inside it, hold it, or reach it through a link (real paths compared): `--force`
    replaces DST whole, and an input is never modified."""
    from ckpttool import paths

    if paths.overlap(src, dst):
        same = os.path.realpath(src) == os.path.realpath(dst)
        where = ("is the input" if same else "lies inside the input" if paths.within(dst, src) else
                 "holds the input")
        raise UsageError(f"{dst}: the output {where} ({os.path.realpath(src)}, links resolved); write to a path "
                         "apart from it (inputs are never modified)")
    if os.path.lexists(dst) and not force:
        raise UsageError(f"{dst}: already exists; pass --force to replace it")
    parent = os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(parent):
        raise UsageError(f"{parent}: output folder does not exist")


def refuse_broken(ckpt, component=None):
    """A truncated, corrupt or incomplete input gives exit 1 and no output at all. With `component`, problems a
    reader pinned on another component do not count (a family's missing optimizer does not stop reading its model)."""
    errors = [p for p in ckpt.problems if p.severity == ERROR and p.code != Code.UNSAFE_PICKLE
              and not (component is not None and p.component and p.component != component.name)]
    if errors:
        first = errors[0]
        raise CkptError(first.code, f"input is broken, nothing written: {first.message}; run `ckpttool verify "
                        f"{ckpt.path}` for details", first.path or ckpt.path)
    if uncarried := uncarried_tensors([component] if component is not None else ckpt.components):
        raise CkptError(Code.UNSUPPORTED_LAYOUT, f"{uncarried}; it would drop them, so nothing is written or compared "
                        "(torch.load them and save them dense first)", ckpt.path)


@dataclass(frozen=True)
class RawBytes:
    """A tensor given as a byte range of a file, for writers that can copy it without loading it."""

    file: str
    offset: int
    length: int


@dataclass(frozen=True)
class RawRanges:
    """A tensor given as byte ranges of files, one after another (a concatenation of whole rows, say)."""

    ranges: tuple[RawBytes, ...]


def write_tensors(dst: str, fmt: str, specs, tensors, metadata: dict | None = None, wrap=None, *,
                  staged: bool = True):
    """Write (name, tensor) pairs, in `specs` order. `staged`: to a temporary sibling renamed into place (a caller
    that stages a whole folder itself passes False). A failed write removes what it wrote and raises OutputError."""
    from ckpttool import hashing
    from ckpttool.formats import safetensors, torchwriter

    tmp = atomic.make_staging_file(dst) if staged else dst
    writer = None
    sizes = {name: dtype_bytes(dtype, shape) for name, dtype, shape in specs}
    with atomic.guard(dst, sum(sizes.values())), hashing.progress(sum(sizes.values()), "writing") as advance:
        try:
            writer = (safetensors.Writer(tmp, specs, metadata) if fmt == "safetensors"
                      else torchwriter.Writer(tmp, specs, wrap))
            for name, tensor in tensors:
                if isinstance(tensor, RawBytes):
                    writer.write_raw(name, tensor.file, tensor.offset, tensor.length)
                elif isinstance(tensor, RawRanges):
                    writer.write_raw_ranges(name, [(r.file, r.offset, r.length) for r in tensor.ranges])
                else:
                    writer.write(name, tensor)
                advance(sizes.get(name, 0))
            writer.close()
            writer = None
            if staged:
                os.replace(tmp, dst)
        finally:
            try:
                if writer is not None:
                    writer.abort()
            finally:  # never a full-size staging file left behind, whatever closing it raised
                if staged or writer is not None:
                    atomic.discard(tmp)


def write_json_beside(dst: str, name: str, doc: dict):
    import json

    atomic.write_text(os.path.join(os.path.dirname(os.path.abspath(dst)), name), json.dumps(doc, indent=1) + "\n")

