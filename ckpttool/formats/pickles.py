"""A pickle reader that never imports or calls anything it was not built to imitate.

Every GLOBAL a pickle names is answered with a harmless stand-in: torch's tensor-rebuilding functions become
`TensorRef` records, storages become `StorageRef` records (via the persistent ids torch writes), and any other
global becomes an opaque record that remembers its name, arguments and state. Globals outside `SAFE_GLOBALS` are
collected so the caller can report `unsafe_pickle`; nothing is ever executed, so a malicious file stays inert.
"""

from __future__ import annotations

import codecs
import io
import pickle
from collections import OrderedDict
from dataclasses import dataclass, field

from ckpttool.dtypes import ALIASES, BITS, STORAGE_CLASSES, TORCH_NAMES
from ckpttool.errors import CkptError
from ckpttool.model import WARNING, Code, Problem


# What torch.load(weights_only=True) accepts, plus the numpy pieces Accelerate allow-lists for RNG state.
SAFE_GLOBALS = {
    "collections.OrderedDict", "collections.Counter", "torch.Tensor", "torch.nn.parameter.Parameter",
    "torch._utils._rebuild_tensor",
    "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_tensor_v3", "torch._utils._rebuild_parameter", "torch._utils._rebuild_parameter_with_state",
    "torch._tensor._rebuild_from_type_v2", "torch.Size", "torch.device", "torch.storage.UntypedStorage",
    "builtins.set", "builtins.frozenset", "builtins.bytearray", "builtins.complex", "builtins.slice",
    "codecs.encode", "_codecs.encode", "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct",
    "numpy.ndarray", "numpy.dtype", "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar",
    "numpy.dtypes.UInt32DType", "numpy.dtypes.Float64DType", "numpy.dtypes.Int64DType",
    "torch._utils._rebuild_sparse_tensor", "torch._utils._rebuild_qtensor", "torch._utils._rebuild_nested_tensor",
    "torch.serialization._get_layout", "torch.per_tensor_affine", "torch.per_tensor_symmetric",
    "torch.per_channel_affine", "torch.per_channel_symmetric", "torch.per_channel_affine_float_qparams",
    "torch.nested._internal.nested_tensor._rebuild_njt", "torch.nested._internal.nested_tensor.NestedTensor",
    "torch._utils._rebuild_meta_tensor_no_storage", "torch._utils._rebuild_wrapper_subclass",
    "torch._utils._rebuild_device_tensor_from_numpy", "torch._utils._rebuild_device_tensor_from_cpu_tensor",
    "torch._dynamo.decorators._DimRange",  # a jagged nested tensor's ragged dimension, pickled with it
} | {f"torch.{name}" for name in STORAGE_CLASSES} | {f"torch.{name}" for name in TORCH_NAMES}

# torch.load(weights_only=True)'s own list, by the names its unpickler matches (torch 2.13 _weights_only_unpickler.py
# _get_allowed_globals, plus what `import torch` registers: nested tensors, the device-mesh layouts): the numpy
# pieces, frozenset, slice and codecs.encode of SAFE_GLOBALS are not on it, so a file naming them loads only where the
# trainer's loader allow-lists them too.
_TYPED = ("BFloat16", "Bool", "Byte", "Char", "Double", "Float", "Half", "Int", "Long", "Short")
_CANONICAL_DTYPES = sorted(TORCH_NAMES - set(ALIASES)) + [
    "qint8", "quint8", "qint32", "quint4x2", "quint2x4", "bits1x8", "bits2x4", "bits4x2", "bits8",
    "bits16"] + [f"int{n}" for n in range(1, 8)] + [f"uint{n}" for n in range(1, 8)]
