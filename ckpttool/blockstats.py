"""Value statistics of tensor pairs, streamed in blocks on every core, at about the speed of reading the files.

Tensors whose bytes lie contiguous on disk are read block by block with `os.pread` and viewed as numpy arrays (numpy
is a dependency of optimum-quanto; importing it costs a tenth of what torch costs, which at the read floor is most of
the run). Each block is first compared byte for byte, so byte-identical data costs one read and a memcmp; otherwise
it is measured in float32 (float64 for float64 and integer data) and the block sums are accumulated in float64, which
matches a float64 computation to about 1e-7 relative. Big tensors are split into blocks and small ones batched, so
every core is busy either way and memory is bounded by a few blocks per core, whatever the tensor sizes. Tensors
that are not a contiguous run of bytes (DCP and DeepSpeed chunks, strided views) or whose dtype numpy lacks (float8)
are loaded through torch and measured by the same code.
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ckpttool.errors import CkptError
from ckpttool.hashing import progress, workers
from ckpttool.model import TensorInfo

# Elements per block and side. Measured on 16 cores, two 2 GiB files: 256Ki-element blocks spend their time handing
# the GIL between numpy calls (0.70 s with 16 threads, slower than 4), 1Mi take 0.27 s, 4Mi 0.33 s.
BLOCK_ELEMENTS = 1 << 20
BATCH_TENSORS = 4096  # most small tensors one task reads

# dtype -> (numpy dtype it is read as, dtype it is measured in)
NUMPY_READ = {
    "float32": ("<f4", "float32"), "float16": ("<f2", "float32"), "bfloat16": ("<u2", "float32"),
    "float64": ("<f8", "float64"), "int64": ("<i8", "float64"), "int32": ("<i4", "float64"),
    "int16": ("<i2", "float64"), "int8": ("i1", "float64"), "uint8": ("u1", "float64"), "bool": ("?", "float64"),
}


@dataclass
class Sums:
    """What a block contributes; blocks add up to the tensor's statistics."""

    max_abs: float = 0.0
    diff_sq: float = 0.0
    a_sq: float = 0.0
    b_sq: float = 0.0
    beyond_tolerance: bool = False  # some |a - b| > atol + rtol * |b|

    def add(self, other: Sums) -> None:
        # max() would drop a NaN that comes second; a NaN anywhere must survive into the result
        self.max_abs = other.max_abs if math.isnan(other.max_abs) or other.max_abs > self.max_abs else self.max_abs
        self.diff_sq += other.diff_sq
        self.a_sq += other.a_sq
        self.b_sq += other.b_sq
        self.beyond_tolerance |= other.beyond_tolerance

    def row(self) -> dict:
        """max abs diff, relative L2 of the difference to B, and cosine; cosine from the three sums of squares
        (a.b = (|a|^2 + |b|^2 - |a-b|^2) / 2), whose rounding is far below the six printed decimals."""
        rel_l2 = math.sqrt(self.diff_sq) / math.sqrt(self.b_sq) if self.b_sq else math.inf
        if self.a_sq and self.b_sq:
            cosine = (self.a_sq + self.b_sq - self.diff_sq) / (2 * math.sqrt(self.a_sq) * math.sqrt(self.b_sq))
            cosine = max(-1.0, min(1.0, cosine)) if not math.isnan(cosine) else cosine
        else:
            cosine = 1.0 if self.a_sq == self.b_sq else 0.0
        return {"max_abs": self.max_abs, "rel_l2": rel_l2, "cosine": cosine}

    @property
    def finite(self) -> bool:
        return math.isfinite(self.max_abs) and math.isfinite(self.diff_sq)


_scratch = threading.local()  # one reused difference buffer per worker thread and dtype


def _delta_buffer(dtype, size: int):
    import numpy as np

    buffers = _scratch.__dict__.setdefault("buffers", {})
    buf = buffers.get(dtype)
    if buf is None or len(buf) < size:
        buf = buffers[dtype] = np.empty(max(size, BLOCK_ELEMENTS), dtype=dtype)
    return buf[:size]


