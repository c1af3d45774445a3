"""Load one tensor on demand from the location a reader recorded: reads only that tensor's storage bytes.

This is the only place the format layer needs torch, and it imports it lazily.
"""

from __future__ import annotations

from ckpttool.errors import CkptError
from ckpttool.model import Code, TensorInfo, contiguous_strides


def torch_dtype(name: str):
    import torch

    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise CkptError(Code.CORRUPT, f"dtype {name} is not available in this torch build ({torch.__version__})")
    return dtype


def _short_read(info: TensorInfo, got: int):
    loc = info.location
    return CkptError(Code.TRUNCATED, f"tensor {info.name} needs {loc.length} bytes at offset {loc.offset}, the file "
                     f"holds {got}", loc.file)


def read_bytes(info: TensorInfo) -> bytes:
    loc = info.location
    with open(loc.file, "rb") as f:
        f.seek(loc.offset)
        data = f.read(loc.length)
    if len(data) != loc.length:
        raise _short_read(info, len(data))
    return data


def read_storage(info: TensorInfo, start: int = 0, length: int | None = None):
    """`length` bytes of the tensor's storage from byte `start` (all of it by default) as a uint8 tensor, read
    straight into it (one copy, no intermediate bytes)."""
    import torch

    loc = info.location
    length = loc.length - start if length is None else length
    buf = torch.empty(length, dtype=torch.uint8)
    view = memoryview(buf.numpy())
    done = 0
    with open(loc.file, "rb", buffering=0) as f:
        f.seek(loc.offset + start)
        while done < length:
            n = f.readinto(view[done:])
            if not n:
                raise _short_read(info, start + done)
            done += n
    return buf


VIEW_SPAN = 1 << 20  # bytes of a view's storage read at once: a column of a 100 MB matrix reads it piece by piece


def _read_view(info: TensorInfo, dtype):
    """A strided view of a larger storage, reading only the elements' span, in pieces along its largest stride of at
    most VIEW_SPAN bytes each: memory is the tensor's size and one piece, not the storage's."""
    import torch

    loc, shape, stride = info.location, tuple(info.shape), tuple(info.location.stride)
    itemsize = torch.empty((), dtype=dtype).element_size()
    if not shape or stride == contiguous_strides(shape):  # exactly its own bytes, read at once
        return read_storage(info, loc.storage_offset * itemsize, info.numel * itemsize).view(dtype).reshape(shape)
    out = torch.empty(shape, dtype=dtype)
    dim = max(range(len(shape)), key=lambda d: stride[d] if shape[d] > 1 else -1)
    rest = sum((size - 1) * st for d, (size, st) in enumerate(zip(shape, stride)) if d != dim)
    per_step = max(1, stride[dim])
    block = max(1, (VIEW_SPAN // itemsize - rest - 1) // per_step + 1)
    for first in range(0, shape[dim], block):
        count = min(block, shape[dim] - first)
        begin = loc.storage_offset + first * stride[dim]
        span = (count - 1) * stride[dim] + rest + 1
        piece = read_storage(info, begin * itemsize, span * itemsize).view(dtype)
        sizes = shape[:dim] + (count,) + shape[dim + 1:]
        out.narrow(dim, first, count).copy_(piece.as_strided(sizes, stride, 0))
    return out


def _load_saved(name: str, loc, shape):
    """A DCP item: one whole torch.save blob (of the tensor, or of one chunk of it), its storage bytes read straight
    from the data file."""
    from ckpttool.formats.torchfile import saved_tensor

    return load_tensor(saved_tensor(name, loc, shape))


def _assemble(info: TensorInfo):
    """A sharded tensor from its chunks, one chunk in memory at a time beside the result. A chunk with one offset
    addresses the flattened tensor (DeepSpeed ZeRO's flat partitions); otherwise it is a box (DCP shards)."""
    import torch

    out = torch.empty(info.shape, dtype=torch_dtype(info.dtype))
    for chunk in info.chunks:
        if chunk.location.encoding == "torch.save":
            piece = _load_saved(info.name, chunk.location, chunk.sizes)
            if piece.dtype != out.dtype:
                raise CkptError(Code.CORRUPT, f"tensor {info.name}: a chunk is {piece.dtype}, the tensor {out.dtype}",
                                chunk.location.file)
        else:
            piece = read_storage(TensorInfo(info.name, info.dtype, chunk.sizes, chunk.location)).view(out.dtype)
        view = out.view(-1) if len(chunk.offsets) == 1 else out
        for dim, (start, size) in enumerate(zip(chunk.offsets, chunk.sizes)):
            view = view.narrow(dim, start, size)
        view.copy_(piece.reshape(chunk.sizes))
    return out


def load_tensor(info: TensorInfo):
    """The tensor as a CPU torch.Tensor (whatever device it was saved from), with the values torch.load gives: a
    conj or neg bit torch.save recorded is applied, so what is returned is the values, not the stored data."""
    tensor = _load(info)
    if info.conj:
        tensor = tensor.conj_physical()
    if info.neg:
        tensor = tensor.neg()
    return tensor


def _load(info: TensorInfo):
    import torch

    if info.chunks:
        return _assemble(info)
    if info.location is None:
        raise CkptError(Code.CORRUPT, f"tensor {info.name} has no data location to read")
    if info.location.encoding == "torch.save":
        return _load_saved(info.name, info.location, info.shape)
    dtype = torch_dtype(info.dtype)
    if info.numel == 0:
        return torch.empty(info.shape, dtype=dtype)
    loc = info.location
    if loc.stride is None:  # safetensors: contiguous, exactly this tensor
        return read_storage(info).view(dtype).reshape(info.shape)
    itemsize = torch.empty((), dtype=dtype).element_size()
    needed = loc.storage_offset + sum((s - 1) * st for s, st in zip(info.shape, loc.stride)) + 1
    if needed * itemsize > loc.length:
        raise CkptError(Code.CORRUPT, f"tensor {info.name} reaches element {needed} of a "
                        f"{loc.length // itemsize}-element storage", loc.file)
    return _read_view(info, dtype)
