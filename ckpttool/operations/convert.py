"""`ckpttool convert`: any readable layout to .pt, safetensors (single or sharded), an Accelerate state dir or a
DCP dir, streaming tensor by tensor, then re-read and compared with the source.

A training state (a training dict, a state dir) keeps every part when the target can hold it (.pt, Accelerate dir,
DCP); weights targets take one component (the model unless --component names another). A diffusers pipeline folder
converted to a destination without a suffix becomes a folder of one safetensors file per model component.
"""

from __future__ import annotations

import json
import os
import re

from ckpttool import atomic, hashing, steps
from ckpttool.checkpoint import open_checkpoint
from ckpttool.dtypes import CAST_BY_CONVERT
from ckpttool.errors import CkptError, UsageError
from ckpttool.formats.pretrained_files import SAFETENSORS_FILE, SAFETENSORS_INDEX
from ckpttool.formats.torchfile import read_raw, refused_by_weights_only
from ckpttool.formats.torchtree import rebuild
from ckpttool.model import Checkpoint, Code, Component, TensorInfo, dtype_bytes
from ckpttool.operations import output
from ckpttool.operations.diff import select_component

TARGETS = ("safetensors", "sharded", "torch", "accelerate", "dcp")
CAST = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "bfloat16": "bfloat16", "float16": "float16",
        "float32": "float32"}
WEIGHT_ROLES = ("model", "ema")
SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?$", re.I)
ACCELERATE_FILES = {"optimizer": ("optimizer", ".bin"), "scheduler": ("scheduler", ".bin"),
                    "sampler": ("sampler", ".bin"), "dataloader": ("dl_state_dict", ".bin")}


