"""Sharded checkpoints: `*.safetensors.index.json` / `pytorch_model.bin.index.json` and their shard files."""

from __future__ import annotations

import glob
import json
import os
import re

from ckpttool import paths
from ckpttool.errors import CkptError
from ckpttool.model import ERROR, WARNING, Checkpoint, Code, Component

INDEX_SUFFIX = ".index.json"
# transformers' and diffusers' shard names (`model-00001-of-00003.safetensors`, `pytorch_model-00001-of-00002.bin`),
# whose index is `<stem>.<suffix>.index.json` (transformers: modeling_utils, `_add_variant` and the shard naming)
SHARD_NAME = re.compile(r"^(?P<stem>.+)-(?P<number>\d{5})-of-(?P<count>\d{5})\.(?P<suffix>safetensors|bin)$")


def find_index(path: str) -> str | None:
    if os.path.isfile(path) and path.endswith(INDEX_SUFFIX):
        return path
    if os.path.isdir(path):
        found = sorted(glob.glob(os.path.join(glob.escape(path), "*" + INDEX_SUFFIX)))
        if len(found) == 1:
            return found[0]
    return None


def detect(path: str) -> bool:
    return find_index(path) is not None


def read_index(index: str) -> tuple[dict, dict]:
    """(weight_map, metadata) of an index file, validated."""
    paths.regular(index)
    try:
        with open(index, encoding="utf-8") as f:
            doc = json.load(f)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CkptError(Code.CORRUPT, f"index is not valid JSON ({e})", index) from None
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CkptError(Code.CORRUPT, "index has no weight_map of tensor name -> shard file", index)
    metadata = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
    return weight_map, metadata


def read(path: str, *, role: str | None = None, name: str | None = None) -> Checkpoint:
    role = role or "model"
    name = name or role
    from ckpttool.formats import hub_cache, read_file

    index = find_index(path)
    weight_map, metadata = read_index(index)
    folder = os.path.dirname(index)
    ckpt = Checkpoint(path, "sharded", f"sharded {'safetensors' if '.safetensors' in index else 'torch'}",
                      files=[index], metadata={k: str(v) for k, v in metadata.items()})
    component = Component(name, role, files=[index])
    for shard in sorted(set(weight_map.values())):
        shard_path = os.path.join(folder, shard)
        if not paths.plain_name(shard) or paths.leaves(shard_path, folder):
            ckpt.add_problem(Code.CORRUPT, ERROR, f"the index names shard {shard!r}, outside its folder (shards lie "
                             "beside their index); it was not read", index, component=name)
            continue
        if not os.path.isfile(shard_path):
            wanted = sum(1 for v in weight_map.values() if v == shard)
            lost = hub_cache.dangling(shard_path) if os.path.islink(shard_path) else None  # a download cut short
            ckpt.add_problem(lost.code if lost else Code.MISSING_FILE, ERROR, f"shard {shard} ({wanted} tensors) "
                             f"{'is missing' if lost is None else 'is not there: ' + lost.reason}", shard_path,
                             component=name)
            continue
        component.files.append(shard_path)
        ckpt.files.append(shard_path)
        try:
            part = read_file(shard_path, role=role)
        except CkptError as e:
            ckpt.add_problem(e.code, ERROR, e.reason, shard_path, component=name)
            continue
        ckpt.absorb_problems(part)
        in_shard = {t.name: t for c in part.components for t in c.tensors}
        expected = {name for name, file in weight_map.items() if file == shard}
        component.tensors.extend(t for name, t in in_shard.items() if name in expected)
        for key in sorted(expected - set(in_shard)):
            ckpt.add_problem(Code.MISSING_FILE, ERROR, f"index maps {key} to {shard}, which does not hold it",
                             shard_path, key=key, component=name)
    total = metadata.get("total_size")
    if isinstance(total, int) and not ckpt.has_errors and total != component.nbytes:
        ckpt.add_problem(Code.CORRUPT, WARNING, f"index total_size {total} differs from the shards' {component.nbytes} "
                         "bytes", index)
    ckpt.components.append(component)
    return ckpt


def shard_groups(folder: str) -> dict[str, tuple[int, dict[int, str]]]:
    """The shard sets in a folder, by the index name they belong to: (shard count their names state, {number: shard
    file name}). Found by name only, so a set whose index is lost is found too."""
    groups: dict[str, tuple[int, dict[int, str]]] = {}
    for name in sorted(os.listdir(folder)):
        m = SHARD_NAME.match(name)
        if m and os.path.isfile(os.path.join(folder, name)):
            index = f"{m['stem']}.{m['suffix']}{INDEX_SUFFIX}"
            count, shards = groups.setdefault(index, (int(m["count"]), {}))
            if int(m["count"]) == count:
                shards[int(m["number"])] = name
    return groups


def build_index(folder: str, shards: list[str], metadata: dict | None = None) -> dict:
    """An index document for these shard files, from their own headers: each tensor mapped to the shard that holds
    it, `total_size` the bytes of them all. CkptError when a shard cannot be read or two shards hold one tensor."""
    from ckpttool.formats import read_file

    weight_map, total = {}, 0
    for shard in shards:
        part = read_file(os.path.join(folder, shard))
        errors = [p for p in part.problems if p.severity == ERROR]
        if errors:
            raise CkptError(errors[0].code, errors[0].message, os.path.join(folder, shard))
        for comp in part.components:
            total += comp.nbytes
            for t in comp.tensors:
                if t.name in weight_map:
                    raise CkptError(Code.CORRUPT, f"{t.name} is in both {weight_map[t.name]} and {shard}",
                                    os.path.join(folder, shard))
                weight_map[t.name] = shard
    return {"metadata": {**(metadata or {}), "total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
