"""Counters with meanings -> the checkpoint's global step, and what disagrees in a way no healthy run explains.

Every counter a checkpoint states has a meaning (ckpttool.model: global step, optimizer updates, scheduler steps,
saves, epoch, accumulation micro-steps), given by the reader (torch facts: an optimizer's `step`, a scheduler's
`last_epoch`) or by the trainer profile (ckpttool/trainers/). Counters are compared by meaning, never by equality
alone:

- global-step sources (a dir name, a state json, a training dict) must agree, and so must epochs;
- optimizer updates may lag the global step by the updates an fp16 GradScaler skipped (the trainer's step advances,
  the optimizer's does not). A trainer that counts its skips (DeepSpeed's skipped_steps) says exactly how many; a
  saved scaler bounds how many that can be: every skip halves the scale (backoff
  0.5) from its initial 65536, and `_growth_tracker` counts the updates applied since the last skip, so at most
  global_step - _growth_tracker were skipped. Without a scaler a lag up to `skip_allowance(step)` is a warning;
- an optimizer ahead of the global step, at or behind an earlier save of the same run, or lagging by more than any
  skip count explains is an error: the part comes from another save;
- a scheduler steps after real updates or after every step (times the processes, for Accelerate): it lies between
  the optimizer's updates and the global step; Lightning's may step per epoch instead;
- one counter carried by several files of one save (an optimizer's `step` in every DCP rank file or ZeRO partition,
  Accelerate's `step` in every process's RNG file) has one value: files that differ come from two saves (a rank that
  failed to write, a partial copy), and the error names each value and the files that carry it;
- save counters and accumulation counters are otherwise shown, never compared.
"""

from __future__ import annotations

import math
import os
import re

from ckpttool.model import (EMA_UPDATES, EPOCH, ERROR, GLOBAL_STEP, MICRO_STEPS, OPTIMIZER_UPDATES, SAVES,
                            SCHEDULER_STEPS, SKIPPED_UPDATES, WARNING, Checkpoint, Code, Problem)

MEANINGS = {
    GLOBAL_STEP: "global step: training steps taken, fp16-skipped updates included",
    OPTIMIZER_UPDATES: "optimizer updates actually applied",
    SCHEDULER_STEPS: "LR scheduler steps",
    SAVES: "number of saves (not a step)",
    EPOCH: "epoch",
    MICRO_STEPS: "gradient-accumulation micro-steps (compared only between the processes of one save)",
    SKIPPED_UPDATES: "fp16-skipped updates, as the trainer counted them",
    EMA_UPDATES: "EMA updates (diffusers EMAModel.optimization_step: one per training step)",
}
DEFAULT_INIT_SCALE = 65536.0  # torch.amp.GradScaler, Accelerate GradScalerKwargs and Lightning all default to 2**16
BASE_SKIPS = 16  # halvings from 65536 down to a scale of 1: more early skips than that means a broken run
GROWTH_INTERVAL = 2000  # GradScaler default: one growth (and so at most one more skip) per 2000 clean updates
EXPLAINED, PLAUSIBLE = "explained", "plausible"
MAX_PER_STEP = 64  # scheduler steps per training step a run may make (processes, micro-batches)