TORCH_WEIGHTS_ONLY = {
    "collections.OrderedDict", "collections.Counter", "torch.nn.parameter.Parameter", "torch.serialization._get_layout",
    "torch.Size", "torch.Tensor", "torch.device", "_codecs.encode", "builtins.bytearray", "builtins.set",
    "builtins.complex", "torch._utils._rebuild_tensor", "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_tensor_v3", "torch._utils._rebuild_parameter", "torch._utils._rebuild_parameter_with_state",
    "torch._utils._rebuild_sparse_tensor", "torch._utils._rebuild_qtensor", "torch._utils._rebuild_nested_tensor",
    "torch._utils._rebuild_wrapper_subclass", "torch._utils._rebuild_device_tensor_from_numpy",
    "torch._utils._rebuild_device_tensor_from_cpu_tensor", "torch._utils._rebuild_meta_tensor_no_storage",
    "torch._tensor._rebuild_from_type_v2", "torch.storage.UntypedStorage", "torch.storage.TypedStorage",
    "torch.QUInt2x4Storage", "torch.per_tensor_affine", "torch.per_tensor_symmetric", "torch.per_channel_affine",
    "torch.per_channel_symmetric", "torch.per_channel_affine_float_qparams",
    "torch.nested._internal.nested_tensor.NestedTensor", "torch.nested._internal.nested_tensor._rebuild_njt",
    "torch.distributed._mesh_layout._FlatLayout", "torch.distributed._mesh_layout._MeshLayout",
} | {f"torch.{name}" for name in STORAGE_CLASSES if name != "UntypedStorage"} \
  | {f"torch.cuda.{name}Storage" for name in _TYPED + ("ComplexDouble", "ComplexFloat")} \
  | {f"torch.{prefix}{name}Tensor" for prefix in ("", "cuda.") for name in _TYPED} \
  | {f"torch.{prefix}{name}Tensor" for prefix in ("sparse.", "cuda.sparse.") for name in _TYPED if name != "Bool"} \
  | {f"torch.{name}" for name in _CANONICAL_DTYPES}
# torch.distributed.tensor registers these when imported, as accelerate, transformers and lightning all do: a DTensor
# (FSDP2's per-rank state) loads under weights_only there.
DTENSOR_GLOBALS = {
    f"torch.distributed.{name}" for name in (
        "device_mesh.DeviceMesh", "tensor.DTensor", "tensor._dtensor_spec.DTensorSpec",
        "tensor._dtensor_spec.TensorMeta", "tensor._dtensor_spec.ShardOrderEntry", "tensor.placement_types.Partial",
        "tensor.placement_types.Replicate",
        "tensor.placement_types.Shard", "tensor.placement_types._StridedShard")}
# What Accelerate's `load` (accelerate 1.15 utils/other.py TORCH_SAFE_GLOBALS) and transformers' RNG load
# (trainer_pt_utils.py safe_globals) add for numpy RNG state; a numpy scalar (`numpy.float64(0.1)`) is not among them.
NUMPY_RNG_GLOBALS = {
    "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct", "numpy.ndarray", "numpy.dtype",
    "numpy.dtypes.UInt32DType",
}

# Extra globals a torch.distributed.checkpoint `.metadata` file legitimately names.
DCP_GLOBALS = {
    "torch.distributed.checkpoint.metadata.Metadata", "torch.distributed.checkpoint.metadata.TensorStorageMetadata",
    "torch.distributed.checkpoint.metadata.BytesStorageMetadata",
    "torch.distributed.checkpoint.metadata.TensorProperties",
    "torch.distributed.checkpoint.metadata.ChunkStorageMetadata", "torch.distributed.checkpoint.metadata.MetadataIndex",
    "torch.distributed.checkpoint.metadata.StorageMeta", "torch.distributed.checkpoint.filesystem._StorageInfo",
    "torch.distributed.checkpoint.metadata._MEM_FORMAT_ENCODING", "torch.serialization._get_layout",
    "pathlib.PosixPath", "pathlib.WindowsPath", "pathlib.Path",
    "torch.distributed.checkpoint._extension.StreamTransformExtension",
    # the save plans a planner may keep in Metadata.planner_data (megatron-core's torch_dist caches them there)
    "torch.distributed.checkpoint.planner.SavePlan", "torch.distributed.checkpoint.planner.WriteItem",
    "torch.distributed.checkpoint.planner.WriteItemType", "torch.distributed.checkpoint.planner.TensorWriteData",
}