def parse_size(text: str) -> int:
    m = SIZE.match(text.strip())
    if not m:
        raise UsageError(f"--shard-size {text!r}: expected a size like 5GB, 500MB or 2GiB")
    unit = (m.group(2) or "B").upper().replace("I", "").rstrip("B") or "B"
    factor = {"B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[unit]
    return int(float(m.group(1)) * factor)


def target_kind(dst: str, to: str | None, shard_size) -> str:
    if to:
        kind = {"pt": "torch"}.get(to, to)
        if kind not in TARGETS:
            raise UsageError(f"--to {to}: choose one of {', '.join(TARGETS)}")
        return kind
    if shard_size:
        return "sharded"
    ext = os.path.splitext(dst)[1].lower()
    if ext in output.FILE_FORMATS:
        return output.FILE_FORMATS[ext]
    if dst.endswith(".index.json"):
        return "sharded"
    raise UsageError(f"{dst}: cannot tell the target from the name; use a .safetensors or .pt suffix, or --to "
                     f"{'|'.join(TARGETS)}")


class OutputPart:
    """One output file: its tensors (name -> source TensorInfo) and, for torch targets, the object to rebuild."""

    def __init__(self, component: Component, *, weights: bool):
        self.component = component
        self.weights = weights  # cast with --dtype; may go to safetensors
        self.sources = {t.name: t for t in component.tensors}


def _cast(info: TensorInfo, dtype: str | None, part: OutputPart) -> str:
    return dtype if dtype and part.weights and info.dtype in CAST_BY_CONVERT else info.dtype


class CastPlan(str):
    """The --dtype target, which also keeps count of the values the cast changes beyond rounding: finite values past
    the target's range (they become inf) and nonzero ones below its smallest (they become 0). Unless `allow`, the
    first such tensor stops the conversion: nothing is written."""

    def __new__(cls, name: str, allow: bool):
        plan = super().__new__(cls, name)
        plan.allow, plan.overflowed, plan.underflowed, plan.tensors = allow, 0, 0, []
        return plan

    def count(self, info: TensorInfo, before, after):
        import torch

        if not after.is_floating_point():
            return
        overflowed = int((torch.isinf(after) & torch.isfinite(before)).sum())
        underflowed = int(((after == 0) & (before != 0)).sum())
        if not (overflowed or underflowed):
            return
        if not self.allow:
            raise CkptError(Code.LOSSY_CAST,
                            f"--dtype {self}: tensor {info.name} holds {overflowed} finite values beyond "
                            f"{self}'s range (they would become inf) and {underflowed} nonzero values below its "
                            "smallest (they would become 0); nothing written. Pass --allow-lossy-cast to write them "
                            "anyway, or keep the dtype", info.location.file if info.location else None)
        self.overflowed += overflowed
        self.underflowed += underflowed
        self.tensors.append(info.name)


def _loader(dtype_name):
    """Tensors read and cast; a CastPlan counts (or refuses) what its cast changes beyond rounding."""
    from ckpttool.tensors import load_tensor, torch_dtype

    def load(info: TensorInfo, cast: str):
        tensor = load_tensor(info)
        if cast == info.dtype:
            return tensor
        out = tensor.to(torch_dtype(cast))
        if isinstance(dtype_name, CastPlan):
            dtype_name.count(info, tensor, out)
        return out
    return load


def _identity(info: TensorInfo):
    """Tensors with the same storage, the same view and the same conj and neg bits are one tensor saved under several
    names (tied weights)."""
    loc = info.location
    if loc is None or info.storage_key is None:
        return None
    return loc.file, info.storage_key, loc.storage_offset, info.shape, loc.stride, info.dtype, info.conj, info.neg


def write_safetensors(path: str, part: OutputPart, dtype, metadata, progress):
    load = _loader(dtype)
    specs = [(name, _cast(info, dtype, part), info.shape) for name, info in part.sources.items()]

    def tensors():
        for name, info in part.sources.items():
            cast = _cast(info, dtype, part)
            source = info.byte_range() if cast == info.dtype else None
            progress(info.nbytes)
            # bytes already in safetensors' layout are copied file to file; the rest goes through torch
            yield name, (output.RawBytes(*source) if source else load(info, cast))
    output.write_tensors(path, "safetensors", specs, tensors(), metadata, staged=False)


def write_torch(path: str, parts: dict, dtype, progress, extra: dict | None = None, flat: bool = False,
                notes: list | None = None):
    """A torch.save zip. `parts`: top-level key -> OutputPart (or one under key None for a plain state dict).
    `notes`: inert objects become the plain data torch.load(weights_only=True) takes, each change noted there."""
    load = _loader(dtype)
    specs, plan, canonical = [], [], {}
    for key, part in parts.items():
        for name, info in part.sources.items():
            full = name if key is None else f"{key}/{name}"
            ident = _identity(info)
            if ident is not None and ident in canonical:  # tied: share the first one's storage
                plan.append((full, None, canonical[ident]))
                continue
            cast = _cast(info, dtype, part)
            specs.append((full, cast, info.shape))
            plan.append((full, (info, cast), full))
            if ident is not None:
                canonical[ident] = full

    def wrap(stubs):
        alias = {full: stubs[target] for full, _, target in plan}
        root = {} if not flat else None
        for key, part in parts.items():
            tree = part.component.tree
            if tree is None:  # a flat tensor file (safetensors, DCP): rebuild as a state dict
                value = {name: alias[name if key is None else f"{key}/{name}"] for name in part.sources}
            else:
                found = None if notes is None else []
                value = rebuild(tree, lambda name, k=key: alias[name if k is None else f"{k}/{name}"], notes=found)
                if found:
                    notes.extend(f"{key}.{n}" if key is not None else n for n in found)
            if key is None:
                return value
            root[key] = value
        root.update(extra or {})
        return root

    def tensors():
        for full, job, _ in plan:
            if job is not None:
                info, cast = job
                source = info.byte_range() if cast == info.dtype else None
                progress(info.nbytes)
                yield full, (output.RawBytes(*source) if source else load(info, cast))
    output.write_tensors(path, "torch", specs, tensors(), wrap=wrap, staged=False)


def write_sharded(folder: str, part: OutputPart, dtype, metadata, shard_size: int, progress):
    shards, current, size = [], [], 0
    for name, info in part.sources.items():
        nbytes = dtype_bytes(_cast(info, dtype, part), info.shape)
        if current and size + nbytes > shard_size:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    shards.append(current)
    weight_map, total, seen = {}, 0, set()
    for i, names in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        sub = OutputPart(Component(part.component.name, part.component.role,
                                   tensors=[part.sources[n] for n in names]), weights=part.weights)
        write_safetensors(os.path.join(folder, fname), sub, dtype, metadata, progress)
        for name in names:
            weight_map[name] = fname
            ident = _identity(part.sources[name]) or name
            if ident not in seen:  # total_size counts shared storage once
                seen.add(ident)
                total += dtype_bytes(_cast(part.sources[name], dtype, part), part.sources[name].shape)
    index = {"metadata": {"total_size": total, **metadata}, "weight_map": weight_map}
    with open(os.path.join(folder, SAFETENSORS_INDEX), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=1)


def _indexed(stem: str, index: int) -> str:
    return stem if index == 0 else f"{stem}_{index}"


def write_accelerate(folder: str, ckpt: Checkpoint, dtype, progress) -> list[tuple[str, OutputPart]]:
    """Accelerate's save_state file names, so `Accelerator.load_state` finds every part. Returns (name the reader
    will give it, OutputPart) for each part written."""
    counts: dict[str, int] = {}
    written = []
    for comp in ckpt.components:
        i = counts.get(comp.role, 0)
        counts[comp.role] = i + 1
        part = OutputPart(comp, weights=comp.role in WEIGHT_ROLES)
        if comp.role == "model":
            name = _indexed("model", i)
            write_safetensors(os.path.join(folder, f"{name}.safetensors"), part, dtype, {"format": "pt"}, progress)
        elif comp.role == "ema":  # a diffusers-style `<name>_ema/` subfolder (Accelerate has no EMA file)
            name = comp.name if "ema" in comp.name else _indexed("ema", i)
            os.makedirs(os.path.join(folder, name))
            write_safetensors(os.path.join(folder, name, SAFETENSORS_FILE), part, dtype, {"format": "pt"},
                              progress)
        elif comp.role in ACCELERATE_FILES:
            stem, ext = ACCELERATE_FILES[comp.role]
            name = _indexed(stem, i)
            write_torch(os.path.join(folder, name + ext), {None: part}, None, progress)
        elif comp.role in ("scaler", "rng", "custom"):
            name, fname = {"scaler": ("scaler", "scaler.pt"), "rng": (f"random_states_{i}", f"random_states_{i}.pkl"),
                           "custom": (f"custom_checkpoint_{i}", f"custom_checkpoint_{i}.pkl")}[comp.role]
            write_torch(os.path.join(folder, fname), {None: part}, None, progress)
        else:
            raise UsageError(f"{ckpt.path}: component {comp.name} ({comp.role}) has no place in an Accelerate dir; "
                             "convert it separately with --component, or to a .pt that keeps every part")
        written.append((name, part))
    step, epoch = steps.global_step(ckpt), steps.epoch(ckpt)
    if step is not None or epoch is not None:
        with open(os.path.join(folder, "training_state.json"), "w", encoding="utf-8") as f:
            json.dump({"global_step": step, "epoch": epoch}, f)
    return written


def write_dcp(folder: str, ckpt: Checkpoint, components, dtype, progress):
    """torch.distributed.checkpoint without a process group (DCP needs the whole state dict at once)."""
    import pickle
    import warnings

    import torch.distributed.checkpoint as dcp

    load = _loader(dtype)
    state = {}
    for comp in components:
        part = OutputPart(comp, weights=comp.role in WEIGHT_ROLES)
        tensors = {}
        for name, info in part.sources.items():
            tensors[name] = load(info, _cast(info, dtype, part))
            progress(info.nbytes)
        state[comp.name] = tensors if comp.tree is None else rebuild(comp.tree, tensors.__getitem__)
    step = steps.global_step(ckpt)
    if step is not None:
        state["step"] = step
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            try:
                try:
                    dcp.save(state, checkpoint_id=folder, no_dist=True)
                except dcp.api.CheckpointException as e:  # DCP wraps each rank's error as (exception, stack)
                    raise next(failure[0] for failure in e.failures.values()) from None
            except pickle.PicklingError:  # DCP torch.saves non-tensor items with the plain pickler
                names = ", ".join(c.name for c in components)
                raise UsageError(f"{ckpt.path}: the parts {names} hold objects ckpttool keeps as records of how they "
                                 "were built (numpy arrays of an RNG state, a Namespace): DCP "
                                 "pickles each item afresh and cannot write them; convert to a .pt, which writes them "
                                 "back as they were, or take the weights with --component model") from None
        except RuntimeError as e:  # torch's C++ archive writer reports a failed write as an "enforce fail"
            if "inline_container" not in str(e) and "PytorchStreamWriter" not in str(e):
                raise
            raise atomic.failed_write(folder) from None


def verify_output(src_parts: list[tuple[str, OutputPart]], out: Checkpoint, dtype) -> int:
    """Re-read the output and compare every tensor bit for bit with its (cast) source. Tensors whose bytes lie
    contiguous in both files are compared by xxh3-128 hashes on all cores (no torch); the rest are loaded in pairs.
    Returns the number of tensors compared."""
    pairs, used = [], set()
    for out_component, part in src_parts:
        # the reader names a part by its key, or by its role for an alias key (a family's `opt` reads as optimizer)
        comp = next((c for c in out.components if c.name == out_component), None) or next(
            (c for c in out.components if c.role == part.component.role and c.name not in used), None)
        written = {t.name: t for t in comp.tensors} if comp else {}
        if comp:
            used.add(comp.name)
        for name, info in part.sources.items():
            target = written.get(name)
            if target is None:
                raise CkptError(Code.CORRUPT, f"after writing, {out_component}/{name} is missing from the output")
            pairs.append((f"{out_component}/{name}", info, target, _cast(info, dtype, part)))
    hashable = [(label, src.byte_range(), dst.byte_range()) for label, src, dst, cast in pairs
                if cast == src.dtype == dst.dtype and src.shape == dst.shape and src.byte_range() and dst.byte_range()]
    jobs = [r for _, a, b in hashable for r in (a, b)]
    digests = hashing.run_jobs(jobs, hashing.hash_range, sum(j[2] for j in jobs), "verifying")
    for i, (label, _, _) in enumerate(hashable):
        if digests[2 * i][0] != digests[2 * i + 1][0]:
            raise CkptError(Code.CORRUPT, f"after writing, {label} differs from the source")
    done = {label for label, _, _ in hashable}
    rest = [p for p in pairs if p[0] not in done]
    if rest:
        import torch

        from ckpttool.tensors import load_tensor

        load = _loader(str(dtype) if dtype else None)  # cast again to compare: counted once, when written
        for label, info, target, cast in rest:
            a, b = load(info, cast), load_tensor(target)
            if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(
                    a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)):
                raise CkptError(Code.CORRUPT, f"after writing, {label} differs from the source")
    return len(pairs)


