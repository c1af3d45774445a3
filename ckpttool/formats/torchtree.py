"""From a torch file's unpickled object to what it holds: its tensors, the components of a training dict (model,
optimizer, scheduler, EMA, ...: a convention of key names, not a format), every step or epoch it states, and a
JSON-able picture of the rest. Also the walks convert and repair rebuild an object with."""

from __future__ import annotations

import os
import re
import struct
from collections import OrderedDict

from ckpttool.errors import CkptError
from ckpttool.formats.pickles import SAFE_GLOBALS, DtypeRef, LayoutTensor, Opaque, RawPickle, TensorRef
from ckpttool.model import OPTIMIZER_UPDATES, SCHEDULER_STEPS, Code, Component, Location, Record, StepSource, TensorInfo


# Keys of a training dict, by the component role they hold.
COMPONENT_KEYS = {
    "model": ("model_state_dict", "state_dict", "model", "module", "net", "network", "weights", "params"),
    "ema": ("ema", "ema_state_dict", "model_ema", "ema_model", "ema_params", "ema_weights"),
    "optimizer": ("optimizer_state_dict", "optimizer", "optim", "opt", "optimizer_states", "optimizers"),
    "scheduler": ("scheduler_state_dict", "lr_scheduler", "scheduler", "lr_scheduler_state_dict", "lr_schedulers",
                  "schedulers"),
    "scaler": ("scaler", "grad_scaler", "scaler_state_dict", "amp"),
    "rng": ("rng_state", "rng_states", "random_states", "rng"),
}


STEP_KEYS = ("global_step", "step", "iteration", "iter", "num_updates", "total_steps", "current_step")


EPOCH_KEYS = ("epoch", "current_epoch", "epochs")


def tensor_info(name: str, ref: TensorRef, raw: RawPickle, path: str) -> TensorInfo:
    storage, offset = raw.storages[ref.storage.key]
    location = Location(path, offset, storage.nbytes, ref.storage_offset, ref.stride, storage.location)
    return TensorInfo(name, ref.dtype, ref.shape, location, storage_key=storage.key, conj=ref.conj, neg=ref.neg)


def flatten(obj, prefix="", seen=None):
    """Yield (dotted name, leaf) for every tensor and scalar in a nested object, modules included."""
    seen = set() if seen is None else seen
    if isinstance(obj, (TensorRef, LayoutTensor, int, float, str, bool, bytes)) or obj is None:
        yield prefix, obj
        return
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    elif isinstance(obj, Opaque):
        fields = obj.fields()
        if "_parameters" in fields:  # a pickled nn.Module: walk it like its state_dict
            items = list(fields.get("_parameters", {}).items()) + list(fields.get("_buffers", {}).items())
            items += list(fields.get("_modules", {}).items())
        else:
            items = fields.items()
    else:
        return
    for key, value in items:
        yield from flatten(value, f"{prefix}.{key}" if prefix else str(key), seen)


def rebuild(obj, replace, prefix="", memo=None, notes: list | None = None):
    """A copy of an unpickled object with each TensorRef replaced by `replace(dotted name)` (names as `flatten`
    gives them: a container reached twice is rebuilt once, at its first name, and shared as it was). Only plain data
    is carried: sets and allow-listed objects (numpy RNG state) are rebuilt from contents checked to be inert, so a
    payload hidden inside them is never written back out; anything else is CkptError (unsafe_pickle). With `notes`,
    inert objects torch.load(weights_only=True) refuses become the plain data it takes (`loadable`), each change
    noted there."""
    memo = {} if memo is None else memo
    if isinstance(obj, TensorRef):
        return replace(prefix)
    if isinstance(obj, PLAIN) or obj is None:
        return obj
    if id(obj) in memo:
        return memo[id(obj)]
    join = (lambda k: f"{prefix}.{k}" if prefix else str(k))
    if notes is not None and isinstance(obj, Opaque) and (found := loadable(obj)) is not None:
        value, what = found
        notes.append(f"{prefix or 'the object'}: {obj.global_name} as {what}")
        memo[id(obj)] = out = rebuild(value, replace, prefix, memo, notes)
        return out
    if isinstance(obj, dict):
        for key in obj:
            _check_inert(key, f"{prefix or 'the object'} key")
        out = type(obj)() if isinstance(obj, OrderedDict) else {}
        memo[id(obj)] = out
        out.update((k, rebuild(v, replace, join(k), memo, notes)) for k, v in obj.items())
        return out
    if isinstance(obj, list):
        out = memo[id(obj)] = []
        out.extend(rebuild(v, replace, join(i), memo, notes) for i, v in enumerate(obj))
        return out
    if isinstance(obj, tuple):
        memo[id(obj)] = out = tuple(rebuild(v, replace, join(i), memo, notes) for i, v in enumerate(obj))
        return out
    _check_inert(obj, prefix or "the object")  # sets, complex numbers, numpy RNG state: carried as they are
    return obj


