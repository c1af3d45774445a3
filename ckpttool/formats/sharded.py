"""Sharded checkpoints: `*.safetensors.index.json` / `pytorch_model.bin.index.json` and their shard files."""

from __future__ import annotations

import glob
import json
import os

from ckpttool.errors import CkptError
from ckpttool.model import Checkpoint, Component

INDEX_SUFFIX = ".index.json"


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
    try:
        with open(index, encoding="utf-8") as f:
            doc = json.load(f)
    except (UnicodeDecodeError, ValueError) as e:
        raise CkptError("corrupt", f"index is not valid JSON ({e})", index) from None
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CkptError("corrupt", "index has no weight_map of tensor name -> shard file", index)
    metadata = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
    return weight_map, metadata


def read(path: str, name="model", role="model") -> Checkpoint:
    from ckpttool.formats import read_file

    index = find_index(path)
    weight_map, metadata = read_index(index)
    folder = os.path.dirname(index)
    ckpt = Checkpoint(path, "sharded", f"sharded {'safetensors' if '.safetensors' in index else 'torch'}",
                      files=[index], metadata={k: str(v) for k, v in metadata.items()})
    component = Component(name, role, files=[index])
    for shard in sorted(set(weight_map.values())):
        shard_path = os.path.join(folder, shard)
        if os.path.basename(shard) != shard or not os.path.isfile(shard_path):
            wanted = sum(1 for v in weight_map.values() if v == shard)
            ckpt.add_problem("missing_file", "error", f"shard {shard} ({wanted} tensors) is missing", shard_path,
                             component=name)
            continue
        component.files.append(shard_path)
        ckpt.files.append(shard_path)
        try:
            part = read_file(shard_path, role=role)
        except CkptError as e:
            ckpt.add_problem(e.code, "error", e.reason, shard_path, component=name)
            continue
        ckpt.absorb_problems(part)
        in_shard = {t.name: t for c in part.components for t in c.tensors}
        expected = {name for name, file in weight_map.items() if file == shard}
        component.tensors.extend(t for name, t in in_shard.items() if name in expected)
        for key in sorted(expected - set(in_shard)):
            ckpt.add_problem("missing_file", "error", f"index maps {key} to {shard}, which does not hold it",
                             shard_path, key=key, component=name)
    total = metadata.get("total_size")
    if isinstance(total, int) and not ckpt.has_errors and total != component.nbytes:
        ckpt.add_problem("corrupt", "warning", f"index total_size {total} differs from the shards' {component.nbytes} "
                         "bytes", index)
    ckpt.components.append(component)
    return ckpt
