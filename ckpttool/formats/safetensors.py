"""safetensors files: the header is parsed and validated without reading tensor data or importing torch."""

from __future__ import annotations

import json
import os
import re
import struct

from ckpttool import paths
from ckpttool.dtypes import SAFETENSORS_CODE_OF, SAFETENSORS_CODES
from ckpttool.errors import CkptError, UsageError
from ckpttool.model import Checkpoint, Code, Component, Location, Salvaged, TensorInfo, dtype_bytes

SUFFIXES = (".safetensors",)
MAX_HEADER = 100_000_000  # the reference reader's cap



def detect(path: str) -> bool:
    return os.path.isfile(path) and path.endswith(SUFFIXES)


def read_header(path: str) -> tuple[list[TensorInfo], dict, int]:
    """Validated tensor list, `__metadata__` and data start offset of a safetensors file."""
    paths.regular(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CkptError(Code.TRUNCATED, f"file is {size} bytes, shorter than the 8-byte header length", path)
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER:
            raise CkptError(Code.CORRUPT, f"header length {n} exceeds the {MAX_HEADER}-byte limit: not a safetensors "
                            "file or its first bytes are damaged", path)
        if 8 + n > size:
            raise CkptError(Code.TRUNCATED, f"header declares {n} bytes but the file holds only {size - 8}", path)
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CkptError(Code.CORRUPT, f"header is not valid JSON ({e})", path) from None
    if not isinstance(header, dict):
        raise CkptError(Code.CORRUPT, "header is not a JSON object", path)
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in metadata.items()):
        raise CkptError(Code.CORRUPT, "__metadata__ must map strings to strings", path)
    start = 8 + n
    tensors = [_tensor_entry(name, entry, path, start) for name, entry in header.items()]
    _check_offsets(tensors, start, size, path)
    return tensors, metadata, start


def _tensor_entry(name, entry, path, start) -> TensorInfo:
    if not isinstance(entry, dict):
        raise CkptError(Code.CORRUPT, f"header entry {name!r} is not an object", path)
    dtype = SAFETENSORS_CODES.get(entry.get("dtype")) if isinstance(entry.get("dtype"), str) else None
    if dtype is None:
        raise CkptError(Code.CORRUPT, f"tensor {name!r} has unknown dtype {entry.get('dtype')!r}", path)
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise CkptError(Code.CORRUPT, f"tensor {name!r} has an invalid shape {shape!r}", path)
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int and o >= 0 for o in offsets)
            or offsets[0] > offsets[1]):
        raise CkptError(Code.CORRUPT, f"tensor {name!r} has invalid data_offsets {offsets!r}", path)
    begin, end = offsets
    expected = dtype_bytes(dtype, shape)
    if end - begin != expected:
        raise CkptError(Code.CORRUPT, f"tensor {name!r} spans {end - begin} bytes but {dtype}{shape} needs {expected}",
                        path)
    return TensorInfo(name, dtype, tuple(shape), Location(path, start + begin, end - begin))


def _check_offsets(tensors, start, size, path):
    """Offsets must tile the buffer exactly: contiguous from 0, no overlap, ending at end of file."""
    buffer_size = size - start
    expected_begin = 0
    for t in sorted(tensors, key=lambda t: (t.location.offset, t.location.length)):
        begin = t.location.offset - start
        if begin < expected_begin:
            raise CkptError(Code.CORRUPT, f"tensor {t.name!r} overlaps the tensor before it (offset {begin} < "
                            f"{expected_begin})", path)
        if begin > expected_begin:
            raise CkptError(Code.CORRUPT, f"{begin - expected_begin} unused bytes before tensor {t.name!r}: offsets "
                            "must be contiguous", path)
        expected_begin = begin + t.location.length
    if expected_begin > buffer_size:
        raise CkptError(Code.TRUNCATED, f"data ends at byte {expected_begin} of the buffer but the file holds only "
                        f"{buffer_size}: it was cut short (partial copy or interrupted save)", path)
    if expected_begin < buffer_size:
        raise CkptError(Code.CORRUPT, f"{buffer_size - expected_begin} bytes follow the last tensor", path)


def read(path: str, *, role: str | None = None, name: str | None = None) -> Checkpoint:
    tensors, metadata, _ = read_header(path)
    ckpt = Checkpoint(path, "safetensors", "safetensors file", files=[path], metadata=dict(metadata))
    ckpt.components.append(Component(name or role or "model", role or "model", files=[path], tensors=tensors,
                                     metadata=dict(metadata)))
    return ckpt


# One `"name": {...}` header entry, for a header whose JSON as a whole no longer parses (a flipped or cut byte):
# each entry is read on its own, so one damaged entry costs one tensor, not the file.
HEADER_ENTRY = re.compile(rb'"((?:[^"\\]|\\.)*)"\s*:\s*(\{[^{}]*\})')


