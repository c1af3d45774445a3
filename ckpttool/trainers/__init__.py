"""Trainer profiles: one module per trainer that writes checkpoints, and the one place that says which trainer
wrote a checkpoint and what its files, keys and counters mean (see `base.Profile`).

`for_path(path)` recognises a trainer from names and files before anything is read (it picks the state-dir reader's
file roles); `interpret(ckpt, profile)` applies a profile after reading, falling back to the profiles that recognise a
file by its content (Lightning, training dicts). Adding a trainer means adding one module to `PATH_PROFILES` or
`CONTENT_PROFILES`, most specific first.
"""

from __future__ import annotations

from ckpttool.model import Checkpoint
from ckpttool.trainers.accelerate import Accelerate, AccelerateAutomatic
from ckpttool.trainers.base import Profile
from ckpttool.trainers.consistency_models import ConsistencyModels
from ckpttool.trainers.dcp_state import DcpState
from ckpttool.trainers.deepspeed import DeepSpeed
from ckpttool.trainers.diffusers import Diffusers
from ckpttool.trainers.kohya import Kohya
from ckpttool.trainers.lightning import Lightning
from ckpttool.trainers.peft import Peft
from ckpttool.trainers.reference import Reference
from ckpttool.trainers.simpletuner import SimpleTuner
from ckpttool.trainers.torchtitan import Torchtitan
from ckpttool.trainers.training_dict import TrainingDict
from ckpttool.trainers.transformers import Transformers

PATH_PROFILES = (Reference(), SimpleTuner(), Transformers(), Kohya(), Peft(), Torchtitan(), DeepSpeed(),
                 ConsistencyModels(),
                 AccelerateAutomatic(), Diffusers(), Accelerate())
CONTENT_PROFILES = (Lightning(), TrainingDict(), DcpState())
GENERIC = Profile()


def for_path(path: str) -> Profile | None:
    """The trainer whose output `path` is, judged by names and files alone; None when no profile claims it."""
    return next((p for p in PATH_PROFILES if p.claims_path(path)), None)


def interpret(ckpt: Checkpoint, profile: Profile | None) -> Profile:
    """Apply the trainer profile to what a reader found; returns the profile used (GENERIC when none claims it)."""
    profile = profile or next((p for p in CONTENT_PROFILES if p.claims(ckpt)), GENERIC)
    profile.interpret(ckpt)
    return profile


def profile_of(ckpt: Checkpoint) -> Profile:
    """The profile that interpreted `ckpt`."""
    return profile_named(ckpt.trainer, ckpt.layout)


def profile_named(trainer: str | None, layout: str | None = None) -> Profile:
    """The profile of a `trainer` name (as reports carry it), told apart by `layout` where one trainer has several
    (Accelerate's plain and automatically named dirs); GENERIC for None or an unknown name."""
    named = [p for p in PATH_PROFILES + CONTENT_PROFILES if p.name == trainer and trainer is not None]
    return next((p for p in named if p.layout == layout), named[0] if named else GENERIC)


__all__ = ["Profile", "for_path", "interpret", "profile_of", "profile_named", "PATH_PROFILES", "CONTENT_PROFILES",
           "GENERIC"]
