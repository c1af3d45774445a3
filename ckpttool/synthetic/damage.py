"""Damage kinds of a checkpoint, named for other projects' CI and used by ckpttool's own damage sweep: per part of
the trainer's resume contract (a single-file checkpoint: the file, `checkpoint`), `missing-<part>` (its entries
deleted), `truncated-<part>` (its first file cut to half), `empty-<part>` (emptied), `stale-<part>` (replaced by the
run's previous save's copy), and `bit-flip` (one byte of the largest file flipped after a ckpttool manifest sealed
the save, which only checksums can tell)."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

from ckpttool.model import Code

MISSING, EMPTY, STALE, BIT_FLIP = "missing", "empty", "stale", "bit-flip"
TRUNCATED = Code.TRUNCATED.value  # a file cut to half: the damage has the name of the code a reader gives it
KINDS = (MISSING, TRUNCATED, EMPTY, STALE, BIT_FLIP)
SINGLE_FILE = "checkpoint"  # the part name of a checkpoint that is one file


@dataclass(frozen=True)
class Damage:
    kind: str
    part: str | None  # None for bit-flip
    entries: tuple[str, ...]  # what it touches, relative to the checkpoint ("" for the checkpoint file itself)

    @property
    def name(self) -> str:
        return self.kind if self.part is None else f"{self.kind}-{self.part}"


def parts_of(checkpoint: str) -> dict[str, tuple[str, ...]]:
    """{part name: its entries} by the trainer's resume contract; a part is named by its first entry without
    suffix (`optimizer` for optimizer.bin, `random_states_0`, `model` for model.safetensors)."""
    from ckpttool import trainers
    from ckpttool.checkpoint import open_checkpoint
    from ckpttool.trainers import contract as terms

    if os.path.isfile(checkpoint):
        return {SINGLE_FILE: ("",)}
    ckpt = open_checkpoint(checkpoint)
    deal = trainers.profile_of(ckpt).resume_contract(ckpt)
    listing = terms.entries(checkpoint)
    # a layout read whole by its format reader (a DCP dir): each of its files is a part
    groups = [tuple(part.matches(listing, checkpoint)) for part in deal.parts] if deal else [
        (e,) for e in listing if not e.endswith("/")]
    found: dict[str, tuple[str, ...]] = {}
    for entries in groups:
        if not entries:
            continue
        name = os.path.splitext(entries[0].rstrip("/").lstrip("."))[0]  # .metadata -> metadata
        if name in found:  # metadata.json beside DCP's .metadata (Megatron): the whole name
            name = entries[0].rstrip("/")
        while name in found:
            name += "_"
        found[name] = entries
    return found


def kinds(checkpoint: str, previous: str | None, beside: tuple[str, ...] = ()) -> list[Damage]:
    """Every damage of the checkpoint (stale ones where the previous save has the same entry); `beside`: files
    outside the save that its resume reads, by their paths from the save's folder (torchtune's
    recipe_state/recipe_state.pt, ai-toolkit's optimizer.pt), each a part too."""
    out = []
    parts = parts_of(checkpoint)
    for entry in beside:
        name = os.path.splitext(os.path.basename(entry))[0]
        while name in parts:
            name += "_"
        parts[name] = (os.path.join(os.pardir, entry) if os.path.isdir(checkpoint) else entry,)
    for part, entries in parts.items():
        first = _first_file(checkpoint, entries[0])
        out.append(Damage(MISSING, part, entries))
        if first is not None:
            out += [Damage(TRUNCATED, part, (first,)), Damage(EMPTY, part, (first,))]
            older = entry_path(previous, first) if previous else None
            if older and os.path.isfile(older) and os.path.realpath(older) != os.path.realpath(
                    entry_path(checkpoint, first)):  # a file beside both saves is no other save's copy
                out.append(Damage(STALE, part, (first,)))
    out.append(Damage(BIT_FLIP, None, (_largest(checkpoint),)))
    return [d for d in out if not (d.kind == MISSING and d.entries == ("",))]  # a file cannot lose itself


def apply(checkpoint: str, damage: Damage, previous: str | None = None):
    """Damage the checkpoint in place (a copy: the caller's)."""
    if damage.kind == BIT_FLIP:
        from ckpttool.operations import manifest

        manifest.write(checkpoint, force=True)  # sealed (again) while healthy, so that checksums tell the flip
        path = entry_path(checkpoint, damage.entries[0])
        with open(path, "r+b") as f:
            f.seek(os.path.getsize(path) // 2)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0x01]))
        return
    for entry in damage.entries:
        damage_file(entry_path(checkpoint, entry), damage.kind,
                    entry_path(previous, entry) if damage.kind == STALE else None)


def damage_file(path: str, kind: str, source: str | None = None):
    """One entry damaged: deleted (a folder whole), cut to half, emptied, or replaced by `source` (stale)."""
    if kind == MISSING:
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    elif kind == STALE:
        shutil.copyfile(source, path)
    else:
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2 if kind == TRUNCATED else 0)


def entry_path(checkpoint: str, entry: str) -> str:
    """Where an entry is: in a checkpoint folder, or beside a checkpoint file ("": the file itself)."""
    if not entry:
        return checkpoint
    return os.path.join(checkpoint if os.path.isdir(checkpoint) else os.path.dirname(checkpoint), entry)


def _first_file(checkpoint: str, entry: str) -> str | None:
    path = entry_path(checkpoint, entry)
    if os.path.isfile(path):
        return entry
    files = sorted(os.path.relpath(os.path.join(d, f), checkpoint) for d, _, names in os.walk(path) for f in names)
    return files[0] if files else None


def _largest(checkpoint: str) -> str:
    if os.path.isfile(checkpoint):
        return ""
    files = [os.path.relpath(os.path.join(d, f), checkpoint) for d, _, names in os.walk(checkpoint) for f in names]
    return max(files, key=lambda rel: os.path.getsize(os.path.join(checkpoint, rel)))