NAMESPACES = ("argparse.Namespace", "types.SimpleNamespace")
PATHS = ("pathlib.PosixPath", "pathlib.PurePosixPath", "pathlib.Path", "pathlib.WindowsPath", "pathlib.PureWindowsPath")
NUMPY_SCALARS = ("numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar")
NUMPY_CODE = re.compile(r"[<>|=]?(?:[biuf](?:1|2|4|8)|c(?:8|16)|\?)")
DATETIMES = ("datetime.datetime", "datetime.date", "datetime.time")


def loadable(obj: Opaque) -> tuple[object, str] | None:
    """(the plain data torch.load(weights_only=True) takes for an inert object it refuses, what it became): an
    argparse or types Namespace as the dict of its attributes, a path as its string, a numpy scalar as the Python
    number and a numpy dtype as its name, a date or time as its ISO text, a timedelta as seconds. None for any other
    object (and for one whose pickled arguments are not what the class pickles)."""
    import datetime

    name, args = obj.global_name, obj.args
    if name in NAMESPACES:
        return obj.fields(), "a dict"
    if name in PATHS and args and all(isinstance(a, str) for a in args):  # PurePath.__reduce__: its parts
        import ntpath
        import posixpath

        return (ntpath if "Windows" in name else posixpath).join(*args), "a string"
    if name == "numpy.dtype" and args and isinstance(args[0], str) and NUMPY_CODE.fullmatch(args[0]):
        return args[0], "its name"
    if name in NUMPY_SCALARS and len(args) == 2 and isinstance(args[0], Opaque) and isinstance(args[1], bytes):
        import numpy

        code, state = args[0].args[0] if args[0].args else None, args[0].state
        order = state[1] if isinstance(state, tuple) and len(state) > 1 and state[1] in ("<", ">", "|", "=") else ""
        if isinstance(code, str) and NUMPY_CODE.fullmatch(code):
            dtype = numpy.dtype(order + code if code[0] not in "<>|=" else code)
            if dtype.itemsize == len(args[1]):
                return numpy.frombuffer(args[1], dtype=dtype)[0].item(), "a Python number"
        return None
    if name == "datetime.timedelta" and len(args) == 3 and all(type(a) is int for a in args):
        return datetime.timedelta(*args).total_seconds(), "seconds"
    if name == "torch.torch_version.TorchVersion" and len(args) == 1 and isinstance(args[0], str):
        return args[0], "a string"
    if name in DATETIMES and len(args) == 1 and isinstance(args[0], bytes):  # with a tzinfo: no plain form kept
        try:
            cls = getattr(datetime, name.rpartition(".")[2])
            return cls(args[0]).isoformat(), "ISO text"  # the class's own pickled state: bytes, never code
        except (TypeError, ValueError):
            return None
    return None


PLAIN = (int, float, str, bool, bytes)


INERT_DEPTH = 64


def _check_inert(obj, where: str, depth: int = 0, seen=None):
    """Raise CkptError (unsafe_pickle) unless `obj` is plain data all the way down: scalars, containers of them,
    torch dtypes, and objects of allow-listed globals built from such data (each object visited once)."""
    seen = set() if seen is None else seen
    if isinstance(obj, PLAIN + (complex, DtypeRef)) or obj is None:
        return
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if depth > INERT_DEPTH:
        raise CkptError(Code.UNSAFE_PICKLE, f"{where} nests too deeply to be checked; ckpttool does not rebuild it")
    if isinstance(obj, (list, tuple, set, frozenset)):
        parts = list(obj)
    elif isinstance(obj, dict):
        parts = [x for item in obj.items() for x in item]
    elif isinstance(obj, type) and issubclass(obj, Opaque) and obj.global_name in SAFE_GLOBALS:
        parts = []
    elif isinstance(obj, Opaque) and obj.global_name in SAFE_GLOBALS:
        parts = [obj.args, obj.state, obj.items, obj.entries]
    else:
        name = obj.global_name if isinstance(obj, Opaque) or isinstance(obj, type) and issubclass(obj, Opaque) \
            else type(obj).__name__
        raise CkptError(Code.UNSAFE_PICKLE, f"{where} holds a {name}, which ckpttool does not rebuild (it never writes "
                        "back a global outside the allow-list); convert the weights alone with --component")
    for part in parts:
        _check_inert(part, where, depth + 1, seen)


def _has_tensors(obj) -> bool:
    return any(isinstance(leaf, (TensorRef, LayoutTensor)) for _, leaf in flatten(obj))


