"""`ckpttool inspect`: what a checkpoint is, from headers alone."""

from __future__ import annotations

import math
import os
import re
from collections import Counter

from ckpttool import discovery, steps
from ckpttool.identity import identify
from ckpttool.checkpoint import guess_format
from ckpttool.errors import CkptError
from ckpttool.model import ERROR, Checkpoint, Problem, TensorInfo, errors


def model_components(ckpt: Checkpoint):
    return [c for c in ckpt.components if c.role == "model"]


def summarize(ckpt: Checkpoint, tensor_filter: str | None = None, *, list_tensors: bool = False) -> dict:
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
        "identity": identify(ckpt),
        "pickle_globals": ckpt.pickle_globals,
        "metadata": ckpt.metadata,
        "problems": list(ckpt.problems),
    }
    if list_tensors:
        pattern = re.compile(tensor_filter) if tensor_filter else None
        report["tensor_list"] = [
            {"component": c.name, "name": t.name, "shape": list(t.shape), "dtype": t.dtype, "bytes": t.nbytes}
            for c in ckpt.components for t in c.tensors if pattern is None or pattern.search(t.name)]
    return report


def inspect(path: str, tensor_filter: str | None = None, list_tensors: bool = False, stats: bool = False,
            modules: bool = False, depth: int | None = None) -> dict:
    """Report on `path`. A file too broken to read still gives a report: its problem, no components. `stats` reads
    every tensor (of those `tensor_filter` matches) for tensor_stats; `modules` adds module_tree to `depth`."""
    try:
        ckpt = discovery.open_checkpoint_or_run(path)
    except CkptError as e:
        ckpt = Checkpoint(path, guess_format(path), "unreadable")
        ckpt.problems.append(Problem(e.code, ERROR, e.reason, e.path or path))
    report = summarize(ckpt, tensor_filter, list_tensors=list_tensors)
    if stats:
        report["stats"] = tensor_stats(ckpt, tensor_filter)
    if modules:
        report["modules"] = module_tree(ckpt, depth)
    return report


def module_tree(ckpt: Checkpoint, depth: int | None = None) -> list[dict]:
    """Each model component's modules (from its keys, ckpttool.modules) down to `depth` (None: all), in model order:
    tensors, parameters, bytes and dtypes under each; which are optimum-quanto quantized (and how many below); keys
    that share storage with another key (tied weights); and, when the checkpoint has an EMA, how many keys under
    each module the EMA lacks (prefixes aligned as diff aligns them)."""
    from ckpttool.keys import align
    from ckpttool.modules import ancestors, module_of, tree

    emas = [c for c in ckpt.components if c.role == "ema"]
    rows = []
    for index, comp in enumerate(model_components(ckpt)):
        quantized = {m["module"]: m for m in (ckpt.quantization or {}).get("modules", [])
                     if m["component"] == comp.name}
        by_storage: dict[str, list[str]] = {}
        for t in comp.tensors:
            if t.storage_key is not None:
                by_storage.setdefault(t.storage_key, []).append(t.name)
        tied: dict[str, list[str]] = {}
        for names in (n for n in by_storage.values() if len(n) > 1):
            for name in names:
                tied.setdefault(module_of(name, quantized), []).append(
                    f"{name} = {', '.join(other for other in names if other != name)}")
        missing: Counter = Counter()
        ema = emas[0] if emas and index == 0 else None  # an EMA shadows the first (main) model
        if ema is not None:
            alignment = align([t.name for t in comp.tensors], [t.name for t in ema.tensors])
            in_ema = set(alignment.b.values())
            for raw, aligned in alignment.a.items():
                if aligned not in in_ema:
                    missing.update([""] + ancestors(module_of(raw, quantized)))
        quantized_below: Counter = Counter()
        for module in quantized:
            quantized_below.update(ancestors(module))
        for name, node in tree(comp.tensors, quantized).items():
            if not name or (depth is not None and node.depth > depth):
                continue
            rows.append({"component": comp.name, "module": name, "depth": node.depth, "tensors": node.tensors,
                         "parameters": node.parameters, "bytes": node.bytes,
                         "dtypes": dict(sorted(node.dtypes.items())),
                         "quantized": quantized[name]["weights"] if name in quantized else None,
                         "quantized_modules": quantized_below[name], "tied": tied.get(name, []),
                         "missing_in_ema": missing[name] if ema is not None else None})
    return rows


def tensor_stats(ckpt: Checkpoint, tensor_filter: str | None = None) -> list[dict]:
    """min, max, mean, std, L2 norm and NaN/Inf/zero counts of every tensor of every component, streamed on every
    core (ckpttool.blockstats). An optimum-quanto module's keys become one row: its weight, dequantized by
    optimum-quanto (the packed qint4/qint2 ones need a bias to know their shape; without one their raw keys stay)."""
    from ckpttool.blockstats import tensor_moments
    from ckpttool.formats.quanto import quantized_key_of
    from ckpttool.quantization import infer_weight_shape, module_inputs

    pattern = re.compile(tensor_filter) if tensor_filter else None
    rows, infos, loaders = [], [], {}
    for comp in ckpt.components:
        by_name = {t.name: t for t in comp.tensors}
        quantized = {m["module"]: m for m in (ckpt.quantization or {}).get("modules", [])
                     if m["component"] == comp.name and infer_weight_shape(m["module"], by_name)}
        for module, info in quantized.items():
            name = f"{module}.weight"
            if pattern is None or pattern.search(name):
                shape = tuple(infer_weight_shape(module, by_name))
                loaders[len(infos)] = _dequantizer(module_inputs(module, info, by_name), info, shape)
                infos.append(TensorInfo(name, info["dtype"], shape))
                rows.append({"component": comp.name, "name": name, "dtype": info["dtype"], "shape": list(shape),
                             "dequantized": info["weights"]})
        for t in comp.tensors:
            if (quantized and quantized_key_of(t.name, quantized)) or (pattern and not pattern.search(t.name)):
                continue
            infos.append(t)
            rows.append({"component": comp.name, "name": t.name, "dtype": t.dtype, "shape": list(t.shape)})
    for row, moments in zip(rows, tensor_moments(infos, loaders)):
        row.update({k: _finite_or_text(v) for k, v in moments.row().items()})
    return rows


def _dequantizer(inputs: dict, info: dict, shape: tuple):
    """A function giving the module's plain weight, as optimum-quanto dequantizes it."""
    def dequantized():
        from ckpttool.quantization import dequantize_module
        from ckpttool.tensors import load_tensor, torch_dtype

        return dequantize_module({k: load_tensor(v) for k, v in inputs.items()}, info["weights"], shape,
                                 torch_dtype(info["dtype"]))
    return dequantized


def _finite_or_text(value):
    """JSON has no NaN or Infinity: those become the strings "nan", "inf", "-inf"."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def has_errors(report: dict) -> bool:
    return bool(errors(report["problems"]))