def salvage(path: str) -> Salvaged:
    """The tensors of a damaged safetensors file whose header entry is sound and whose bytes are all in the file.

    The header is the only map of the data: when it is cut or its length is damaged, nothing can be placed
    (CkptError). Tensors whose ranges overlap another's are lost: which of them the damage moved cannot be told."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CkptError(Code.TRUNCATED,
                            f"file is {size} bytes, shorter than the 8-byte header length: no tensor can "
                            "be located", path)
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or 8 + n > size:
            raise CkptError(Code.TRUNCATED if n <= MAX_HEADER else Code.CORRUPT,
                            f"the header (declared {n} bytes, the file holds {size - 8}) is cut or its length is "
                            "damaged: it is the only map of where each tensor lies, so none can be located", path)
        raw = f.read(n)
    start = 8 + n
    out = Salvaged(path, "safetensors", how="header intact", checked=False)  # only a manifest vouches for bytes
    try:
        header = json.loads(raw.decode("utf-8"))
        entries = list(header.items()) if isinstance(header, dict) else None
    except (UnicodeDecodeError, ValueError, RecursionError):
        entries = None
    if entries is None:
        entries = []
        for m in HEADER_ENTRY.finditer(raw):
            try:
                entries.append((json.loads(b'"' + m.group(1) + b'"'), json.loads(m.group(2))))
            except (UnicodeDecodeError, ValueError, RecursionError):
                continue
        out.how = f"header JSON damaged: {len(entries)} entries read one by one"
    found, spans = [], []  # spans: (begin, end) in the data of every entry whose offsets read, kept or lost
    for name, entry in entries:
        if name == "__metadata__":
            if isinstance(entry, dict):
                out.metadata = {str(k): str(v) for k, v in entry.items() if isinstance(v, str)}
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int and o >= 0 for o in offsets):
            spans.append(tuple(offsets))
        try:
            info = _tensor_entry(name, entry, path, start)
        except CkptError as e:
            out.lost.append((name, e.reason))
            continue
        end = info.location.offset + info.location.length
        if end > size:
            out.lost.append((name, f"cut: its bytes end at byte {end}, the file at {size}"))
        else:
            found.append(info)
    found.sort(key=lambda t: (t.location.offset, t.location.length))
    overlapping, claimed = set(), 0
    for before, after in zip(found, found[1:]):
        if after.location.offset < before.location.offset + before.location.length:
            overlapping.update((before.name, after.name))
    for begin, end in sorted(spans):
        if begin > claimed:  # an entry the damage made unreadable: its name is gone with it
            out.lost.append(("(unnamed)", f"bytes {claimed} to {begin} of the data belong to no readable header "
                             "entry"))
        claimed = max(claimed, end)
    for t in found:
        if t.name in overlapping:
            out.lost.append((t.name, "its byte range overlaps another tensor's (a damaged header entry)"))
        else:
            out.kept.append(t)
    return out


class Writer:
    """Streams a safetensors file: the header (from the tensor specs) first, then each tensor in spec order.

    Memory stays bounded by the tensor being written; the caller decides the specs up front."""

    def __init__(self, path: str, specs: list[tuple[str, str, tuple]], metadata: dict | None = None):
        header, offset = {}, 0
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        for name, dtype, shape in specs:
            code = SAFETENSORS_CODE_OF.get(dtype)
            if code is None:
                raise UsageError(f"tensor {name}: dtype {dtype} has no safetensors equivalent; write a .pt instead "
                                 "(or leave it out with --component)")
            size = dtype_bytes(dtype, shape)
            header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the reference writer aligns the data buffer to 8 bytes
        self._order = [(name, dtype, tuple(shape)) for name, dtype, shape in specs]
        self._next = 0
        self._file = open(path, "wb")
        self._file.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, tensor):
        import torch

        expected = self._order[self._next]
        got = (name, str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape))
        if got != expected:
            raise ValueError(f"writer expected {expected}, got {got}")
        self._next += 1
        if tensor.numel():
            flat = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
            self._file.write(flat.numpy().data)

    def write_raw(self, name: str, src_path: str, offset: int, length: int):
        """Copy a tensor's bytes straight from another file (kernel-side copy, nothing held in memory)."""
        self.write_raw_ranges(name, [(src_path, offset, length)])

    def write_raw_ranges(self, name: str, ranges: list[tuple[str, int, int]]):
        """A tensor whose bytes are these (file, offset, length) ranges one after another, copied file to file."""
        expected = self._order[self._next]
        length = sum(r[2] for r in ranges)
        if expected[0] != name or dtype_bytes(expected[1], expected[2]) != length:
            raise ValueError(f"writer expected {expected}, got raw {name} of {length} bytes")
        self._next += 1
        self._file.flush()
        for src_path, offset, size in ranges:
            with open(src_path, "rb") as src:
                copy_range(src.fileno(), offset, self._file.fileno(), size)

    def close(self):
        if self._next != len(self._order):
            raise ValueError(f"writer closed after {self._next} of {len(self._order)} tensors")
        self._file.close()

    def abort(self):
        """Close without raising: on a full disk, closing flushes the buffered tail and fails again; the file is
        closed all the same, and the caller removes it."""
        try:
            self._file.close()
        except OSError:
            pass


def copy_range(src_fd: int, offset: int, dst_fd: int, length: int):
    """Append `length` bytes at `offset` of src to dst (at its current position): copy_file_range where the kernel
    offers it, else a bounded read/write loop."""
    done = 0
    try:
        while done < length:
            n = os.copy_file_range(src_fd, dst_fd, length - done, offset + done)
            if n <= 0:
                break
            done += n
    except (AttributeError, OSError):
        pass
    while done < length:
        chunk = os.pread(src_fd, min(8 << 20, length - done), offset + done)
        if not chunk:
            raise CkptError(Code.TRUNCATED, f"source ended {length - done} bytes early")
        os.write(dst_fd, chunk)
        done += len(chunk)
