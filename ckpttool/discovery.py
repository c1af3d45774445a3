"""Finding the checkpoints a training run left in its output dir, newest first (for `latest` and `prune`)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from ckpttool import paths, trainers
from ckpttool.atomic import STAGING
from ckpttool.checksums import MANIFEST_SUFFIX
from ckpttool.formats import family
from ckpttool.trainers.aitoolkit import aitoolkit_header, saved_step
from ckpttool.trainers.base import TEMPORARY_NAME

NUMBERED_DIR = re.compile(r".*?(\d+)(?:-tmp|\.tmp)?$")
# A loose file is a candidate only by a name a trainer writes: a counter word before the number (`step_20.pt`,
# Lightning's `epoch=0-step=10.ckpt`, `ckpt_iter500.pth`) or kohya's `{name}-{epoch:06d}.safetensors`; never a file
# that merely has digits in its name (`train_data_7.bin`, `unet_fp16.safetensors`, `notes_v2.pt`).
STEP_IN_FILE_NAME = re.compile(r"(?:.*[-_.])?(?:global_step|step|iter|checkpoint|ckpt|epoch)[-_=]?(\d+)(?:-v\d+)?"
                               r"\.(?:pt|pth|bin|ckpt|safetensors)")
COMPOSER_SAVE = re.compile(r"ep\d+-ba(\d+)-rank0\.pt")  # Composer's default save_filename: its batch counter
AITK_CONFIG = "config.yaml"  # ai-toolkit rewrites the job's config into its save folder at every start
AITK_SAVE = re.compile(r"(.+)_(\d{9})\.safetensors")  # ai-toolkit's {name}_{step:09d}; its final save is {name}
KOHYA_WEIGHTS = re.compile(r".+-(\d{6})\.(?:safetensors|ckpt|pt)")
LIGHTNING_LAST = re.compile(r"last(?:-v?\d+)?\.ckpt$")  # no number: ordered by modification time, newest first
# ModelCheckpoint's filename template with auto_insert_metric_name (the default): `epoch=0-val_loss=0.89.ckpt`; a
# `.ckpt` named otherwise (`pretrained_base.ckpt`) is no save of this run, whatever step it records
LIGHTNING_TEMPLATE = re.compile(r"[A-Za-z_][\w./]*=[^=]*?(?:-[A-Za-z_][\w./]*=[^=]*?)*(?:-v\d+)?\.ckpt")


@dataclass
class Candidate:
    path: str  # what `verify` is given
    number: int | None  # the number in its name (step, save index or epoch): the ordering key
    files: list = field(default_factory=list)  # what deleting it removes
    skip: str | None = None  # why it is never chosen, without even verifying (temp dir, no guard)

    @property
    def order(self):
        """By number; of two with one number, the `-last` one (NeMo's and Lightning's save_last copy of the newest
        save, which their resume takes), then the newer."""
        return (self.number if self.number is not None else float("inf"), self.path.endswith("-last"),
                os.path.getmtime(self.path))


def discover(root: str) -> list[Candidate]:
    found: list[Candidate] = []
    # Accelerate's automatic naming; Megatron's non-persistent saves, a OneTrainer workspace's backups and ai-toolkit's
    # job folders, where only that trainer's saves count (a user's own `backup/` of copies is never a candidate, so
    # prune never deletes in it); never followed through a link
    nested = {os.path.join(root, name): only for name, only in NESTED.items()}
    nested.update({job: "ai-toolkit" for job in _job_folders(root)})
    folders = [root] + [n for n in nested if os.path.isdir(n) and not os.path.islink(n)]
    for folder in folders:
        start = len(found)
        families: dict[int, list[str]] = {}
        jobs: set[str] = set()  # ai-toolkit jobs with numbered saves here
        for entry in sorted(os.listdir(folder)):
            full = os.path.join(folder, entry)
            if os.path.islink(full) or paths.special(full) or STAGING.match(entry):  # never a link, a FIFO (it
                continue  # would block) or ckpttool's own staging (an output being written, a prune's deletion)
            if os.path.isdir(full):
                candidate = _dir_candidate(full, entry)
                if candidate:
                    found.append(candidate)
            elif (parsed := family.parse(entry)) is not None:
                families.setdefault(parsed[1], []).append(full)
            elif LIGHTNING_LAST.fullmatch(entry):
                found.append(Candidate(full, None, [full] + _existing(full + MANIFEST_SUFFIX)))
            elif LIGHTNING_TEMPLATE.fullmatch(entry):  # Lightning's names hold metrics too: the step it records
                found.append(Candidate(full, recorded_step(full), [full] + _existing(full + MANIFEST_SUFFIX)))
            elif (m := AITK_SAVE.fullmatch(entry)) and aitoolkit_header(full) is not None:  # never by name alone
                jobs.add(m.group(1))
                found.append(Candidate(full, int(m.group(2)), [full] + _existing(full + MANIFEST_SUFFIX)))
            elif m := (STEP_IN_FILE_NAME.fullmatch(entry) or KOHYA_WEIGHTS.fullmatch(entry) or
                       COMPOSER_SAVE.fullmatch(entry)):
                found.append(Candidate(full, int(m.group(1)), [full] + _existing(full + MANIFEST_SUFFIX)))
        # ai-toolkit's final save has no number: the step its header records; it is found beside the job's numbered
        # saves, or beside the config.yaml every job writes into its folder (the numbered ones may be pruned)
        finals = {f"{job}.safetensors" for job in jobs}
        if os.path.isfile(os.path.join(folder, AITK_CONFIG)):
            finals |= {e for e in os.listdir(folder) if e.endswith(".safetensors") and not AITK_SAVE.fullmatch(e)}
        for entry in sorted(finals):
            final = os.path.join(folder, entry)
            if aitoolkit_header(final) is not None and not any(c.path == final for c in found):
                found.append(Candidate(final, saved_step(final), [final] + _existing(final + MANIFEST_SUFFIX)))
        for step, members in families.items():
            main = next((m for m in members if os.path.basename(m).startswith("model")), members[0])
            manifest = os.path.join(folder, f"family{step:06d}{MANIFEST_SUFFIX}")
            found.append(Candidate(main, step, sorted(members) + _existing(manifest)))
        if nested.get(folder):
            found[start:] = [c for c in found[start:] if _written_by(c.path, nested[folder])]
    return sorted(found, key=lambda c: c.order, reverse=True)


NESTED = {"checkpoints": None, "non_persistent": "megatron", "backup": "onetrainer"}  # folder -> the only trainer


def _written_by(path: str, trainer: str) -> bool:
    """Whether `path` is a save of `trainer` by its own names and files (an ai-toolkit file by its header)."""
    if os.path.isfile(path):
        return trainer == "ai-toolkit" and aitoolkit_header(path) is not None
    profile = trainers.for_path(path)
    return profile is not None and profile.name == trainer


def _job_folders(root: str) -> list[str]:
    """ai-toolkit's job folders under its training folder (`{training_folder}/{name}/`), never through a link."""
    from ckpttool.trainers import path_profiles

    aitoolkit = path_profiles(("aitoolkit.AiToolkit",))[0]
    subs = [os.path.join(root, e) for e in sorted(os.listdir(root))]
    return [s for s in subs if not os.path.islink(s) and os.path.isdir(s) and aitoolkit.run_folder(s)]


