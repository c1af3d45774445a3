"""`ckpttool repair SRC DST`: what can be saved or rebuilt from a damaged checkpoint, written at DST. SRC is never
written to; DST is written only when something was saved, and a healthy SRC gets "nothing to repair".

The plan answers each problem verify finds with a fix, or with why none is possible:
- a cut, corrupt or manifest-mismatched tensor file: its intact tensors copied out bit for bit (the salvage readers,
  `formats.safetensors.salvage` and `formats.torchsalvage`, say which are intact; a manifest, where there is one,
  vouches for each tensor's bytes);
- shards whose index is lost or disagrees with them: a fresh index from the shards' own headers;
- a DeepSpeed save dir whose `latest` names a broken tag: `latest` rewritten to the newest tag that verifies;
- a run folder whose newest checkpoints were half written: DST without them, so "resume from latest" picks a good one;
- with `like` (a reference checkpoint of the model to load into): model weights in a file of their own whose keys
  differ from it by a prefix (`module.`, `_orig_mod.`) or by optimum-quanto's `._data`/`._scale` keys are aligned as
  `remap --like` does.
Every other file is copied as it is (or hard-linked, with `link`).
"""

from __future__ import annotations

import json
import os
import shutil
from collections import OrderedDict
from dataclasses import dataclass, field

from ckpttool import atomic, hashing, paths
from ckpttool.checksums import MANIFEST_NAME, MANIFEST_SUFFIX
from ckpttool.errors import CkptError, UsageError
from ckpttool.model import ERROR, Code, Component, Salvaged, VerifyReport, errors

SALVAGE_CODES = (Code.TRUNCATED, Code.CORRUPT, Code.CHECKSUM_MISMATCH)
NO_REPAIR = {
    Code.MISSING_FILE: "its bytes are nowhere in the checkpoint, so nothing can rebuild them",
    Code.MISSING_OPTIMIZER: "the optimizer state was never saved; nothing can rebuild it",
    Code.MISSING_SCHEDULER: "the LR scheduler state was never saved; nothing can rebuild it",
    Code.MISSING_RNG: "the RNG state was never saved; a resume still works, not bit for bit",
    Code.WEIGHTS_ONLY: "a weights file holds no training state; resume from the state dir verify names",
    Code.STEP_MISMATCH: "the files cannot tell which counter is right; check the run's config and logs",
    Code.UNSAFE_PICKLE: "ckpttool never runs pickled code; `ckpttool convert SRC out.safetensors` keeps the tensors "
                     "without it, if you trust the weights",
    Code.NONFINITE: "NaN/Inf values came from training, not from damage to the file",
    "quantized_keys": "`ckpttool remap SRC DST --dequantize` writes the plain keys a plain model loads",
    Code.WORLD_SIZE_MISMATCH: "resume with the world size it was saved with",
    Code.NO_MANIFEST: "`ckpttool manifest` writes one for a checkpoint that verifies",
}
LATEST = "latest"  # DeepSpeed's save dir names its newest tag here


@dataclass
class Fix:
    """One line of the plan: the problem (verify's code, where verify gave one) and what repair does about it."""

    code: str | None
    path: str
    action: str  # salvage | rebuild index | rewrite latest | leave out | remap | none
    detail: str
    kept: int = 0
    lost: list = field(default_factory=list)  # {"name", "why"}
    saves: bool = True  # whether applying it saves anything (a salvage that kept nothing does not)

    def to_json(self) -> dict:
        out = {"code": self.code, "path": self.path, "action": self.action, "detail": self.detail}
        if self.action == "salvage":
            out.update(kept=self.kept, lost=self.lost)
        return out


@dataclass
class Plan:
    src: str
    kind: str = "checkpoint"  # file | checkpoint (a folder) | run (a folder of a run's checkpoints)
    fixes: list = field(default_factory=list)
    salvaged: dict = field(default_factory=dict)  # absolute path of a damaged file -> Salvaged
    generated: dict = field(default_factory=dict)  # path relative to SRC -> bytes written there in DST
    left_out: set = field(default_factory=set)  # absolute paths not carried into DST
    answered: set = field(default_factory=set)  # absolute paths whose problems a fix already answers
    remaps: dict = field(default_factory=dict)  # absolute path of a weights file -> the reference its keys align to
    ckpt: object = None  # SRC as verify read it (None when unreadable, or a run)
    not_copied: list = field(default_factory=list)  # {"path", "why"}: links out of SRC and special files, unread

    def add(self, fix: Fix, *answers: str):
        self.fixes.append(fix)
        self.answered.update(os.path.abspath(a) for a in (fix.path, *answers))

    def is_answered(self, path: str) -> bool:
        path = os.path.abspath(path)
        return path in self.answered or any(_inside(path, out) for out in self.left_out)

    @property
    def saves_something(self) -> bool:
        return any(f.action != "none" and f.saves for f in self.fixes)


