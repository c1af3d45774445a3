"""Key analysis shared by diff, remap and the resume gate: seeing through wrapper prefixes and quantized layouts.

`align(a, b)` finds the renaming that makes two key sets line up (DDP `module.`, torch.compile `_orig_mod.`, nested
combinations, a common prefix on one side) and says which rule it applied. `compare(a, b)` then lists what still
differs: keys only on one side, shape and dtype mismatches, and optimum-quanto modules quantized on one side only
(one finding per module, not a flood of `_data`/`_scale` keys).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ckpttool.formats import quanto
from ckpttool.model import TensorInfo

QUANTO_SUFFIXES = (".weight._data._data", ".weight._data", ".weight._scale", ".weight._shift", ".input_scale",
                   ".output_scale")


def strip_wrappers(key: str) -> str:
    """Drop DDP/DataParallel `module.` segments at the start and torch.compile `_orig_mod.` segments anywhere."""
    parts = key.split(".")
    out = []
    for part in parts:
        if part == "_orig_mod" or (part == "module" and not out):
            continue
        out.append(part)
    return ".".join(out) or key


def _base_key(key: str) -> str:
    """The plain key a quanto key stands for (`x.weight._data` -> `x.weight`), for measuring overlap."""
    for suffix in QUANTO_SUFFIXES[:4]:
        if key.endswith(suffix):
            return key[: -len(suffix)] + ".weight"
    return key


def _overlap(a: dict, b: dict) -> int:
    return len({_base_key(k) for k in a.values()} & {_base_key(k) for k in b.values()})


def _common_head(keys) -> str | None:
    heads = {k.split(".", 1)[0] for k in keys}
    return next(iter(heads)) if len(heads) == 1 and all("." in k for k in keys) else None


@dataclass
class Alignment:
    a: dict  # raw key -> aligned key
    b: dict
    rules: list = field(default_factory=list)


def align(keys_a, keys_b, *, normalize: bool = True, labels=("A", "B")) -> Alignment:
    a = {k: k for k in keys_a}
    b = {k: k for k in keys_b}
    result = Alignment(a, b)
    if not normalize or not a or not b:
        return result
    for side, mapping in zip(labels, (a, b)):
        stripped = {k: strip_wrappers(v) for k, v in mapping.items()}
        changed = sum(stripped[k] != v for k, v in mapping.items())
        if changed and len(set(stripped.values())) == len(stripped):
            removed = sorted({seg for k in mapping for seg in ("module", "_orig_mod")
                              if seg in k.split(".") and stripped[k] != k})
            mapping.update(stripped)
            prefixes = " and ".join(repr(s + ".") for s in removed)
            result.rules.append(f"stripped {prefixes} from {changed} keys of {side}")
    best = _overlap(a, b)
    for side, mapping, other in ((labels[0], a, b), (labels[1], b, a)):
        head = _common_head(mapping.values())
        if head is None or _common_head(other.values()) == head:
            continue
        trial = {k: v.split(".", 1)[1] for k, v in mapping.items()}
        if len(set(trial.values())) == len(trial) and _overlap(trial, other) > best:
            mapping.update(trial)
            best = _overlap(a, b)
            result.rules.append(f"stripped common prefix {head + '.'!r} from {side}")
    return result


@dataclass
class KeyReport:
    only_a: list = field(default_factory=list)
    only_b: list = field(default_factory=list)
    shape_mismatches: list = field(default_factory=list)  # {"key", "a", "b"}
    dtype_mismatches: list = field(default_factory=list)
    quantized: list = field(default_factory=list)  # {"module", "quantized_side", "qtype", "dtype"}
    common: list = field(default_factory=list)  # (aligned key, TensorInfo a, TensorInfo b)
    rules: list = field(default_factory=list)

    @property
    def same_keys(self) -> bool:
        return not (self.only_a or self.only_b or self.shape_mismatches or self.dtype_mismatches or self.quantized)


def renamed(tensors, mapping) -> list[TensorInfo]:
    """The tensors under their aligned names (the same objects where the name is unchanged: most of them)."""
    return [t if mapping[t.name] == t.name else dataclasses.replace(t, name=mapping[t.name]) for t in tensors]


def compare(tensors_a, tensors_b, *, normalize: bool = True, labels=("A", "B")) -> KeyReport:
    alignment = align([t.name for t in tensors_a], [t.name for t in tensors_b], normalize=normalize, labels=labels)
    a = {t.name: t for t in renamed(tensors_a, alignment.a)}
    b = {t.name: t for t in renamed(tensors_b, alignment.b)}
    report = KeyReport(rules=alignment.rules)
    qa, qb = quanto.quantized_modules(a.values()), quanto.quantized_modules(b.values())
    for side, modules, mine, other in (("a", qa, a, b), ("b", qb, b, a)):
        for module, info in modules.items():
            if module + ".weight" in other and module not in (qb if side == "a" else qa):
                report.quantized.append({"module": module, "quantized_side": side, "qtype": info["weights"],
                                         "dtype": info["dtype"]})
                for key in [k for k in mine if quanto.quantized_key_of(k, {module: info}) == module]:
                    del mine[key]
                for suffix in (".weight", ".input_scale", ".output_scale"):
                    other.pop(module + suffix, None)
    report.only_a = sorted(set(a) - set(b))
    report.only_b = sorted(set(b) - set(a))
    for key in sorted(set(a) & set(b)):
        ta, tb = a[key], b[key]
        if ta.shape != tb.shape:
            report.shape_mismatches.append({"key": key, "a": list(ta.shape), "b": list(tb.shape)})
        elif ta.dtype != tb.dtype:
            report.dtype_mismatches.append({"key": key, "a": ta.dtype, "b": tb.dtype})
        else:
            report.common.append((key, ta, tb))
    return report