def convert(src: str, dst: str, *, to=None, component=None, dtype=None, shard_size=None, verify=True,
            force=False, allow_lossy_cast=False, family=None) -> dict:
    if to in ("original", "diffusers"):
        if dtype or shard_size:
            raise UsageError(f"--to {to} moves a model between layouts as it is; cast or shard it in a convert of "
                             "its own")
        from ckpttool.operations.relayout import relayout

        return relayout(src, dst, to, family=family, component=component, verify=verify, force=force)
    if family:
        raise UsageError("--family tells which model a file is with --to original|diffusers")
    if dtype is not None and dtype not in CAST:
        raise UsageError(f"--dtype {dtype}: choose bf16, fp16 or fp32")
    if allow_lossy_cast and dtype is None:
        raise UsageError("--allow-lossy-cast only applies to a --dtype cast; give --dtype, or leave it out")
    cast = CastPlan(CAST[dtype], allow_lossy_cast) if dtype else None
    shard_bytes = parse_size(shard_size) if shard_size else None
    output.check_destination(src, dst, force=force)
    ckpt = open_checkpoint(src)
    per_component = ckpt.format == "pipeline" and not component and not to and not os.path.splitext(dst)[1]
    kind = "components" if per_component else target_kind(dst, to, shard_bytes)
    if not component:  # only an explicitly chosen component may be taken from an otherwise damaged checkpoint
        output.refuse_broken(ckpt)
    chosen = select_component(ckpt, component or "model", src) if component or kind in ("safetensors", "sharded") \
        else None
    if kind == "components":  # a diffusers pipeline: one safetensors file per model component, into a folder
        whole = [c for c in ckpt.components if c.role in WEIGHT_ROLES and c.tensors]
    else:
        whole = list(ckpt.components) if chosen is None else [chosen]
    step = steps.global_step(ckpt)
    metadata = {"format": "pt", "source": os.path.basename(os.path.normpath(src)), "converted_by": "ckpttool"}
    if step is not None:
        metadata["step"] = str(step)
    total = sum(t.nbytes for c in whole for t in c.tensors)
    if not any(c.tensors for c in whole):
        raise CkptError(Code.NO_TENSORS, f"holds no tensors ({', '.join(c.name for c in whole) or 'no components'}): "
                        "there is nothing to convert, and no output was written", src)
    notes: list[str] = []
    with atomic.guard(dst, total):
        compared = _convert_staged(ckpt, dst, kind, whole, chosen, cast, metadata, step, shard_bytes, total, verify,
                                   notes)
    return {"src": src, "dst": dst, "target": kind, "components": [c.name for c in whole],
            "weights_only_loadable": list(dict.fromkeys(notes)),
            "weights_only_refuses": refused_by_weights_only(read_raw(dst)) if kind == "torch" else [],
            "tensors": sum(len(c.tensors) for c in whole), "bytes": total, "dtype": cast and str(cast),
            "verified_tensors": compared if verify else None,
            "lossy_cast": {"overflowed": cast.overflowed, "underflowed": cast.underflowed, "tensors": cast.tensors}
            if cast is not None and cast.tensors else None}


