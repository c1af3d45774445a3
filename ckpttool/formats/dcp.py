"""torch.distributed.checkpoint directories: `.metadata` (a pickle of dataclasses) plus `*.distcp` data files.

The metadata is read with the safe pickle reader (DCP's own dataclasses allowed as inert records), so listing a DCP
checkpoint imports neither torch nor anything the file names.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections import defaultdict

from ckpttool import paths
from ckpttool.errors import CkptError
from ckpttool.formats.pickles import (DCP_GLOBALS, SAFE_GLOBALS, SCAN_OPCODES, DtypeRef, Opaque, TensorRef,
                                      classify, own_classes_problem, unpickle)
from ckpttool.model import (ERROR, OPTIMIZER_UPDATES, SCHEDULER_STEPS, WARNING, Checkpoint, Chunk, Code, Component,
                            Location, Record, StepSource, TensorInfo)

METADATA = ".metadata"
# A non-tensor item is a torch.save blob of the value (default_planner.DefaultSavePlanner.transform_object), and DCP
# loads it with torch.load(weights_only=False) (DefaultLoadPlanner.load_bytes): any global in it would run. BytesIO is
# inert and legitimate: torchtitan's TrainState saves its loss lists as torch.save'd BytesIO buffers.
OBJECT_GLOBALS = SAFE_GLOBALS | {"_io.BytesIO"}
OBJECT_LIMIT = 1 << 20  # bytes of one non-tensor item read to show it; larger ones are only sized
OBJECTS_READ = 2000  # non-tensor items read per checkpoint; the rest are listed unread
SCALAR_ITEM_LIMIT = 1 << 16  # bytes of a one-element tensor item's torch.save blob; a larger one is no counter
# Lightning: optimizer_0, ...; Composer's sharded State: state.optimizers.<class>, state.schedulers.<class>
OPTIMIZER_STEP = re.compile(r"(?:(?:optimizer|optim)(?:_\d+)?|state\.optimizers\.[^.]+)\.state\..+\.step")
SCHEDULER_STEP = re.compile(r"(?:(?:lr_scheduler|scheduler)(?:\.\d+)?|state\.schedulers\.[^.]+)\.last_epoch")


DATA_FILE = re.compile(r"__(\d+)_\d+\.distcp")  # filesystem.py: each rank's data files, `__{rank}_{n}.distcp`


def detect(path: str) -> bool:
    """A DCP dir, also one whose save never finished (data files, no `.metadata`: read() says so)."""
    return os.path.isdir(path) and (os.path.isfile(os.path.join(path, METADATA)) or
                                    any(DATA_FILE.fullmatch(e) for e in os.listdir(path)))


def _fields(obj, what, path) -> dict:
    if not isinstance(obj, Opaque):
        raise CkptError(Code.CORRUPT, f".metadata {what} is not a DCP record", path)
    return obj.fields()


def _split_by_role(component: Component, object_names=()) -> list[Component]:
    """A DCP state dict is usually {"model": ..., "optimizer": ..., "lr_scheduler": ...}: when its top-level names
    include a known part (model, optimizer, ...), each top-level name becomes its own component. A known part saved
    as non-tensor items only (an LR scheduler's state) is a component without tensors."""
    from ckpttool.formats.torchtree import role_of_key

    groups: dict[str, list[TensorInfo]] = {}
    for t in component.tensors:
        head, _, rest = t.name.partition(".")
        if not rest:
            return [component]
        groups.setdefault(head, []).append(dataclasses.replace(t, name=rest))
    for name in object_names:
        head, _, rest = name.partition(".")
        if rest and head not in groups and role_of_key(head):
            groups[head] = []
    if not any(role_of_key(head) for head in groups):
        return [component]
    if len(groups) == 1 and role_of_key(next(iter(groups))) == component.role:
        return [Component(component.name, component.role, component.files, next(iter(groups.values())))]
    return [Component(head, role_of_key(head) or "extra", component.files, tensors)
            for head, tensors in groups.items()]


def _chunks(fqn, fields, items, locations, shape, meta_path) -> list[Chunk]:
    """Each saved piece of a tensor with where it sits: DCP writes one per shard (an FSDP2/torchtitan DTensor split
    along any dim, over any mesh), named by its offsets; the entry's `chunks` give each one's sizes
    (torch/distributed/checkpoint/metadata.py: MetadataIndex.offset, ChunkStorageMetadata)."""
    sizes_at = {}
    chunks = fields.get("chunks")
    for chunk in chunks if isinstance(chunks, (list, tuple)) else ():
        if isinstance(chunk, Opaque):
            c = chunk.fields()
            offsets, sizes = _ints(c.get("offsets")), _ints(c.get("sizes"))
            if offsets is not None and sizes is not None:
                sizes_at[offsets] = sizes
    found = []
    for item, location in zip(items, locations):
        offsets = _ints(item.get("chunk_offsets")) or (0,) * len(shape)
        sizes = sizes_at.get(offsets, tuple(shape) if len(items) == 1 else None)
        if sizes is None or not len(offsets) == len(sizes) == len(shape) or any(
                o < 0 or z < 0 or o + z > d for o, z, d in zip(offsets, sizes, shape)):
            raise CkptError(Code.CORRUPT, f".metadata chunk of {fqn!r} at {offsets} has no valid size", meta_path)
        found.append(Chunk(offsets, sizes, location))
    if sum(math.prod(c.sizes) for c in found) != math.prod(shape):
        raise CkptError(Code.CORRUPT, f".metadata chunks of {fqn!r} do not cover its {tuple(shape)} elements exactly",
                        meta_path)
    return found


def _ints(value) -> tuple | None:
    """A tuple of ints (torch.Size, list), or None for anything else a damaged file holds."""
    if isinstance(value, (tuple, list)) and all(type(v) is int for v in value):
        return tuple(value)
    return None


def read(path: str, *, role: str | None = None, name: str | None = None) -> Checkpoint:
    """A DCP dir: a checkpoint of its own, or (`name` given) one part of a state dir's checkpoint."""
    within = f"{os.path.basename(os.path.normpath(path))}/" if name else ""  # a part's files, named from its dir
    role = role or "model"
    name = name or role
    meta_path = os.path.join(path, METADATA)
    if not os.path.isfile(meta_path):
        ckpt = Checkpoint(path, "dcp", "torch.distributed.checkpoint", files=sorted(
            os.path.join(path, e) for e in os.listdir(path) if DATA_FILE.fullmatch(e)))
        ckpt.add_problem(Code.MISSING_FILE, ERROR, f"no {METADATA}: DCP writes it last, after every rank's data files, "
                         "so this save never finished and dcp.load cannot read it", meta_path)
        return ckpt
    with open(meta_path, "rb") as f:
        try:
            obj, unpickler = unpickle(f.read(), SAFE_GLOBALS | DCP_GLOBALS, what=".metadata")
        except CkptError as e:
            raise CkptError(e.code, e.reason, meta_path) from None
    meta = _fields(obj, "root", meta_path)
    entries = meta.get("state_dict_metadata")
    if not isinstance(entries, dict):
        raise CkptError(Code.CORRUPT, ".metadata has no state_dict_metadata", meta_path)
    storage = defaultdict(list)  # fqn -> [_StorageInfo fields, with the chunk's offsets from its MetadataIndex]
    for index, info in (meta.get("storage_data") or {}).items():
        if isinstance(index, Opaque) and isinstance(info, Opaque):
            fields, where = index.fields(), info.fields()
            relative = str(where.get("relative_path"))
            if not paths.plain_name(relative):  # FileSystemWriter's own names
                raise CkptError(Code.CORRUPT, f".metadata places {fields.get('fqn')!r} in {relative!r}, outside the "
                                "checkpoint dir (DCP writes its data files beside .metadata); it was not read",
                                meta_path)
            paths.inside(path, relative, "data file", meta_path)  # nor through a link out of the dir
            fqn = fields.get("fqn")
            if not isinstance(fqn, str):
                raise CkptError(Code.CORRUPT, f".metadata names a storage item by a {type(fqn).__name__}, not a "
                                "name; it cannot be read", meta_path)
            storage[fqn].append({**where, "chunk_offsets": fields.get("offset")})

    ckpt = Checkpoint(path, "dcp", "torch.distributed.checkpoint", files=[meta_path])
    component = Component(name, role, files=[meta_path])
    data_files = set()
    objects = {}
    read = _objects_read(entries)
    budget = [SCAN_OPCODES]  # opcodes the scans of this checkpoint's unread items share
    for fqn, entry in entries.items():
        fields = _fields(entry, f"entry {fqn!r}", meta_path)
        items = storage.get(fqn, [])
        for item in items:
            data_files.add(str(item.get("relative_path")))
        if "properties" not in fields:  # BytesStorageMetadata: a pickled Python object
            if fqn in read:
                objects[fqn] = _object(ckpt, fqn, items[0] if items else None, path, budget)
            else:
                objects[fqn] = "<not read>"
                _scan_unread(ckpt, fqn, items[0] if items else None, path, budget)
            continue
        props = fields["properties"]
        # TensorProperties pickles its state as a (dtype, layout, requires_grad, memory_format, pin_memory) tuple.
        state = props.state if isinstance(props, Opaque) else None
        dtype = state[0] if isinstance(state, tuple) and state else _fields(props, "properties", meta_path).get("dtype")
        shape = _ints(fields.get("size"))
        if not isinstance(dtype, DtypeRef) or shape is None or any(d < 0 for d in shape):
            raise CkptError(Code.CORRUPT, f".metadata entry {fqn!r} has no dtype or size", meta_path)
        places = [(item.get("offset", 0), item.get("length", 0)) for item in items]
        if not all(type(o) is int and type(n) is int and o >= 0 and n >= 0 for o, n in places):
            raise CkptError(Code.CORRUPT, f".metadata entry {fqn!r} has a malformed byte range", meta_path)
        locations = [Location(os.path.join(path, str(item.get("relative_path"))), o, n, encoding="torch.save")
                     for item, (o, n) in zip(items, places)]
        chunks = _chunks(fqn, fields, items, locations, shape, meta_path)
        whole = len(chunks) == 1 and chunks[0].sizes == tuple(shape)
        component.tensors.append(TensorInfo(fqn, dtype.name, shape, chunks[0].location if whole else None,
                                            chunks=() if whole else tuple(chunks)))
    for data_file in sorted(data_files):
        full = os.path.join(path, data_file)
        if not os.path.isfile(full):  # every name is a plain one: checked as .metadata was read
            ckpt.add_problem(Code.MISSING_FILE, ERROR, f"data file {data_file} named by .metadata is missing; it held "
                             f"{_held(storage, data_file)}", full)
            continue
        ckpt.files.append(full)
        component.files.append(full)
        size = os.path.getsize(full)
        ends = [_end(i) for items in storage.values() for i in items if i.get("relative_path") == data_file]
        if max(ends, default=0) > size:
            ckpt.add_problem(Code.TRUNCATED, ERROR, f"{data_file} ends at byte {size}, before byte {max(ends)} that "
                             f".metadata expects: it was cut short, losing {_held(storage, data_file, size)}", full)
    ckpt.components.extend(_split_by_role(component, objects))
    if objects:
        ckpt.metadata["objects"] = objects
    ckpt.steps.extend(_counters(objects, component.tensors, within))
    if unpickler.unsafe_globals:
        ckpt.add_problem(Code.UNSAFE_PICKLE, ERROR, f".metadata imports {', '.join(unpickler.unsafe_globals)}, "
                         "outside the allow-list; it was not executed", meta_path)
    return ckpt


def _objects_read(entries: dict) -> set:
    """The non-tensor items read: the OBJECTS_READ shallowest (a step, a scheduler's last_epoch, a timestamp lie near
    the top; an optimizer's per-parameter items deep), so that thousands of those never crowd the counters out."""
    objects = [fqn for fqn, entry in entries.items() if isinstance(entry, Opaque) and
               "properties" not in entry.fields()]
    return set(sorted(objects, key=lambda fqn: str(fqn).count("."))[:OBJECTS_READ])


def _end(item: dict) -> int:
    offset, length = item.get("offset", 0), item.get("length", 0)
    return offset + length if type(offset) is int and type(length) is int else 0


def _held(storage: dict, data_file: str, beyond: int = -1, shown: int = 8) -> str:
    """The items of `data_file` (ending past byte `beyond`), in words: each tensor, or its chunk, by name."""
    names = [fqn + (f" (chunk at {tuple(item['chunk_offsets'])})" if len(items) > 1 and item.get("chunk_offsets")
                    else "")
             for fqn, items in storage.items() for item in items
             if item.get("relative_path") == data_file and _end(item) > beyond]
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return f"{len(names)} items: {', '.join(names[:shown])}{more}"


def _blob(ckpt: Checkpoint, fqn: str, item: dict | None, path: str, allowed: set):
    """The unpickled torch.save blob of one item (safe reader, nothing imported), or None when it cannot be read."""
    from ckpttool.formats.torchfile import read_raw

    if item is None:
        return None
    full = os.path.join(path, str(item.get("relative_path")))
    offset, length = item.get("offset", 0), item.get("length", 0)
    if type(offset) is not int or type(length) is not int or offset < 0 or length < 0:
        ckpt.add_problem(Code.CORRUPT, ERROR, f".metadata gives item {fqn!r} the byte range {offset!r}+{length!r}",
                         os.path.join(path, METADATA))
        return None
    if not os.path.isfile(full) or not _end(item) or _end(item) > os.path.getsize(full):
        return None  # a missing or cut-short data file, or a malformed range, is reported once, by read()
    try:
        raw = read_raw(full, allowed, span=(offset, length))
    except CkptError as e:
        ckpt.add_problem(e.code, ERROR, f"item {fqn!r} at byte {offset}: {e.reason}", full)
        return None
    # dcp.load takes inert data (weights_only=False): no word of it
    unsafe, _, own = classify(raw.unsafe_globals, raw.called, raw.runs_methods)
    if unsafe:
        ckpt.add_problem(Code.UNSAFE_PICKLE, ERROR,
                         f"item {fqn!r} imports {', '.join(unsafe)}, outside the "
                         "allow-list: dcp.load unpickles it with weights_only=False and would run that code; it was "
                         "not executed", full)
    if own and not any(p.code == Code.UNSAFE_PICKLE and p.severity == WARNING and p.path == full
                       for p in ckpt.problems):
        ckpt.problems.append(own_classes_problem(own, f"item {fqn!r}", full))
    ckpt.pickle_globals.extend(g for g in raw.globals_seen if g not in ckpt.pickle_globals)
    return raw


def _scan_unread(ckpt: Checkpoint, fqn: str, item: dict | None, path: str, budget: list):
    """An item too large (or one too many) to unpickle still has its pickle's opcodes scanned for the globals dcp.load
    would import (weights_only=False): any outside the allow-list is `unsafe_pickle`, as scanned names cannot be told
    built from called. The scans of one checkpoint share one opcode budget."""
    import zipfile

    from ckpttool.formats.pickles import scan_records
    from ckpttool.formats.torchzip import ZIP_ERRORS, Window, _salvage

    if item is None or not isinstance(item.get("relative_path"), str):
        return
    full = os.path.join(path, item["relative_path"])
    if not os.path.isfile(full) or not _end(item) or _end(item) > os.path.getsize(full) or budget[0] <= 0:
        return
    try:
        with Window(full, item.get("offset", 0), item.get("length", 0)) as raw:
            names = [g for info in zipfile.ZipFile(raw).infolist() for g in scan_records(_salvage(raw, info) or b"",
                                                                                        budget)]
    except ZIP_ERRORS:
        return  # unreadable: dcp.load fails on it as well
    unsafe = [g for g in dict.fromkeys(names) if g not in OBJECT_GLOBALS]
    if unsafe:
        ckpt.add_problem(Code.UNSAFE_PICKLE, ERROR, f"item {fqn!r} (not unpickled here, its opcodes scanned) imports "
                         f"{', '.join(unsafe[:8])}, outside the allow-list: dcp.load unpickles it with "
                         "weights_only=False and would run that code; it was not executed", full)


def _object(ckpt: Checkpoint, fqn: str, item: dict | None, path: str, budget: list):
    """A non-tensor item's value as shown in metadata: ints, strings, short bytes, nested dicts (a train state's
    step, a dataloader's state), with torch.save'd BytesIO buffers opened in turn."""
    from ckpttool.formats.torchfile import read_raw
    from ckpttool.formats.torchtree import plain

    length = item.get("length") if item else None
    if type(length) is int and length > OBJECT_LIMIT:
        _scan_unread(ckpt, fqn, item, path, budget)
        return f"<{length} bytes, not read>"
    raw = _blob(ckpt, fqn, item, path, OBJECT_GLOBALS)
    if raw is None:
        return None
    value = raw.obj
    state = value.state if isinstance(value, Opaque) and value.global_name == "_io.BytesIO" else None
    if isinstance(state, tuple) and state and isinstance(state[0], bytes):
        try:  # the buffer holds a torch.save blob (torchtitan): show what it holds
            return plain(read_raw(path, SAFE_GLOBALS, data=state[0]).obj)
        except CkptError:
            return f"<BytesIO, {len(state[0])} bytes>"
    return plain(value)


def _counters(objects: dict, tensors: list, within: str) -> list[StepSource]:
    """Counters of a DCP state dict: `step`/`epoch` items (ints, or one-element tensors such as torchtitan's
    train_state.step), optimizer `step`s and a scheduler's `last_epoch`. What `step` means, the trainer profile says.
    `within`: the DCP dir's own name and "/" where it is a part of a state dir, naming each data file from there."""
    from ckpttool.formats.torchtree import EPOCH_KEYS, STEP_KEYS

    found, updates = [], []
    for fqn, value in objects.items():
        if type(value) is not int:
            continue
        if fqn.rsplit(".", 1)[-1] in STEP_KEYS + EPOCH_KEYS and not OPTIMIZER_STEP.fullmatch(fqn):
            found.append(StepSource(f"DCP state '{fqn}'", value, record=Record.DCP_STATE, key=fqn))
        elif SCHEDULER_STEP.fullmatch(fqn):
            found.append(StepSource(fqn, value, SCHEDULER_STEPS, record=Record.SCHEDULER, key=fqn))
    for t in tensors:
        if t.numel != 1 or t.location is None or t.name.rsplit(".", 1)[-1] not in STEP_KEYS + EPOCH_KEYS:
            continue
        if OPTIMIZER_STEP.fullmatch(t.name):
            updates.append(t)
        else:
            value = _scalar(t)
            if value is not None:
                found.append(StepSource(f"DCP state '{t.name}'", value, record=Record.DCP_STATE, key=t.name,
                                        file=within + os.path.basename(t.location.file)))
    if updates:
        found.extend(_optimizer_updates(updates, within))
    return found


def _optimizer_updates(steps: list[TensorInfo], within: str) -> list[StepSource]:
    """The optimizer's updates: every per-parameter `step` item is read (DCP writes each replicated item once, from
    whichever rank its planner picks, so each rank's data file holds some of them); each file's largest is its
    value. Files may differ in a healthy save (torch steps a parameter only when it has a gradient, and a file may
    hold only parameters some steps left out), so steps.Judge weighs a difference against the run's earlier save."""
    per_file: dict[str, int] = {}
    by_file: dict[str, list[TensorInfo]] = defaultdict(list)
    for t in steps:
        by_file[t.location.file].append(t)
    for file, items in sorted(by_file.items()):
        values = [int(v) for v in _scalars(file, items) if v is not None]
        if values:
            per_file[within + os.path.basename(file)] = max(values)
    if not per_file:
        return []
    return [StepSource("optimizer state step", max(per_file.values()), OPTIMIZER_UPDATES, record=Record.OPTIMIZER,
                       key=f"{within.rstrip('/')}.step" if within else "step",
                       per_file=tuple(sorted(per_file.items())) if len(per_file) > 1 else (), per_file_exact=False)]


def _scalars(file: str, items: list[TensorInfo]) -> list:
    """The values of one data file's one-element tensor items, in `items`' order, each read from its torch.save blob
    in memory (the file opened once, read in offset order); None for one that is unreadable, larger than a scalar's
    blob, or not a whole number."""
    from ckpttool.formats.torchfile import read_raw
    from ckpttool.formats.torchtree import scalar_in

    found: list = [None] * len(items)
    try:
        paths.regular(file)
        with open(file, "rb") as f:
            for i in sorted(range(len(items)), key=lambda i: items[i].location.offset):
                location = items[i].location
                if location.length > SCALAR_ITEM_LIMIT:
                    continue
                f.seek(location.offset)
                blob = f.read(location.length)
                try:
                    raw = read_raw(file, data=blob)
                except CkptError:
                    continue  # verify reads the item and names its damage
                value = scalar_in(raw, blob) if isinstance(raw.obj, TensorRef) and math.prod(raw.obj.shape) == 1 \
                    else None
                if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
                    found[i] = value
    except (CkptError, OSError):
        pass  # read() names a missing or cut-short data file
    return found


def _scalar(info: TensorInfo):
    """A one-element tensor item's value, read from its torch.save blob without torch; None if unreadable."""
    return _scalars(info.location.file, [info])[0]