# Globals that run code, reach the system or load more code when a pickle calls them: torch.load(weights_only=False),
# pickle.load and every scanner treat them as payloads. A pickle naming one is `unsafe_pickle` (an error) in any file of
# a checkpoint, read on resume or not; other globals outside the allow-list are judged where the file is read.
COMPUTED_GLOBAL = "?.(a global named by computed strings)"  # STACK_GLOBAL whose operands no opcode spelled out
CODE_RUNNING_MODULES = {
    "os", "posix", "nt", "subprocess", "sys", "runpy", "importlib", "pickle", "_pickle", "marshal", "shutil", "socket",
    "ctypes", "multiprocessing", "pty", "code", "codeop", "webbrowser", "pdb", "bdb", "timeit", "cProfile", "profile",
    "trace", "doctest", "pip", "setuptools", "distutils", "urllib", "http", "requests", "ftplib", "smtplib",
    "telnetlib", "asyncio", "signal", "platform", "tempfile", "glob", "io", "_io", "zipimport", "pkgutil", "dill",
    "cloudpickle", "joblib", "torch.hub", "torch.jit", "torch._C", "torch.ops", "torch.classes", "torch.package",
    "torch.serialization", "torch._dynamo", "torch._inductor", "numpy.testing", "numpy.lib.npyio", "jinja2",
    "pydoc", "torch.fx", "_posixsubprocess", "_ctypes", "numpy.ctypeslib", "torch.utils.cpp_extension", "imp",
    "site", "shelve", "zipfile", "tarfile", "logging.config", "_thread", "threading", "concurrent", "ssl", "xmlrpc",
    "wsgiref", "venv", "ensurepip", "compileall", "py_compile", "sqlite3", "numpy.f2py", "numpy.distutils", "select",
    "selectors", "fcntl", "resource", "mmap", "_winapi", "msvcrt", "winreg", "ntpath", "posixpath", "genericpath",
}
CODE_RUNNING_GLOBALS = {
    "builtins.eval", "builtins.exec", "builtins.compile", "builtins.open", "builtins.__import__", "builtins.getattr",
    "builtins.setattr", "builtins.delattr", "builtins.globals", "builtins.locals", "builtins.vars",
    "builtins.breakpoint", "builtins.input", "builtins.help", "builtins.exit", "builtins.quit", "builtins.type",
    "builtins.apply", "builtins.execfile", "builtins.file", "builtins.reload", "types.FunctionType",
    "types.CodeType", "types.LambdaType", "types.MethodType", "types.ModuleType",
    "functools.partial", "functools.reduce", "operator.attrgetter", "operator.methodcaller", "operator.itemgetter",
    "_operator.attrgetter", "_operator.methodcaller", "_operator.itemgetter", "copyreg._reconstructor_unsafe",
    "torch.load", "torch.save", "numpy.load", "numpy.fromfile", "numpy.memmap", "torch.storage._load_from_bytes",
    "uuid._get_command_stdout", "codecs.open", "builtins.map", "builtins.filter",
}


def runs_code(name: str) -> bool:
    """Whether a pickle global (`module.attr`) runs code or reaches the system when called: a module or callable
    on the lists above, or any dunder attribute (`__reduce__`, `__import__`, `__builtins__` lookups)."""
    if name in SAFE_GLOBALS:  # what torch.load(weights_only=True) takes, wherever its module lives
        return False
    parts = name.split(".")
    within = parts[:-1]  # the module path and the attributes on the way (`pathlib.os.system` reaches os)
    return (name in CODE_RUNNING_GLOBALS or name == COMPUTED_GLOBAL or any(p.startswith("__") for p in parts[1:]) or
            any(".".join(within[i:j]) in CODE_RUNNING_MODULES for i in range(len(within))
                for j in range(i + 1, len(within) + 1)))


# Plain data classes training scripts pickle beside their tensors (Megatron's and kohya's `args`, Composer's timestamps
# and torch version, the paths Lightning callbacks keep, as NeMo saves them; megatron-core's register_safe_globals
# allow-lists the same): unpickling one builds an attribute bag, a duration, a string or a path and calls nothing, but
# torch.load(weights_only=True), torch's default since 2.6, refuses it unless allow-listed. A pickle naming one is a
# warning with the line that lets it load (`inert_problem`), never `unsafe_pickle`, unless loading would call a method
# of its instances (Opaque.runs_methods).
INERT_CLASSES = {"argparse.Namespace", "types.SimpleNamespace", "datetime.timedelta", "datetime.datetime",
                 "datetime.date", "datetime.time", "datetime.timezone", "torch.torch_version.TorchVersion",
                 "pathlib.PosixPath", "pathlib.PurePosixPath", "pathlib.WindowsPath", "pathlib.PureWindowsPath",
                 "pathlib.Path"}


def inert_problem(names: list[str], where: str, path: str) -> Problem:
    """The warning for a pickle naming the inert data classes `names`: what refuses it and the exact lines (either
    form) that let torch.load(weights_only=True) take it."""
    modules = ", ".join(dict.fromkeys(n.rpartition(".")[0] for n in names))
    listed = ", ".join(names)
    return Problem(Code.NEEDS_SAFE_GLOBALS, WARNING,
                   f"{where} names {listed}, plain data that loading builds without calling any code, but "
                   "torch.load(weights_only=True), the default since torch 2.6, refuses it (UnpicklingError); if you "
                   f"trust the file, run `import {modules}; torch.serialization.add_safe_globals([{listed}])` before "
                   f"loading it, or load it inside `with torch.serialization.safe_globals([{listed}]):`", path)


