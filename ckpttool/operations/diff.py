"""`ckpttool diff`: key, shape, dtype (and with --values, content) differences between two checkpoints, or between a
checkpoint and a model, seeing through wrapper prefixes and quantized layouts."""

from __future__ import annotations

import importlib
import math
import os
import sys
from dataclasses import dataclass, field, replace

from ckpttool.checkpoint import open_checkpoint
from ckpttool.errors import UsageError
from ckpttool.identity import apart, identify
from ckpttool.keys import KeyReport, align, compare
from ckpttool.model import ERROR, Code, Component, Problem, Severity, TensorInfo


@dataclass
class DiffReport:
    """What `diff` found between A and B: the key, shape and dtype differences (and with --values, content); for two
    pipelines, every component's own report in `components`, every difference named after its component."""

    a: str
    b: str
    component: str | None
    normalization: list = field(default_factory=list)  # the key rules applied to make the sides meet
    only_a: list = field(default_factory=list)
    only_b: list = field(default_factory=list)
    shape_mismatches: list = field(default_factory=list)
    dtype_mismatches: list = field(default_factory=list)
    quantized_keys: list = field(default_factory=list)
    compared: int = 0
    values: dict | None = None
    problems: list = field(default_factory=list)  # Problem
    fix: str | None = None
    components: list | None = None  # DiffReport of each component two pipelines share
    only_a_components: list = field(default_factory=list)
    only_b_components: list = field(default_factory=list)
    identities: dict = field(default_factory=dict)  # "a", "b": what each side is (identity.identify), or None
    apart: str | None = None  # why A and B are not for each other by what they are

    @property
    def same(self) -> bool:
        return not self.problems

    def to_json(self) -> dict:
        out = {"same": self.same, "a": self.a, "b": self.b, "component": self.component}
        if self.components is not None:
            out.update(components=[c.to_json() for c in self.components],
                       different_components=[c.component for c in self.components if not c.same],
                       only_a_components=self.only_a_components, only_b_components=self.only_b_components)
        out.update(normalization=self.normalization, only_a=self.only_a, only_b=self.only_b,
                   shape_mismatches=self.shape_mismatches, dtype_mismatches=self.dtype_mismatches,
                   quantized_keys=self.quantized_keys, compared=self.compared, values=self.values,
                   problems=[p.to_json() for p in self.problems], fix=self.fix, identity=self.identities,
                   apart=self.apart)
        return out


def select_component(ckpt, wanted: str, path: str) -> Component:
    """The component to work on; a broken one (or one lost to a broken file) is exit 1, never a partial result."""
    from ckpttool.operations.output import refuse_broken

    comp = ckpt.component(wanted)
    if comp is None:
        refuse_broken(ckpt)
        have = ", ".join(f"{c.name} ({c.role})" for c in ckpt.components) or "none"
        raise UsageError(f"{path}: no component {wanted!r}; it has: {have}. Pick one with --component")
    refuse_broken(ckpt, comp)
    return comp


def load_model(spec: str):
    """Call `module:callable` (the user's own code, asked for explicitly) and return the nn.Module it builds."""
    if ":" not in spec:
        raise UsageError(f"--model {spec!r}: expected module:callable, e.g. mypkg.models:build_unet")
    module_name, _, attr = spec.partition(":")
    sys.path.insert(0, os.getcwd())
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise UsageError(f"--model {spec}: cannot import it ({e})") from None
    finally:
        sys.path.pop(0)
    import torch

    model = factory() if callable(factory) and not isinstance(factory, torch.nn.Module) else factory
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"--model {spec}: returned {type(model).__name__}, not a torch.nn.Module")
    return model


def model_tensors(model) -> list[TensorInfo]:
    """A model's state_dict as TensorInfos (in memory: no file location)."""
    return [TensorInfo(k, str(v.dtype).removeprefix("torch."), tuple(v.shape)) for k, v in model.state_dict().items()]


def fix_command(a_path: str, b_desc: str, b_is_model: bool) -> str:
    """The remap command that makes A's keys load into B."""
    target = f"--model {b_desc}" if b_is_model else f"--like {b_desc}"
    stem, ext = os.path.splitext(os.path.basename(os.path.normpath(a_path)))
    return f"ckpttool remap {a_path} {stem}-remapped{ext if ext in ('.pt', '.safetensors') else '.safetensors'} " \
           f"{target}"


