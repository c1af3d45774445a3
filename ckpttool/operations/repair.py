"""`ckpttool repair SRC DST`: the plan (`repair_plan`) carried out at DST. SRC is never written to; DST is written only
when something was saved, and a healthy SRC gets "nothing to repair". Every file no fix answers is copied as it is
(or hard-linked, with `link`); everything is staged beside DST and renamed into place when complete.
"""

from __future__ import annotations

import os
import shutil
from collections import OrderedDict
from dataclasses import dataclass, field

from ckpttool import atomic, hashing, paths
from ckpttool.checksums import MANIFEST_NAME
from ckpttool.model import Component, Salvaged
from ckpttool.operations.repair_plan import RepairPlan, Scope, plan, verdict


@dataclass(eq=False)
class Written:
    """What DST is once written: verify's verdict on it (of a training state, for resume too), or for a run what
    `latest` picks in it."""

    ok: bool
    problems: list = field(default_factory=list)  # Problem
    latest: str | None = None  # a run's: the checkpoint `latest` picks in DST
    run: bool = False

    def to_json(self) -> dict:
        out = {"ok": self.ok}
        if self.run:
            out["latest"] = self.latest
        out["problems"] = [p.to_json() for p in self.problems]
        return out


@dataclass(eq=False)
class RepairReport:
    """What `repair` did: the plan's fixes, whether DST was written, and what DST is then."""

    src: str
    dst: str
    dry_run: bool
    fixes: list  # Fix
    saves_something: bool  # a fix that saves anything (RepairPlan.saves_something)
    written: bool = False
    not_copied: list | None = None  # {"path", "why"}: links out of SRC and special files, once written
    after: Written | None = None

    @property
    def healthy(self) -> bool:
        return not self.fixes

    def to_json(self) -> dict:
        out = {"src": self.src, "dst": self.dst, "healthy": self.healthy, "dry_run": self.dry_run,
               "written": self.written, "saves_something": self.saves_something,
               "fixes": [f.to_json() for f in self.fixes], "kept": sum(f.kept for f in self.fixes),
               "lost": sum(len(f.lost) for f in self.fixes)}
        if self.written:
            out.update(not_copied=self.not_copied, after=self.after.to_json())
        return out


def repair(src: str, dst: str, *, like: str | None = None, dry_run: bool = False, force: bool = False,
           link: bool = False) -> RepairReport:
    """Plan, and unless `dry_run` or nothing can be saved, write DST; the report says what was kept and lost."""
    from ckpttool.operations.output import check_destination

    if not dry_run:  # before the plan, which may read the whole checkpoint
        check_destination(src, dst, force=force)
        if os.path.isfile(src):
            _file_format(dst, None)
    p = plan(src, like)
    report = RepairReport(src, dst, dry_run, list(p.fixes), p.saves_something)
    if not p.fixes or dry_run or not p.saves_something:
        return report
    total = _size(p)
    with atomic.guard(dst, total), hashing.progress(total, "writing") as advance:
        _write(p, dst, link=link, advance=advance)
    report.written, report.not_copied, report.after = True, p.not_copied, _after(p, dst)
    return report


def _file_format(dst: str, source: str | None) -> str | None:
    """The format a repaired file is written in: the one DST's suffix names, as for convert; the damaged file's own
    (`source`) where DST has no suffix. A suffix that names another kind of file (`.json`, `.index.json`, `.txt`) is
    refused: a usage error before anything is written."""
    from ckpttool.errors import UsageError
    from ckpttool.formats import TORCH_SUFFIXES
    from ckpttool.operations.output import FILE_FORMATS

    suffix = os.path.splitext(dst)[1].lower()
    if suffix and suffix not in FILE_FORMATS and suffix not in TORCH_SUFFIXES:
        raise UsageError(f"{dst}: its suffix names no format a repaired file is written in; name it .safetensors or "
                         ".pt (or leave the suffix out to keep the input's format)")
    return FILE_FORMATS.get(suffix) or ("torch" if suffix in TORCH_SUFFIXES else source)


def _after(p: RepairPlan, dst: str) -> Written:
    """What verify says of DST (of a training state, for resume too; of a run, what `latest` picks in it)."""
    if p.kind is Scope.RUN:
        from ckpttool.operations.latest import latest

        picked = latest(dst)["path"]
        return Written(picked is not None, latest=picked, run=True)
    from ckpttool.operations.verify import verify

    report = verdict(dst)[0] if p.kind is Scope.CHECKPOINT else verify(dst, recall=False)
    return Written(report.ok, report.problems)


def _size(p: RepairPlan) -> int:
    total = 0
    for folder, _, files in os.walk(p.src) if os.path.isdir(p.src) else [("", [], [p.src])]:
        total += sum(os.lstat(os.path.join(folder, f)).st_size for f in files
                     if os.path.lexists(os.path.join(folder, f)))
    return total


def _write(p: RepairPlan, dst: str, *, link: bool, advance):
    staging = atomic.make_staging_dir(dst)
    try:
        out = os.path.join(staging, os.path.basename(os.path.normpath(dst)))
        if os.path.isdir(p.src):
            _write_dir(p, out, link=link, advance=advance)
        elif os.path.abspath(p.src) in p.salvaged:
            found = p.salvaged[os.path.abspath(p.src)]
            _write_salvaged(found, out, _file_format(dst, found.format))
        else:
            shutil.copyfile(p.src, out)
        for weights, like in p.remaps.items():
            _remap_in_place(out if weights == os.path.abspath(p.src) else
                            os.path.join(out, os.path.relpath(weights, os.path.abspath(p.src))), like)
        atomic.publish(out, dst)  # --force: the old output goes only once the new one is in its place
    finally:
        atomic.discard(staging)


def _write_dir(p: RepairPlan, out: str, *, link: bool, advance):
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
                    _write_salvaged(p.salvaged[full], target, p.salvaged[full].format)
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
    if result["dequantized"]:
        for name in quanto.QMAP_NAMES:
            beside = os.path.join(os.path.dirname(target), name)
            if os.path.isfile(beside):
                os.unlink(beside)


def _write_salvaged(found: Salvaged, path: str, fmt: str):
    """The kept tensors in `fmt`, bytes copied file to file where the format stays: a safetensors file in their order
    on disk, a torch file with the object they were in (lost tensors dropped from their dict, None in their list), or
    a flat state dict when that object names globals outside the allow-list or the damaged file was safetensors."""
    from ckpttool.formats import safetensors
    from ckpttool.operations.convert import OutputPart, write_safetensors, write_torch

    if fmt != found.format:  # another format than the damaged file's: the kept tensors as a flat state dict
        part = OutputPart(Component("model", "model", [found.path], list(found.kept)), weights=False)
        if fmt == "safetensors":
            write_safetensors(path, part, None, found.metadata or None, lambda _n: None)
        else:
            write_torch(path, {None: part}, None, lambda _n: None)
        return
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
    lost = {name for name, _ in found.lost}
    tree = None if found.unsafe_globals else _without(found.tree, lost | found.dropped)  # None: a flat state dict
    whole = Component("model", "model", [found.path], list(found.kept), tree=tree)
    write_torch(path, {None: OutputPart(whole, weights=False)}, None, lambda _n: None)


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
