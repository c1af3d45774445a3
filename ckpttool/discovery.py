"""Finding the checkpoints a training run left in its output dir, newest first (for `latest` and `prune`)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from ckpttool.formats import family, statedir
from ckpttool.operations.manifest import MANIFEST_SUFFIX

CHECKPOINT_DIR = re.compile(r"checkpoint-(\d+)(?:-(.+))?$")  # diffusers, SimpleTuner, our trainer
ACCELERATE_AUTO_DIR = re.compile(r"checkpoint_(\d+)$")  # N counts saves
KOHYA_STATE_DIR = re.compile(r".*?-(?:step)?(\d+)-state$")
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")
STEP_IN_FILE_NAME = re.compile(r"(?:step|iter|checkpoint|ckpt|epoch)?[-_]?(\d+)\.(?:pt|pth|bin|ckpt|safetensors)$")


@dataclass
class Candidate:
    path: str  # what `verify` is given
    number: int | None  # the number in its name (step, save index or epoch): the ordering key
    files: list = field(default_factory=list)  # what deleting it removes
    skip: str | None = None  # why it is never chosen, without even verifying (temp dir, no guard)

    @property
    def order(self):
        return (self.number if self.number is not None else float("inf"), os.path.getmtime(self.path))


def discover(root: str) -> list[Candidate]:
    found: list[Candidate] = []
    folders = [root] + [os.path.join(root, "checkpoints")] * os.path.isdir(os.path.join(root, "checkpoints"))
    for folder in folders:
        families: dict[int, list[str]] = {}
        for entry in sorted(os.listdir(folder)):
            full = os.path.join(folder, entry)
            if os.path.islink(full):
                continue
            if os.path.isdir(full):
                candidate = _dir_candidate(full, entry)
                if candidate:
                    found.append(candidate)
            elif (parsed := family.parse(entry)) is not None:
                families.setdefault(parsed[1], []).append(full)
            elif entry.endswith(WEIGHT_SUFFIXES) and (m := STEP_IN_FILE_NAME.search(entry)):
                found.append(Candidate(full, int(m.group(1)), [full] + _existing(full + MANIFEST_SUFFIX)))
        for step, members in families.items():
            main = next((m for m in members if os.path.basename(m).startswith("model")), members[0])
            manifest = os.path.join(folder, f"family{step:06d}{MANIFEST_SUFFIX}")
            found.append(Candidate(main, step, sorted(members) + _existing(manifest)))
    return sorted(found, key=lambda c: c.order, reverse=True)


def _dir_candidate(full: str, entry: str) -> Candidate | None:
    if m := CHECKPOINT_DIR.match(entry):
        candidate = Candidate(full, int(m.group(1)), [full])
        if m.group(2) == "tmp" or entry.endswith(".tmp"):
            candidate.skip = "temporary dir: its save never completed"
        elif statedir.is_simpletuner(full) and not _guarded(full):
            candidate.skip = "no .guard containing 'complete': SimpleTuner never finished this save"
        return candidate
    if m := ACCELERATE_AUTO_DIR.match(entry):
        return Candidate(full, int(m.group(1)), [full])
    if m := KOHYA_STATE_DIR.match(entry):
        return Candidate(full, int(m.group(1)), [full])
    if entry.endswith("-state"):
        return Candidate(full, None, [full])  # kohya's final `{name}-state`
    return None


def _existing(path: str) -> list[str]:
    return [path] if os.path.isfile(path) else []


def _guarded(folder: str) -> bool:
    try:
        with open(os.path.join(folder, ".guard"), encoding="utf-8", errors="replace") as f:
            return f.read().strip() == "complete"
    except OSError:
        return False
