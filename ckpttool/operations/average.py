"""`ckpttool average`: the uniform, weighted or EMA average of checkpoints of one model, streamed tensor by tensor.

Each output tensor is accumulated in float64 from one input tensor at a time (memory: the accumulator and one input
tensor, however many checkpoints), divided by the sum of the weights, and rounded to the stored dtype, so N copies of
one checkpoint average to it bit for bit. Keys are aligned as `diff` aligns them (wrapper prefixes seen through) and
named as in the newest input; integer and bool tensors (counters, index buffers) are not averaged but taken from the
newest input, and the report says which.
"""

from __future__ import annotations

import math

from ckpttool import steps
from ckpttool.checkpoint import open_checkpoint
from ckpttool.dtypes import AVERAGED
from ckpttool.errors import CkptError, UsageError
from ckpttool.keys import align, compare
from ckpttool.model import Code
from ckpttool.operations import output
from ckpttool.operations.diff import problems_of, select_component


def ema_weights(count: int, decay: float) -> list[float]:
    """The weight of each of `count` checkpoints, oldest first, in ema = decay * ema + (1 - decay) * next started
    from the oldest: decay^(n-1) for the oldest, (1 - decay) * decay^(n-1-k) for the k-th after it (they sum to 1)."""
    return [decay ** (count - 1)] + [(1 - decay) * decay ** (count - 1 - k) for k in range(1, count)]


def plan_weights(sources: list[str], found_steps: list, weights: list[float] | None, ema: float | None):
    """(order of the inputs, weight of each in that order, mode)."""
    count = len(sources)
    if weights is not None and ema is not None:
        raise UsageError("give --weights or --ema, not both")
    if ema is not None:
        if not 0 < ema < 1:
            raise UsageError(f"--ema {ema}: the decay must lie strictly between 0 and 1 (e.g. 0.999)")
        unknown = [s for s, step in zip(sources, found_steps) if step is None]
        if unknown:
            raise UsageError(f"--ema needs each checkpoint's step to put them in order; {unknown[0]} has none "
                             "(`ckpttool inspect` shows where steps come from); use --weights instead")
        order = sorted(range(count), key=lambda i: found_steps[i])
        return order, ema_weights(count, ema), f"ema {ema:g}"
    if weights is not None:
        if len(weights) != count:
            raise UsageError(f"--weights has {len(weights)} values for {count} checkpoints")
        if not all(math.isfinite(w) for w in weights) or not math.isfinite(sum(weights)):
            raise UsageError(f"--weights {','.join(map(str, weights))}: each weight and their sum must be finite "
                             "(inf, nan or an overflowing sum would write inf or nan); give relative weights such as "
                             "1,3")
        if any(w < 0 for w in weights) or not sum(weights) > 0:
            raise UsageError("--weights must be non-negative with a positive sum")
        return list(range(count)), list(weights), "weighted"
    return list(range(count)), [1.0] * count, "uniform"


def average(sources: list[str], dst: str, *, weights: list[float] | None = None, ema: float | None = None,
            component: str = "model", normalize: bool = True, to: str | None = None, force: bool = False) -> dict:
    if len(sources) < 2:
        raise UsageError("average needs at least two checkpoints and an output path")
    fmt = output.target_format(dst, to)
    for src in sources:
        output.check_destination(src, dst, force=force)
    ckpts = [open_checkpoint(src) for src in sources]
    comps = [select_component(ckpt, component, src) for ckpt, src in zip(ckpts, sources)]
    for ckpt, comp, src in zip(ckpts, comps, sources):
        quantized = [m["module"] for m in (ckpt.quantization or {}).get("modules", []) if m["component"] == comp.name]
        if quantized:  # int8 data would be taken from the newest and the scales averaged: a wrong weight
            raise UsageError(f"{src}: {len(quantized)} modules are optimum-quanto quantized ({quantized[0]}, ...); "
                             f"average plain weights: `ckpttool remap {src} plain.safetensors --dequantize` first")
    found_steps = [steps.global_step(ckpt) for ckpt in ckpts]
    order, ordered_weights, mode = plan_weights(sources, found_steps, weights, ema)
    known = all(s is not None for s in found_steps)
    newest = max(range(len(sources)), key=lambda i: (found_steps[i], i)) if known else len(sources) - 1
    reference = comps[newest]
    matched, rules = {}, []
    for i, comp in enumerate(comps):
        if i == newest:
            continue
        report = compare(comp.tensors, reference.tensors, normalize=normalize)
        problems = [p for p in problems_of(report, sources[i], sources[newest]) if p.code != Code.DTYPE_MISMATCH]
        if problems:
            raise CkptError(problems[0].code, f"{sources[i]} and {sources[newest]} are not checkpoints of one "
                            f"model: {'; '.join(p.message for p in problems[:3])}. `ckpttool diff {sources[i]} "
                            f"{sources[newest]}` shows every difference; nothing written")
        alignment = align([t.name for t in reference.tensors], [t.name for t in comp.tensors], normalize=normalize)
        by_aligned = {alignment.b[t.name]: t for t in comp.tensors}
        matched[i] = {t.name: by_aligned[alignment.a[t.name]] for t in reference.tensors}
        rules += [r for r in report.rules if r not in rules]
    matched[newest] = {t.name: t for t in reference.tensors}
    total = sum(ordered_weights)
    taken = [t.name for t in reference.tensors if t.dtype not in AVERAGED]

    def produce():
        from ckpttool.tensors import load_tensor, torch_dtype

        for t in reference.tensors:
            if t.dtype not in AVERAGED:
                yield t.name, load_tensor(t)
                continue
            acc = None
            for i, weight in zip(order, ordered_weights):
                value = load_tensor(matched[i][t.name]).double()
                acc = value.mul_(weight) if acc is None else acc.add_(value, alpha=weight)
                del value
            yield t.name, acc.div_(total).to(torch_dtype(t.dtype))

    specs = [(t.name, t.dtype, tuple(t.shape)) for t in reference.tensors]
    output.write_tensors(dst, fmt, specs, produce())
    return {"output": dst, "format": fmt, "mode": mode, "component": component, "normalization": rules,
            "sources": [{"path": sources[i], "step": found_steps[i], "weight": w / total}
                        for i, w in zip(order, ordered_weights)],
            "newest": sources[newest], "averaged": len(specs) - len(taken), "taken_from_newest": taken}