def block_sums(a, b, atol: float, rtol: float) -> Sums:
    """The sums of two same-length numpy blocks, already in the dtype they are measured in. einsum's dot products
    keep several partial sums: about 1e-7 relative over a block, and the blocks are added in float64."""
    import numpy as np

    delta = np.subtract(a, b, out=_delta_buffer(a.dtype, len(a)))
    high, low = delta.max(), delta.min()
    max_abs = float(high) if math.isnan(high) or math.isnan(low) else max(float(high), -float(low))
    sums = Sums(max_abs, float(np.einsum("i,i->", delta, delta)), float(np.einsum("i,i->", a, a)),
                float(np.einsum("i,i->", b, b)))
    if rtol:
        np.abs(delta, out=delta)
        delta -= rtol * np.abs(b)
        sums.beyond_tolerance = bool(delta.max() > atol)
    else:
        sums.beyond_tolerance = max_abs > atol
    return sums


def _as_measured(data, dtype: str):
    """A numpy view of raw little-endian bytes, converted to the dtype the statistics use."""
    import numpy as np

    read_as, measured = NUMPY_READ[dtype]
    values = np.frombuffer(data, dtype=read_as)
    if dtype == "bfloat16":  # bf16 is the top half of a float32
        return (values.astype(np.uint32) << 16).view(np.float32)
    return values.astype(measured, copy=False)


def _byte_ranges(a: TensorInfo, b: TensorInfo):
    """(file, offset, length) of each side when both are one contiguous run of bytes of a dtype numpy reads."""
    if not a.numel or a.dtype not in NUMPY_READ:
        return None
    ra, rb = a.byte_range(), b.byte_range()
    return (ra, rb) if ra and rb else None


class _Reader:
    """The bytes of a task's ranges. A batch of small tensors lying close together in a file (safetensors, a torch
    zip's members) is read with one pread covering them all and sliced: thousands of preads from many threads spend
    their time handing the GIL back and forth."""

    def __init__(self, ranges):
        self._fds: dict[str, int] = {}
        self._covering: dict[str, tuple[int, bytes]] = {}
        by_file: dict[str, list[tuple[int, int]]] = {}
        for path, offset, length in ranges:
            by_file.setdefault(path, []).append((offset, length))
        for path, spans in by_file.items():
            if len(spans) < 2:
                continue
            low, high = min(o for o, _ in spans), max(o + n for o, n in spans)
            needed = sum(n for _, n in spans)
            if high - low <= 2 * needed + (1 << 20):
                data = os.pread(self._fd(path), high - low, low)
                if len(data) == high - low:  # else each range is read alone and the short one named
                    self._covering[path] = (low, data)

    def _fd(self, path: str) -> int:
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
        return self._fds[path]

    def read(self, path: str, offset: int, length: int, info: TensorInfo) -> bytes:
        """`length` bytes at `offset` of `path`; `info` names the tensor when the file is short."""
        if path in self._covering:
            low, data = self._covering[path]
            return data[offset - low:offset - low + length]
        data = os.pread(self._fd(path), length, offset)
        if len(data) != length:
            raise CkptError("truncated", f"tensor {info.name}: the file ends before byte {offset + length}",
                            info.location.file)
        return data

    def close(self):
        for fd in self._fds.values():
            os.close(fd)


def _measure_spans(spans: list, atol: float, rtol: float) -> list:
    """For each span (tensor A, range in A's file, range in B's file) of two tensors of one dtype: None when its bytes
    are identical, else its Sums. One task reads many small tensors or one block of a big one."""
    reader, out = _Reader([r for _, ra, rb in spans for r in (ra, rb)]), []
    try:
        for info, range_a, range_b in spans:
            data_a, data_b = reader.read(*range_a, info), reader.read(*range_b, info)
            if data_a == data_b:
                out.append(None)
            else:
                out.append(block_sums(_as_measured(data_a, info.dtype), _as_measured(data_b, info.dtype), atol,
                                      rtol))
    finally:
        reader.close()
    return out