def _no_tensor(name: str):
    raise CkptError(Code.CORRUPT, f"{name} holds a tensor outside the checkpoint's parts; it was not written")


def _convert_staged(ckpt, dst, kind, whole, chosen, cast, metadata, step, shard_bytes, total, verify,
                    notes) -> int:
    """Write the output into a staging folder beside `dst`, compare it with the source (returns how many tensors
    were compared), and rename it into place. `notes`: what a .pt output holds as plain data instead of an object
    torch.load(weights_only=True) refuses."""
    staging = atomic.make_staging_dir(dst)
    try:
        out_path = os.path.join(staging, os.path.basename(os.path.normpath(dst)))
        with hashing.progress(total, "converting") as progress:
            if kind == "components":
                os.makedirs(out_path)
                for comp in whole:
                    write_safetensors(os.path.join(out_path, f"{comp.name}.safetensors"),
                                      OutputPart(comp, weights=True), cast,
                                      dict(metadata, component=comp.name), progress)
            elif kind == "safetensors":
                parts = [("model", OutputPart(chosen, weights=chosen.role in WEIGHT_ROLES))]
                write_safetensors(out_path, parts[0][1], cast, metadata, progress)
            elif kind == "sharded":
                os.makedirs(out_path)
                parts = [("model", OutputPart(chosen, weights=chosen.role in WEIGHT_ROLES))]
                write_sharded(out_path, parts[0][1], cast, metadata, shard_bytes or (5 << 30), progress)
            elif kind == "torch":
                if chosen is not None or len(whole) == 1:
                    comp = whole[0]
                    parts = [("model", OutputPart(comp, weights=comp.role in WEIGHT_ROLES))]
                    write_torch(out_path, {None: parts[0][1]}, cast, progress, notes=notes)
                else:
                    parts = [(c.name, OutputPart(c, weights=c.role in WEIGHT_ROLES)) for c in whole]
                    extra = rebuild(ckpt.extras, _no_tensor, notes=notes)  # the training dict's other values
                    if step is not None:
                        extra.setdefault("global_step", step)
                    write_torch(out_path, dict(parts), cast, progress, extra, notes=notes)
            elif kind == "accelerate":
                os.makedirs(out_path)
                parts = write_accelerate(out_path, Checkpoint(ckpt.path, ckpt.format, ckpt.layout, whole,
                                                              ckpt.steps), cast, progress)
            else:
                write_dcp(out_path, ckpt, whole, cast, progress)
                parts = [(c.name, OutputPart(c, weights=c.role in WEIGHT_ROLES)) for c in whole]
        if kind == "components":
            compared = sum(verify_output([("model", OutputPart(comp, weights=True))], open_checkpoint(
                os.path.join(out_path, f"{comp.name}.safetensors")), cast) for comp in whole) if verify else 0
        else:
            compared = verify_output(parts, open_checkpoint(out_path), cast) if verify else 0
        atomic.publish(out_path, dst)  # --force: the old output goes only once the new one is in its place
    finally:
        atomic.discard(staging)
    return compared
