"""What a trainer profile knows about the checkpoints one trainer writes, and the defaults most trainers share.

A profile answers, once for every command: is this path (or this file's content) that trainer's output; what role
each file or top-level key plays; what each counter it saves means; how a finished save is marked; how the trainer's
own "resume from latest" chooses; and what a resume from it needs. The format readers (`ckpttool.formats`) never
decide these.
"""

from __future__ import annotations

import functools
import json
import os
import re
from typing import TYPE_CHECKING

from ckpttool import paths
from ckpttool.model import ERROR, GLOBAL_STEP, WARNING, Checkpoint, Code, Problem, Record, StepSource
from ckpttool.trainers import implications

if TYPE_CHECKING:
    from ckpttool.formats.statedir import FileRole, StateDirFiles
    from ckpttool.trainers.contract import Contract

TEMPORARY_NAME = re.compile(r".*(?:-tmp|\.tmp)")


MARKER_LIMIT = 64 << 20  # bytes of a marker or counters file read at most: a larger one is no trainer's


def marker_text(folder: str, name: str, limit: int = MARKER_LIMIT) -> str | None:
    """The text of `folder/name`, a file a profile recognises its trainer by; None when it is missing, unreadable or
    longer than `limit` bytes (a hostile file is never read whole into memory), and never opened when it is a FIFO,
    device or socket (opening could block for ever) or a link out of `folder`."""
    full = os.path.join(folder, name)
    if paths.unsafe(full, folder):
        return None
    try:
        with open(full, "rb") as f:
            data = f.read(limit + 1)
    except OSError:
        return None
    return None if len(data) > limit else data.decode("utf-8", errors="replace")


def json_keys(folder: str, name: str) -> set | None:
    """The top-level keys of `folder/name` when it is a JSON object; None when it is missing or not one."""
    text = marker_text(folder, name)
    try:
        doc = json.loads(text) if text is not None else None
    except (ValueError, RecursionError):
        return None
    return set(doc) if isinstance(doc, dict) else None


def dig(obj, *keys):
    """obj[k1][k2]... of plain dicts, or None where a level is missing or not a dict (the file is untrusted)."""
    for key in keys:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


def numbered_dirs(folder: str, pattern: re.Pattern) -> dict[int, str]:
    """number -> path of the subdirs of `folder` whose name matches `pattern` (group 1 is the number)."""
    found = {}
    try:
        entries = os.listdir(folder)
    except OSError:
        return found
    for entry in entries:
        m = pattern.fullmatch(entry)
        if m and os.path.isdir(os.path.join(folder, entry)):
            found[int(m.group(1))] = os.path.join(folder, entry)
    return found


MOMENT = re.compile(r"(?:(.*)\.)?state\.(\d+)\.(exp_avg|exp_avg_sq|max_exp_avg_sq|momentum_buffer)")


def moment_problems(ckpt: Checkpoint) -> list[Problem]:
    """A torch optimizer keeps every moment of one parameter in that parameter's shape (Adam's exp_avg, exp_avg_sq,
    SGD's momentum_buffer): moments of one index in two shapes were swapped or mixed between parameters, and the
    first step after the resume fails (RuntimeError: the size of tensor a must match tensor b)."""
    problems = []
    for comp in ckpt.components:
        if comp.role != "optimizer":
            continue
        shapes: dict[tuple, dict[str, tuple]] = {}
        for t in comp.tensors:
            if (m := MOMENT.fullmatch(t.name)) and t.shape:
                shapes.setdefault((m.group(1), int(m.group(2))), {})[m.group(3)] = tuple(t.shape)
        for (prefix, index), moments in sorted(shapes.items(), key=lambda item: (item[0][0] or "", item[0][1])):
            if len(set(moments.values())) > 1:
                seen = ", ".join(f"{k} {list(v)}" for k, v in sorted(moments.items()))
                problems.append(Problem(Code.OPTIMIZER_MISMATCH, ERROR,
                                        f"the optimizer state of parameter {index} holds "
                                        f"moments of different shapes ({seen}): they were swapped or mixed between "
                                        "parameters, and the first step after the resume fails", comp.files[0]
                                        if comp.files else ckpt.path, key=f"{prefix + '.' if prefix else ''}state."
                                        f"{index}", component=comp.name))
    return problems