def own_classes_problem(names: list[str], where: str, path: str) -> Problem:
    """The warning for a pickle naming classes of the training code itself (`names`, from modules not importable
    here), which it only builds (never calls): loading needs that code."""
    modules = ", ".join(dict.fromkeys(n.rpartition(".")[0] for n in names))
    return Problem(Code.UNSAFE_PICKLE, WARNING,
                   f"{where} names {', '.join(names)}, classes of the training code ({modules}, not importable here) "
                   "that it builds without calling them: loading the file needs their code importable, and with "
                   f"weights_only=True (torch's default since 2.6) `torch.serialization.add_safe_globals([...])` of "
                   "them once imported; ckpttool did not import or run them", path)


def classify(names: list[str], called=(), methods=()) -> tuple[list[str], list[str], list[str]]:
    """The globals outside the allow-list in three kinds: (those that run code: known to, called by the pickle
    (REDUCE) and not inert data, or with methods it calls (`methods`: SafeUnpickler.runs_methods); inert data
    classes; classes of the training code itself, only built, from a module not importable here)."""
    inert = [n for n in names if n in INERT_CLASSES and n not in methods]
    own = [n for n in names if n not in INERT_CLASSES and n not in called and not runs_code(n) and _own_module(n)]
    return [n for n in names if n not in inert and n not in own], inert, own


def split_unsafe(names: list[str], called=()) -> tuple[list[str], list[str]]:
    """(the globals outside the allow-list that are not inert data classes, those that are)."""
    unsafe, inert, own = classify(names, called)
    return unsafe + own, inert


def _own_module(name: str) -> bool:
    """Whether a global's module is the training code's own, not importable here: a script's `__main__`, or a
    top-level package no finder knows (looked up by name, nothing imported)."""
    import importlib.util

    top = name.split(".")[0]
    if top == "__main__":
        return True
    if not top.isidentifier():
        return False
    try:
        return importlib.util.find_spec(top) is None
    except (ImportError, ValueError):
        return False


# Protocol-2 pickles name Python 2 modules; map them as the standard unpickler would.
MODULE_ALIASES = {"__builtin__": "builtins", "copy_reg": "copyreg"}


@dataclass(frozen=True)
class DtypeRef:
    name: str


@dataclass(frozen=True)
class StorageType:
    dtype: str
    untyped: bool = False


