"""torch.distributed.checkpoint directories: `.metadata` (a pickle of dataclasses) plus `*.distcp` data files.

The metadata is read with the safe pickle reader (DCP's own dataclasses allowed as inert records), so listing a DCP
checkpoint imports neither torch nor anything the file names.
"""

from __future__ import annotations

import os
from collections import defaultdict

from ckpttool.errors import CkptError
from ckpttool.formats.pickles import DCP_GLOBALS, SAFE_GLOBALS, DtypeRef, Opaque, unpickle
from ckpttool.model import Checkpoint, Component, Location, TensorInfo

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
        groups.setdefault(head, []).append(TensorInfo(rest, t.dtype, t.shape, t.location, t.storage_key))
    if not any(role_of_key(head) for head in groups):
        return [component]
    if len(groups) == 1 and role_of_key(next(iter(groups))) == component.role:
        return [Component(component.name, component.role, component.files, next(iter(groups.values())))]
    return [Component(head, role_of_key(head) or "extra", component.files, tensors)
            for head, tensors in groups.items()]


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
    storage = defaultdict(list)  # fqn -> [_StorageInfo fields]
    for index, info in (meta.get("storage_data") or {}).items():
        if isinstance(index, Opaque) and isinstance(info, Opaque):
            storage[index.fields().get("fqn")].append(info.fields())

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
        shape = fields.get("size")
        if not isinstance(dtype, DtypeRef) or not isinstance(shape, tuple):
            raise CkptError("corrupt", f".metadata entry {fqn!r} has no dtype or size", meta_path)
        location = None
        if len(items) == 1:
            item = items[0]
            location = Location(os.path.join(path, str(item.get("relative_path"))), int(item.get("offset", 0)),
                                int(item.get("length", 0)), encoding="torch.save")
        component.tensors.append(TensorInfo(fqn, dtype.name, shape, location))
    for data_file in sorted(data_files):
        full = os.path.join(path, data_file)
        if os.path.basename(data_file) != data_file or not os.path.isfile(full):
            ckpt.add_problem("missing_file", "error", f"data file {data_file} named by .metadata is missing", full)
            continue
        ckpt.files.append(full)
        component.files.append(full)
        ends = [int(i.get("offset", 0)) + int(i.get("length", 0)) for items in storage.values() for i in items
                if i.get("relative_path") == data_file]
        if ends and max(ends) > os.path.getsize(full):
            ckpt.add_problem("truncated", "error", f"{data_file} ends before byte {max(ends)} that .metadata "
                             "expects: it was cut short", full)
    ckpt.components.extend(_split_by_role(component))
    if unpickler.unsafe_globals:
        ckpt.add_problem("unsafe_pickle", "error", f".metadata imports {', '.join(unpickler.unsafe_globals)}, "
                         "outside the allow-list; it was not executed", meta_path)
    return ckpt
