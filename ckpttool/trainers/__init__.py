"""Trainer profiles: one module per trainer that writes checkpoints, and the one place that says which trainer
wrote a checkpoint and what its files, keys and counters mean (see `base.Profile`).

`for_path(path)` recognises a trainer from names and files before anything is read (it picks the state-dir reader's
file roles); `interpret(ckpt, profile)` applies a profile after reading, falling back to the profiles that recognise a
file by its content (Lightning, training dicts). Adding a trainer means adding one entry to `PATH_PROFILES` or
`CONTENT_PROFILES`, most specific first. Profile modules are imported only when a path could be theirs (a file is
claimed only by a consistency_models family; a safetensors file only by ai-toolkit's header): start-up is most of
the cost of a command on a small file.
"""

from __future__ import annotations

import functools
import importlib
import os
import re

from ckpttool.model import Checkpoint, Code, Problem
from ckpttool.trainers.base import Profile, numbered_dirs, weights_only_problem

PATH_PROFILES = ("reference.Reference", "aitoolkit.AiToolkit", "simpletuner.SimpleTuner", "transformers.Transformers",
                 "musubi.Musubi", "kohya.Kohya", "torchtune.Torchtune", "torchtune.TorchtuneDist",
                 "composer.ComposerSharded", "onetrainer.OneTrainer", "nemo.NeMo", "peft.Peft",
                 "torchtitan.Torchtitan", "megatron.Megatron", "megatron.MegatronLegacy", "deepspeed.DeepSpeed",
                 "consistency_models.ConsistencyModels", "lightning.LightningSharded", "pretrained.ModelFolder",
                 "accelerate.AccelerateAutomatic", "diffusers.Diffusers", "accelerate.Accelerate")
FILE_PROFILES = ("consistency_models.ConsistencyModels",)  # the only path profile that claims a file
CONTENT_PROFILES = {"torch": ("composer.Composer", "lightning.Lightning", "training_dict.TrainingDict"),
                    "dcp": ("composer.ComposerSharded", "dcp_state.DcpState"), "safetensors": ("aitoolkit.AiToolkit",)}
GENERIC = Profile()


@functools.cache
def _profile(dotted: str) -> Profile:
    module, _, cls = dotted.rpartition(".")
    return getattr(importlib.import_module(f"ckpttool.trainers.{module}"), cls)()


def path_profiles(names=PATH_PROFILES) -> list[Profile]:
    return [_profile(n) for n in names]


def for_path(path: str) -> Profile | None:
    """The trainer whose output `path` is, judged by names and files alone; None when no profile claims it. A dir
    claimed only by files any trainer on the same library writes (Accelerate's) is its run's trainer when the run's
    other checkpoints say which: a SimpleTuner checkpoint that lost training_state.json, the file that marks it, is
    still SimpleTuner's, and that loss is damage, not an Accelerate checkpoint."""
    own = _claimant(path)
    if own is not None and own.claims_by_shared_files:
        return run_profile(path, own) or own
    return own


def _claimant(path: str) -> Profile | None:
    """The first profile whose names and files claim `path` by themselves."""
    names = PATH_PROFILES if os.path.isdir(path) else FILE_PROFILES
    return next((p for p in path_profiles(names) if p.claims_path(path)), None)


SIBLINGS_ASKED = 4  # the run's checkpoints nearest by number that are asked which trainer wrote them


def run_profile(path: str, own: Profile) -> Profile | None:
    """The more specific trainer (one built on `own`'s library) that the run's other checkpoints nearest to `path` are
    claimed by, where they agree and its naming is `path`'s too; None where none says so."""
    folder = os.path.dirname(os.path.abspath(os.path.normpath(path)))
    number = own.name_number(path)
    if number is None or own.name_pattern is None:
        return None
    nearest = sorted(numbered_dirs(folder, own.name_pattern).items(), key=lambda item: abs(item[0] - number))
    siblings = [sibling for n, sibling in nearest if n != number][:SIBLINGS_ASKED]
    claimed = {_claimant(sibling) for sibling in siblings}
    specific = {p for p in claimed if p is not None and not p.claims_by_shared_files and p.built_on == own.built_on
                and p.name_number(path) is not None}
    return specific.pop() if len(specific) == 1 else None


def is_state_dir(path: str) -> bool:
    """Whether `path` is a dir of checkpoint files that a trainer profile names the roles of."""
    profile = for_path(path) if os.path.isdir(path) else None
    return bool(profile and profile.state_dir_files())


def interpret(ckpt: Checkpoint, profile: Profile | None) -> Profile:
    """Apply the trainer profile to what a reader found; returns the profile used (GENERIC when none claims it)."""
    if profile is not None and not profile.confirms(ckpt):
        profile = None
    profile = profile or next((p for p in path_profiles(CONTENT_PROFILES.get(ckpt.format, ())) if p.claims(ckpt)),
                              GENERIC)
    profile.interpret(ckpt)
    return profile


def profile_of(ckpt: Checkpoint) -> Profile:
    """The profile that interpreted `ckpt` (it rides on the checkpoint)."""
    return ckpt.profile or GENERIC


def profile_named(trainer: str | None, layout: str | None = None) -> Profile:
    """The profile of a `trainer` name where only a report is at hand (a verify report recalled from the cache carries
    the name, not the object), told apart by `layout` where one trainer has several (Accelerate's plain and
    automatically named dirs); GENERIC for None or an unknown name."""
    if trainer is None:
        return GENERIC
    every = PATH_PROFILES + tuple(n for names in CONTENT_PROFILES.values() for n in names)
    named = [p for p in path_profiles(every) if p.name == trainer]
    return next((p for p in named if p.layout == layout), named[0] if named else GENERIC)


def resume_problems(ckpt: Checkpoint) -> list[Problem]:
    """What a resume from `ckpt` would lose or trip on, as the trainer that wrote it resumes; a weights file's
    problem names the state dir beside it when there is one."""
    problems = profile_of(ckpt).resume_problems(ckpt)
    hint = state_dir_hint(ckpt.path) if any(p.code == Code.WEIGHTS_ONLY for p in problems) else None
    return [weights_only_problem(ckpt, hint) if p.code == Code.WEIGHTS_ONLY and hint else p for p in problems]


def state_dir_hint(path: str) -> str | None:
    """The state dir a weights file or model folder belongs to: the dir holding it (`checkpoint-500/unet`), kohya
    `<stem>-state`, else the newest `checkpoint-N` beside it."""
    folder = os.path.dirname(os.path.abspath(os.path.normpath(path)))
    if is_state_dir(folder):  # the weights file inside a state dir: resume from the dir itself
        return folder
    stem = os.path.basename(os.path.abspath(path))
    for suffix in (".safetensors", ".pt", ".pth", ".bin", ".ckpt"):
        stem = stem.removesuffix(suffix)
    kohya = os.path.join(folder, f"{stem}-state")
    if os.path.isdir(kohya):
        return kohya
    numbered = numbered_dirs(folder, re.compile(r"checkpoint[-_](\d+)"))
    return numbered[max(numbered)] if numbered else None


__all__ = ["Profile", "for_path", "is_state_dir", "interpret", "profile_of", "profile_named", "resume_problems",
           "PATH_PROFILES", "CONTENT_PROFILES", "GENERIC"]