@dataclass
class StorageRef:
    key: str
    dtype: str
    location: str  # device torch saved it from, e.g. "cuda:0"
    numel: int  # elements for typed storages, bytes for untyped ones
    untyped: bool = False
    itemsize: int = field(init=False)  # computed once: a 100,000-tensor file asks for it 200,000 times

    def __post_init__(self):
        self.itemsize = 1 if self.untyped else max(1, BITS.get(self.dtype, 8) // 8)

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize


@dataclass
class TensorRef:
    storage: StorageRef
    storage_offset: int
    shape: tuple
    stride: tuple
    dtype: str
    conj: bool = False  # torch.save of `c.conj()`: the data as stored, to be conjugated (torch's conj bit)
    neg: bool = False  # torch.save of `torch._neg_view(x)`: the data as stored, to be negated (torch's neg bit)


@dataclass
class LayoutTensor:
    """A tensor torch.load rebuilds in a layout ckpttool does not read (sparse COO/CSR/CSC/BSR/BSC, quantized,
    nested): named and counted, never dropped silently; its parts stay inside."""

    layout: str  # sparse_coo, sparse_csr, ..., quantized, nested
    shape: tuple | None
    parts: tuple = ()


def _rebuild_sparse(layout, data, *_rest):
    parts = tuple(data) if isinstance(data, (tuple, list)) else ()
    size = next((p for p in reversed(parts) if isinstance(p, tuple) and all(type(d) is int for d in p)), None)
    return LayoutTensor(str(layout).removeprefix("torch."), size, parts)


def _rebuild_qtensor(storage, storage_offset, size, *rest):
    return LayoutTensor("quantized", tuple(size) if isinstance(size, (tuple, list)) else None, (storage, *rest))


def _rebuild_nested(buffer, sizes, *rest):
    return LayoutTensor("nested", None, (buffer, sizes, *rest))


def _get_layout(name):
    return str(name)


def _rebuild_njt(fields, *_rest):
    values = fields.get("values") if isinstance(fields, dict) else None
    return LayoutTensor("jagged", None, (fields,) if values is not None else ())


def _rebuild_meta(dtype, size, *_rest):
    return LayoutTensor("meta", tuple(size) if isinstance(size, (tuple, list)) else None)


def _layout_of(kind):
    return lambda *args: LayoutTensor(kind, None, args)


@dataclass(frozen=True)
class GlobalRef:
    """A global written back by `RepicklingPickler` as a GLOBAL opcode, without importing it."""

    name: str

    def __call__(self, *args):  # pickle insists the reduce function be callable; it is never called
        raise TypeError(f"{self.name} is a reference to be pickled, not called")


class RepicklingPickler(pickle._Pickler):
    """The pure-Python pickler, taught to write `GlobalRef`s as GLOBAL opcodes (module and name unchecked)."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_global(self, obj, name=None):
        if isinstance(obj, GlobalRef):
            ref = obj.name
        elif isinstance(obj, DtypeRef):
            ref = f"torch.{obj.name}"
        elif isinstance(obj, type) and issubclass(obj, Opaque):  # a class the reader stood in for
            ref = obj.global_name
        else:
            return super().save_global(obj, name)
        if ref not in SAFE_GLOBALS:  # the last guard: nothing written names a global torch.load would not take
            raise CkptError(Code.UNSAFE_PICKLE, f"refusing to write a reference to {ref}, outside the allow-list")
        module, _, attr = ref.rpartition(".")
        self.write(pickle.GLOBAL + f"{module}\n{attr}\n".encode("utf-8"))
        self.memoize(obj)

    dispatch[GlobalRef] = save_global
    dispatch[DtypeRef] = save_global


class Opaque:
    """Stand-in for an instance of a class we will not import: records how the pickle built it. `runs_methods` (on
    the class) records that loading would call a method of the real class beyond building it: a second BUILD, a
    state that sets a dunder, `append` or `extend` attribute (which a later BUILD or APPEND calls), or items fed in
    by APPEND(S) or SETITEM(S)."""

    global_name = "?"
    runs_methods = False

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args, obj.state, obj.items, obj.entries = args, None, [], []
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        parts = state if isinstance(state, tuple) and len(state) == 2 else (state,)
        if self.state is not None or any(isinstance(p, dict) and any(
                not isinstance(k, str) or k.startswith("__") or k in ("append", "extend") for k in p) for p in parts):
            type(self).runs_methods = True
        self.state = state

    def append(self, item):
        type(self).runs_methods = True
        self.items.append(item)

    def extend(self, items):
        type(self).runs_methods = True
        self.items.extend(items)

    def __setitem__(self, key, value):
        type(self).runs_methods = True
        self.entries.append((key, value))

    def __repr__(self):
        return f"<{self.global_name}>"

    def __reduce_ex__(self, protocol):
        """Pickle back exactly as it was built (used to carry allow-listed objects, e.g. numpy RNG state, into a
        converted file without importing or running anything)."""
        return (GlobalRef(self.global_name), self.args, self.state, iter(self.items) if self.items else None,
                iter(self.entries) if self.entries else None)

    def fields(self) -> dict:
        """The attributes a dataclass-like object was rebuilt with (state dict, or slots in a (None, dict) pair)."""
        state = self.state
        if isinstance(state, tuple) and len(state) == 2:
            merged = dict(state[0] or {})
            merged.update(state[1] or {})
            return merged
        return dict(state) if isinstance(state, dict) else {}


INT_ONLY = {int}  # the types a valid size or stride holds (bool is not int here)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, hooks=None, metadata=None,
                       *_rest):
    return _tensor(storage, storage_offset, size, stride, None, metadata)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, hooks, dtype, metadata=None, *_rest):
    return _tensor(storage, storage_offset, size, stride, dtype, metadata)


TENSOR_BITS = {"conj", "neg"}  # what torch._utils.get_tensor_metadata writes; torch.load sets each on the tensor


def _tensor(storage, storage_offset, size, stride, dtype, metadata=None):
    if not isinstance(storage, StorageRef):
        raise CkptError(Code.CORRUPT, f"tensor rebuilt from {type(storage).__name__}, not a storage")
    if isinstance(dtype, DtypeRef):
        name = dtype.name
    elif dtype is None:
        name = storage.dtype
    else:
        raise CkptError(Code.CORRUPT, "tensor dtype is not a torch dtype")
    shape, stride = tuple(size), tuple(stride)
    dims = shape + stride
    if type(storage_offset) is not int or (dims and (set(map(type, dims)) != INT_ONLY or min(dims) < 0)):
        raise CkptError(Code.CORRUPT, "tensor has a malformed size, stride or offset")
    bits = metadata if isinstance(metadata, dict) else {}
    if set(map(str, bits)) - TENSOR_BITS or not all(type(v) is bool for v in bits.values()):
        # a flag of a later torch, say: its values are not known to be the stored data, so the tensor is named
        return LayoutTensor(f"tensor with metadata {sorted(map(str, bits))}", shape)
    return TensorRef(storage, storage_offset, shape, stride, name, bits.get("conj", False), bits.get("neg", False))


def _first_arg(data, *_rest):
    return data


def _rebuild_from_type(func, new_type, args, state):
    return func(*args)


def _codecs_encode(text, encoding="utf-8", *_rest):
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise CkptError(Code.CORRUPT, "codecs.encode used for something other than latin1 bytes")
    return codecs.encode(text, "latin1")


def _torch_size(dims=()):
    return tuple(dims)


def _torch_device(kind, index=None):
    return f"{kind}:{index}" if index is not None else str(kind)


IMITATIONS = {
    "collections.OrderedDict": OrderedDict,
    "torch._utils._rebuild_tensor": lambda s, o, size, stride: _tensor(s, o, size, stride, None),
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
    "torch._utils._rebuild_tensor_v3": _rebuild_tensor_v3,
    "torch._utils._rebuild_parameter": _first_arg,
    "torch._utils._rebuild_parameter_with_state": _first_arg,
    "torch._tensor._rebuild_from_type_v2": _rebuild_from_type,
    "torch.Size": _torch_size,
    "torch.device": _torch_device,
    "builtins.set": set,
    "builtins.frozenset": frozenset,
    "builtins.complex": complex,
    "codecs.encode": _codecs_encode,
    "_codecs.encode": _codecs_encode,
    "torch._utils._rebuild_sparse_tensor": _rebuild_sparse,
    "torch._utils._rebuild_qtensor": _rebuild_qtensor,
    "torch._utils._rebuild_nested_tensor": _rebuild_nested,
    "torch.serialization._get_layout": _get_layout,
    "torch.nested._internal.nested_tensor._rebuild_njt": _rebuild_njt,
    "torch._utils._rebuild_meta_tensor_no_storage": _rebuild_meta,
    "torch._utils._rebuild_wrapper_subclass": _layout_of("wrapper_subclass"),
    "torch._utils._rebuild_device_tensor_from_numpy": _layout_of("device"),
    "torch._utils._rebuild_device_tensor_from_cpu_tensor": _layout_of("device"),
}


class SafeUnpickler(pickle._Unpickler):
    """Unpickles into plain data and stand-ins; torch persistent ids become `StorageRef`s.

    It is the pure-Python unpickler, whose memo is a dict. The C one keeps its memo in an array sized to the largest
    index a PUT names, zero-filled to twice that: one forged LONG_BINPUT index in a damaged or hostile file made it
    fill 24 GB and be killed for memory (found by `make fuzz`). Text inside a pickle looks like such indices, so they
    cannot be checked cheaply ahead of parsing."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, stream, allowed=SAFE_GLOBALS):
        super().__init__(stream)
        self._stream = stream
        self.allowed = allowed
        self.globals_seen: list[str] = []
        self._called: set[str] = set()
        self.storages: dict[str, StorageRef] = {}
        self._opaque_classes: dict[str, type] = {}

    def load(self):
        """pickle._Unpickler.load reading straight from the stream: its _Unframer adds a Python call to every one of
        the millions of reads a large pickle makes (about a fifth of the time for 100,000 tensors)."""
        self.read, self.readline = self._stream.read, self._stream.readline
        self.readinto = getattr(self._stream, "readinto", None)
        self.metastack, self.stack = [], []
        self.append = self.stack.append
        self.proto = 0
        read, dispatch = self.read, self.dispatch
        try:
            while True:
                key = read(1)
                if not key:
                    raise EOFError
                dispatch[key[0]](self)
        except pickle._Stop as stop:
            return stop.value

    def load_frame(self):
        """A FRAME (protocol 4) only says how many bytes follow together: they are read straight through."""
        if len(self.read(8)) != 8:
            raise EOFError

    dispatch[pickle.FRAME[0]] = load_frame

    def load_reduce(self):
        """REDUCE calls what lies under its arguments: a global used so is called, not only built."""
        if len(self.stack) >= 2 and isinstance(getattr(self.stack[-2], "global_name", None), str):
            self._called.add(self.stack[-2].global_name)
        pickle._Unpickler.load_reduce(self)

    dispatch[pickle.REDUCE[0]] = load_reduce

    def _instantiate(self, klass, args):
        """INST and OBJ (protocols 0 and 1) call their class with its arguments."""
        if isinstance(getattr(klass, "global_name", None), str):
            self._called.add(klass.global_name)
        pickle._Unpickler._instantiate(self, klass, args)

    @property
    def called(self) -> set[str]:
        """Globals whose code loading would run beyond building an instance: called (REDUCE, INST, OBJ), named by an
        attribute path (`module` then `a.b`: protocol 4 reaches any attribute so), or whose instances get more than
        one plain BUILD (`runs_methods`)."""
        return self._called | self.runs_methods

    @property
    def runs_methods(self) -> set[str]:
        """Classes whose instances loading would call a method of beyond building them (Opaque.runs_methods)."""
        return {cls.global_name for cls in self._opaque_classes.values() if cls.runs_methods}

    def find_class(self, module, name):
        module = MODULE_ALIASES.get(module, module)
        full = f"{module}.{name}"
        if full not in self.globals_seen:
            self.globals_seen.append(full)
        if "." in str(name):  # an attribute path from the module (protocol 4): whatever it reaches, not a class
            self._called.add(full)
        if full in IMITATIONS:
            return IMITATIONS[full]
        if module == "torch" and name in STORAGE_CLASSES:
            return StorageType(STORAGE_CLASSES[name])
        if full == "torch.storage.UntypedStorage":
            return StorageType("uint8", untyped=True)
        if module == "torch" and name in TORCH_NAMES:
            return DtypeRef(ALIASES.get(name, name))
        if full not in self._opaque_classes:
            self._opaque_classes[full] = type(str(name), (Opaque,), {"global_name": full})
        return self._opaque_classes[full]

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != "storage":
            raise CkptError(Code.CORRUPT, f"unknown persistent id {str(pid)[:60]!r}")
        _, stype, key, location, numel = pid[:5]
        if not isinstance(stype, StorageType) or not isinstance(numel, int) or numel < 0:
            raise CkptError(Code.CORRUPT, f"malformed storage record {str(pid)[:80]!r}")
        key = str(key)
        ref = self.storages.get(key)
        if ref is None:
            ref = StorageRef(key, stype.dtype, str(location), numel, stype.untyped)
            self.storages[key] = ref
        return ref

    @property
    def unsafe_globals(self) -> list[str]:
        return [g for g in self.globals_seen if g not in self.allowed]


def unpickle(source, allowed=SAFE_GLOBALS, what="pickle"):
    """Safely unpickle one object from bytes or an open file (left just after STOP): (object, unpickler).

    Any malformation becomes CkptError ('truncated' when the stream ends early, else 'corrupt'), except that a pickle
    that names a global outside the allow-list before it breaks off is `unsafe_pickle`: torch.load would have run that
    global before failing, so the damage does not make the file harmless."""
    stream = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    unpickler = SafeUnpickler(stream, allowed)
    try:
        obj = unpickler.load()
    except Exception as e:  # noqa: BLE001 - malformed input raises many types (IndexError, KeyError, struct.error...)
        failure = _failure(e, what)
    else:
        if _deeper_than(obj, MAX_DEPTH):
            failure = CkptError(Code.CORRUPT, f"{what} nests deeper than {MAX_DEPTH} levels; no trainer saves one so "
                                "deep, and walking it would exhaust the stack")
        else:
            return obj, unpickler
    if unsafe := split_unsafe(unpickler.unsafe_globals)[0]:
        raise CkptError(Code.UNSAFE_PICKLE, f"{what} imports {', '.join(unsafe)}, outside the "
                        f"allow-list (torch.load would run it), and then cannot be read: {failure.reason}")
    raise failure


SCAN_OPCODES = 4_000_000  # opcodes one scan walks at most (a few seconds); what lies past them is not seen
STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING", "SHORT_BINSTRING"}
GET_OPS = {"GET", "BINGET", "LONG_BINGET"}
PUT_OPS = {"PUT", "BINPUT", "LONG_BINPUT"}


MAX_DEPTH = 200  # containers within containers; real checkpoints nest a dozen or so (Hydra configs in hparams)


def _deeper_than(obj, limit: int) -> bool:
    """Whether containers nest more than `limit` deep, each looked at once (the unpickler builds any depth without
    recursion; the walks after it recurse)."""
    stack, seen = [(obj, 0)], set()
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, (list, tuple, set, frozenset)):
            stack.extend((v, depth + 1) for v in node)
        elif isinstance(node, Opaque):
            stack.extend((v, depth + 1) for v in (node.args, node.state, node.items, node.entries))
    return False


