"""Statistics of tensor data, streamed in blocks on every core, at about the speed of reading the files: the
difference of tensor pairs (`diff --values`) and each tensor's own moments (`inspect --stats`).

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
from ckpttool.model import Code, TensorInfo

# Elements per block and side. Measured on 16 cores, two 2 GiB files: 256Ki-element blocks spend their time handing
# the GIL between numpy calls (0.70 s with 16 threads, slower than 4), 1Mi take 0.27 s, 4Mi 0.33 s.
BLOCK_ELEMENTS = 1 << 20
BATCH_TENSORS = 4096  # most small tensors one task reads
# Threads that measure blocks. Each block is a handful of numpy calls, each handing the GIL over, and past about 8
# threads the hand-overs cost what more cores bring (benchmarks/bench_threads.py, two different 2 GiB files on 16
# cores): medians 0.18 s with 8 threads, 0.16 s with 12, 0.21 s with 16, 0.32 s with 4 on one instance
# (results/device-16core/threads.txt); 0.47 to 0.58 s with 8 and 0.66 to 1.21 s with 16 on a slower one
# (results/device-16core/threads-slow-instance.txt).
MAX_THREADS = 8

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

    with np.errstate(all="ignore"):  # Inf - Inf is NaN, as in torch, without numpy's warning
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
            raise CkptError(Code.TRUNCATED, f"tensor {info.name}: the file ends before byte {offset + length}",
                            info.location.file)
        return data

    def close(self):
        for fd in self._fds.values():
            os.close(fd)


def _norm_only(x) -> Sums:
    """The Sums of a block compared with itself: no difference, its sum of squares on both sides."""
    import numpy as np

    square = float(np.einsum("i,i->", x, x))
    return Sums(a_sq=square, b_sq=square)


def _measure_spans(spans: list, atol: float, rtol: float, norms: bool = False) -> list:
    """For each span (tensor A, [range in A's file, range in B's file]) of two tensors of one dtype: None when its
    bytes are identical (with `norms`, their sums of squares alone), else its Sums. One task reads many small tensors
    or one block of a big one."""
    reader, out = _Reader([r for _, ranges in spans for r in ranges]), []
    try:
        for info, (range_a, range_b) in spans:
            data_a, data_b = reader.read(*range_a, info), reader.read(*range_b, info)
            if data_a == data_b:
                out.append(_norm_only(_as_measured(data_a, info.dtype)) if norms else None)
            else:
                out.append(block_sums(_as_measured(data_a, info.dtype), _as_measured(data_b, info.dtype), atol,
                                      rtol))
    finally:
        reader.close()
    return out


def _plan(direct: dict) -> tuple[list, list, list]:
    """Tasks over tensors read directly: `direct` maps an index to (tensor, [(file, offset, length) per side], all
    sides the same length). Small tensors are batched, big ones cut into blocks of BLOCK_ELEMENTS. Each task is a
    list of spans (tensor, [range per side]); also returned: each task's indices, one per span, and its bytes."""
    tasks, owners, sizes = [], [], []
    batch, owned, batch_bytes = [], [], 0
    for i, (info, ranges) in direct.items():
        length = ranges[0][2]
        block_bytes = BLOCK_ELEMENTS * (length // info.numel)
        if length <= block_bytes:
            batch.append((info, ranges))
            owned.append(i)
            batch_bytes += length * len(ranges)
            if batch_bytes >= block_bytes * len(ranges) or len(batch) >= BATCH_TENSORS:
                tasks.append(batch)
                owners.append(owned)
                sizes.append(batch_bytes)
                batch, owned, batch_bytes = [], [], 0
        else:
            for start in range(0, length, block_bytes):
                n = min(block_bytes, length - start)
                tasks.append([(info, [(path, offset + start, n) for path, offset, _ in ranges])])
                owners.append([i])
                sizes.append(n * len(ranges))
    if batch:
        tasks.append(batch)
        owners.append(owned)
        sizes.append(batch_bytes)
    return tasks, owners, sizes


def _run(tasks, owners, sizes, measure, results, extra=(), label: str = "reading"):
    """Run `measure(task)` over the tasks on every core, adding each span's result into results[index]; then each
    (index, fn, nbytes) of `extra` (tensors read through torch) on the same cores, its result stored as is."""
    with progress(sum(sizes) + sum(n for _, _, n in extra), label) as advance, \
            ThreadPoolExecutor(min(workers(), MAX_THREADS)) as pool:
        for owned, size, measured in zip(owners, sizes, pool.map(measure, tasks)):
            advance(size)
            for i, block in zip(owned, measured):
                if block is not None:
                    if results[i] is None:
                        results[i] = type(block)()
                    results[i].add(block)
        for (i, _, nbytes), value in zip(extra, pool.map(lambda job: job[1](), extra)):
            advance(nbytes)
            results[i] = value


def _components(tensor):
    """A flat tensor of the values to measure: a complex tensor's real and imaginary parts side by side (each part
    counted, compared and summed as a value of its own: its L2 norm is the complex one), anything else flattened."""
    import torch

    flat = tensor.detach().reshape(-1)
    return torch.view_as_real(flat.resolve_conj()).reshape(-1) if flat.is_complex() else flat


def _measured_in(tensor):
    """The torch dtype a tensor read through torch is measured in: as NUMPY_READ says for its dtype, else float32."""
    import torch

    name = str(tensor.dtype).removeprefix("torch.")
    return torch.float64 if NUMPY_READ.get(name, ("", "float32"))[1] == "float64" else torch.float32


def _measure_loaded(a: TensorInfo, b: TensorInfo, atol: float, rtol: float, norms: bool = False) -> Sums | None:
    """A pair read through torch (chunked, strided or numpy-less dtypes), measured block by block by the same code."""
    import torch

    from ckpttool.tensors import load_tensor

    ta, tb = _components(load_tensor(a)).contiguous(), _components(load_tensor(b)).contiguous()
    if (torch.equal(ta.view(torch.uint8), tb.view(torch.uint8)) or torch.equal(ta, tb)) and not norms:
        return None
    wide = _measured_in(ta)
    total = Sums()
    for start in range(0, ta.numel(), BLOCK_ELEMENTS):
        block_a, block_b = (t[start:start + BLOCK_ELEMENTS].to(wide).numpy() for t in (ta, tb))
        total.add(block_sums(block_a, block_b, atol, rtol))
    return total


def compare_pairs(pairs: list[tuple[TensorInfo, TensorInfo]], atol: float = 0.0, rtol: float = 0.0,
                  label: str = "comparing", norms: bool = False) -> list[Sums | None]:
    """For each (a, b) pair of same-shape, same-dtype tensors, the Sums of their difference; None when their bytes
    are identical or their values equal (-0.0 equals 0.0; a NaN on one side, or at different places, makes them
    differ). With `norms`, equal pairs get Sums too (their sums of squares, no difference: per-module relative
    change needs the size of what did not change); `equal()` tells them apart."""
    direct = {i: (a, list(ranges)) for i, (a, b) in enumerate(pairs) if (ranges := _byte_ranges(a, b))}
    results: list[Sums | None] = [None] * len(pairs)
    loaded = [(i, lambda a=a, b=b: _measure_loaded(a, b, atol, rtol, norms), 2 * a.nbytes)
              for i, (a, b) in enumerate(pairs) if i not in direct and a.numel]
    _run(*_plan(direct), lambda task: _measure_spans(task, atol, rtol, norms), results, loaded, label)
    if norms:
        return [s or Sums() for s in results]
    return [None if equal(s) else s for s in results]


def equal(sums: Sums | None) -> bool:
    """Whether compare_pairs found a pair equal: identical bytes, or differences torch.equal ignores (-0.0)."""
    return sums is None or (sums.max_abs == 0 and sums.finite)


# --- one tensor's statistics (inspect --stats) ---

@dataclass
class Moments:
    """Count, extremes, mean and sum of squared deviations (combined across blocks as Chan et al. do, in float64),
    sum of squares (for the L2 norm), and counts of NaN, Inf and zeros. NaN and Inf propagate into min, max, mean
    and std as they do in torch."""

    count: int = 0
    minimum: float = math.inf
    maximum: float = -math.inf
    mean: float = 0.0
    m2: float = 0.0
    sum_sq: float = 0.0
    nan: int = 0
    inf: int = 0
    zeros: int = 0
    values: int | None = None  # a complex tensor's element count (`count` is of its real and imaginary parts)

    def add(self, other: Moments) -> None:
        if not other.count:
            return
        total = self.count + other.count
        delta = other.mean - self.mean
        if self.count:
            self.mean += delta * other.count / total
            self.m2 += other.m2 + delta * delta * self.count * other.count / total
        else:
            self.mean, self.m2 = other.mean, other.m2
        self.minimum = _nan_or(min, self.minimum, other.minimum)
        self.maximum = _nan_or(max, self.maximum, other.maximum)
        self.count = total
        self.sum_sq += other.sum_sq
        self.nan += other.nan
        self.inf += other.inf
        self.zeros += other.zeros

    def row(self) -> dict:
        """min, max, mean, std (with Bessel's correction, as torch.std), L2 norm and the counts."""
        empty = not self.count
        std = math.sqrt(self.m2 / (self.count - 1)) if self.count > 1 and self.m2 >= 0 else math.nan
        if self.nan or self.inf:  # torch: a NaN or Inf makes the mean what float arithmetic makes it, the std NaN
            std = math.nan
        return {"numel": self.count if self.values is None else self.values, "min": math.nan if empty else self.minimum,
                "max": math.nan if empty else self.maximum, "mean": math.nan if empty else self.mean, "std": std,
                "l2": math.sqrt(self.sum_sq), "nan": self.nan, "inf": self.inf, "zeros": self.zeros}


def _nan_or(pick, a: float, b: float) -> float:
    return math.nan if math.isnan(a) or math.isnan(b) else pick(a, b)


def block_moments(x) -> Moments:
    """The Moments of one numpy block (float32 or float64)."""
    import numpy as np

    n = len(x)
    if not n:
        return Moments()
    moments = Moments(count=n, zeros=n - int(np.count_nonzero(x)))
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        moments.nan = int(np.isnan(x).sum())
        moments.inf = int(np.isinf(x).sum())
    with np.errstate(all="ignore"):  # Inf - Inf is NaN here as in torch, without numpy's warning
        moments.minimum, moments.maximum = float(x.min()), float(x.max())
        moments.mean = float(x.sum(dtype=np.float64)) / n
        centered = np.subtract(x, x.dtype.type(moments.mean), out=_delta_buffer(x.dtype, n))
        moments.m2 = float(np.einsum("i,i->", centered, centered))
        moments.sum_sq = float(np.einsum("i,i->", x, x))
    return moments


def _moments_of_spans(spans: list) -> list:
    """Moments of each (tensor, [(file, offset, length)]) span: one block of a big tensor, or many small tensors at
    once (segment reductions over their concatenation: a few numpy calls per batch, not per tensor)."""
    reader = _Reader([r for _, (r,) in spans])
    try:
        values = [_as_measured(reader.read(*r, info), info.dtype) for info, (r,) in spans]
    finally:
        reader.close()
    if len(values) == 1:
        return [block_moments(values[0])]
    return _segment_moments(values)


def _segment_moments(arrays: list) -> list[Moments]:
    """block_moments of each (non-empty) array, computed over their concatenation in float64."""
    import numpy as np

    sizes = np.array([len(a) for a in arrays])
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    joined = np.concatenate([a.astype(np.float64, copy=False) for a in arrays])
    with np.errstate(all="ignore"):  # Inf - Inf is NaN here as in torch, without numpy's warning
        means = np.add.reduceat(joined, starts) / sizes
        centered = joined - np.repeat(means, sizes)
        m2 = np.add.reduceat(centered * centered, starts)
        sum_sq = np.add.reduceat(joined * joined, starts)
        lows, highs = np.minimum.reduceat(joined, starts), np.maximum.reduceat(joined, starts)
        zeros = np.add.reduceat((joined == 0).astype(np.int64), starts)
        nans = np.add.reduceat(np.isnan(joined).astype(np.int64), starts)
        infs = np.add.reduceat(np.isinf(joined).astype(np.int64), starts)
    return [Moments(count=int(n), minimum=float(lo), maximum=float(hi), mean=float(mean), m2=float(dev),
                    sum_sq=float(sq), nan=int(nan), inf=int(inf), zeros=int(zero))
            for n, lo, hi, mean, dev, sq, nan, inf, zero in zip(sizes, lows, highs, means, m2, sum_sq, nans, infs,
                                                                 zeros)]


def _moments_loaded(tensor) -> Moments:
    """Moments of a torch tensor (one read through torch, or a dequantized weight), block by block. A complex
    tensor's extremes, mean, std and L2 are over its real and imaginary parts together; its count, NaN, Inf and
    zeros are of its values (a value is NaN when either part is, zero when both are)."""
    flat = _components(tensor)
    wide = _measured_in(flat)
    total = Moments()
    try:
        for start in range(0, flat.numel(), BLOCK_ELEMENTS):
            total.add(block_moments(flat[start:start + BLOCK_ELEMENTS].to(wide).numpy()))
    except (NotImplementedError, RuntimeError):  # a dtype torch cannot widen (float4_e2m1fn_x2, bits8): not measured
        return Moments(values=tensor.numel())
    if tensor.is_complex():
        import torch

        values = tensor.detach().reshape(-1)
        total.values = values.numel()
        total.nan = int(torch.isnan(values).sum())
        total.inf = int(torch.isinf(values).sum())
        total.zeros = int((values == 0).sum())
    return total


def tensor_moments(infos: list[TensorInfo], loaders: dict | None = None, label: str = "reading") -> list[Moments]:
    """The Moments of each tensor. Those that are one contiguous run of a dtype numpy reads are read in blocks on
    every core; the rest (chunked, strided, float8) are loaded through torch one at a time on the same cores.
    `loaders`: {index: callable returning a torch tensor} for tensors computed rather than read (a dequantized
    quanto weight)."""
    from ckpttool.tensors import load_tensor

    loaders = loaders or {}
    direct = {}
    for i, info in enumerate(infos):
        byte_range = info.byte_range() if i not in loaders and info.dtype in NUMPY_READ else None
        if byte_range:
            direct[i] = (info, [byte_range])
    results: list[Moments | None] = [None] * len(infos)
    loaded = [(i, (lambda i=i: _moments_loaded(loaders[i]())) if i in loaders else
               (lambda info=info: _moments_loaded(load_tensor(info))), info.nbytes)
              for i, info in enumerate(infos) if i not in direct and (info.numel or i in loaders)]
    _run(*_plan(direct), _moments_of_spans, results, loaded, label)
    return [m or Moments() for m in results]
