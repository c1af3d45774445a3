"""`convert --to original|diffusers`: a Flux.1 transformer or an SD/SDXL UNet between a diffusers model folder (or
the pipeline folder holding one) and the original single file, streaming tensor by tensor (conventions/models.py
plans every output tensor from pieces of the inputs), then re-read and compared with the plan."""

from __future__ import annotations

import json
import os

from ckpttool import atomic, hashing
from ckpttool.checkpoint import open_checkpoint
from ckpttool.conventions import models
from ckpttool.conventions.pieces import byte_ranges, materialize
from ckpttool.errors import CkptError, UsageError
from ckpttool.identity import described, identify_tensors
from ckpttool.model import Code, dtype_bytes
from ckpttool.operations import output
from ckpttool.operations.diff import select_component

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
PIPELINE_MODELS = ("transformer", "unet")  # the component of a pipeline folder that is the diffusion model


def relayout(src: str, dst: str, to: str, *, family: str | None = None, component: str | None = None,
             verify: bool = True, force: bool = False) -> dict:
    output.check_destination(src, dst, force=force)
    ckpt = open_checkpoint(src)
    parts = None
    if ckpt.format == "pipeline" and component is None:
        parts = {c.name: c for c in ckpt.components if c.role == "model"}
        name = next((n for n in PIPELINE_MODELS if n in parts), None)
        if name is None:
            raise UsageError(f"{src}: a pipeline folder without a transformer or unet; name a component")
        for part in parts.values():
            output.refuse_broken(ckpt, part)
        comp = parts[name]
    else:
        comp = select_component(ckpt, component or "model", src)
    identity = identify_tensors(comp.tensors, ckpt.metadata) or {}
    family = family or identity.get("family")
    if family not in models.FAMILIES:
        told = identity.get("family") or "family not told"
        raise UsageError(f"{src}: cannot tell from its keys which model this is ({told}); --to {to} converts "
                         f"{', '.join(models.FAMILIES)}: pass --family")
    main = "transformer" if family == "flux.1" else "unet"
    if parts and main not in parts:
        raise UsageError(f"{src}: a pipeline without a {main}, which a {family} model has; check --family")
    have = identity.get("convention")
    want_from = "diffusers" if to == "original" else "original"
    if have and have != want_from or identity.get("kind") == "lora":
        raise UsageError(f"{src}: a {identity.get('kind')} in the {have} convention; --to {to} takes a "
                         f"{want_from} model (a LoRA moves with `ckpttool remap --to {to}`)")
    if to == "original" and os.path.splitext(dst)[1].lower() != ".safetensors":
        raise UsageError(f"{dst}: --to original writes one .safetensors file; name it so")
    if to == "diffusers" and os.path.splitext(dst)[1]:
        raise UsageError(f"{dst}: --to diffusers writes a folder (config.json, {DIFFUSERS_WEIGHTS}); give a "
                         "folder name without a suffix")
    if to == "original":
        plans = {"": models.pipeline_to_original({n: c.tensors for n, c in parts.items()}, family) if parts
                 else models.to_original(comp.tensors, family)}
    elif family != "flux.1" and any(not t.name.startswith(models.UNET_PREFIX) for t in comp.tensors):
        plans = models.checkpoint_to_diffusers(comp.tensors, family)  # a whole checkpoint: one folder per part
    else:
        plans = {"": models.to_diffusers(comp.tensors, family)}
    if not any(p.outputs for p in plans.values()):
        raise CkptError(Code.NO_TENSORS, "holds no diffusion-model tensors to convert; nothing written", src)
    total = sum(dtype_bytes(m.dtype, m.shape) for p in plans.values() for m in p.outputs.values())
    compared = 0
    with atomic.guard(dst, total):
        staging = atomic.make_staging_dir(dst)
        try:
            out = os.path.join(staging, os.path.basename(os.path.normpath(dst)))
            for sub, plan in plans.items():
                weights = out
                if to == "diffusers":
                    folder = os.path.join(out, sub)
                    os.makedirs(folder, exist_ok=True)
                    weights = os.path.join(folder, models.WEIGHTS_FILE.get(sub, DIFFUSERS_WEIGHTS))
                    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
                        json.dump(plan.config, f, indent=2)
                specs = [(name, m.dtype, m.shape) for name, m in plan.outputs.items()]
                output.write_tensors(weights, "safetensors", specs, _produce(plan.outputs), {"format": "pt"},
                                     staged=False)
                compared += _verify(plan.outputs, weights) if verify else 0
            atomic.publish(out, dst)
        finally:
            atomic.discard(staging)
    sources = sum(len(c.tensors) for c in (parts or {comp.name: comp}).values())
    written = sum(len(p.outputs) for p in plans.values())
    what = described(identity) if identity else f"a {family} model"
    changes = [f"{sources} tensors of {what} -> {written} in the {to} layout" +
               (f" ({', '.join(sub for sub in plans)})" if len(plans) > 1 else "")]
    changes += [note for p in plans.values() for note in p.notes]
    left = [key for p in plans.values() for key in p.left]
    if left:
        changes.append(f"{len(left)} tensors are not converted, as the {to} layout has no place for them (e.g. "
                       f"{', '.join(left[:2])})")
    if to == "diffusers" and len(plans) > 1:
        changes.append("the tokenizers, the scheduler and model_index.json are not in the weights: copy them from "
                       "the model's diffusers repo beside these folders")
    return {"src": src, "dst": dst, "target": to, "family": family,
            "components": list(parts) if parts else [sub for sub in plans if sub] or [comp.name],
            "tensors": written, "bytes": total, "changes": changes, "left_out": len(left),
            "verified_tensors": compared if verify else None, "weights_only_loadable": [],
            "weights_only_refuses": [], "dtype": None, "lossy_cast": None}


