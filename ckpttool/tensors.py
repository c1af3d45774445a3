"""Load one tensor on demand from the location a reader recorded: reads only that tensor's storage bytes.

This is the only place the format layer needs torch, and it imports it lazily.
"""

from __future__ import annotations

from ckpttool.errors import CkptError
from ckpttool.model import TensorInfo


def torch_dtype(name: str):
    import torch

    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise CkptError("corrupt", f"dtype {name} is not available in this torch build ({torch.__version__})")
    return dtype


def _short_read(info: TensorInfo, got: int):
    loc = info.location
    return CkptError("truncated", f"tensor {info.name} needs {loc.length} bytes at offset {loc.offset}, the file "
                     f"holds {got}", loc.file)


def read_bytes(info: TensorInfo) -> bytes:
    loc = info.location
    with open(loc.file, "rb") as f:
        f.seek(loc.offset)
        data = f.read(loc.length)
    if len(data) != loc.length:
        raise _short_read(info, len(data))
    return data


def read_storage(info: TensorInfo):
    """The tensor's storage bytes as a uint8 tensor, read straight into it (one copy, no intermediate bytes)."""
    import torch

    loc = info.location
    buf = torch.empty(loc.length, dtype=torch.uint8)
    view = memoryview(buf.numpy())
    done = 0
    with open(loc.file, "rb", buffering=0) as f:
        f.seek(loc.offset)
        while done < loc.length:
            n = f.readinto(view[done:])
            if not n:
                raise _short_read(info, done)
            done += n
    return buf


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
                raise CkptError("corrupt", f"tensor {info.name}: a chunk is {piece.dtype}, the tensor {out.dtype}",
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
        raise CkptError("corrupt", f"tensor {info.name} has no data location to read")
    if info.location.encoding == "torch.save":
        return _load_saved(info.name, info.location, info.shape)
    dtype = torch_dtype(info.dtype)
    if info.numel == 0:
        return torch.empty(info.shape, dtype=dtype)
    flat = read_storage(info).view(dtype)
    if info.location.stride is None:  # safetensors: contiguous, exactly this tensor
        return flat.reshape(info.shape)
    needed = info.location.storage_offset + sum((s - 1) * st for s, st in zip(info.shape, info.location.stride)) + 1
    if needed > flat.numel():
        raise CkptError("corrupt", f"tensor {info.name} reaches element {needed} of a {flat.numel()}-element storage",
                        info.location.file)
    return flat.as_strided(info.shape, info.location.stride, info.location.storage_offset)