def skip_allowance(global_step: int) -> int:
    """Skipped updates a healthy fp16 run may have by `global_step` when no scaler state says more: the early
    back-offs from the default scale, one per growth interval after, and never more than half of all steps."""
    return min(BASE_SKIPS + global_step // GROWTH_INTERVAL, global_step // 2)


def of(ckpt: Checkpoint, meaning: str) -> list:
    return [s for s in ckpt.steps if s.meaning == meaning]


def global_step(ckpt: Checkpoint) -> int | None:
    """The global step: the first global-step source (profiles list state files and names before other counters);
    without one, the optimizer's updates (an Accelerate dir with no name states nothing else)."""
    sources = of(ckpt, GLOBAL_STEP) or of(ckpt, OPTIMIZER_UPDATES)
    return sources[0].value if sources else None


def epoch(ckpt: Checkpoint) -> int | None:
    sources = of(ckpt, EPOCH)
    return sources[0].value if sources else None


def scaler_state(ckpt: Checkpoint) -> dict | None:
    for comp in ckpt.components:
        if comp.role == "scaler" and isinstance(comp.tree, dict) and isinstance(comp.tree.get("scale"), float):
            return comp.tree
    return None


def scaler_skips(scaler: dict, step: int) -> tuple[int | None, int, int]:
    """(net back-offs the loss scale shows under the default init_scale, or None when its factors are not the
    defaults; most growths possible; hard upper bound on skips). A skip halves the scale and a growth doubles it,
    so skips = growths + log2(65536 / scale), which is negative once a long run's scale has grown past 65536."""
    tracker = scaler.get("_growth_tracker") if type(scaler.get("_growth_tracker")) is int else 0
    interval = scaler.get("growth_interval") if type(scaler.get("growth_interval")) is int else GROWTH_INTERVAL
    hard = max(0, step - tracker)
    halvings = None
    scale = scaler["scale"]
    if scale > 0 and scaler.get("backoff_factor", 0.5) == 0.5 and scaler.get("growth_factor", 2.0) == 2.0:
        exact = math.log2(DEFAULT_INIT_SCALE / scale)
        halvings = round(exact) if abs(exact - round(exact)) < 1e-9 else None
    return halvings, hard // max(1, interval), hard


class Judge:
    """Compares one checkpoint's counters; `problems` collects what it finds, `notes` what it explained."""

    def __init__(self, ckpt: Checkpoint, profile, run_saves: dict[int, str]):
        self.ckpt, self.profile = ckpt, profile
        self.step = global_step(ckpt)
        self.has_global = bool(of(ckpt, GLOBAL_STEP))
        self.earlier = sorted(s for s in run_saves if self.step is not None and s < self.step)
        self.run_saves = run_saves
        self._earlier, self._earlier_read = None, False
        self.problems: list[Problem] = []
        self.notes: list[str] = []

    def error(self, message):
        self.problems.append(Problem(Code.STEP_MISMATCH, ERROR, message, self.ckpt.path))

    def warn(self, message):
        self.problems.append(Problem(Code.STEP_MISMATCH, WARNING, message, self.ckpt.path))

    def agree(self, meaning, what):
        sources = of(self.ckpt, meaning)
        if len({s.value for s in sources}) > 1:
            first = sources[0]
            others = ", ".join(f"{s.source}={s.value}" for s in sources[1:] if s.value != first.value)
            self.error(f"{what} sources disagree: {first.source}={first.value}, but {others}; one of them was "
                       "edited or comes from another save")

    def optimizer(self, source):
        updates, step = source.value, self.step
        if updates > step:
            self.error(f"{source.source} is {updates}, ahead of the global step {step}: the optimizer state comes "
                       "from a later save")
            return
        lag = step - updates
        if lag == 0:
            return
        earlier = [s for s in self.earlier if updates <= s]
        verdict, why = self._lag_explained(lag)
        if verdict == EXPLAINED:
            return
        if earlier:
            self.error(f"{source.source} is {updates}, {lag} behind the global step {step}: no more than the run's "
                       f"earlier save at step {earlier[-1]}, so the optimizer state comes from an earlier save")
        elif not self.profile.skips_advance_global_step:
            self.warn(f"{source.source} is {updates}, {lag} behind the global step {step}; "
                      f"{self.profile.name} advances its step only on applied updates, so the optimizer was "
                      "re-created (progressive distillation) or started fresh on a resume that lacked its file")
        elif verdict == PLAUSIBLE:
            self.warn(f"{source.source} is {updates}, {lag} behind the global step {step}: {why}")
        else:
            self.error(f"{source.source} is {updates}, {lag} behind the global step {step}: {why}; the optimizer "
                       "state comes from another save")

    def _lag_explained(self, lag) -> tuple[str | None, str]:
        """(EXPLAINED, note): the scaler shows exactly these skips; (PLAUSIBLE, why): fp16 skips may explain it;
        (None, why): nothing a healthy run does explains it."""
        counted = of(self.ckpt, SKIPPED_UPDATES)
        if counted:
            if lag == counted[0].value:
                note = f"{lag} fp16-skipped updates, as {counted[0].source} counts them"
                self.notes.append(note)
                return EXPLAINED, note
            return None, f"{counted[0].source} counts {counted[0].value} skipped updates, not {lag}"
        scaler = scaler_state(self.ckpt)
        if scaler is None:
            allowance = skip_allowance(self.step)
            if lag <= allowance:
                return PLAUSIBLE, "consistent with fp16 loss-scale skips (no scaler state to confirm it)"
            return None, f"more skipped updates than a healthy fp16 run has by this step (at most {allowance} assumed)"
        halvings, growths, hard = scaler_skips(scaler, self.step)
        if lag > hard:
            return None, (f"the GradScaler's growth tracker shows the last {self.step - hard} updates were all "
                          f"applied, so at most {hard} can have been skipped")
        if halvings is not None and halvings <= lag <= halvings + growths:
            note = (f"{lag} fp16-skipped updates, matching the loss scale ({scaler['scale']:g}, {halvings} net "
                    f"back-offs from {DEFAULT_INIT_SCALE:g}" + (f", up to {growths} growths" if growths else "") + ")")
            self.notes.append(note)
            return EXPLAINED, note
        return PLAUSIBLE, (f"consistent with fp16 loss-scale skips only if init_scale was not the default "
                           f"{DEFAULT_INIT_SCALE:g} (the scale {scaler['scale']:g} shows {halvings} net back-offs)")

    def run_multiple(self, multiples: set[int], value: int, low: int, high: int) -> set[int]:
        """Of the scheduler steps one training step may make (`multiples`: Accelerate's 1 with split_batches, else one
        per process, the processes counted by their RNG files; not saved anywhere), the one this run makes, read from
        its nearest earlier save where the ratio there is exact. A trainer that steps its scheduler once per process
        may save from the main process only (the diffusers scripts), so one RNG file shows no process count: there
        the earlier save's ratio stands (up to MAX_PER_STEP). All of `multiples` where nothing tells."""
        fits = any(k * low <= value <= k * high for k in multiples)
        other = self.earlier_checkpoint() if len(multiples) > 1 or not fits else None
        if other is None:
            return multiples
        step, counted = global_step(other), of(other, SCHEDULER_STEPS)
        ratio = counted[0].value // step if step and len(counted) == 1 and not counted[0].value % step else None
        if ratio is None or not (ratio in multiples or self.profile.scheduler_steps_per_process and
                                 1 < ratio <= MAX_PER_STEP):
            return multiples
        self.notes.append(f"the run steps its scheduler {ratio}x per step (its save at step {step}: "
                          f"{counted[0].source}={counted[0].value})")
        return {ratio}

    def ema(self, source):
        """An EMA steps once per training step (diffusers' scripts: `ema_unet.step` on every sync step, its
        optimization_step saved in unet_ema/config.json and restored on resume): equal to the global step."""
        value, step = source.value, self.step
        if value > step:
            self.error(f"{source.source} is {value}, ahead of the global step {step}: the EMA weights come from a "
                       "later save")
        elif value < step:
            earlier = [s for s in self.earlier if value <= s]
            if earlier:
                self.error(f"{source.source} is {value}, behind the global step {step} and no further than the run's "
                           f"earlier save at step {earlier[-1]}: the EMA weights come from an earlier save")
            else:
                self.warn(f"{source.source} is {value}, behind the global step {step}: the EMA was started late, or "
                          "its weights come from another save")

    def scheduler(self, source, updates):
        value, step = source.value, self.step
        low = min(updates) if updates else step
        high = step if self.has_global else (max(updates) + skip_allowance(max(updates)) if updates else step)
        multiples = self.run_multiple(self.profile.scheduler_multiples(self.ckpt), value, low, high)
        if any(k * low <= value <= k * high for k in multiples):
            return
        epochs = of(self.ckpt, EPOCH)
        if self.profile.scheduler_may_step_per_epoch and epochs and value in (epochs[0].value, epochs[0].value + 1):
            return  # an interval="epoch" scheduler
        rule = self.profile.scheduler_rule
        if value > max(multiples) * high:
            # an exact multiple of the global step, or of the updates where no global step is saved (high is then
            # the updates plus the skips they may lag by)
            exact = [(value // base, base) for base in (high, low) if base and not value % base and
                     2 <= value // base <= MAX_PER_STEP]
            if exact:
                ratio, base = exact[0]
                self.warn(f"{source.source} is {value}, {ratio}x the {'global step' if base == step else 'updates'} "
                          f"{base}: the scheduler steps once per process or micro-batch; check that the resume steps "
                          "it the same way")
            else:
                self.error(f"{source.source} is {value}, ahead of the global step {high} (this trainer steps it "
                           f"{rule}): the scheduler state comes from a later save")
        elif any(value <= max(multiples) * s for s in self.earlier):
            self.error(f"{source.source} is {value}, behind the optimizer ({low}) and no further than the run's "
                       "earlier saves: the scheduler state comes from an earlier save")
        else:
            self.warn(f"{source.source} is {value}, behind the optimizer's {low} updates (this trainer steps it "
                      f"{rule}); fine for a plateau or per-epoch scheduler, otherwise it comes from another save")

    def mixed(self, what: str, values: dict[str, int], exact: bool = True) -> bool:
        """Whether the files carrying one counter of one save (`values`: file -> value) disagree. Where every file
        holds the same value (`exact`) that is an error; where a file's may lag in a healthy save (DCP's per-parameter
        optimizer steps), only a lagging file identical to the same file of one of the run's earlier saves is;
        otherwise a warning."""
        if len(set(values.values())) < 2:
            return False
        by_value: dict[int, list[str]] = {}
        for file, value in sorted(values.items()):
            by_value.setdefault(value, []).append(file)
        shown = " but ".join(f"{value} in {', '.join(files[:4])}{' ...' if len(files) > 4 else ''}"
                             for value, files in sorted(by_value.items()))
        left = "; a file was left by another save (a rank that failed to write, an interrupted copy or restore): " \
               "resume from a checkpoint saved whole"
        if exact:
            self.error(f"the checkpoint mixes saves: {what} is {shown}, and every file of one save carries the same "
                       f"value{left}")
            return True
        top = max(values.values())
        stale = self.left_by_earlier_saves([f for f, v in values.items() if v < top])
        if stale:
            self.error(f"the checkpoint mixes saves: {what} is {shown}, and "
                       + ", ".join(f"{f} is byte for byte the one in the run's save at step {step}"
                                   for f, step in sorted(stale.items())[:4]) + left)
        else:
            self.warn(f"{what} is {shown}: the files come from different saves, or the lower ones hold only parameters "
                      "that some steps left without a gradient (a frozen or unused part); seal each save "
                      "(ckpttool.integrations) to tell")
        return True

    def left_by_earlier_saves(self, files: list[str]) -> dict[str, int]:
        """Which of `files` (relative to the checkpoint) are byte for byte the same file of one of the run's earlier
        saves (newest first), with that save's step: a file a healthy save wrote holds at least its own shards of
        what changed since, so only a file left from an earlier save is identical to it."""
        import filecmp

        found = {}
        for rel in files:
            mine = os.path.join(self.ckpt.path, rel)
            for step in reversed(self.earlier):
                theirs = os.path.join(self.run_saves[step], rel)
                try:
                    same = os.path.getsize(theirs) == os.path.getsize(mine) and filecmp.cmp(theirs, mine,
                                                                                            shallow=False)
                except OSError:
                    same = False
                if same:
                    found[rel] = step
                    break
        return found

    def earlier_checkpoint(self):
        """The run's nearest earlier save, read once (None where there is none or it cannot be read)."""
        if not self._earlier_read:
            self._earlier_read = True
            if self.earlier:
                from ckpttool.checkpoint import open_checkpoint
                from ckpttool.errors import CkptError

                try:
                    self._earlier = open_checkpoint(self.run_saves[self.earlier[-1]])
                except (CkptError, OSError):
                    pass
        return self._earlier


def per_rank_values(ckpt: Checkpoint, profile) -> dict[str, dict[str, int]]:
    """Counters each process writes into its own file with one value for all (the profile's `per_rank_counters`):
    what they are -> file -> value, where more than one file carries them."""
    found: dict[str, dict[str, int]] = {}
    for pattern, what in profile.per_rank_counters:
        for s in ckpt.steps:
            if s.file and re.fullmatch(pattern, s.key):
                found.setdefault(what, {})[s.file] = s.value
    return {what: values for what, values in found.items() if len(values) > 1}


def judge(ckpt: Checkpoint, profile, run_saves: dict[int, str] | None = None) -> tuple[list[Problem], list[str]]:
    """Problems (`step_mismatch`) and explanations for the counters of `ckpt` as its trainer `profile` reads them."""
    j = Judge(ckpt, profile, run_saves or {})
    j.agree(GLOBAL_STEP, "global-step")
    j.agree(EPOCH, "epoch")
    for what, values in per_rank_values(ckpt, profile).items():
        j.mixed(what, values)
    mixed = {id(s) for s in ckpt.steps
             if s.per_file and j.mixed(f"the {s.source}", dict(s.per_file), s.per_file_exact)}
    if j.step is not None:
        updates = of(ckpt, OPTIMIZER_UPDATES)
        for source in updates:
            if j.has_global and id(source) not in mixed:  # files that disagree are the finding, not a lag
                j.optimizer(source)
        for source in of(ckpt, EMA_UPDATES):
            j.ema(source)
        for source in of(ckpt, SCHEDULER_STEPS):
            j.scheduler(source, [u.value for u in updates])
    return j.problems, j.notes