def _produce(outputs: dict):
    """Each output as byte ranges of its sources where it is only rows of them (copied file to file), else built."""
    cache: dict = {}
    for name, matrix in outputs.items():
        ranges = byte_ranges(matrix)
        yield name, (output.RawRanges(tuple(output.RawBytes(*r) for r in ranges)) if ranges
                     else materialize(matrix, cache))


def _verify(outputs: dict, path: str) -> int:
    """Every written tensor read back equal, bit for bit, to its plan: byte ranges hashed side by side on all cores,
    built tensors built again from the inputs and compared."""
    written = {t.name: t for c in open_checkpoint(path).components for t in c.tensors}
    jobs, built = [], []
    for name, matrix in outputs.items():
        target = written.get(name)
        if target is None or target.dtype != matrix.dtype or tuple(target.shape) != tuple(matrix.shape):
            raise CkptError(Code.CORRUPT, f"after writing, {name} is missing or not as planned")
        ranges, dst = byte_ranges(matrix), target.byte_range()
        if ranges and dst:
            offset = dst[1]
            for source in ranges:
                jobs += [source, (dst[0], offset, source[2])]
                offset += source[2]
        else:
            built.append((name, matrix, target))
    digests = hashing.run_jobs(jobs, hashing.hash_range, sum(j[2] for j in jobs), "verifying")
    for i in range(0, len(jobs), 2):
        if digests[i] != digests[i + 1] or digests[i][1] != jobs[i][2]:
            raise CkptError(Code.CORRUPT, f"after writing, bytes {jobs[i + 1][1]}.. of {path} differ from the source")
    if not built:
        return len(outputs)
    import torch

    from ckpttool.tensors import load_tensor

    cache: dict = {}
    for name, matrix, target in built:
        expected, got = materialize(matrix, cache), load_tensor(target)
        if not torch.equal(got.reshape(-1).view(torch.uint8), expected.contiguous().reshape(-1).view(torch.uint8)):
            raise CkptError(Code.CORRUPT, f"after writing, {name} differs from the source")
    return len(outputs)
