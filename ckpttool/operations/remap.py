"""`ckpttool remap`: repair a checkpoint's keys (prefixes, regex renames, drops, alignment to a reference) and
convert between optimum-quanto layouts and plain weights, writing a new file tensor by tensor."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

from ckpttool import atomic
from ckpttool.checkpoint import open_checkpoint
from ckpttool.errors import CkptError, UsageError
from ckpttool.formats import quanto
from ckpttool.keys import align
from ckpttool.model import Code, TensorInfo, dtype_bytes
from ckpttool.operations import output
from ckpttool.operations.diff import load_model, model_tensors, select_component
from ckpttool.quantization import infer_weight_shape, module_inputs
from ckpttool.trainers import is_state_dir


@dataclass
class Planned:
    """One output tensor: its name, dtype, shape and how to produce it."""

    name: str
    dtype: str
    shape: tuple
    source: TensorInfo | None = None  # copied as is
    module: str | None = None  # else produced by (de)quantizing this module
    key: str | None = None  # the module's key this output is


@dataclass
class ModuleJob:
    kind: str  # "dequantize" | "quantize"
    qtype: str
    inputs: dict  # module-relative key -> TensorInfo
    shape: tuple
    dtype: str
    activations: str | None = None
    outputs: dict = field(default_factory=dict)  # module-relative key -> (dtype, shape)


def parse_ops(ops):
    """[(kind, value)] in command-line order -> functions on a key (returning None to drop it)."""
    funcs = []
    for kind, value in ops:
        if kind == "strip_prefix":
            funcs.append(lambda k, p=value: k[len(p):] if k.startswith(p) else k)
        elif kind == "add_prefix":
            funcs.append(lambda k, p=value: p + k)
        elif kind == "rename":
            pattern, sep, repl = value.partition("=")
            if not sep:
                raise UsageError(f"--rename {value!r}: expected REGEX=REPLACEMENT")
            funcs.append(lambda k, r=_regex(pattern, "--rename"), s=repl: r.sub(s, k))
        elif kind == "drop":
            funcs.append(lambda k, r=_regex(value, "--drop"): None if r.search(k) else k)
    return funcs


def _regex(pattern, option):
    try:
        return re.compile(pattern)
    except re.error as e:
        raise UsageError(f"{option} {pattern!r}: not a regular expression ({e})") from None


def _torch_dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


class KeyPlan:
    def __init__(self, tensors):
        self.entries: dict[str, Planned] = {t.name: Planned(t.name, t.dtype, t.shape, source=t) for t in tensors}
        self.jobs: dict[str, ModuleJob] = {}
        self.changes: list[str] = []  # in words, for the user
        self.dequantized = 0  # modules turned from optimum-quanto's layout into plain weights
        self.quantized = 0  # and the reverse

    def rename_all(self, func, label):
        renamed, dropped, moved, sources = {}, 0, 0, {}
        for old, entry in self.entries.items():
            new = func(old)
            if new is None:
                dropped += 1
                continue
            if new in renamed:
                raise CkptError(Code.KEY_MISMATCH, f"{label} maps both {sources[new]!r} and {old!r} to {new!r}; "
                                "adjust the rule so every key stays unique")
            moved += new != old
            entry.name = new
            renamed[new], sources[new] = entry, old
        self.entries = renamed
        self.changes.append(f"{label}: {moved} renamed, {dropped} dropped")

    def infos(self) -> list[TensorInfo]:
        return [TensorInfo(k, e.dtype, e.shape) for k, e in self.entries.items()]

    def dequantize(self, modules: dict, shapes: dict | None = None):
        for module, info in modules.items():
            selected = module_inputs(module, info, self.entries)  # {"weight._data": entry, ..., "bias": entry}
            inputs = {k: e.source for k, e in selected.items()}
            if any(v is None for v in inputs.values()):
                raise CkptError(Code.CORRUPT, f"{module}: cannot dequantize keys that were produced by this remap")
            sources = {k: e.source for k, e in self.entries.items() if e.source is not None}
            shape = (shapes or {}).get(module) or infer_weight_shape(module, sources)
            if shape is None:
                raise CkptError(Code.CORRUPT, f"{module} is {info['weights']}-packed and its weight shape cannot be "
                                "known from the file (no bias to give out_features); pass --like REF or --model "
                                "so the shape can be taken from there")
            for key in selected:
                if key != "bias":  # the bias stays as it is beside the dequantized weight
                    del self.entries[f"{module}.{key}"]
            self.jobs[module] = ModuleJob("dequantize", info["weights"], inputs, tuple(shape), info["dtype"])
            self.entries[f"{module}.weight"] = Planned(f"{module}.weight", info["dtype"], tuple(shape), module=module,
                                                       key="weight")
        self.dequantized += len(modules)
        if modules:
            qtypes = sorted({i["weights"] for i in modules.values()})
            self.changes.append(f"dequantized {len(modules)} modules ({', '.join(qtypes)}) to plain weights")

    def quantize(self, qmap: dict):
        from ckpttool.quantization import quantize_module
        from ckpttool.tensors import load_tensor

        done = 0
        for module, spec in qmap.items():
            qtype = spec.get("weights") if isinstance(spec, dict) else None
            weight = self.entries.get(f"{module}.weight")
            if qtype in (None, "none") or weight is None:
                continue
            if weight.source is None:
                raise CkptError(Code.CORRUPT, f"{module}: cannot quantize a weight this remap produced")
            bias = self.entries.get(f"{module}.bias")
            inputs = {"weight": weight.source, **({"bias": bias.source} if bias else {})}
            sample = quantize_module(load_tensor(weight.source), load_tensor(bias.source) if bias else None, qtype,
                                     spec.get("activations"))
            job = ModuleJob("quantize", qtype, inputs, weight.shape, weight.dtype, spec.get("activations"),
                            {k: (_torch_dtype_name(v.dtype), tuple(v.shape)) for k, v in sample.items()})
            self.jobs[module] = job
            del self.entries[f"{module}.weight"]
            if bias:
                del self.entries[f"{module}.bias"]
            for key, (dtype, shape) in job.outputs.items():
                self.entries[f"{module}.{key}"] = Planned(f"{module}.{key}", dtype, shape, module=module, key=key)
            done += 1
        if not done:
            raise UsageError("--quantize: no module in the map has a plain `<module>.weight` in the checkpoint; check "
                             "the map's module names against `ckpttool inspect --tensors`")
        self.quantized += done
        self.changes.append(f"quantized {done} modules with optimum-quanto")


def load_qmap(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            qmap = json.load(f)
    except (OSError, ValueError, RecursionError) as e:
        raise UsageError(f"{path}: cannot read the quantization map ({e})") from None
    if not isinstance(qmap, dict):
        raise UsageError(f"{path}: a quantization map is a JSON object of module -> {{\"weights\": qtype}}")
    return qmap


def align_like(plan: KeyPlan, ref_tensors: list[TensorInfo], ref_qmap_path: str | None):
    """Rename and (de)quantize so the plan's keys are exactly the reference's; fail on what cannot be aligned."""
    ours = plan.infos()
    alignment = align([t.name for t in ours], [t.name for t in ref_tensors])
    ref_by_aligned = {alignment.b[t.name]: t for t in ref_tensors}
    plan.rename_all(lambda k: alignment.a[k], "aligned keys to the reference")
    plan.changes[-1] += f" ({'; '.join(alignment.rules) or 'no prefix change'})"
    aligned_ref = {alignment.b[t.name]: t for t in ref_tensors}
    our_q = quanto.quantized_modules(plan.infos())
    ref_q = quanto.quantized_modules([TensorInfo(k, t.dtype, t.shape) for k, t in aligned_ref.items()])
    to_dequantize = {m: i for m, i in our_q.items() if m not in ref_q and f"{m}.weight" in aligned_ref}
    shapes = {m: aligned_ref[f"{m}.weight"].shape for m in to_dequantize}
    plan.dequantize(to_dequantize, shapes)
    to_quantize = {m: {"weights": i["weights"]} for m, i in ref_q.items()
                   if m not in our_q and f"{m}.weight" in plan.entries}
    if ref_qmap_path and to_quantize:
        exact = load_qmap(ref_qmap_path)
        to_quantize = {m: exact.get(m, spec) for m, spec in to_quantize.items()}
    if to_quantize:
        plan.quantize(to_quantize)
    plan.rename_all(lambda k: ref_by_aligned[k].name if k in ref_by_aligned else k, "renamed to the reference's keys")
    missing = sorted(set(t.name for t in ref_tensors) - set(plan.entries))
    extra = sorted(set(plan.entries) - set(t.name for t in ref_tensors))
    shape_off = [k for k in plan.entries if k in {t.name: t for t in ref_tensors}
                 and tuple(plan.entries[k].shape) != tuple({t.name: t for t in ref_tensors}[k].shape)]
    if missing or extra or shape_off:
        parts = []
        if missing:
            parts.append(f"{len(missing)} reference keys have no source (e.g. {', '.join(missing[:3])})")
        if extra:
            parts.append(f"{len(extra)} keys have no place in the reference (e.g. {', '.join(extra[:3])})")
        if shape_off:
            parts.append(f"{len(shape_off)} shapes differ (e.g. {shape_off[0]})")
        raise CkptError(Code.KEY_MISMATCH, "cannot align to the reference: " + "; ".join(parts) +
                        ". Add --drop/--rename for those keys, or compare with `ckpttool diff`")


def produce(plan: KeyPlan):
    """Yield (name, tensor) in plan order; a module's (de)quantized outputs are computed once."""
    from ckpttool.quantization import dequantize_module, quantize_module
    from ckpttool.tensors import load_tensor, torch_dtype

    cache_module, cache = None, {}
    for name, entry in plan.entries.items():
        if entry.source is not None:
            yield name, load_tensor(entry.source)
            continue
        if entry.module != cache_module:
            job = plan.jobs[entry.module]
            inputs = {k: load_tensor(v) for k, v in job.inputs.items()}
            if job.kind == "dequantize":
                weight = dequantize_module(inputs, job.qtype, job.shape, torch_dtype(job.dtype))
                cache = {"weight": weight}
            else:
                cache = quantize_module(inputs["weight"], inputs.get("bias"), job.qtype, job.activations)
            cache_module = entry.module
        yield name, cache[entry.key]