def plan(src: str, like: str | None = None) -> Plan:
    """What repair would do for `src` (keys aligned to `like`, if given), from verify's problems and a look at the
    layout; reads, never writes."""
    if not os.path.exists(src):
        raise UsageError(f"{src}: no such file or directory")
    if like is not None and not os.path.exists(like):
        raise UsageError(f"{like}: no such file or directory (--like names the checkpoint whose keys DST must have)")
    p = _plan_damage(src)
    if like is not None and p.kind != "run":
        _plan_like(p, like)
    return p


def _plan_damage(src: str) -> Plan:
    from ckpttool.operations.verify import verify_checkpoint

    p = Plan(src)
    if os.path.isdir(src):
        _plan_indexes(p)
        try:
            report, p.ckpt = _verdict(src)
        except UsageError:  # not one checkpoint: a run folder, or a shard set without its index
            if not p.fixes:
                p.kind = "run"
                _plan_run(p)
            return p
        if not report.ok and os.path.isfile(os.path.join(src, LATEST)):
            _plan_latest(p, report)
    else:
        p.kind = "file"
        report, p.ckpt = verify_checkpoint(src)
    if not report.ok:
        _plan_problems(p, report)
    return p


def _verdict(path: str) -> tuple[VerifyReport, object]:
    """verify's report on a folder, and the checkpoint it read; for a training state (an optimizer, scheduler or RNG
    state among its parts), with what its trainer's resume reads checked too, as `verify --for-resume` does (a
    folder of weights is not judged as a resume point: that it holds weights only is no damage)."""
    from ckpttool.operations.verify import Verification, check_resume, verify_checkpoint

    report, ckpt = verify_checkpoint(path)
    if ckpt is not None and any(c.role in ("optimizer", "scheduler", "rng") for c in ckpt.components):
        v = Verification(path)
        check_resume(v, ckpt)
        report.problems += v.problems
    return report, ckpt


def _plan_problems(p: Plan, report: VerifyReport):
    manifest = _manifest_digests(p.src)
    for problem in report.problems:
        path, code = problem.path or p.src, problem.code
        if p.is_answered(path):
            continue
        if code in SALVAGE_CODES and _salvageable(path) and _inside(path, p.src):
            _plan_salvage(p, code, path, manifest)
        elif code == Code.UNSAFE_PATH and _inside(path, p.src) and os.path.abspath(path) != os.path.abspath(p.src):
            p.left_out.add(os.path.abspath(path))
            p.add(Fix(code, path, "leave out", f"{problem.message.split(':')[0]}: never read; DST is written "
                      "without it"))
        elif problem.severity is ERROR or code in NO_REPAIR:
            p.fixes.append(Fix(code, path, "none", f"{problem.message}: no repair possible: "
                               f"{NO_REPAIR.get(code, 'ckpttool has no repair for this')}"))


def _plan_salvage(p: Plan, code: str, path: str, manifest: dict):
    from ckpttool.formats import safetensors, torchsalvage

    try:
        found = (safetensors.salvage if path.endswith(".safetensors") else torchsalvage.salvage)(path)
    except CkptError as e:
        p.add(Fix(code, path, "none", f"no repair possible: {e.reason}"))
        return
    checked = _check_against_manifest(found, manifest)
    if found.format == "torch":
        _drop_incomplete_optimizers(found)
    if found.unsafe_globals:  # never rebuilt, never carried: the tensors alone
        found.how += f"; its pickle imports {', '.join(found.unsafe_globals)}, outside the allow-list (never run): " \
                     "DST holds the tensors alone, as a flat state dict"
    p.salvaged[os.path.abspath(path)] = found
    vouch = ("each checked by its CRC-32" if found.checked else "no checksum in the file") + \
        (f", {checked} matched to the manifest" if checked else "")
    p.add(Fix(code, path, "salvage", f"{len(found.kept)} of {len(found.kept) + len(found.lost)} tensors whole "
              f"({vouch}); {found.how}", len(found.kept), [{"name": name, "why": why} for name, why in found.lost],
              found.saves_anything))