def recorded_step(path: str) -> int | None:
    """The global_step a Lightning .ckpt records in its own pickle (its name is a template that may hold a metric's
    digits, `epoch=0-val_loss=0.89.ckpt`); None when it records none or cannot be read (verify then says why)."""
    from ckpttool.errors import CkptError
    from ckpttool.formats.torchfile import read_raw

    try:
        obj = read_raw(path).obj
    except (CkptError, OSError):
        return None
    step = obj.get("global_step") if isinstance(obj, dict) else None
    return step if type(step) is int and step >= 0 else None


def _dir_candidate(full: str, entry: str) -> Candidate | None:
    """A dir some trainer profile recognises and whose name numbers it (step, epoch or save index); kohya's final
    `{name}-state` has no number."""
    profile = trainers.for_path(full)
    if profile is None and not TEMPORARY_NAME.fullmatch(entry):
        return None
    counters = profile.name_counters(full) if profile else []
    number = counters[0].value if counters else None
    if number is None and (m := NUMBERED_DIR.fullmatch(entry)) and (TEMPORARY_NAME.fullmatch(entry) or
                                                                     (profile and profile.name_pattern)):
        number = int(m.group(1))
    if number is None and not entry.endswith("-state"):
        return None
    candidate = Candidate(full, number, [full])
    if TEMPORARY_NAME.fullmatch(entry):
        candidate.skip = "temporary dir: its save never completed"
    return candidate


def _existing(path: str) -> list[str]:
    return [path] if os.path.isfile(path) else []


RUN_NAMED = 5  # checkpoints of a run folder named in the answer to `inspect DIR`


def open_checkpoint_or_run(path: str):
    """open_checkpoint; where `path` is a training run's folder rather than one checkpoint, a UsageError that names
    its checkpoints, newest first, and the commands that take a run."""
    from ckpttool.checkpoint import open_checkpoint
    from ckpttool.errors import UsageError

    try:
        return open_checkpoint(path)
    except UsageError:  # no layout: a run folder? (a trainer that claims the folder has said why already)
        found = discover(path) if os.path.isdir(path) and trainers.for_path(path) is None else []
        if not found:
            raise
    names = [os.path.relpath(c.path, path) for c in found]
    more = f" and {len(names) - RUN_NAMED} more" if len(names) > RUN_NAMED else ""
    raise UsageError(f"{path} is a training run's folder, not one checkpoint: it holds {len(names)} checkpoints "
                     f"({', '.join(names[:RUN_NAMED])}{more}). `ckpttool latest {path}` picks the newest that "
                     f"verifies (--for-resume: that a resume can use), `ckpttool report {path}` describes them all; to "
                     f"inspect one, name it: {os.path.join(path, names[0])}") from None