UNSCANNED = "?.(the rest of a pickle too long to scan)"  # what scan_records names past its opcode budget


def scan_records(data: bytes, budget: list | None = None) -> list[str]:
    """The globals named by every pickle in `data`, one record after another, read as opcodes: nothing is built,
    so memory stays that of the bytes, and no call the reader would refuse (a `_codecs.encode` of another codec)
    hides the globals named after it. Records follow one another while the next starts with PROTO; a record that
    cannot be parsed ends the scan, its globals up to that point counted; UNSCANNED when `budget` (shared by the
    scans of one file) ran out first. For bytes torch.load itself never unpickles but other loaders and scanners
    do: concatenated pickles, extra archive members."""
    names, complete = scan_opcodes(data, budget)
    return names if complete else names + [UNSCANNED]


def scan_opcodes(source, budget: list | None = None) -> tuple[list[str], bool]:
    """(globals named in `source`, bytes or a binary file, whether every record was walked to its end within
    `budget`, a one-item list of opcodes left that several scans may share; SCAN_OPCODES by default). STACK_GLOBAL
    takes its module and name from the strings pushed before it (directly, or fetched back from the memo); one built
    any other way is COMPUTED_GLOBAL."""
    import pickletools

    budget = [SCAN_OPCODES] if budget is None else budget
    stream = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    seen, memo, complete = [], {}, budget[0] > 0
    while complete:
        start = stream.tell()
        if stream.read(1) != b"\x80" and start > 0:  # a record after the first starts with PROTO; the first may be
            break  # protocol 0 or 1, which has none
        stream.seek(start)
        recent: list = []  # the last two values pushed, as far as strings go (None: anything else)
        try:
            for op, arg, _ in pickletools.genops(stream):
                budget[0] -= 1
                name = op.name
                if name in STRING_OPS:
                    recent.append(arg if isinstance(arg, str) else None)
                elif name in GET_OPS:
                    recent.append(memo.get(arg))
                elif name in PUT_OPS:
                    memo[arg] = recent[-1] if recent else None
                elif name == "MEMOIZE":
                    memo[len(memo)] = recent[-1] if recent else None
                elif name == "GLOBAL":
                    seen.append(".".join(str(arg).split(" ", 1)))
                    recent.append(None)
                elif name == "STACK_GLOBAL":
                    pair = recent[-2:]
                    seen.append(f"{pair[0]}.{pair[1]}" if len(pair) == 2 and None not in pair else COMPUTED_GLOBAL)
                    recent.append(None)
                elif name not in ("FRAME", "PROTO"):
                    recent.append(None)
                del recent[:-2]
                if budget[0] <= 0:
                    complete = False
                    break
        except Exception:  # noqa: BLE001 - a record that cannot be parsed ends the scan (pickle.load stops there too)
            break
    return [_aliased(g) for g in dict.fromkeys(seen)], complete