def _plan(direct: dict, pairs: list) -> tuple[list, list, list]:
    """Tasks of spans over the pairs read directly (index -> their byte ranges): small tensors batched, big ones cut
    into blocks; for each task the pair index of each span, and the bytes it reads."""
    tasks, owners, sizes = [], [], []
    batch, owned, batch_bytes = [], [], 0
    for i, ((file_a, offset_a, length), (file_b, offset_b, _)) in direct.items():
        info = pairs[i][0]
        block_bytes = BLOCK_ELEMENTS * (length // info.numel)
        if length <= block_bytes:
            batch.append((info, (file_a, offset_a, length), (file_b, offset_b, length)))
            owned.append(i)
            batch_bytes += length
            if batch_bytes >= block_bytes or len(batch) >= BATCH_TENSORS:
                tasks.append(batch)
                owners.append(owned)
                sizes.append(2 * batch_bytes)
                batch, owned, batch_bytes = [], [], 0
        else:
            for start in range(0, length, block_bytes):
                n = min(block_bytes, length - start)
                tasks.append([(info, (file_a, offset_a + start, n), (file_b, offset_b + start, n))])
                owners.append([i])
                sizes.append(2 * n)
    if batch:
        tasks.append(batch)
        owners.append(owned)
        sizes.append(2 * batch_bytes)
    return tasks, owners, sizes


def _measure_loaded(a: TensorInfo, b: TensorInfo, atol: float, rtol: float) -> Sums | None:
    """A pair read through torch (chunked, strided or numpy-less dtypes), measured block by block by the same code."""
    import torch

    from ckpttool.tensors import load_tensor

    ta, tb = load_tensor(a).reshape(-1).contiguous(), load_tensor(b).reshape(-1).contiguous()
    if torch.equal(ta.view(torch.uint8), tb.view(torch.uint8)) or torch.equal(ta, tb):
        return None
    wide = torch.float64 if NUMPY_READ.get(a.dtype, ("", "float32"))[1] == "float64" else torch.float32
    total = Sums()
    for start in range(0, ta.numel(), BLOCK_ELEMENTS):
        block_a, block_b = (t[start:start + BLOCK_ELEMENTS].to(wide).numpy() for t in (ta, tb))
        total.add(block_sums(block_a, block_b, atol, rtol))
    return total


def compare_pairs(pairs: list[tuple[TensorInfo, TensorInfo]], atol: float = 0.0, rtol: float = 0.0,
                  label: str = "comparing") -> list[Sums | None]:
    """For each (a, b) pair of same-shape, same-dtype tensors: None when their bytes are identical or their values
    equal (-0.0 equals 0.0), else the Sums of their difference (a NaN on one side, or at different places, makes
    them differ)."""
    direct = {i: ranges for i, (a, b) in enumerate(pairs) if (ranges := _byte_ranges(a, b))}
    tasks, owners, sizes = _plan(direct, pairs)
    results: list[Sums | None] = [None] * len(pairs)
    with progress(sum(sizes), label) as advance, ThreadPoolExecutor(workers()) as pool:
        for owned, size, sums in zip(owners, sizes, pool.map(lambda t: _measure_spans(t, atol, rtol), tasks)):
            advance(size)
            for i, block in zip(owned, sums):
                if block is not None:
                    if results[i] is None:
                        results[i] = Sums()
                    results[i].add(block)
    for i, (a, b) in enumerate(pairs):
        if i not in direct and a.numel:
            results[i] = _measure_loaded(a, b, atol, rtol)
    # bytes that differ only in ways torch.equal ignores (-0.0 against 0.0) are equal values
    return [None if s is not None and s.max_abs == 0 and s.finite else s for s in results]
