"""Value statistics of tensor pairs, streamed in blocks on every core, at about the speed of reading the files.

Tensors whose bytes lie contiguous on disk are read block by block with `os.pread` straight into numpy views (numpy
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

BLOCK_ELEMENTS = 1 << 18  # per side: enough to amortize the Python work per block, few enough to stay in cache
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


def _as_measured(data, info: TensorInfo):
    """A numpy view of raw little-endian bytes, converted to the dtype the statistics use."""
    import numpy as np

    read_as, measured = NUMPY_READ[info.dtype]
    values = np.frombuffer(data, dtype=read_as)
    if info.dtype == "bfloat16":  # bf16 is the top half of a float32
        return (values.astype(np.uint32) << 16).view(np.float32)
    return values.astype(measured, copy=False)


def _as_measured(data, dtype: str):
    """A numpy view of raw little-endian bytes, converted to the dtype the statistics use."""
    import numpy as np

    read_as, measured = NUMPY_READ[dtype]
    values = np.frombuffer(data, dtype=read_as)
    if dtype == "bfloat16":  # bf16 is the top half of a float32
        return (values.astype(np.uint32) << 16).view(np.float32)
    return values.astype(measured, copy=False)


def _contiguous(a: TensorInfo, b: TensorInfo):
    """(file, offset) of each side when both are one contiguous run of bytes of a dtype numpy reads, else None."""
    ra, rb = a.byte_range(), b.byte_range()
    if ra and rb and a.dtype in NUMPY_READ:
        return ra[:2], rb[:2]
    return None


def _read(fd: int, offset: int, length: int, info: TensorInfo) -> bytes:
    data = os.pread(fd, length, offset)
    if len(data) != length:
        raise CkptError("truncated", f"tensor {info.name}: the file ends before byte {offset + length}",
                        info.location.file)
    return data


def _measure_spans(spans: list, atol: float, rtol: float) -> list:
    """For each (a, b, element start, element count) span of two contiguous tensors of one dtype: None when its bytes
    are identical, else its Sums. One task reads many small tensors or one block of a big one."""
    fds: dict[str, int] = {}

    def fd(path):
        if path not in fds:
            fds[path] = os.open(path, os.O_RDONLY)
        return fds[path]

    out = []
    try:
        for a, b, start, count in spans:
            (file_a, offset_a), (file_b, offset_b) = _contiguous(a, b)
            itemsize = a.nbytes // a.numel
            data_a = _read(fd(file_a), offset_a + start * itemsize, count * itemsize, a)
            data_b = _read(fd(file_b), offset_b + start * itemsize, count * itemsize, b)
            if data_a == data_b:
                out.append(None)
            else:
                out.append(block_sums(_as_measured(data_a, a.dtype), _as_measured(data_b, a.dtype), atol, rtol))
    finally:
        for descriptor in fds.values():
            os.close(descriptor)
    return out


def _plan(indices: list[int], pairs: list) -> tuple[list, list]:
    """Tasks of spans over the contiguous pairs: small tensors batched, big ones cut into blocks; and for each task
    the pair index of each span."""
    tasks, owners, batch, owned, batch_elements = [], [], [], [], 0
    for i in indices:
        a, b = pairs[i]
        if a.numel <= BLOCK_ELEMENTS:
            batch.append((a, b, 0, a.numel))
            owned.append(i)
            batch_elements += a.numel
            if batch_elements >= BLOCK_ELEMENTS or len(batch) >= BATCH_TENSORS:
                tasks.append(batch)
                owners.append(owned)
                batch, owned, batch_elements = [], [], 0
        else:
            for start in range(0, a.numel, BLOCK_ELEMENTS):
                tasks.append([(a, b, start, min(BLOCK_ELEMENTS, a.numel - start))])
                owners.append([i])
    if batch:
        tasks.append(batch)
        owners.append(owned)
    return tasks, owners


def _measure_loaded(a: TensorInfo, b: TensorInfo, atol: float, rtol: float) -> Sums | None:
    """A pair read through torch (chunked, strided or numpy-less dtypes), measured block by block by the same code."""
    import torch

    from ckpttool.tensors import load_tensor

    ta, tb = load_tensor(a).reshape(-1), load_tensor(b).reshape(-1)
    if torch.equal(ta, tb):
        return None
    wide = torch.float64 if ta.dtype in (torch.float64, torch.int64, torch.int32) else torch.float32
    total = Sums()
    for start in range(0, ta.numel(), BLOCK_ELEMENTS):
        block_a, block_b = (t[start:start + BLOCK_ELEMENTS].to(wide).numpy() for t in (ta, tb))
        total.add(block_sums(block_a, block_b, atol, rtol))
    return total


def compare_pairs(pairs: list[tuple[TensorInfo, TensorInfo]], atol: float = 0.0, rtol: float = 0.0,
                  label: str = "comparing") -> list[Sums | None]:
    """For each (a, b) pair of same-shape, same-dtype tensors: None when their values are equal (as torch.equal
    says: -0.0 equals 0.0, NaN equals nothing), else the Sums of their difference."""
    contiguous = [i for i, (a, b) in enumerate(pairs) if a.numel and _contiguous(a, b)]
    tasks, owners = _plan(contiguous, pairs)
    results: list[Sums | None] = [None] * len(pairs)
    total_bytes = sum(2 * pairs[i][0].nbytes for i in contiguous)
    with progress(total_bytes, label) as advance, ThreadPoolExecutor(workers()) as pool:
        for task, owned, sums in zip(tasks, owners, pool.map(lambda t: _measure_spans(t, atol, rtol), tasks)):
            advance(2 * sum(span[3] * (span[0].nbytes // span[0].numel) for span in task))
            for i, block in zip(owned, sums):
                if block is not None:
                    if results[i] is None:
                        results[i] = Sums()
                    results[i].add(block)
    done = set(contiguous)
    for i, (a, b) in enumerate(pairs):
        if i not in done and a.numel:
            results[i] = _measure_loaded(a, b, atol, rtol)
    # bytes that differ only in ways torch.equal ignores (-0.0 against 0.0) are equal values
    return [None if s is not None and s.max_abs == 0 and s.finite else s for s in results]