def _role_of_dict(obj) -> str | None:
    """Role of a file that holds one state_dict (Accelerate's optimizer.bin, scheduler.bin, ...), or of a non-empty
    list of state dicts of one role (Lightning's optimizer_states, lr_schedulers): one level of list, each item
    looked at once (a list that holds itself, or shares its items 60 levels deep, costs its length, not 2^60)."""
    if isinstance(obj, list) and obj:
        roles = {_own_role(item) if not isinstance(item, list) else None for item in obj}
        return roles.pop() if len(roles) == 1 else None
    return _own_role(obj)


def _own_role(obj) -> str | None:
    if not isinstance(obj, dict):
        return None
    keys = set(map(str, obj))
    if {"state", "param_groups"} <= keys:
        return "optimizer"
    if "last_epoch" in keys and ({"base_lrs", "_step_count", "_last_lr"} & keys):  # _last_lr: ReduceLROnPlateau
        return "scheduler"
    if {"random_state", "torch_manual_seed"} & keys:
        return "rng"
    if {"scale", "growth_factor"} <= keys:
        return "scaler"
    return None


NUMBERED_PARTS = re.compile(r"^(model|optimizer|scheduler|random_states|custom_checkpoint|scaler)_\d+$")


NUMBERED_ROLES = {"model": "model", "optimizer": "optimizer", "scheduler": "scheduler", "random_states": "rng",
                  "custom_checkpoint": "custom", "scaler": "scaler"}


def role_of_key(key: str) -> str | None:
    """The role of a training dict's top-level key (also Accelerate's numbered part names, as convert writes them)."""
    for role, keys in COMPONENT_KEYS.items():
        if key in keys:
            return role
    m = NUMBERED_PARTS.match(key)
    return NUMBERED_ROLES[m.group(1)] if m else None


def analyse(raw: RawPickle, path: str, *, role: str | None = None, name: str | None = None):
    """Components, step sources, metadata and the training dict's other top-level values (as unpickled) of one torch
    file's object; `role` and `name`: what the file is as a part of a larger checkpoint (None: what its contents
    say)."""
    obj = raw.obj
    components, steps, metadata, extras = [], [], {}, {}

    def component(comp_name, comp_role, value):
        leaves = list(flatten(value))
        tensors = [tensor_info(n, leaf, raw, path) for n, leaf in leaves if isinstance(leaf, TensorRef)]
        comp = Component(comp_name, comp_role, files=[path], tensors=tensors, tree=value,
                         pickle_globals=raw.globals_seen,
                         uncarried=[(n, leaf.layout) for n, leaf in leaves if isinstance(leaf, LayoutTensor)])
        components.append(comp)
        steps.extend(_component_steps(comp, value, raw, path))
        return comp

    own_role = _role_of_dict(obj)
    training_keys = [k for k in obj if isinstance(k, str) and role_of_key(k)] if isinstance(obj, dict) else []
    if own_role or role in ("optimizer", "scheduler", "rng", "scaler", "sampler", "dataloader", "custom"):
        component(name or own_role or role, own_role or role, obj)
    elif training_keys and any(_has_tensors(obj[k]) or _role_of_dict(obj[k]) for k in training_keys):
        metadata["top_level_keys"] = [str(k) for k in obj]
        for key, value in obj.items():
            named_role = role_of_key(key) if isinstance(key, str) else None
            found = named_role or _role_of_dict(value)
            if found and (_has_tensors(value) or _role_of_dict(value) or found in ("rng", "custom")):
                taken = key if NUMBERED_PARTS.match(key) or not named_role else found
                component(taken if taken not in [c.name for c in components] else key, found, value)
            elif _has_tensors(value):
                component(str(key), "extra", value)
            else:
                _scalars_into(metadata, str(key), value)
                extras[key] = value
        for key in STEP_KEYS + EPOCH_KEYS:
            value = obj.get(key)
            if type(value) is int or (isinstance(value, float) and value.is_integer()):
                steps.append(StepSource(f"training dict '{key}'", int(value), record=Record.TRAINING_DICT, key=key,
                                        file=os.path.basename(path)))  # the trainer profile names it
    else:
        component(name or role or "model", role or "model", obj)
    return components, steps, metadata, extras


def _scalars_into(metadata, key, value):
    """Keep a training dict's plain values (numbers, strings, nested dicts and lists of them, such as Lightning's
    `loops` counters) as JSON-able metadata; other objects by their class name."""
    metadata[key] = plain(value)


SHOWN_ITEMS = 32  # of a list or dict shown as metadata; the rest are counted


PLAIN_NODES = 4096  # values one picture shows at most: shared children would otherwise be shown once per path