def remap_state_dir(src: str, dst: str, force: bool = False, **options) -> dict:
    """A whole training-state dir with its model weights remapped: every other file copied as is, the manifest (if
    the source had one) rewritten for the new contents, the dir published only when complete."""
    import shutil

    from ckpttool.checksums import MANIFEST_NAME
    from ckpttool.operations import manifest

    output.check_destination(src, dst, force=force)
    ckpt = open_checkpoint(src)
    comp = select_component(ckpt, options.get("component", "model"), src)
    weights = next((f for f in comp.files if f.endswith(".safetensors")), None)
    if weights is None:
        raise UsageError(f"{src}: its {comp.name} weights are not a safetensors file; remap that file directly")
    with atomic.guard(dst, sum(os.path.getsize(f) for f in ckpt.files if os.path.isfile(f))):
        staging = atomic.make_staging_dir(dst)
        try:
            out = os.path.join(staging, "dir")
            stale = [MANIFEST_NAME] + (list(quanto.QMAP_NAMES) if options.get("dequantize") else [])
            shutil.copytree(src, out, ignore=shutil.ignore_patterns(*stale), copy_function=shutil.copyfile)
            target = os.path.join(out, os.path.relpath(weights, src))
            result = remap(weights, target, force=True, to="safetensors", **options)
            if os.path.exists(os.path.join(src, MANIFEST_NAME)):
                manifest.write(out)
            atomic.publish(out, dst)
        finally:
            atomic.discard(staging)
    return {**result, "src": src, "dst": dst, "format": "state dir"}


