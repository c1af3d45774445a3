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
    if component is None:
        names = [c.name for c in ckpt.components]
        component = next((n for n in PIPELINE_MODELS if n in names), "model")
    comp = select_component(ckpt, component, src)
    identity = identify_tensors(comp.tensors, ckpt.metadata) or {}
    family = family or identity.get("family")
    if family not in models.FAMILIES:
        told = identity.get("family") or "family not told"
        raise UsageError(f"{src}: cannot tell from its keys which model this is ({told}); --to {to} converts "
                         f"{', '.join(models.FAMILIES)}: pass --family")
    have = identity.get("convention")
    want_from = "diffusers" if to == "original" else "original"
    if have and have != want_from or identity.get("kind") == "lora":
        raise UsageError(f"{src}: a {identity.get('kind')} in the {have} convention; --to {to} takes a "
                         f"{want_from} model (a LoRA moves with `ckpttool remap --to {to}`)")
    plan = models.to_original(comp.tensors, family) if to == "original" else models.to_diffusers(comp.tensors, family)
    if not plan.outputs:
        raise CkptError(Code.NO_TENSORS, "holds no diffusion-model tensors to convert; nothing written", src)
    if to == "original" and os.path.splitext(dst)[1].lower() != ".safetensors":
        raise UsageError(f"{dst}: --to original writes one .safetensors file; name it so")
    if to == "diffusers" and os.path.splitext(dst)[1]:
        raise UsageError(f"{dst}: --to diffusers writes a model folder (config.json, {DIFFUSERS_WEIGHTS}); give a "
                         "folder name without a suffix")
    specs = [(name, m.dtype, m.shape) for name, m in plan.outputs.items()]
    metadata = {"format": "pt"}
    total = sum(dtype_bytes(d, s) for _, d, s in specs)
    with atomic.guard(dst, total):
        staging = atomic.make_staging_dir(dst)
        try:
            out = os.path.join(staging, os.path.basename(os.path.normpath(dst)))
            weights = out
            if to == "diffusers":
                os.makedirs(out)
                weights = os.path.join(out, DIFFUSERS_WEIGHTS)
                with open(os.path.join(out, "config.json"), "w", encoding="utf-8") as f:
                    json.dump(plan.config, f, indent=2)
            output.write_tensors(weights, "safetensors", specs, _produce(plan.outputs), metadata, staged=False)
            compared = _verify(plan.outputs, weights) if verify else None
            atomic.publish(out, dst)
        finally:
            atomic.discard(staging)
    what = described(identity) if identity else f"a {family} model"
    changes = [f"{len(comp.tensors)} tensors of {what} -> {len(specs)} in the {to} layout"] + plan.notes
    if plan.left:
        changes.append(f"{len(plan.left)} tensors of the file's other parts (VAE, text encoders; e.g. "
                       f"{', '.join(plan.left[:2])}) are not converted: only the diffusion model is")
    return {"src": src, "dst": dst, "target": to, "family": family, "components": [comp.name],
            "tensors": len(specs), "bytes": total, "changes": changes, "left_out": len(plan.left),
            "verified_tensors": compared, "weights_only_loadable": [], "weights_only_refuses": [], "dtype": None,
            "lossy_cast": None}


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
