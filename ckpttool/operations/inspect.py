"""`ckpttool inspect`: what a checkpoint is, from headers alone."""

from __future__ import annotations

import os
import re
from collections import Counter

from ckpttool import steps
from ckpttool.errors import CkptError
from ckpttool.formats import guess_format, open_checkpoint
from ckpttool.model import ERROR, Checkpoint, Problem

def model_components(ckpt: Checkpoint):
    return [c for c in ckpt.components if c.role == "model"]


def summarize(ckpt: Checkpoint, tensor_filter: str | None = None, list_tensors: bool = False) -> dict:
    models = model_components(ckpt)
    model_tensors = [t for c in models for t in c.tensors]
    dtypes = Counter(t.dtype for t in model_tensors)
    report = {
        "path": ckpt.path,
        "format": ckpt.format,
        "layout": ckpt.layout,
        "trainer": ckpt.trainer,
        "step": steps.global_step(ckpt),
        "epoch": steps.epoch(ckpt),
        "step_sources": [{"source": s.source, "kind": s.kind, "value": s.value, "meaning": s.meaning,
                          "meaning_text": steps.MEANINGS.get(s.meaning, "not known: shown, never compared"),
                          **({"note": s.note} if s.note else {})} for s in ckpt.steps],
        "tensors": len(model_tensors),
        "parameters": sum(t.numel for t in model_tensors),
        "bytes": sum(c.nbytes for c in models),
        "dtypes": dict(sorted(dtypes.items())),
        "components": [{"name": c.name, "role": c.role, "files": c.files, "tensors": len(c.tensors),
                        "parameters": sum(t.numel for t in c.tensors), "bytes": c.nbytes} for c in ckpt.components],
        "files": ckpt.files,
        "file_bytes": sum(os.path.getsize(f) for f in ckpt.files if os.path.isfile(f)),
        "quantization": ckpt.quantization,
        "pickle_globals": ckpt.pickle_globals,
        "metadata": ckpt.metadata,
        "problems": [p.to_json() for p in ckpt.problems],
    }
    if list_tensors:
        pattern = re.compile(tensor_filter) if tensor_filter else None
        report["tensor_list"] = [
            {"component": c.name, "name": t.name, "shape": list(t.shape), "dtype": t.dtype, "bytes": t.nbytes}
            for c in ckpt.components for t in c.tensors if pattern is None or pattern.search(t.name)]
    return report


def inspect(path: str, tensor_filter: str | None = None, list_tensors: bool = False) -> dict:
    """Report on `path`. A file too broken to read still gives a report: its problem, no components."""
    try:
        ckpt = open_checkpoint(path)
    except CkptError as e:
        ckpt = Checkpoint(path, guess_format(path), "unreadable")
        ckpt.problems.append(Problem(e.code, ERROR, e.reason, e.path or path))
    return summarize(ckpt, tensor_filter, list_tensors)


def has_errors(report: dict) -> bool:
    return any(p["severity"] == ERROR for p in report["problems"])
