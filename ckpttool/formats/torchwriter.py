"""Writing a torch.save zip file tensor by tensor (convert, remap, repair), with the same records torch.save writes,
so torch.load reads it with weights_only=True; memory is one tensor at a time."""

from __future__ import annotations

import io
import math
from collections import OrderedDict

import xxhash

from ckpttool.dtypes import STORAGE_CLASSES
from ckpttool.formats.pickles import DtypeRef, GlobalRef, RepicklingPickler
from ckpttool.model import contiguous_strides, dtype_bytes


class _StorageStub:
    def __init__(self, key, storage_class: GlobalRef, numel):
        self.key, self.storage_class, self.numel = key, storage_class, numel


class _SizeStub(tuple):
    """Pickles as torch.Size(dims) does."""

    def __reduce__(self):
        return GlobalRef("torch.Size"), (tuple(self),)


class _TensorStub:
    """Pickles exactly as torch.save pickles a contiguous tensor with its own storage, without importing torch."""

    def __init__(self, storage, shape, dtype: str):
        self.storage, self.shape, self.dtype = storage, shape, dtype

    def __reduce_ex__(self, protocol):
        args = (self.storage, 0, _SizeStub(self.shape), contiguous_strides(tuple(self.shape)), False, OrderedDict())
        if self.storage.storage_class.name == UNTYPED_STORAGE:
            return GlobalRef("torch._utils._rebuild_tensor_v3"), args + (DtypeRef(self.dtype),)
        return GlobalRef("torch._utils._rebuild_tensor_v2"), args


UNTYPED_STORAGE = "torch.storage.UntypedStorage"  # the class's own module, as torch.save names it


def _storage_class(dtype_name) -> GlobalRef:
    """The storage class torch.save names for a dtype: a typed one where the dtype has it, else UntypedStorage."""
    for cls_name, name in STORAGE_CLASSES.items():
        if name == dtype_name and cls_name != "UntypedStorage":
            return GlobalRef(f"torch.{cls_name}")
    return GlobalRef(UNTYPED_STORAGE)


class Writer:
    """Streams a torch.save-compatible zip: the pickle (built from the specs) first, then one storage per tensor,
    through `ArchiveWriter` (64-byte aligned, CRC-32 per record). Loads with weights_only=True and mmap=True. Torch is
    imported only to write tensors given in memory (`write`); copying bytes from another file (`write_raw`) needs
    none."""

    def __init__(self, path: str, specs: list[tuple[str, str, tuple]], wrap=None):
        """`wrap(state_dict) -> object` builds the pickled top level (a training dict, say); default: the state dict."""
        from ckpttool.formats.ziparchive import ArchiveWriter

        state = OrderedDict()
        self._order = []
        for i, (name, dtype, shape) in enumerate(specs):
            storage_class = _storage_class(dtype)
            numel = math.prod(shape)
            count = dtype_bytes(dtype, shape) if storage_class.name == UNTYPED_STORAGE else numel
            state[name] = _TensorStub(_StorageStub(str(i), storage_class, count), tuple(shape), dtype)
            self._order.append((name, dtype, tuple(shape)))
        root = wrap(state) if wrap else state

        class Pickler(RepicklingPickler):
            def persistent_id(self, obj):
                if isinstance(obj, _StorageStub):
                    return ("storage", obj.storage_class, obj.key, "cpu", obj.numel)
                return None

        buffer = io.BytesIO()
        Pickler(buffer, protocol=2).dump(root)
        data = buffer.getvalue()
        self._id = "%040d" % (int(xxhash.xxh3_128_hexdigest(data), 16) % 10**40)  # stable for the same content
        self._zip = ArchiveWriter(path)
        self._zip.write_record("data.pkl", data)
        self._zip.write_record(".format_version", b"1")
        self._zip.write_record(".storage_alignment", b"64")
        self._zip.write_record("byteorder", b"little")
        self._next = 0

    def _expect(self, name: str, nbytes: int):
        expected = self._order[self._next]
        if expected[0] != name or dtype_bytes(expected[1], expected[2]) != nbytes:
            raise ValueError(f"writer expected {expected}, got {name} of {nbytes} bytes")

    def write(self, name: str, tensor):
        import torch

        got = (name, str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape))
        if got != self._order[self._next]:
            raise ValueError(f"writer expected {self._order[self._next]}, got {got}")
        flat = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        self._zip.write_record(f"data/{self._next}", flat.numpy())
        self._next += 1

    def write_raw(self, name: str, src_path: str, offset: int, length: int):
        """Write a storage straight from another file's bytes, file to file (ArchiveWriter.write_copy)."""
        self._expect(name, length)
        self._zip.write_copy(f"data/{self._next}", src_path, offset, length)
        self._next += 1

    def close(self):
        if self._next != len(self._order):
            raise ValueError(f"writer closed after {self._next} of {len(self._order)} tensors")
        self._zip.close(self._id)

    def abort(self):
        self._zip.abort()