@functools.lru_cache(maxsize=1)
def _other_numpy_core() -> str | None:
    """The spelling of numpy's core module that a weights_only load on this machine does not accept: the trainers
    allow-list `np._core.multiarray._reconstruct` under numpy 2 and `np.core...` under numpy 1, and torch matches
    names exactly, so an RNG file written under the other numpy is refused. None where numpy is not installed."""
    from importlib import metadata

    try:
        major = int(metadata.version("numpy").split(".")[0])
    except (metadata.PackageNotFoundError, ValueError):
        return None
    return "numpy.core" if major >= 2 else "numpy._core"


COUNTER_LIMIT = 1 << 63  # torch's int64 and JSON writers' counters stay below; a larger number counts nothing


class Profile:
    """The generic profile: what holds for a checkpoint whose trainer is not known."""

    name: str | None = None  # the `trainer` JSON field
    layout: str | None = None  # shown as the layout; None keeps the reader's
    source = ""  # the library source this profile was read from (shown by inspect as metadata.trainer_source)
    file_roles: tuple[FileRole, ...] = ()  # for state dirs
    state_files: dict[str, dict[str, str]] = {}  # JSON files of counters: file -> {key: meaning}
    key_roles: dict[str, str] = {}  # a training dict's top-level keys -> roles (beyond the generic ones)
    # (the record a counter was read from, a regex its key matches whole, its meaning) for counters the reader did not
    # name: matched on where a counter was read, never on the label shown for it
    counter_meanings: tuple[tuple[Record, str, str], ...] = ()
    name_pattern: re.Pattern | None = None  # the checkpoint's own name; group 1 is `name_meaning`'s value
    name_meaning = GLOBAL_STEP
    skips_advance_global_step = True  # an fp16-skipped update still advances the global step
    saves_rng = True  # a checkpoint without RNG state is worth a warning
    needs_scheduler = True
    scheduler_rule = "after each optimizer step, or after each training step"
    scheduler_may_step_per_epoch = False  # Lightning's interval="epoch": last_epoch counts epochs
    # (file name pattern, the globals the trainer's torch.load(weights_only=True) of it accepts, whether a refusal
    # stops the resume): a file naming anything else fails there, whatever ckpttool itself can read. Empty where the
    # loader is unknown or unpickles freely (DeepSpeed's engine, Lightning's torch.load of a trusted .ckpt).
    weights_only_loads: tuple[tuple[str, frozenset, bool], ...] = ()
    scheduler_steps_per_process = False  # its scheduler may step once per process (scheduler_multiples)
    # (key regex, what it is) of counters every process writes into its own file with one value for all
    per_rank_counters: tuple[tuple[str, str], ...] = ()
    built_on: str | None = None  # the library whose save this trainer's checkpoints are (Accelerate's save_state)
    # Claims a dir by the files every trainer built on that library writes: the run's other checkpoints may say which
    # trainer it really is, when the file that marks that trainer is the one lost
    claims_by_shared_files = False
    latest_rule: str | None = None  # how the trainer's own "resume from latest" picks, in words
    lost_pick_outcome = "its resume fails"  # what the trainer does when what its rule picks is gone
    training_state_only = False  # its saves are training states, never weights alone (one without them is damaged)
    total_limit_rule: str | None = None  # how its total limit deletes, in words

    def state_dir_files(self) -> StateDirFiles | None:
        """What the state-dir reader reads in this trainer's checkpoint dirs; None when they are no state dirs."""
        if not self.file_roles:
            return None
        from ckpttool.formats.statedir import StateDirFiles

        return StateDirFiles(self.file_roles, self.state_files, self.layout)

    def claims_path(self, path: str) -> bool:
        """Recognise the trainer's output from names and files alone (no pickle read)."""
        return False

    def claims(self, ckpt: Checkpoint) -> bool:
        """Recognise the trainer's output from what a reader found (a torch file's top-level keys)."""
        return False

    def confirms(self, ckpt: Checkpoint) -> bool:
        """Whether what the reader found is this trainer's, where names and files claimed it (a name another tool may
        also write); when not, the profiles that recognise content decide."""
        return True

    def run_folder(self, path: str) -> str | None:
        """Why `path`, which this profile claims, is a folder of the run's saves rather than one checkpoint, and
        what to run instead; None when it is a checkpoint."""
        return None

    # --- counters ---

    def name_number(self, path: str) -> int | None:
        if self.name_pattern is None:
            return None
        m = self.name_pattern.fullmatch(os.path.basename(os.path.abspath(path)))
        return int(m.group(1)) if m else None

    def name_counters(self, path: str) -> list[StepSource]:
        number = self.name_number(path)
        label = "file name" if os.path.isfile(path) else "directory name"
        return [] if number is None else [StepSource(label, number, self.name_meaning, record=Record.NAME)]

    def interpret(self, ckpt: Checkpoint):
        """Name the trainer, the roles of its parts and the meaning of each counter; add what an unfinished save
        looks like as problems."""
        ckpt.trainer = self.name
        ckpt.problems[:] = [p for p in ckpt.problems if not self._loader_takes(ckpt, p)]
        if self.source:
            ckpt.metadata["trainer_source"] = self.source
        if self.layout:
            ckpt.layout = self.layout
        for comp in ckpt.components:
            if comp.name in self.key_roles:
                comp.role = self.key_roles[comp.name]
        ckpt.steps[:0] = self.name_counters(ckpt.path)
        ckpt.steps[:] = [s for s in ckpt.steps if all(-COUNTER_LIMIT < v < COUNTER_LIMIT for v in
                                                      [s.value] + [v for _, v in s.per_file])]
        for s in ckpt.steps:
            if s.meaning is None:
                s.meaning = next((meaning for record, pattern, meaning in self.counter_meanings
                                  if s.record is record and re.fullmatch(pattern, s.key)), None)
        ckpt.problems.extend(self.completion_problems(ckpt))
        if os.path.isdir(ckpt.path) and (terms := self.resume_contract(ckpt)) is not None:
            from ckpttool.trainers import contract

            ckpt.problems.extend(contract.damage(terms, ckpt))

    def _loader_takes(self, ckpt: Checkpoint, problem: Problem) -> bool:
        """Whether a `needs_safe_globals` warning is moot: the trainer's own weights_only load of that file
        allow-lists every plain-data global it names (loader_problems judges the file against that list)."""
        if problem.code != Code.NEEDS_SAFE_GLOBALS or problem.severity != WARNING or not problem.path:
            return False
        from ckpttool.formats.pickles import INERT_CLASSES

        name = os.path.basename(problem.path)
        allowed = next((a for pattern, a, _ in self.weights_only_loads if re.fullmatch(pattern, name)), None)
        named = {g for c in ckpt.components if c.files and c.files[0] == problem.path for g in c.pickle_globals
                 if g in INERT_CLASSES or g.startswith("numpy.")}
        return allowed is not None and bool(named) and named <= allowed

    def completion_problems(self, ckpt: Checkpoint) -> list[Problem]:
        return []

    def scheduler_multiples(self, ckpt: Checkpoint) -> set[int]:
        """How many scheduler steps one training step may make (Accelerate: one per process)."""
        return {1}

    def own_manifest(self, ckpt: Checkpoint) -> tuple[str, list[Problem]] | None:
        """The checksum manifest the trainer itself wrote into this checkpoint, checked as its loader checks it: (its
        name, what differs); None where it wrote none. verify reads it where ckpttool wrote no manifest of its own."""
        return None

    # --- the run a checkpoint belongs to ---

    def run_saves(self, path: str) -> dict[int, str]:
        """global step -> path of every save of the run this checkpoint belongs to (itself included)."""
        if self.name_pattern is None or self.name_meaning != GLOBAL_STEP:
            return {}
        return numbered_dirs(os.path.dirname(os.path.abspath(os.path.normpath(path))), self.name_pattern)

    def own_latest(self, run_dir: str) -> str | None:
        """What the trainer's own "resume from latest" would load from `run_dir` (None: it has none)."""
        return None

    # --- resume ---

    def resume_contract(self, ckpt: Checkpoint) -> Contract | None:
        """What this trainer's own resume reads from a checkpoint dir, from its source (ckpttool/trainers/contract.py):
        every part checked when read, its absence when resuming. None: the roles the reader found decide."""
        return None

    def loader_problems(self, ckpt: Checkpoint) -> list[Problem]:
        """Parts whose file names globals the trainer's own weights_only load refuses (an optimizer `lr` saved as a
        numpy.float64): an error where the refusal stops the resume, with the line that lets it load."""
        from ckpttool.formats.pickles import runs_code

        problems, files = [], {}
        for comp in ckpt.components:  # the parts of one file (a Lightning .ckpt) share its globals: one problem
            if comp.files and comp.pickle_globals:
                files.setdefault(comp.files[0], comp)
        for path, comp in files.items():
            name = os.path.basename(path)
            allowed, fatal = next(((a, f) for pattern, a, f in self.weights_only_loads if re.fullmatch(pattern, name)),
                                  (None, False))
            if allowed is not None and (other := _other_numpy_core()):
                allowed = {g for g in allowed if not g.startswith(other + ".")}
            refused = [g for g in comp.pickle_globals if allowed is not None and g not in allowed and not runs_code(g)]
            if refused:
                line = f"torch.serialization.add_safe_globals([{', '.join(refused)}])"
                problems.append(Problem(
                    Code.NEEDS_SAFE_GLOBALS, ERROR if fatal else WARNING,
                    f"{name} names {', '.join(refused)}, which {self.name}'s resume loads "
                    f"with torch.load(weights_only=True) and refuses (UnpicklingError)" +
                    (": the resume fails" if fatal else ": it goes on without this part") +
                    f"; if you trust the file, run `{line}` (the objects imported) before resuming", path,
                    component=comp.name))
        return problems

    def resume_problems(self, ckpt: Checkpoint) -> list[Problem]:
        """What a resume from this checkpoint would fail on or silently lose."""
        roles = {c.role for c in ckpt.components}
        problems = []
        name = os.path.basename(os.path.abspath(ckpt.path))
        if TEMPORARY_NAME.fullmatch(name):  # SimpleTuner's checkpoint-N-tmp, the reference trainer's .tmp
            problems.append(Problem(Code.MISSING_FILE, ERROR, f"{name} is a temporary dir: its save never completed "
                                    "(trainers rename it into place when done)", ckpt.path))
        if roles <= {"model", "ema", "extra", "target", "teacher", "config", "callbacks"}:
            return problems + [weights_only_problem(ckpt)]
        problems += self.loader_problems(ckpt) + moment_problems(ckpt)
        if os.path.isdir(ckpt.path) and (terms := self.resume_contract(ckpt)) is not None:
            from ckpttool.trainers import contract

            step = next((s.value for s in self.name_counters(ckpt.path)), None)
            sibling = contract.nearest_sibling(ckpt.path, self.run_saves(ckpt.path), step)
            lost = contract.absence(terms, ckpt, sibling)
            return problems + lost + contract.implied(terms, ckpt, lost)
        if "optimizer" not in roles:
            problems.append(Problem(Code.MISSING_OPTIMIZER, ERROR, "no optimizer state: a resume would restart Adam "
                                    "moments and the step count from zero", ckpt.path))
        if self.needs_scheduler and "scheduler" not in roles:
            problems.append(Problem(Code.MISSING_SCHEDULER, ERROR, "no LR scheduler state: a resume would restart "
                                    "warmup and the schedule from step 0", ckpt.path))
        problems += implications.scheduler_problems(ckpt, always_saved=False,
                                                    lost_reported=self.needs_scheduler and "scheduler" not in roles)
        if self.saves_rng and "rng" not in roles:
            problems.append(Problem(Code.MISSING_RNG, WARNING,
                                    "no RNG state: a resume works but data order and dropout "
                                    "differ from an uninterrupted run (not bit-exact)", ckpt.path))
        return problems


def weights_only_problem(ckpt: Checkpoint, hint: str | None = None) -> Problem:
    """A weights file or adapter where a training state is needed; `hint`: the state dir to resume from instead
    (`ckpttool.trainers.resume_problems` finds it)."""
    advice = (f"resume from the state dir beside it: {hint}" if hint else
              "resume from the training state (optimizer, scheduler, RNG) saved with it, not from exported weights")
    return Problem(Code.WEIGHTS_ONLY, ERROR, f"{os.path.basename(os.path.abspath(ckpt.path))} holds weights only; "
                   f"{advice}", ckpt.path)
