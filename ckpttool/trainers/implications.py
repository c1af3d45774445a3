"""What a checkpoint's own files imply about the files it should hold: facts of torch that hold for every trainer,
so that a lone checkpoint (no sibling to compare with) still shows a lost part.

- `initial_lr` in every param group of an optimizer: torch's LRScheduler sets it when a scheduler is built on the
  optimizer (torch/optim/lr_scheduler.py LRScheduler.__init__: `group.setdefault("initial_lr", group["lr"])`; the
  transformers and diffusers schedulers are LambdaLRs built that way, and OneCycleLR sets it too; ReduceLROnPlateau
  does not). Each scheduler is built on one optimizer and its `base_lrs` are those `initial_lr`s, so every optimizer
  that carries them had a scheduler of as many groups (fewer, where groups were added after it was built), and a
  saved scheduler's `base_lrs` name the optimizer it steps.
- A torch optimizer keeps each parameter's moments (Adam's exp_avg, SGD's momentum_buffer) in that parameter's shape:
  a numbered optimizer with no numbered model of its own whose moments fit no model here belongs to a model that was
  not saved, or was lost.
"""

from __future__ import annotations

import os
import re

from ckpttool.model import ERROR, WARNING, Checkpoint, Code, Component, Problem

MOMENT = re.compile(r"(?:.*\.)?state\.\d+\.(?:exp_avg|momentum_buffer)")
LR_SOURCE = "torch/optim/lr_scheduler.py LRScheduler.__init__ sets each param group's initial_lr"
MAX_GROUPS = 1 << 16  # param groups of one optimizer; a longer list is no optimizer's


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


def _rates(value) -> tuple | None:
    """A list of learning rates as a tuple of numbers; None for anything else (a hostile file's list may hold
    itself, strings or nested lists: never compared as such)."""
    if not isinstance(value, list) or not value or len(value) > MAX_GROUPS:
        return None
    if not all(type(v) in (int, float) for v in value):
        return None
    return tuple(value)


def initial_lrs(state: dict) -> tuple | None:
    """The `initial_lr` of each param group, where every group has one (a scheduler was built on it); else None
    (none, or a group added after the scheduler was built: Lightning's BackboneFinetuning)."""
    groups = _groups(state)
    if groups is None or not all("initial_lr" in g for g in groups):
        return None
    return _rates([g["initial_lr"] for g in groups])


def base_lrs(state: dict) -> tuple | None:
    """The rates of the optimizer groups a scheduler steps: its `base_lrs`, or the first of the schedulers a
    SequentialLR or ChainedScheduler holds (`_schedulers`); None where its state names none (ReduceLROnPlateau, timm's
    schedulers with `base_values`): such a scheduler may step any optimizer."""
    if "base_lrs" in state:
        return _rates(state["base_lrs"])
    inner = state.get("_schedulers")
    for sub in inner[:MAX_GROUPS] if isinstance(inner, list) else ():
        if isinstance(sub, dict) and "base_lrs" in sub:
            return _rates(sub["base_lrs"])
    return None


def _where(comp: Component) -> str:
    return os.path.basename(comp.files[0]) if comp.files else comp.name


def _steps(scheduler: dict, optimizer: dict, exact: bool) -> bool:
    """Whether `scheduler` may step `optimizer`: its base_lrs are the optimizer's initial_lrs (`exact`), or it steps no
    more groups than the optimizer has (groups added after it was built have no initial_lr), or it names none."""
    lrs = base_lrs(scheduler)
    if lrs is None:
        return not exact
    return lrs == initial_lrs(optimizer) if exact else len(lrs) <= len(_groups(optimizer))


def _pairs(optimizers: list[tuple[Component, dict]], schedulers: list[tuple[Component, dict]]) -> tuple[list, ...]:
    """Each scheduler matched to the optimizer it steps (by its rates first, then by its group count); (optimizers
    with initial_lr left without one, schedulers that step more groups than any optimizer here has, other schedulers
    left over where there are more schedulers than optimizers)."""
    waiting = [o for o in optimizers if initial_lrs(o[1]) is not None]
    total = len(schedulers)
    for exact in (True, False):
        left = []
        for s in schedulers:
            match = next((o for o in waiting if _steps(s[1], o[1], exact)), None)
            if match is None:
                left.append(s)
            else:
                waiting.remove(match)
        schedulers = left
    orphans = [s for s in schedulers if base_lrs(s[1]) is not None and
               not any(len(base_lrs(s[1])) <= len(_groups(o[1])) for o in optimizers)]
    # two schedulers may step one optimizer: only more schedulers than optimizers makes one of them suspect
    spare = [s for s in schedulers if s not in orphans] if total > len(optimizers) else []
    return waiting, orphans, spare


def scheduler_problems(ckpt: Checkpoint, *, always_saved: bool, lost_reported: bool, series: bool = False
                       ) -> list[Problem]:
    """An optimizer that had a scheduler whose state is not here (`always_saved`: the trainer saves every scheduler it
    was given, so this is an error; else a warning: the run may never have handed it over); a scheduler whose
    optimizer is not here, though others are. `lost_reported`: a missing scheduler is already reported (the resume
    contract's part). `series`: optimizers and schedulers are saved as numbered series, one per prepared object
    (Accelerate), so more schedulers than optimizers is worth a warning; a list of them (Lightning) pairs freely."""
    optimizers = [(c, t) for c, t in _states(ckpt, "optimizer") if _groups(t) is not None]
    schedulers = _states(ckpt, "scheduler")
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
    for comp, state in spare if series else ():
        found.append(Problem(Code.MISSING_OPTIMIZER, WARNING,
                             f"{_where(comp)} has no optimizer of its own: there are more schedulers than optimizers "
                             "here, so either two schedulers step one optimizer, or an optimizer's state (the next in "
                             "its series) was lost", comp.files[0] if comp.files else ckpt.path, component=comp.name))
    return found


def model_problems(ckpt: Checkpoint, optimizer_numbers: dict[str, int], model_count: int) -> list[Problem]:
    """A numbered optimizer (`optimizer_numbers`: component name -> its place in the series) beyond the models saved
    (`model_count`) whose moments fit no model tensor here: the model it trains is missing."""
    shapes = {tuple(t.shape) for c in ckpt.components if c.role in ("model", "lora") for t in c.tensors}
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