def problems_of(report: KeyReport, a: str = "A", b: str = "B", *, dtype_severity: Severity = ERROR,
                strict: bool = False) -> list[Problem]:
    """Contract problems for what a key comparison found; `a`/`b` name the sides in the messages. `strict`: B is a
    live model, whose load_state_dict sees raw keys, so a prefix the comparison saw through is still a failure."""
    problems = []
    if strict and report.rules:
        problems.append(Problem(Code.KEY_MISMATCH, ERROR,
                                f"load_state_dict(strict=True) would fail: keys match only after "
                                f"{'; '.join(report.rules)}"))
    for q in report.quantized:
        side = a if q["quantized_side"] == "a" else b
        problems.append(Problem(Code.QUANTIZED_KEYS, ERROR,
                                f"{q['module']} is {q['qtype']}-quantized (optimum-quanto) in {side} only: "
                                f"._data/._scale keys where the other side has {q['module']}.weight", key=q["module"]))
    if report.only_a or report.only_b:
        problems.append(Problem(Code.KEY_MISMATCH, ERROR,
                                f"{len(report.only_a)} keys only in {a} ({', '.join(report.only_a[:3])}), "
                                f"{len(report.only_b)} only in {b} ({', '.join(report.only_b[:3])})"))
    for m in report.shape_mismatches:
        problems.append(Problem(Code.SHAPE_MISMATCH, ERROR,
                                f"{m['key']}: {m['a']} in {a}, {m['b']} in {b}", key=m["key"]))
    for m in report.dtype_mismatches:
        problems.append(Problem(Code.DTYPE_MISMATCH, dtype_severity,
                                f"{m['key']}: {m['a']} in {a}, {m['b']} in {b}", key=m["key"]))
    return problems


def in_model_order(report: KeyReport, tensors_a, tensors_b, normalize: bool = True) -> list:
    """The common (key, a, b) entries in A's own key order (compare sorts them): modules then come in model order,
    as far as the file keeps it (a .pt keeps the state dict's order; safetensors sorts its keys)."""
    aligned = align([t.name for t in tensors_a], [t.name for t in tensors_b], normalize=normalize).a
    rank = {key: i for i, key in enumerate(aligned.values())}
    return sorted(report.common, key=lambda entry: rank.get(entry[0], len(rank)))


def compare_values(common, atol: float, rtol: float, module_depth: int | None = None) -> dict:
    """Equal tensors (identical bytes cost one read and a compare) and, for the rest, max abs diff, relative L2 and
    cosine, streamed block by block on every core (ckpttool.blockstats); and the relative change of each module
    down to `module_depth`, when given (it costs a pass over equal tensors too: their norms count)."""
    from ckpttool.blockstats import compare_pairs, equal

    by_module = module_depth is not None
    sums = compare_pairs([(a, b) for _, a, b in common], atol, rtol, norms=by_module)
    same, close, different = 0, [], []
    for (key, _, _), s in zip(common, sums):
        if equal(s):
            same += 1
        else:
            within = s.finite and not s.beyond_tolerance
            (close if within else different).append({"key": key, **s.row()})
    return {"equal": same, "close": close, "different": different,
            "modules": module_changes([key for key, _, _ in common], sums, module_depth) if by_module else None}


def module_changes(keys: list[str], sums: list, depth: int) -> list[dict]:
    """Per module (keys grouped by their first `depth` name parts, in model order): tensors, how many changed, and
    the relative change |A - B| / |B| over all of them (float, or "inf"/"nan" text where B is zero or not finite)."""
    from ckpttool.blockstats import equal
    from ckpttool.modules import module_of

    groups: dict[str, list] = {}
    for key, s in zip(keys, sums):
        module = ".".join(module_of(key).split(".")[:depth]) or "(top level)"
        groups.setdefault(module, []).append(s)
    rows = []
    for module, group in groups.items():
        diff_sq, b_sq = sum(s.diff_sq for s in group), sum(s.b_sq for s in group)
        change = math.sqrt(diff_sq) / math.sqrt(b_sq) if b_sq else (0.0 if not diff_sq else math.inf)
        rows.append({"module": module, "tensors": len(group), "changed": sum(not equal(s) for s in group),
                     "rel_change": change if math.isfinite(change) else ("inf" if change > 0 else "nan")})
    return rows


def plot(report: DiffReport, path: str):
    """diff --plot: the per-module relative change as a PNG, or an HTML page with its tables."""
    from ckpttool import charts

    modules = report.values["modules"]
    title = f"relative change per module: {os.path.basename(report.a)} against {os.path.basename(report.b)}"
    fig, _ = charts.module_change_chart(modules, title)
    rows = [[m["module"], m["tensors"], m["changed"], _short(m["rel_change"])] for m in modules]
    tensors = [[d["key"], _short(d["max_abs"]), _short(d["rel_l2"]), f"{d['cosine']:.6f}"]
               for d in report.values["different"] + report.values["close"]]
    charts.write(path, fig, title, [
        "<h2>Modules</h2>" + charts.table(["module", "tensors", "changed", "relative change"], rows),
        "<h2>Changed tensors</h2>" + charts.table(["tensor", "max abs diff", "relative L2", "cosine"], tensors)])


def _short(value) -> str:
    return value if isinstance(value, str) else f"{value:.3g}"


