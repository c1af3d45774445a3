"""torch.distributed.checkpoint directories: `.metadata` (a pickle of dataclasses) plus `*.distcp` data files.

The metadata is read with the safe pickle reader (DCP's own dataclasses allowed as inert records), so listing a DCP
checkpoint imports neither torch nor anything the file names.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict

from ckpttool.errors import CkptError
from ckpttool.formats.pickles import DCP_GLOBALS, SAFE_GLOBALS, DtypeRef, Opaque, unpickle
from ckpttool.model import Checkpoint, Chunk, Component, Location, TensorInfo

METADATA = ".metadata"


def detect(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, METADATA))


def _fields(obj, what, path) -> dict:
    if not isinstance(obj, Opaque):
        raise CkptError("corrupt", f".metadata {what} is not a DCP record", path)
    return obj.fields()


def _split_by_role(component: Component) -> list[Component]:
    """A DCP state dict is usually {"model": ..., "optimizer": ...}: when its top-level names include a known part
    (model, optimizer, ...), each top-level name becomes its own component."""
    from ckpttool.formats.torchfile import role_of_key

    groups: dict[str, list[TensorInfo]] = {}
    for t in component.tensors:
        head, _, rest = t.name.partition(".")
        if not rest:
            return [component]
        groups.setdefault(head, []).append(TensorInfo(rest, t.dtype, t.shape, t.location, t.storage_key, t.chunks))
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
            raise CkptError("corrupt", f".metadata chunk of {fqn!r} at {offsets} has no valid size", meta_path)
        found.append(Chunk(offsets, sizes, location))
    if sum(math.prod(c.sizes) for c in found) != math.prod(shape):
        raise CkptError("corrupt", f".metadata chunks of {fqn!r} do not cover its {tuple(shape)} elements exactly",
                        meta_path)
    return found


def _ints(value) -> tuple | None:
    """A tuple of ints (torch.Size, list), or None for anything else a damaged file holds."""
    if isinstance(value, (tuple, list)) and all(type(v) is int for v in value):
        return tuple(value)
    return None


def read(path: str, name="model", role="model") -> Checkpoint:
    meta_path = os.path.join(path, METADATA)
    with open(meta_path, "rb") as f:
        try:
            obj, unpickler = unpickle(f.read(), SAFE_GLOBALS | DCP_GLOBALS, what=".metadata")
        except CkptError as e:
            raise CkptError(e.code, e.reason, meta_path) from None
    meta = _fields(obj, "root", meta_path)
    entries = meta.get("state_dict_metadata")
    if not isinstance(entries, dict):
        raise CkptError("corrupt", ".metadata has no state_dict_metadata", meta_path)
    storage = defaultdict(list)  # fqn -> [_StorageInfo fields, with the chunk's offsets from its MetadataIndex]
    for index, info in (meta.get("storage_data") or {}).items():
        if isinstance(index, Opaque) and isinstance(info, Opaque):
            fields = index.fields()
            storage[fields.get("fqn")].append({**info.fields(), "chunk_offsets": fields.get("offset")})

    ckpt = Checkpoint(path, "dcp", "torch.distributed.checkpoint", files=[meta_path])
    component = Component(name, role, files=[meta_path])
    data_files = set()
    for fqn, entry in entries.items():
        fields = _fields(entry, f"entry {fqn!r}", meta_path)
        items = storage.get(fqn, [])
        for item in items:
            data_files.add(str(item.get("relative_path")))
        if "properties" not in fields:  # BytesStorageMetadata: a pickled Python object
            ckpt.metadata.setdefault("objects", []).append(fqn)
            continue
        props = fields["properties"]
        # TensorProperties pickles its state as a (dtype, layout, requires_grad, memory_format, pin_memory) tuple.
        state = props.state if isinstance(props, Opaque) else None
        dtype = state[0] if isinstance(state, tuple) and state else _fields(props, "properties", meta_path).get("dtype")
        shape = _ints(fields.get("size"))
        if not isinstance(dtype, DtypeRef) or shape is None or any(d < 0 for d in shape):
            raise CkptError("corrupt", f".metadata entry {fqn!r} has no dtype or size", meta_path)
        places = [(item.get("offset", 0), item.get("length", 0)) for item in items]
        if not all(type(o) is int and type(n) is int and o >= 0 and n >= 0 for o, n in places):
            raise CkptError("corrupt", f".metadata entry {fqn!r} has a malformed byte range", meta_path)
        locations = [Location(os.path.join(path, str(item.get("relative_path"))), o, n, encoding="torch.save")
                     for item, (o, n) in zip(items, places)]
        chunks = _chunks(fqn, fields, items, locations, shape, meta_path)
        whole = len(chunks) == 1 and chunks[0].sizes == tuple(shape)
        component.tensors.append(TensorInfo(fqn, dtype.name, shape, chunks[0].location if whole else None,
                                            chunks=() if whole else tuple(chunks)))
    for data_file in sorted(data_files):
        full = os.path.join(path, data_file)
        if os.path.basename(data_file) != data_file or not os.path.isfile(full):
            ckpt.add_problem("missing_file", "error", f"data file {data_file} named by .metadata is missing", full)
            continue
        ckpt.files.append(full)
        component.files.append(full)
        ends = [i.get("offset", 0) + i.get("length", 0) for items in storage.values() for i in items
                if type(i.get("offset", 0)) is int and type(i.get("length", 0)) is int
                if i.get("relative_path") == data_file]
        if ends and max(ends) > os.path.getsize(full):
            ckpt.add_problem("truncated", "error", f"{data_file} ends before byte {max(ends)} that .metadata "
                             "expects: it was cut short", full)
    ckpt.components.extend(_split_by_role(component))
    if unpickler.unsafe_globals:
        ckpt.add_problem("unsafe_pickle", "error", f".metadata imports {', '.join(unpickler.unsafe_globals)}, "
                         "outside the allow-list; it was not executed", meta_path)
    return ckpt
