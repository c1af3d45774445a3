"""Load one tensor on demand from the location a reader recorded: reads only that tensor's storage bytes.

This is the only place the format layer needs torch, and it imports it lazily.
"""

from __future__ import annotations

import io

from ckpttool.errors import CkptError
from ckpttool.model import TensorInfo


def torch_dtype(name: str):
    import torch

    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise CkptError("corrupt", f"dtype {name} is not available in this torch build ({torch.__version__})")
    return dtype


def read_bytes(info: TensorInfo) -> bytes:
    loc = info.location
    with open(loc.file, "rb") as f:
        f.seek(loc.offset)
        data = f.read(loc.length)
    if len(data) != loc.length:
        raise CkptError("truncated", f"tensor {info.name} needs {loc.length} bytes at offset {loc.offset}, the file "
                        f"holds {len(data)}", loc.file)
    return data


def load_tensor(info: TensorInfo):
    """The tensor as a CPU torch.Tensor (whatever device it was saved from)."""
    import torch

    if info.location is None:
        raise CkptError("corrupt", f"tensor {info.name} has no single data location to read")
    if info.location.encoding == "torch.save":
        blob = read_bytes(info)
        try:
            return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
        except Exception as e:
            raise CkptError("corrupt", f"tensor {info.name} cannot be read ({e})", info.location.file) from None
    dtype = torch_dtype(info.dtype)
    if info.numel == 0:
        return torch.empty(info.shape, dtype=dtype)
    data = bytearray(read_bytes(info))
    flat = torch.frombuffer(data, dtype=torch.uint8).view(dtype)
    if info.location.stride is None:  # safetensors: contiguous, exactly this tensor
        return flat.reshape(info.shape)
    needed = info.location.storage_offset + sum((s - 1) * st for s, st in zip(info.shape, info.location.stride)) + 1
    if needed > flat.numel():
        raise CkptError("corrupt", f"tensor {info.name} reaches element {needed} of a {flat.numel()}-element storage",
                        info.location.file)
    return flat.as_strided(info.shape, info.location.stride, info.location.storage_offset)