def diff(a_path: str, b_path: str | None = None, *, model_spec: str | None = None, component: str | None = None,
         normalize: bool = True, values: bool = False, atol: float = 0.0, rtol: float = 0.0,
         module_depth: int | None = None) -> DiffReport:
    """A against B (or --model). `component`: which part to compare (the model by default); two diffusers pipelines
    without one are compared component by component."""
    a_ckpt = open_checkpoint(a_path)
    b_ckpt = open_checkpoint(b_path) if not model_spec else None
    options = dict(normalize=normalize, values=values, atol=atol, rtol=rtol, module_depth=module_depth)
    if component is None and b_ckpt is not None and "pipeline" in (a_ckpt.format, b_ckpt.format):
        return _diff_components(a_ckpt, b_ckpt, a_path, b_path, **options)
    component = component or "model"
    a_comp = select_component(a_ckpt, component, a_path)
    if model_spec:
        b_tensors, b_desc = model_tensors(load_model(model_spec)), model_spec
    else:
        b_tensors, b_desc = select_component(b_ckpt, component, b_path).tensors, b_path
    report = _diff_tensors(a_path, a_comp.tensors, b_tensors, b_desc, component, against_model=bool(model_spec),
                           **options)
    if component == "model":
        a_is, b_is = identify(a_ckpt), identify(b_ckpt) if b_ckpt is not None else None
        report.identities, report.apart = {"a": a_is, "b": b_is}, apart(a_is, b_is)
        if report.apart and any(i and i["kind"] == "lora" for i in (a_is, b_is)):
            report.fix = None  # no remap makes a LoRA's keys a model's, or a Fill LoRA a dev one's
        elif report.fix and a_is and b_is and a_is["kind"] == b_is["kind"] == "lora" and a_is.get("convention") \
                and b_is.get("convention") and a_is["convention"] != b_is["convention"]:
            stem = os.path.splitext(os.path.basename(os.path.normpath(a_path)))[0]
            report.fix = f"ckpttool remap {a_path} {stem}-{b_is['convention']}.safetensors --to {b_is['convention']}"
    return report


def _diff_tensors(a_path, a_tensors, b_tensors, b_desc, component, *, against_model, normalize, values, atol, rtol,
                  module_depth) -> DiffReport:
    report = compare(a_tensors, b_tensors, normalize=normalize)
    problems = problems_of(report, strict=against_model)
    key_problems = bool(problems)
    value_report = None
    if values and not against_model:
        value_report = compare_values(in_model_order(report, a_tensors, b_tensors, normalize), atol, rtol,
                                      module_depth)
        if value_report["different"]:
            problems.append(Problem(Code.VALUE_MISMATCH, ERROR,
                                    f"{len(value_report['different'])} tensors differ in content"))
    return DiffReport(a_path, b_desc, component, report.rules, report.only_a, report.only_b, report.shape_mismatches,
                      report.dtype_mismatches, report.quantized, len(report.common), value_report, problems,
                      fix_command(a_path, b_desc, against_model) if key_problems else None)


def _diff_components(a_ckpt, b_ckpt, a_path, b_path, **options) -> DiffReport:
    """Two pipelines, component by component (each refused alone when broken): the top-level lists hold every
    difference with its component's name in front ("unet/conv_in.weight"), `components` each one's own report."""
    from ckpttool.operations.output import refuse_broken

    a_parts = {c.name: c for c in a_ckpt.components if c.role == "model"}
    b_parts = {c.name: c for c in b_ckpt.components if c.role == "model"}
    reports = []
    for name in sorted(set(a_parts) & set(b_parts)):
        refuse_broken(a_ckpt, a_parts[name])
        refuse_broken(b_ckpt, b_parts[name])
        reports.append(_diff_tensors(a_path, a_parts[name].tensors, b_parts[name].tensors, b_path, name,
                                     against_model=False, **options))
    problems = [Problem(Code.KEY_MISMATCH, ERROR, f"component {name} is only in {side}")
                for side, names in (("A", set(a_parts) - set(b_parts)), ("B", set(b_parts) - set(a_parts)))
                for name in sorted(names)]
    problems += [replace(p, component=r.component) for r in reports for p in r.problems]

    def joined(key):
        return [f"{r.component}/{k}" if isinstance(k, str) else dict(k, key=f"{r.component}/{k['key']}")
                for r in reports for k in getattr(r, key)]

    values = None
    if options["values"]:
        values = {"equal": sum(r.values["equal"] for r in reports)}
        for key in ("different", "close", "modules"):
            values[key] = [dict(d, **{"key" if key != "modules" else "module": f"{r.component}/"
                                      f"{d['key' if key != 'modules' else 'module']}"})
                           for r in reports for d in (r.values.get(key) or [])]
        if all(r.values["modules"] is None for r in reports):
            values["modules"] = None
    return DiffReport(a_path, b_path, None, [], joined("only_a"), joined("only_b"), joined("shape_mismatches"),
                      joined("dtype_mismatches"), [], sum(r.compared for r in reports), values, problems,
                      components=reports, only_a_components=sorted(set(a_parts) - set(b_parts)),
                      only_b_components=sorted(set(b_parts) - set(a_parts)))