def _manifest_digests(src: str) -> dict:
    """(file, offset, length) -> (xxh3-128, names) of each tensor range in SRC's manifest; {} when there is none."""
    from ckpttool import checksums

    target = os.path.join(src, MANIFEST_NAME) if os.path.isdir(src) else src + MANIFEST_SUFFIX
    if not os.path.isfile(target):
        return {}
    try:
        doc, _ = checksums.load(target)
    except CkptError:
        return {}
    folder = os.path.dirname(os.path.abspath(target))
    return {(os.path.normpath(os.path.join(folder, e["file"])), e["offset"], e["length"]):
            (e.get(hashing.ALGORITHM), e.get("names", []))
            for e in doc.get("tensors", []) if isinstance(e, dict) and {"file", "offset", "length"} <= set(e)}


def _check_against_manifest(found: Salvaged, manifest: dict) -> int:
    """Where the manifest covers the file, keep only the tensors it vouches for: the same byte range, the same bytes,
    and (safetensors, whose header carries no checksum) the same name. How many it vouched for."""
    path = os.path.abspath(found.path)
    if not any(key[0] == path for key in manifest):
        return 0
    kept = []
    for t in found.kept:
        loc = t.location
        digest, names = manifest.get((path, loc.offset, loc.length), (None, []))
        if digest is None:
            found.lost.append((t.name, "the manifest has no tensor at its byte range: its header entry may be "
                               "damaged"))
        elif found.format == "safetensors" and not any(n == t.name or n.endswith("/" + t.name) for n in names):
            found.lost.append((t.name, f"the manifest names its bytes {', '.join(names)}: its header entry is "
                               "damaged"))
        elif hashing.hash_range(loc.file, loc.offset, loc.length)[0] != digest:
            found.lost.append((t.name, "its bytes differ from the manifest"))
        else:
            kept.append(t)
    checked, found.kept = len(kept), kept
    return checked


def _drop_incomplete_optimizers(found: Salvaged):
    """An optimizer state that lost any tensor is left out whole: loaded, a partial one resumes the parameters whose
    moments are gone as if new (Adam re-creates empty state), silently; left out, the resume and verify say so."""
    for path in _optimizer_paths(found.tree):
        def inside(name, path=path):
            return not path or name == path or name.startswith(path + ".")

        gone = [name for name, _ in found.lost if inside(name)]
        if not gone:
            continue
        found.dropped.add(path)
        found.lost += [(t.name, f"left out with the optimizer state it belongs to ({path or 'the whole file'}), "
                        f"which lost {len(gone)} tensors: a partial state would resume those parameters with fresh "
                        "moments, silently") for t in found.kept if inside(t.name)]
        found.kept = [t for t in found.kept if not inside(t.name)]