def plain(value, depth=0, budget=None):
    """A JSON-able picture of an unpickled value: numbers and strings as they are, short bytes as their repr,
    tensors by dtype and shape, other objects by their class name; long lists and dicts cut short, and the whole
    picture cut at PLAIN_NODES values (a dict of shared children 30 deep would otherwise be expanded 2^30 times)."""
    budget = [PLAIN_NODES] if budget is None else budget
    budget[0] -= 1
    if budget[0] < 0:
        return "..."
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    if isinstance(value, (bytes, bytearray)):
        return repr(bytes(value)) if len(value) <= 64 else f"<{len(value)} bytes>"
    if isinstance(value, TensorRef):
        return f"<tensor {value.dtype}{list(value.shape)}>"
    if isinstance(value, Opaque):
        return f"<{value.global_name}>"
    if depth < 8 and isinstance(value, dict):
        shown = {str(k): plain(v, depth + 1, budget) for k, v in list(value.items())[:SHOWN_ITEMS]}
        if len(value) > SHOWN_ITEMS:
            shown["..."] = f"{len(value) - SHOWN_ITEMS} more"
        return shown
    if depth < 8 and isinstance(value, (list, tuple)):
        shown = [plain(v, depth + 1, budget) for v in value[:SHOWN_ITEMS]]
        return shown + [f"... {len(value) - SHOWN_ITEMS} more"] if len(value) > SHOWN_ITEMS else shown
    return f"<{type(value).__name__}>"


def _component_steps(comp: Component, value, raw: RawPickle, path: str):
    if comp.role == "optimizer":
        for state in _optimizer_dicts(value):
            step = optimizer_step(state, raw, path)
            if step is not None:
                yield StepSource(f"{comp.name} state step", step, OPTIMIZER_UPDATES, record=Record.OPTIMIZER,
                                 key=f"{comp.name}.step", file=os.path.basename(path))
    elif comp.role == "scheduler":
        for sched in value if isinstance(value, list) else [value]:
            if isinstance(sched, dict) and type(sched.get("last_epoch")) is int:
                yield StepSource(f"{comp.name} last_epoch", sched["last_epoch"], SCHEDULER_STEPS,
                                 record=Record.SCHEDULER, key=f"{comp.name}.last_epoch", file=os.path.basename(path))
    elif comp.role == "rng" and isinstance(value, dict) and type(value.get("step")) is int:
        yield StepSource(f"{comp.name} step", value["step"], record=Record.RNG,  # what it counts, the profile says
                         key=f"{comp.name}.step", file=os.path.basename(path))


def _optimizer_dicts(value, seen=None):
    seen = set() if seen is None else seen
    if id(value) in seen:  # a list shared or holding itself is looked at once
        return
    seen.add(id(value))
    if isinstance(value, dict) and "state" in value:
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _optimizer_dicts(item, seen)


def optimizer_step(state_dict, raw: RawPickle, path: str) -> int | None:
    """The largest per-parameter `step` (equal for every parameter updated each step)."""
    return largest_step(state_dict, lambda _index, ref: read_scalar(tensor_info("step", ref, raw, path)))


def largest_step(state_dict, scalar) -> int | None:
    """The largest per-parameter `step` of an optimizer state dict; `scalar(index, ref)` reads a step saved as a
    tensor (by its storage, or by the name a component gave it)."""
    steps = []
    state = state_dict.get("state") if isinstance(state_dict, dict) else None
    for index, per_param in (state.items() if isinstance(state, dict) else []):
        step = per_param.get("step") if isinstance(per_param, dict) else None
        if isinstance(step, TensorRef):
            step = scalar(index, step)
        if type(step) is int or (type(step) is float and step.is_integer()):  # NaN, inf or 2.5 count nothing
            steps.append(int(step))
    return max(steps) if steps else None


SCALAR_FORMATS = {"float32": "<f", "float64": "<d", "int64": "<q", "int32": "<i", "float16": "<e"}


def scalar_in(raw: RawPickle, data: bytes):
    """The value of the one-element tensor a torch.save blob held in memory (`data`, read as `raw`) pickled."""
    ref = raw.obj
    fmt = SCALAR_FORMATS.get(ref.dtype)
    entry = raw.storages.get(ref.storage.key)
    if fmt is None or entry is None:
        return None
    size = struct.calcsize(fmt)
    start = entry[1] + ref.storage_offset * size
    chunk = data[start:start + size] if start >= 0 else b""
    return struct.unpack(fmt, chunk)[0] if len(chunk) == size else None


def read_scalar(info: TensorInfo):
    """Value of a one-element tensor read straight from its bytes (a few bytes, no torch import)."""
    fmt = SCALAR_FORMATS.get(info.dtype)
    if fmt is None or info.numel != 1:
        return None
    size = struct.calcsize(fmt)
    with open(info.location.file, "rb") as f:
        f.seek(info.location.offset + info.location.storage_offset * size)
        data = f.read(size)
    return struct.unpack(fmt, data)[0] if len(data) == size else None