def remap_lora(src: str, dst: str, to: str, family: str | None, force: bool) -> dict:
    """A LoRA file in another key convention (conventions/lora.py), written in the format DST's suffix names."""
    from ckpttool.conventions import lora
    from ckpttool.identity import identify

    fmt = output.target_format(dst, None)
    output.check_destination(src, dst, force=force)
    ckpt = open_checkpoint(src)
    comp = select_component(ckpt, "model", src)
    output.refuse_broken(ckpt, comp)
    converted = lora.convert(comp.tensors, ckpt.metadata, identify(ckpt), to, family, src, _plain_values(comp.tree))
    metadata = {"format": "pt", "source": os.path.basename(os.path.normpath(src)), "remapped_by": "ckpttool"}
    output.write_tensors(dst, fmt, converted.specs, lora.produce(converted.recipes), metadata)
    return {"src": src, "dst": dst, "format": fmt, "tensors": len(converted.specs),
            "bytes": sum(dtype_bytes(d, s) for _, d, s in converted.specs), "changes": converted.changes,
            "convention": to, "family": converted.family, "modules": converted.modules,
            "dequantized": 0, "quantized": 0}


def _plain_values(tree, prefix: str = "") -> dict:
    """The values a `.pt` file holds beside its tensors, by dotted key (a kohya `.alpha` saved as a Python float)."""
    from ckpttool.formats.pickles import TensorRef

    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in _plain_values(value, f"{prefix}{key}.").items()}
    return {} if tree is None and not prefix or isinstance(tree, TensorRef) else {prefix[:-1]: tree}


