"""The plan of `ckpttool repair`: what can be saved or rebuilt from a damaged checkpoint, read and never written.

Each problem verify finds is answered with a fix, or with why none is possible:
- a cut, corrupt or manifest-mismatched tensor file: its intact tensors copied out bit for bit (the salvage readers,
  `formats.safetensors.salvage` and `formats.torchsalvage`, say which are intact; a manifest, where there is one,
  vouches for each tensor's bytes);
- shards whose index is lost or disagrees with them: a fresh index from the shards' own headers;
- a DeepSpeed save dir whose `latest` names a broken tag: `latest` rewritten to the newest tag that verifies;
- a run folder whose newest checkpoints were half written: DST without them, so "resume from latest" picks a good one;
- with `like` (a reference checkpoint of the model to load into): model weights in a file of their own whose keys
  differ from it by a prefix (`module.`, `_orig_mod.`) or by optimum-quanto's `._data`/`._scale` keys are aligned as
  `remap --like` does.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from enum import StrEnum

from ckpttool import hashing, trainers
from ckpttool.checksums import MANIFEST_NAME, MANIFEST_SUFFIX
from ckpttool.errors import CkptError, UsageError
from ckpttool.model import ERROR, Code, Salvaged, VerifyReport, errors

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
    Code.QUANTIZED_KEYS: "`ckpttool remap SRC DST --dequantize` writes the plain keys a plain model loads",
    Code.WORLD_SIZE_MISMATCH: "resume with the world size it was saved with",
    Code.NO_MANIFEST: "`ckpttool manifest` writes one for a checkpoint that verifies",
}
LATEST = "latest"  # DeepSpeed's save dir names its newest tag here


class Action(StrEnum):
    """What repair does about a problem."""

    SALVAGE = "salvage"  # the file's intact tensors copied out bit for bit
    REBUILD_INDEX = "rebuild index"  # a shard index written afresh from the shards' headers
    REWRITE_LATEST = "rewrite latest"  # DeepSpeed's `latest` pointed at the newest tag that verifies
    LEAVE_OUT = "leave out"  # not carried into DST (a half-written checkpoint, a link out of SRC)
    REMAP = "remap"  # the model weights' keys aligned to --like
    NONE = "none"  # nothing can be done: the detail says why


class Scope(StrEnum):
    """What SRC is to repair."""

    FILE = "file"
    CHECKPOINT = "checkpoint"  # a folder
    RUN = "run"  # a folder of a run's checkpoints


@dataclass
class Fix:
    """One line of the plan: the problem (verify's code, where verify gave one) and what repair does about it."""

    code: Code | None
    path: str
    action: Action
    detail: str
    kept: int = 0
    lost: list = field(default_factory=list)  # {"name", "why"}
    saves: bool = True  # whether applying it saves anything (a salvage that kept nothing does not)

    def to_json(self) -> dict:
        out = {"code": self.code and self.code.value, "path": self.path, "action": self.action.value,
               "detail": self.detail}
        if self.action is Action.SALVAGE:
            out.update(kept=self.kept, lost=self.lost)
        return out


@dataclass
class RepairPlan:
    src: str
    kind: Scope = Scope.CHECKPOINT
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
        return any(f.action is not Action.NONE and f.saves for f in self.fixes)


def plan(src: str, like: str | None = None) -> RepairPlan:
    """What repair would do for `src` (keys aligned to `like`, if given), from verify's problems and a look at the
    layout; reads, never writes."""
    if not os.path.exists(src):
        raise UsageError(f"{src}: no such file or directory")
    if like is not None and not os.path.exists(like):
        raise UsageError(f"{like}: no such file or directory (--like names the checkpoint whose keys DST must have)")
    p = _plan_damage(src)
    if like is not None and p.kind is not Scope.RUN:
        _plan_like(p, like)
    return p


def _plan_damage(src: str) -> RepairPlan:
    from ckpttool.operations.verify import verify_checkpoint

    p = RepairPlan(src)
    if os.path.isdir(src):
        _plan_indexes(p)
        try:
            report, p.ckpt = verdict(src)
        except UsageError:  # not one checkpoint: a run folder, or a shard set without its index
            if not p.fixes:
                p.kind = Scope.RUN
                _plan_run(p)
            return p
        if not report.ok and os.path.isfile(os.path.join(src, LATEST)):
            _plan_latest(p, report)
    else:
        p.kind = Scope.FILE
        report, p.ckpt = verify_checkpoint(src)
    if not report.ok:
        _plan_problems(p, report)
    return p


def verdict(path: str) -> tuple[VerifyReport, object]:
    """verify's report on a folder, and the checkpoint it read; for a training state (an optimizer, scheduler or RNG
    state among its parts), with what its trainer's resume reads checked too, as `verify --for-resume` does (a
    folder of weights is not judged as a resume point: that it holds weights only is no damage)."""
    from ckpttool.operations.verify import Verification, check_resume, verify_checkpoint

    report, ckpt = verify_checkpoint(path)
    if ckpt is not None and (any(c.role in ("optimizer", "scheduler", "rng") for c in ckpt.components) or
                             trainers.profile_of(ckpt).training_state_only):
        v = Verification(path)
        check_resume(v, ckpt)
        report.problems += v.problems
    return report, ckpt


def _plan_problems(p: RepairPlan, report: VerifyReport):
    manifest = _manifest_digests(p.src)
    for problem in report.problems:
        path, code = problem.path or p.src, problem.code
        if p.is_answered(path):
            continue
        if code in SALVAGE_CODES and _salvageable(path) and _inside(path, p.src):
            _plan_salvage(p, code, path, manifest)
        elif code == Code.UNSAFE_PATH and _inside(path, p.src) and os.path.abspath(path) != os.path.abspath(p.src):
            p.left_out.add(os.path.abspath(path))
            p.add(Fix(code, path, Action.LEAVE_OUT, f"{problem.message.split(':')[0]}: never read; DST is written "
                      "without it"))
        elif problem.severity is ERROR or code in NO_REPAIR:
            p.fixes.append(Fix(code, path, Action.NONE, f"{problem.message}: no repair possible: "
                               f"{NO_REPAIR.get(code, 'ckpttool has no repair for this')}"))


def _plan_salvage(p: RepairPlan, code: Code, path: str, manifest: dict):
    from ckpttool.formats import safetensors, torchsalvage

    try:
        found = (safetensors.salvage if path.endswith(".safetensors") else torchsalvage.salvage)(path)
    except CkptError as e:
        p.add(Fix(code, path, Action.NONE, f"no repair possible: {e.reason}"))
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
    p.add(Fix(code, path, Action.SALVAGE, f"{len(found.kept)} of {len(found.kept) + len(found.lost)} tensors whole "
              f"({vouch}); {found.how}", kept=len(found.kept),
              lost=[{"name": name, "why": why} for name, why in found.lost], saves=found.saves_anything))


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


def _plan_indexes(p: RepairPlan):
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
                p.fixes.append(Fix(Code.MISSING_FILE, index_path, Action.NONE,
                                   f"shards {gone} of {count} are gone and so is "
                                   "the index: an index without their tensors would load an incomplete model; no "
                                   "repair possible"))
            continue
        try:
            doc = sharded.build_index(p.src, [shards[n] for n in sorted(shards)], old[1] if old else None)
        except CkptError as e:
            if old is None:
                p.fixes.append(Fix(e.code, index_path, Action.NONE, f"the index is lost and a shard cannot be read "
                                   f"({e}): repair the shard first, then this folder"))
            continue
        if old is not None and old[0] == doc["weight_map"]:
            continue
        why = ("is lost" if not os.path.isfile(index_path) else "cannot be read" if old is None else
               "disagrees with the shards' headers")
        p.generated[index] = (json.dumps(doc, indent=2) + "\n").encode()
        code = Code.MISSING_FILE if not os.path.isfile(index_path) else Code.CORRUPT
        p.add(Fix(code, index_path, Action.REBUILD_INDEX,
                  f"the index {why}: rebuilt from the headers of {count} shards ({len(doc['weight_map'])} tensors)"),
              *(os.path.join(p.src, shard) for shard in shards.values()))


def _plan_latest(p: RepairPlan, report: VerifyReport):
    """DeepSpeed: `latest` naming a tag that is gone or broken is pointed at the newest tag that verifies."""
    from ckpttool.discovery import discover

    latest = os.path.join(p.src, LATEST)
    with open(latest, encoding="utf-8", errors="replace") as f:
        named = f.read().strip()
    first = errors(report.problems)[0]
    for candidate in discover(p.src):
        if os.path.dirname(os.path.abspath(candidate.path)) != os.path.abspath(p.src) or candidate.skip:
            continue
        if verdict(candidate.path)[0].ok:
            tag = os.path.basename(candidate.path)
            p.generated[LATEST] = tag.encode()
            broken = os.path.join(p.src, named)
            if named and os.path.isdir(broken) and os.path.dirname(os.path.abspath(broken)) == os.path.abspath(p.src):
                p.left_out.add(os.path.abspath(broken))
            p.add(Fix(first.code, latest, Action.REWRITE_LATEST,
                      f"`latest` names {named!r} ({first.message}); in DST it names {tag!r}, the newest tag "
                      "that verifies"
                      + (f", and {named} is left out" if os.path.abspath(broken) in p.left_out else "")))
            return


def _plan_run(p: RepairPlan):
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
            p.fixes.append(Fix(code, candidate.path, Action.NONE,
                               f"{why}: no checkpoint of the run verifies, so leaving "
                               "them out saves nothing; repair one on its own: "
                               f"`ckpttool repair {candidate.path} OUT`"))
            continue
        p.left_out.update(os.path.abspath(f) for f in candidate.files or [candidate.path])
        p.fixes.append(Fix(code, candidate.path, Action.LEAVE_OUT,
                           f"{why}: left out of DST so a resume from the latest "
                           f"checkpoint does not pick it (to save what is in it: `ckpttool repair {candidate.path} "
                           "OUT`)"))


def _plan_like(p: RepairPlan, like: str):
    """Align the model weights' keys to the reference's where they differ, as `remap --like` would."""
    from ckpttool.checkpoint import open_checkpoint
    from ckpttool.formats import quanto
    from ckpttool.operations import remap
    from ckpttool.operations.diff import select_component

    ref = select_component(open_checkpoint(like), "model", like).tensors
    weights, tensors = _model_weights(p)
    if weights is None:
        p.fixes.append(Fix(Code.KEY_MISMATCH, p.src, Action.NONE,
                           "--like: the model weights are not a file of their own "
                           "here (a training dict's other parts would not survive a remap): `ckpttool remap SRC "
                           "OUT --like REF --component model` writes the weights alone"))
        return
    if {t.name for t in tensors} == {t.name for t in ref}:
        return
    keys = remap.KeyPlan(tensors)
    try:
        remap.align_like(keys, ref, quanto.find_qmap(like))
    except (CkptError, UsageError) as e:
        p.fixes.append(Fix(Code.KEY_MISMATCH, weights, Action.NONE,
                           f"its keys differ from {like}'s and cannot be aligned: "
                           f"{e.args[0] if isinstance(e, UsageError) else e.reason}"))
        return
    code = Code.QUANTIZED_KEYS if keys.quantized or keys.dequantized else Code.KEY_MISMATCH
    p.remaps[os.path.abspath(weights)] = like
    p.add(Fix(code, weights, Action.REMAP, f"keys aligned to {like} as `ckpttool remap --like` does: "
              f"{'; '.join(keys.changes)}"))


def _model_weights(p: RepairPlan):
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