def _optimizer_paths(obj, prefix="", seen=None):
    """Dotted paths (as `flatten` names them: a shared container at its first path) of the optimizer state dicts in
    an unpickled object."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, dict):
        if {"state", "param_groups"} <= set(map(str, obj)):
            yield prefix
            return
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return
    for key, value in items:
        yield from _optimizer_paths(value, f"{prefix}.{key}" if prefix else str(key), seen)


def _plan_indexes(p: Plan):
    """A shard set whose index is lost, unreadable or disagrees with the shards gets a fresh one."""
    from ckpttool.formats import sharded

    for index, (count, shards) in sharded.shard_groups(p.src).items():
        index_path = os.path.join(p.src, index)
        gone = [n for n in range(1, count + 1) if n not in shards]
        try:
            old = sharded.read_index(index_path) if os.path.isfile(index_path) else None
        except CkptError:
            old = None
        if gone:
            if old is None:
                p.fixes.append(Fix(Code.MISSING_FILE, index_path, "none", f"shards {gone} of {count} are gone and so is "
                                   "the index: an index without their tensors would load an incomplete model; no "
                                   "repair possible"))
            continue
        try:
            doc = sharded.build_index(p.src, [shards[n] for n in sorted(shards)], old[1] if old else None)
        except CkptError as e:
            if old is None:
                p.fixes.append(Fix(e.code, index_path, "none", f"the index is lost and a shard cannot be read "
                                   f"({e}): repair the shard first, then this folder"))
            continue
        if old is not None and old[0] == doc["weight_map"]:
            continue
        why = ("is lost" if not os.path.isfile(index_path) else "cannot be read" if old is None else
               "disagrees with the shards' headers")
        p.generated[index] = (json.dumps(doc, indent=2) + "\n").encode()
        p.add(Fix(Code.MISSING_FILE if not os.path.isfile(index_path) else Code.CORRUPT, index_path, "rebuild index",
                  f"the index {why}: rebuilt from the headers of {count} shards ({len(doc['weight_map'])} tensors)"),
              *(os.path.join(p.src, shard) for shard in shards.values()))


def _plan_latest(p: Plan, report: VerifyReport):
    """DeepSpeed: `latest` naming a tag that is gone or broken is pointed at the newest tag that verifies."""
    from ckpttool.discovery import discover

    latest = os.path.join(p.src, LATEST)
    with open(latest, encoding="utf-8", errors="replace") as f:
        named = f.read().strip()
    first = errors(report.problems)[0]
    for candidate in discover(p.src):
        if os.path.dirname(os.path.abspath(candidate.path)) != os.path.abspath(p.src) or candidate.skip:
            continue
        if _verdict(candidate.path)[0].ok:
            tag = os.path.basename(candidate.path)
            p.generated[LATEST] = tag.encode()
            broken = os.path.join(p.src, named)
            if named and os.path.isdir(broken) and os.path.dirname(os.path.abspath(broken)) == os.path.abspath(p.src):
                p.left_out.add(os.path.abspath(broken))
            p.add(Fix(first.code, latest, "rewrite latest",
                      f"`latest` names {named!r} ({first.message}); in DST it names {tag!r}, the newest tag "
                      "that verifies"
                      + (f", and {named} is left out" if os.path.abspath(broken) in p.left_out else "")))
            return


def _plan_run(p: Plan):
    """A run folder: each checkpoint in it that fails verify is left out of DST, so resume-from-latest skips it
    (when at least one verifies: with none, leaving them out would save nothing)."""
    from ckpttool.operations.latest import verdicts

    found, broken = 0, []
    for candidate, report in verdicts(p.src):
        found += 1
        if report is None:
            broken.append((candidate, Code.MISSING_FILE, candidate.skip))
        elif not report.ok:
            error = errors(report.problems)[0]
            broken.append((candidate, error.code, error.message))
    if not found:
        raise UsageError(f"{p.src}: no checkpoint layout recognised here, nor checkpoints of a run; point repair at a "
                         "checkpoint file, a state dir, a shard folder or a run's output folder")
    for candidate, code, why in broken:
        if len(broken) == found:
            p.fixes.append(Fix(code, candidate.path, "none", f"{why}: no checkpoint of the run verifies, so leaving "
                               "them out saves nothing; repair one on its own: "
                               f"`ckpttool repair {candidate.path} OUT`"))
            continue
        p.left_out.update(os.path.abspath(f) for f in candidate.files or [candidate.path])
        p.fixes.append(Fix(code, candidate.path, "leave out", f"{why}: left out of DST so a resume from the latest "
                           f"checkpoint does not pick it (to save what is in it: `ckpttool repair {candidate.path} "
                           "OUT`)"))


def _plan_like(p: Plan, like: str):
    """Align the model weights' keys to the reference's where they differ, as `remap --like` would."""
    from ckpttool.checkpoint import open_checkpoint
    from ckpttool.formats import quanto
    from ckpttool.operations import remap
    from ckpttool.operations.diff import select_component

    ref = select_component(open_checkpoint(like), "model", like).tensors
    weights, tensors = _model_weights(p)
    if weights is None:
        p.fixes.append(Fix(Code.KEY_MISMATCH, p.src, "none", "--like: the model weights are not a file of their own "
                           "here (a training dict's other parts would not survive a remap): `ckpttool remap SRC "
                           "OUT --like REF --component model` writes the weights alone"))
        return
    if {t.name for t in tensors} == {t.name for t in ref}:
        return
    keys = remap.Plan(tensors)
    try:
        remap.align_like(keys, ref, quanto.find_qmap(like))
    except (CkptError, UsageError) as e:
        p.fixes.append(Fix(Code.KEY_MISMATCH, weights, "none", f"its keys differ from {like}'s and cannot be aligned: "
                           f"{e.args[0] if isinstance(e, UsageError) else e.reason}"))
        return
    code = Code.QUANTIZED_KEYS if keys.quantized or keys.dequantized else Code.KEY_MISMATCH
    p.remaps[os.path.abspath(weights)] = like
    p.add(Fix(code, weights, "remap", f"keys aligned to {like} as `ckpttool remap --like` does: "
              f"{'; '.join(keys.changes)}"))


def _model_weights(p: Plan):
    """(the file of SRC's model weights, its tensors as repair leaves them), or (None, None) when they are not one
    file of their own (a training dict's other parts would not survive a remap)."""
    if os.path.abspath(p.src) in p.salvaged:
        from ckpttool.formats.pickles import TensorRef
        from ckpttool.formats.torchtree import flatten

        found = p.salvaged[os.path.abspath(p.src)]
        plain = found.format == "safetensors" or all(isinstance(leaf, TensorRef) for _, leaf in flatten(found.tree))
        return (p.src, found.kept) if plain else (None, None)
    ckpt = p.ckpt  # as verify read it: not read a second time
    if ckpt is None:
        return None, None
    comp = ckpt.model
    files = {t.location.file for t in comp.tensors if t.location} if comp else set()
    if len(files) != 1:
        return None, None
    weights = files.pop()
    if any(c is not comp and any(t.location and t.location.file == weights for t in c.tensors)
           for c in ckpt.components):
        return None, None
    found = p.salvaged.get(os.path.abspath(weights))
    return weights, found.kept if found else comp.tensors


def _salvageable(path: str) -> bool:
    """A file a salvage reader reads: safetensors, or torch.save's (zip or legacy) by its suffix or first bytes."""
    from ckpttool.formats import safetensors, torchfile

    return safetensors.detect(path) or torchfile.detect(path)


def _inside(path: str, src: str) -> bool:
    path, src = os.path.abspath(path), os.path.abspath(src)
    return path == src or path.startswith(src.rstrip(os.sep) + os.sep)


# --- writing ---

def repair(src: str, dst: str, *, like: str | None = None, dry_run: bool = False, force: bool = False,
           link: bool = False) -> dict:
    """Plan, and unless `dry_run` or nothing can be saved, write DST; the report says what was kept and lost."""
    from ckpttool.operations.output import check_destination

    if not dry_run:  # before the plan, which may read the whole checkpoint
        check_destination(src, dst, force)
    p = plan(src, like)
    result = {"src": src, "dst": dst, "healthy": not p.fixes, "dry_run": dry_run, "written": False,
              "saves_something": p.saves_something, "fixes": [f.to_json() for f in p.fixes],
              "kept": sum(f.kept for f in p.fixes), "lost": sum(len(f.lost) for f in p.fixes)}
    if not p.fixes or dry_run or not p.saves_something:
        return result
    total = _size(p)
    with atomic.guard(dst, total), hashing.progress(total, "writing") as advance:
        _write(p, dst, link, advance)
    result["written"] = True
    result["not_copied"] = p.not_copied
    result["after"] = _after(p, dst)
    return result


def _after(p: Plan, dst: str) -> dict:
    """What verify says of DST (of a training state, for resume too; of a run, what `latest` picks in it)."""
    if p.kind == "run":
        from ckpttool.operations.latest import latest

        picked = latest(dst)
        return {"ok": picked["path"] is not None, "latest": picked["path"], "problems": []}
    from ckpttool.operations.verify import verify

    report = _verdict(dst)[0] if p.kind == "checkpoint" else verify(dst, recall=False)
    return {"ok": report.ok, "problems": report.problems}


def _size(p: Plan) -> int:
    total = 0
    for folder, _, files in os.walk(p.src) if os.path.isdir(p.src) else [("", [], [p.src])]:
        total += sum(os.lstat(os.path.join(folder, f)).st_size for f in files
                     if os.path.lexists(os.path.join(folder, f)))
    return total


def _write(p: Plan, dst: str, link: bool, advance):
    staging = atomic.make_staging_dir(dst)
    try:
        out = os.path.join(staging, os.path.basename(os.path.normpath(dst)))
        if os.path.isdir(p.src):
            _write_dir(p, out, link, advance)
        elif os.path.abspath(p.src) in p.salvaged:
            _write_salvaged(p.salvaged[os.path.abspath(p.src)], out)
        else:
            shutil.copyfile(p.src, out)
        for weights, like in p.remaps.items():
            _remap_in_place(out if weights == os.path.abspath(p.src) else
                            os.path.join(out, os.path.relpath(weights, os.path.abspath(p.src))), like)
        atomic.publish(out, dst)  # --force: the old output goes only once the new one is in its place
    finally:
        atomic.discard(staging)


def _write_dir(p: Plan, out: str, link: bool, advance):
    src = os.path.abspath(p.src)
    for folder, dirs, files in os.walk(src):
        rel = os.path.relpath(folder, src)
        dirs[:] = sorted(d for d in dirs if os.path.join(folder, d) not in p.left_out)
        for d in [d for d in dirs if os.path.islink(os.path.join(folder, d))]:  # os.walk does not follow them
            p.not_copied.append({"path": os.path.join(folder, d),
                                 "why": "a link to a folder: not followed, not copied"})
        os.makedirs(os.path.join(out, rel), exist_ok=True)
        for name in sorted(files):
            full, target = os.path.join(folder, name), os.path.normpath(os.path.join(out, rel, name))
            inner = os.path.normpath(os.path.join(rel, name))
            if full in p.left_out or inner in p.generated or (rel == "." and name == MANIFEST_NAME):
                continue  # SRC's manifest describes the damaged files: `ckpttool manifest DST` writes a new one
            if why := paths.unsafe(full, src):  # never read through: a FIFO blocks a copy, an outside file is not SRC's
                p.not_copied.append({"path": full, "why": f"{why}: not read, not copied"})
                continue
            if full in p.salvaged:
                if p.salvaged[full].saves_anything:
                    _write_salvaged(p.salvaged[full], target)
            elif link and os.path.islink(full):  # a link inside SRC: its target's bytes, copied
                shutil.copyfile(os.path.realpath(full), target)
            elif link:
                try:
                    os.link(full, target)
                except OSError:
                    shutil.copyfile(full, target)
            else:
                shutil.copyfile(full, target)
            advance(os.path.getsize(full))
    for inner, data in p.generated.items():
        atomic.write_synced(os.path.join(out, inner), data)


def _remap_in_place(target: str, like: str):
    """The weights file at `target` (inside the staging) with its keys aligned to `like`; a quanto map beside it goes
    when the weights were dequantized."""
    from ckpttool.formats import quanto
    from ckpttool.operations import remap

    aligned = target + ".aligned"
    result = remap.remap(target, aligned, like=like, force=True,
                         to="safetensors" if target.endswith(".safetensors") else "torch")
    os.replace(aligned, target)
    if any("dequantized" in change for change in result["changes"]):
        for name in quanto.QMAP_NAMES:
            beside = os.path.join(os.path.dirname(target), name)
            if os.path.isfile(beside):
                os.unlink(beside)


def _write_salvaged(found: Salvaged, path: str):
    """The kept tensors, bytes copied file to file: a safetensors file in their order on disk, a torch file with the
    object they were in (lost tensors dropped from their dict, None in their list), or a flat state dict when that
    object names globals outside the allow-list."""
    from ckpttool.formats import safetensors

    if found.format == "safetensors":
        writer = safetensors.Writer(path, [(t.name, t.dtype, t.shape) for t in found.kept], found.metadata)
        try:
            for t in found.kept:
                writer.write_raw(t.name, t.location.file, t.location.offset, t.location.length)
            writer.close()
        except BaseException:
            writer.abort()
            raise
        return
    from ckpttool.operations.convert import Part, write_torch

    lost = {name for name, _ in found.lost}
    tree = None if found.unsafe_globals else _without(found.tree, lost | found.dropped)  # None: a flat state dict
    write_torch(path, {None: Part(Component("model", "model", [found.path], list(found.kept), tree=tree), False)},
                None, lambda _n: None)


def _without(obj, lost: set, prefix="", memo=None):
    """The unpickled object less the lost tensors and dropped parts (by the dotted names `flatten` gives): gone from
    a dict, None in a list or tuple, so every kept tensor keeps its name. A shared container is rebuilt once."""
    from ckpttool.formats.pickles import TensorRef

    memo = {} if memo is None else memo
    if not isinstance(obj, (dict, list, tuple)):
        return obj
    if id(obj) in memo:
        return memo[id(obj)]

    def join(key):
        return f"{prefix}.{key}" if prefix else str(key)

    if isinstance(obj, dict):
        out = memo[id(obj)] = OrderedDict() if isinstance(obj, OrderedDict) else {}
        out.update((k, _without(v, lost, join(k), memo)) for k, v in obj.items()
                   if not ((isinstance(v, TensorRef) or isinstance(v, (dict, list, tuple))) and join(k) in lost))
        return out
    out = memo[id(obj)] = []
    out.extend(None if join(i) in lost and isinstance(v, (TensorRef, dict, list, tuple))
               else _without(v, lost, join(i), memo) for i, v in enumerate(obj))
    if isinstance(obj, tuple):
        memo[id(obj)] = out = tuple(out)
    return out