def remap(src: str, dst: str, *, ops=(), like: str | None = None, model_spec: str | None = None,
          dequantize: bool = False, quantize_map: str | None = None, component: str = "model",
          to: str | None = None, family: str | None = None, force: bool = False) -> dict:
    from ckpttool.conventions.lora import CONVENTIONS

    if to in CONVENTIONS:
        if ops or like or model_spec or dequantize or quantize_map or component != "model":
            raise UsageError(f"--to {to} moves a whole LoRA file between conventions; run key options "
                             "(--strip-prefix, --rename, --like, --dequantize, ...) as a remap of their own")
        return remap_lora(src, dst, to, family, force)
    if family:
        raise UsageError(f"--family tells which model a LoRA is for with --to {'|'.join(CONVENTIONS)}")
    if os.path.isdir(src) and is_state_dir(src) and not os.path.splitext(dst)[1] and not to:
        return remap_state_dir(src, dst, force, ops=ops, like=like, model_spec=model_spec, dequantize=dequantize,
                               quantize_map=quantize_map, component=component)
    fmt = output.target_format(dst, to)
    output.check_destination(src, dst, force=force)
    comp = select_component(open_checkpoint(src), component, src)
    plan = KeyPlan(comp.tensors)
    for func, (kind, value) in zip(parse_ops(ops), ops):
        plan.rename_all(func, f"--{kind.replace('_', '-')} {value}")
    if dequantize:
        modules = quanto.quantized_modules(plan.infos())
        if not modules:
            raise UsageError(f"{src}: --dequantize, but no optimum-quanto quantized weights were found")
        plan.dequantize(modules)
    if quantize_map:
        plan.quantize(load_qmap(quantize_map))
    if like or model_spec:
        if like:
            ref = open_checkpoint(like)
            ref_tensors = select_component(ref, "model", like).tensors
            qmap = quanto.find_qmap(like)
        else:
            ref_tensors, qmap = model_tensors(load_model(model_spec)), None
        align_like(plan, ref_tensors, qmap)
    metadata = {"format": "pt", "source": os.path.basename(os.path.normpath(src)), "remapped_by": "ckpttool"}
    specs = [(k, e.dtype, e.shape) for k, e in plan.entries.items()]
    output.write_tensors(dst, fmt, specs, produce(plan), metadata)
    qmap = {m: {"weights": j.qtype, "activations": j.activations or "none"} for m, j in plan.jobs.items()
            if j.kind == "quantize"}
    if qmap:  # optimum.quanto.requantize needs the map; nothing in the weights names the qtype
        stem = os.path.splitext(os.path.basename(dst))[0]
        output.write_json_beside(dst, f"{stem}_quanto_qmap.json", qmap)
    return {"src": src, "dst": dst, "format": fmt, "tensors": len(specs),
            "bytes": sum(dtype_bytes(d, s) for _, d, s in specs), "changes": plan.changes,
            "dequantized": plan.dequantized, "quantized": plan.quantized}