def _aliased(name: str) -> str:
    module, _, attr = name.partition(".")
    return f"{MODULE_ALIASES.get(module, module)}.{attr}"


# How pickle (and zlib, under a deflated member) word running out of bytes.
TRUNCATION_WORDS = ("was truncated", "truncated stream", "ran out of input")


def _failure(e: Exception, what: str) -> CkptError:
    if isinstance(e, CkptError):
        return e
    if isinstance(e, EOFError) or any(words in str(e).lower() for words in TRUNCATION_WORDS):
        return CkptError(Code.TRUNCATED, f"{what} ends before its STOP opcode")
    if isinstance(e, RecursionError):
        return CkptError(Code.CORRUPT, f"{what} nests too deeply to read")
    if isinstance(e, MemoryError):
        return CkptError(Code.CORRUPT, f"{what} asks for more memory than it could hold")
    return CkptError(Code.CORRUPT, f"{what} cannot be parsed ({type(e).__name__}: {str(e)[:120]})")


@dataclass
class RawPickle:
    """A torch file's top-level object, with storage keys resolved to byte ranges in the file."""

    obj: object
    layout: str
    storages: dict = field(default_factory=dict)  # key -> (StorageRef, data offset)
    globals_seen: list = field(default_factory=list)
    unsafe_globals: list = field(default_factory=list)
    called: set = field(default_factory=set)  # globals the pickle calls (SafeUnpickler.called)
    runs_methods: set = field(default_factory=set)  # classes it calls methods of (SafeUnpickler.runs_methods)


def union(lists) -> list:
    """The names of several pickles' globals, each once, in the order first seen."""
    return list(dict.fromkeys(name for names in lists for name in names))


def unpickle_at(f, allowed, path, what):
    try:
        return unpickle(f, allowed, what=what)
    except CkptError as e:
        raise CkptError(e.code, e.reason, path) from None
