"""What a checkpoint's own files imply about the files it should hold: facts of torch that hold for every trainer,
so that a lone checkpoint (no sibling to compare with) still shows a lost part.

- `initial_lr` in every param group of an optimizer: torch's LRScheduler sets it when a scheduler is built on the
  optimizer (torch/optim/lr_scheduler.py LRScheduler.__init__: `group.setdefault("initial_lr", group["lr"])`; the
  transformers and diffusers schedulers are LambdaLRs built that way, and OneCycleLR sets it too; ReduceLROnPlateau
  does not). Each scheduler is built on one optimizer and its `base_lrs` are those `initial_lr`s, so every optimizer
  that carries them had a scheduler of as many groups, and a saved scheduler's `base_lrs` name the optimizer it steps.
- A torch optimizer keeps each parameter's moments (Adam's exp_avg, SGD's momentum_buffer) in that parameter's shape:
  a numbered optimizer with no numbered model of its own whose moments fit no model here belongs to a model that was
  not saved, or was lost.
"""

from __future__ import annotations

import os
import re
from collections import Counter

from ckpttool.model import ERROR, WARNING, Checkpoint, Code, Component, Problem

MOMENT = re.compile(r"(?:.*\.)?state\.\d+\.(?:exp_avg|momentum_buffer)")
LR_SOURCE = "torch/optim/lr_scheduler.py LRScheduler.__init__ sets each param group's initial_lr"


def _states(ckpt: Checkpoint, role: str) -> list[tuple[Component, dict]]:
    """(component, state dict) of every optimizer or scheduler: a Lightning .ckpt lists several in one component."""
    found = []
    for comp in ckpt.components:
        if comp.role == role:
            trees = comp.tree if isinstance(comp.tree, list) else [comp.tree]
            found.extend((comp, t) for t in trees if isinstance(t, dict))
    return found


def _groups(state: dict) -> list | None:
    groups = state.get("param_groups")
    return groups if isinstance(groups, list) and groups and all(isinstance(g, dict) for g in groups) else None


def initial_lrs(state: dict) -> list | None:
    """The `initial_lr` of each param group, where every group has one (a scheduler was built on it); else None."""
    groups = _groups(state)
    if groups is None or not all("initial_lr" in g for g in groups):
        return None
    return [g["initial_lr"] for g in groups]


def base_lrs(state: dict) -> list | None:
    lrs = state.get("base_lrs")
    return lrs if isinstance(lrs, list) and lrs else None


def _where(comp: Component) -> str:
    return os.path.basename(comp.files[0]) if comp.files else comp.name


def _pairs(optimizers: list[tuple[Component, dict]], schedulers: list[tuple[Component, dict]]) -> tuple[list, list]:
    """Each scheduler matched to the optimizer it steps: its base_lrs equal to the optimizer's initial_lrs, else as
    many groups; (optimizers with initial_lr left without one, schedulers whose groups no optimizer here has, other
    schedulers left over)."""
    waiting = [o for o in optimizers if initial_lrs(o[1]) is not None]
    total = len(schedulers)
    for exact in (True, False):
        left = []
        for s in schedulers:
            lrs = base_lrs(s[1])
            match = next((o for o in waiting if (initial_lrs(o[1]) == lrs if exact else
                                                 len(initial_lrs(o[1])) == len(lrs))), None)
            if match is None:
                left.append(s)
            else:
                waiting.remove(match)
        schedulers = left
    # two schedulers may step one optimizer: only one whose group count no optimizer has is surely an orphan
    orphans = [s for s in schedulers if not any(len(_groups(o[1])) == len(base_lrs(s[1])) for o in optimizers)]
    spare = [s for s in schedulers if s not in orphans] if total > len(optimizers) else []
    return waiting, orphans, spare


def scheduler_problems(ckpt: Checkpoint, *, always_saved: bool, lost_reported: bool) -> list[Problem]:
    """An optimizer that had a scheduler whose state is not here (`always_saved`: the trainer saves every scheduler it
    was given, so this is an error; else a warning: the run may never have handed it over); a scheduler whose
    optimizer is not here, though others are. `lost_reported`: a missing scheduler is already reported (the resume
    contract's part)."""
    optimizers = [(c, t) for c, t in _states(ckpt, "optimizer") if _groups(t) is not None]
    schedulers = [(c, t) for c, t in _states(ckpt, "scheduler") if base_lrs(t) is not None]
    if not optimizers:
        return []  # none read here (DCP, DeepSpeed), or none saved: the contract says so
    no_scheduler, orphans, spare = _pairs(optimizers, schedulers)
    found = []
    if no_scheduler and not (lost_reported and not schedulers):
        severity = ERROR if always_saved else WARNING
        what = ("the trainer saves every scheduler it steps, so its state was lost" if always_saved else
                "its state is not saved, so a resume restarts warmup and the schedule (unless the run rebuilds the "
                "scheduler from the step, or never handed it to the trainer's save)")
        for comp, state in no_scheduler:
            found.append(Problem(Code.MISSING_SCHEDULER, severity,
                                 f"{_where(comp)} has initial_lr in its param groups, so an LR scheduler was built on "
                                 f"it ({LR_SOURCE}), but no scheduler state here steps its {len(initial_lrs(state))} "
                                 f"param group(s): {what}", comp.files[0] if comp.files else ckpt.path,
                                 component=comp.name))
    for comp, state in orphans:
        groups = len(base_lrs(state))
        found.append(Problem(Code.MISSING_OPTIMIZER, ERROR,
                             f"{_where(comp)} steps an optimizer of {groups} param group(s) (its base_lrs), and no "
                             "optimizer state here has as many: that optimizer's state was not saved or was lost, "
                             "and its moments and step restart from zero",
                             comp.files[0] if comp.files else ckpt.path, component=comp.name))
    for comp, state in spare:
        found.append(Problem(Code.MISSING_OPTIMIZER, WARNING,
                             f"{_where(comp)} has no optimizer of its own: there are more schedulers than optimizers "
                             "here, so either two schedulers step one optimizer, or an optimizer's state (the next in "
                             "its series) was lost", comp.files[0] if comp.files else ckpt.path, component=comp.name))
    return found


def model_problems(ckpt: Checkpoint, optimizer_numbers: dict[str, int], model_count: int) -> list[Problem]:
    """A numbered optimizer (`optimizer_numbers`: component name -> its place in the series) beyond the models saved
    (`model_count`) whose moments fit no model tensor here: the model it trains is missing."""
    shapes = Counter(tuple(t.shape) for c in ckpt.components if c.role in ("model", "lora") for t in c.tensors)
    if not shapes:
        return []
    found = []
    for comp in ckpt.components:
        if comp.role != "optimizer" or optimizer_numbers.get(comp.name, 0) < model_count:
            continue
        moments = [tuple(t.shape) for t in comp.tensors if MOMENT.fullmatch(t.name) and t.shape]
        strangers = [s for s in moments if s not in shapes]
        if moments and strangers:
            found.append(Problem(Code.MISSING_FILE, ERROR,
                                 f"{_where(comp)} holds the state of {len(moments)} parameters, {len(strangers)} of "
                                 f"them shaped like no tensor of the {model_count} model(s) here (e.g. "
                                 f"{list(strangers[0])}): the model it trains was not saved with it, or was lost",
                                 comp.files[0] if comp.files else ckpt.path, component=comp.name))
    return found
