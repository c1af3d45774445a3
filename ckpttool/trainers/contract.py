"""A trainer's resume contract: what its own resume reads (taken from its source, cited by each profile), and the one
check that holds a checkpoint dir to it.

A `Part` is one thing the resume loads: the entries (files, or folders written with a trailing "/") that satisfy
it, and what follows when
  - none is there (`absent`): ERROR where the resume fails or silently restarts that state, WARNING where only
    reproducibility is lost, RUN where the trainer loads it only if the run uses it (an fp16 scaler): an error when
    the run's other checkpoints have it, else nothing; None where the trainer reads it only when present;
  - one is there but empty, cut short or unparsable (`damaged`): ERROR where loading it raises, WARNING where the
    trainer catches that and goes on without it.
A `core` part's absence is damage whatever the resume (a transformers checkpoint without trainer_state.json never
finished saving), and `Contract.model` names the parts that hold the model: a checkpoint with none of them is damaged.
Entries the resume never opens are listed in `Contract.not_read`, so a user knows they are not checked.

Every present entry is read by its own format's reader (torch and safetensors files, a DCP folder, a save_pretrained
folder with its config and weights, JSON), so damage anywhere is a problem with a code, never an exception. A part
whose entries form a series (model, model_1, ...; one RNG file per rank) must be numbered from 0 without gaps; and
every entry the run's nearest other checkpoint has is expected here too: how many objects were prepared, or how
many ranks saved, is written nowhere else, so a lost last member shows only there (or in a ckpttool manifest).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from enum import StrEnum

from ckpttool import paths
from ckpttool.errors import CkptError
from ckpttool.formats import pretrained_files
from ckpttool.model import ERROR, WARNING, Checkpoint, Code, Problem, Severity
from ckpttool.trainers import implications


class Absent(StrEnum):
    """What a part's absence is (None: nothing, the trainer reads it only when present)."""

    ERROR = Severity.ERROR  # the resume fails or silently restarts that state
    WARNING = Severity.WARNING  # only reproducibility is lost
    RUN = "run"  # an error when the run's other checkpoints have it (the run uses it), else nothing


RUN = Absent.RUN


class FileCheck(StrEnum):
    """How a present file is checked."""

    WEIGHTS = "weights"  # a torch or safetensors file (or a sharded index), read by ckpttool's readers
    JSON = "json"  # parsed as JSON
    PRESENT = "present"  # must not be empty
    TAG = "tag"  # names a folder beside it (DeepSpeed's `latest`: the tag load_checkpoint(tag=None) loads)


class FolderCheck(StrEnum):
    """How a present folder is checked."""

    DCP = "dcp"  # a torch.distributed.checkpoint folder: `.metadata` (written last) and every data file it names
    PRETRAINED = "pretrained"  # a save_pretrained folder: config.json and complete weights
    ADAPTER = "adapter"  # a PEFT save_pretrained folder: adapter_config.json and adapter_model.*
    ENGINE = "engine"  # read by its own format reader with the checkpoint (a DeepSpeed tag dir, the EMA weights)


WEIGHTS, JSON, PRESENT, TAG = FileCheck.WEIGHTS, FileCheck.JSON, FileCheck.PRESENT, FileCheck.TAG
DCP, PRETRAINED, ADAPTER, ENGINE = FolderCheck.DCP, FolderCheck.PRETRAINED, FolderCheck.ADAPTER, FolderCheck.ENGINE

PRETRAINED_CONTENT = (pretrained_files.CONFIG,) + pretrained_files.WEIGHTS
ADAPTER_CONTENT = (pretrained_files.ADAPTER_CONFIG,) + pretrained_files.ADAPTER_WEIGHTS


@dataclass(frozen=True)
class Part:
    what: str  # in words, with its file names: "optimizer state (optimizer.bin, optimizer_1.bin, ...)"
    names: tuple[str, ...]  # regexes of entries (a folder's ends in "/"); a series numbers them in group 1
    absent: Absent | None = Absent.ERROR
    damaged: Severity = ERROR
    code: Code = Code.MISSING_FILE  # the code when absent (missing_optimizer, missing_scheduler, missing_rng, ...)
    why: str = ""  # the trainer's own failure, or what a resume loses, and where in its source
    kind: FileCheck = WEIGHTS  # how a file is checked
    folders: FolderCheck = DCP  # how a folder is checked
    content: tuple[str, ...] = ()  # a folder matches only when it holds one of these (a save_pretrained folder)
    series: bool = False  # every matching entry is read, numbered from 0 (model, model_1, ...; one per rank)
    template: str = ""  # a series member's name: "{_n}" is "" for 0 and "_N" else, "{n}" the number
    per_rank: bool = False  # one per process: as many as the checkpoint shows processes (DCP data files)
    several: bool = False  # a numbered name means several processes (one process writes the unnumbered name)
    stepped: bool = False  # its name carries the step (global_stepN/): the run's checkpoints differ by name
    core: bool = False  # its absence is damage whatever the resume (the save never finished)

    def matches(self, listing: list[str], folder: str) -> list[str]:
        found = []
        for entry in listing:
            if any(re.fullmatch(p, entry) for p in self.names) and (
                    not self.content or not entry.endswith("/") or
                    any(os.path.isfile(os.path.join(folder, entry, c)) for c in self.content)):
                found.append(entry)
        return found

    def number(self, entry: str) -> int:
        """An entry's place in its series: what group 1 captures (0 where a pattern has none: `model`)."""
        for pattern in self.names:
            m = re.fullmatch(pattern, entry)
            if m:
                return int(m.group(1)) if m.groups() and m.group(1) is not None else 0
        return 0

    def member(self, number: int) -> str:
        return self.template.replace("{_n}", f"_{number}" if number else "").replace("{n}", str(number))


@dataclass(frozen=True)
class Contract:
    source: str  # the trainer code these parts were read from
    parts: tuple[Part, ...]
    model: tuple[Part, ...] = ()  # the parts that hold the model (one must be there)
    model_why: str = ""  # the trainer's failure when none is
    not_read: tuple[tuple[str, str], ...] = ()  # (regex of an entry, why the resume never opens it)


def entries(path: str) -> list[str]:
    """The names in a checkpoint dir, folders marked with a trailing "/", sorted."""
    try:
        return sorted(e.name + "/" if e.is_dir() else e.name for e in os.scandir(path))
    except OSError:
        return []


def _full(path: str, entry: str) -> str:
    return os.path.join(path, entry.rstrip("/"))


# --- damage: what is there, and a checkpoint without its model ---

def damage(contract: Contract, ckpt: Checkpoint) -> list[Problem]:
    """Problems of the entries that are there (empty, cut, unparsable, an interrupted DCP save, an incomplete
    save_pretrained folder), each read by its format; what the readers found in a part the trainer tolerates damage
    of is lowered to a warning in `ckpt.problems`; and no model at all."""
    found = []
    listing = entries(ckpt.path)
    for part in contract.parts:
        present = part.matches(listing, ckpt.path)
        for entry in present:
            full = _full(ckpt.path, entry)
            found.extend(_entry_problems(part, full, entry.endswith("/"), ckpt))
            if part.damaged == WARNING:
                _lower(ckpt, full, f"the trainer goes on without it: {part.why}")
        if part.core and not present:
            found.append(Problem(part.code, ERROR, f"no {part.what}: {part.why}", ckpt.path))
    for entry in listing:
        why = next((why for pattern, why in contract.not_read if re.fullmatch(pattern, entry)), None)
        if why:
            _lower(ckpt, _full(ckpt.path, entry), f"not read on resume: {why}")
    if contract.model and not any(p.matches(listing, ckpt.path) for p in contract.model):
        found.append(Problem(Code.MISSING_FILE, ERROR, f"no model weights ({'; '.join(p.what for p in contract.model)})"
                             f": {contract.model_why}", ckpt.path))
    return found


def _entry_problems(part: Part, full: str, is_folder: bool, ckpt: Checkpoint) -> list[Problem]:
    if paths.unsafe(full, ckpt.path):
        return []  # never opened; ckpttool.checkpoint reports it (unsafe_path)
    if is_folder:
        names = pretrained_files
        return (_dcp_problems(part, full, ckpt) if part.folders == DCP else
                _folder_problems(part, full, ckpt, names.CONFIG, names.WEIGHTS, names.WEIGHTS_IN_WORDS)
                if part.folders == PRETRAINED else
                _folder_problems(part, full, ckpt, names.ADAPTER_CONFIG, names.ADAPTER_WEIGHTS,
                                 " or ".join(names.ADAPTER_WEIGHTS))
                if part.folders == ADAPTER else [])
    if not os.path.exists(full):  # a link to nothing
        return [Problem(Code.MISSING_FILE, part.damaged, f"{os.path.basename(full)} is a link to nothing: {part.why}",
                        full)]
    if os.path.getsize(full) == 0:
        return [Problem(Code.MISSING_FILE, part.damaged, f"{os.path.basename(full)} is empty: {part.why}", full)]
    if part.kind == JSON:
        return _json_problems(part, full)
    if part.kind == TAG:
        return _tag_problems(part, full)
    if part.kind == WEIGHTS and full not in ckpt.files:  # a file the reader's roles did not name: read it now
        return _read_problems(part, full)
    return []


def _json_problems(part: Part, full: str) -> list[Problem]:
    try:
        with open(full, encoding="utf-8") as f:
            json.load(f)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        return [Problem(Code.CORRUPT, part.damaged,
                        f"{os.path.basename(full)} is not valid JSON (cut short or damaged: "
                        f"{e}): {part.why}", full)]
    return []


def _tag_problems(part: Part, full: str) -> list[Problem]:
    with open(full, encoding="utf-8", errors="replace") as f:
        tag = f.read().strip()
    if paths.folder_named(os.path.dirname(full), tag):
        return []
    return [Problem(Code.CORRUPT, part.damaged, f"{os.path.basename(full)} names {tag!r}, which is no folder beside it "
                    f"(cut short or damaged?): {part.why}", full)]


def _read_problems(part: Part, full: str) -> list[Problem]:
    from ckpttool.formats import read_file, sharded

    try:
        read = sharded.read(full) if full.endswith(".index.json") else read_file(full)
    except CkptError as e:
        return [Problem(e.code, part.damaged, f"{e.reason}: {part.why}", e.path or full)]
    except OSError as e:
        return [Problem(Code.MISSING_FILE, part.damaged, f"{e.strerror}: {part.why}", e.filename or full)]
    return [Problem(p.code, part.damaged if p.severity == ERROR else p.severity, p.message, p.path or full)
            for p in read.problems]


def _dcp_problems(part: Part, folder: str, ckpt: Checkpoint) -> list[Problem]:
    """A DCP folder: DCP writes `.metadata` last, so without it the save never finished; with it, every data file it
    names must be there and long enough (the DCP reader names the items each one held)."""
    from ckpttool.formats import dcp

    meta = os.path.join(folder, dcp.METADATA)
    if not os.path.isfile(meta):
        return [Problem(Code.MISSING_FILE, part.damaged, f"{os.path.basename(folder)}/ has no {dcp.METADATA}: DCP "
                        f"writes it last, so this save never finished ({part.why})", meta)]
    if meta in ckpt.files:
        return []  # read with the checkpoint: its problems are already in
    try:
        read = dcp.read(folder)
    except CkptError as e:
        return [Problem(e.code, part.damaged, f"{os.path.basename(folder)}/: {e.reason}", e.path or meta)]
    return list(read.problems)


def _folder_problems(part: Part, folder: str, ckpt: Checkpoint, config_name: str, weight_names,
                     weights_in_words: str) -> list[Problem]:
    """A save_pretrained folder, as `from_pretrained` (or PEFT's load_adapter) reads it: its config, then the
    weights (every shard an index names)."""
    name = os.path.basename(folder) + "/"
    problems = []
    config = os.path.join(folder, config_name)
    if not os.path.isfile(config):
        problems.append(Problem(Code.MISSING_FILE, part.damaged, f"{name} has no {config_name}, which from_pretrained "
                                f"builds the model from: {part.why}", config))
    elif os.path.getsize(config) == 0:
        problems.append(Problem(Code.MISSING_FILE, part.damaged, f"{name}{config_name} is empty: {part.why}", config))
    else:
        problems.extend(_json_problems(part, config))
    weights = pretrained_files.weights_file(folder, weight_names)
    if weights is None:
        problems.append(Problem(Code.MISSING_FILE, part.damaged, f"{name} has no weights ({weights_in_words}), which "
                                f"from_pretrained loads: {part.why}", folder))
    elif os.path.getsize(weights) == 0:
        problems.append(Problem(Code.MISSING_FILE, part.damaged, f"{name}{os.path.basename(weights)} is empty: "
                                f"{part.why}", weights))
    elif weights not in ckpt.files:
        problems.extend(_read_problems(part, weights))
    return problems


def _lower(ckpt: Checkpoint, full: str, why: str):
    """Damage the resume does not mind (the trainer catches it, or never opens the file): what the readers found in
    `full` is a warning, saying why."""
    for p in ckpt.problems:  # a pickle that runs code is a payload whether or not the resume opens it
        if p.severity == ERROR and p.code not in (Code.UNSAFE_PICKLE, Code.UNSAFE_PATH) and p.path and \
                (p.path == full or p.path.startswith(full + os.sep)):
            p.severity = WARNING
            p.message += f" ({why})"


# --- absence: what is not there ---

def absence(contract: Contract, ckpt: Checkpoint, sibling: str | None) -> list[Problem]:
    """What a resume would fail on or lose for want of an entry: a part none of whose entries is there, a gap in a
    series, and an entry that the run's nearest other checkpoint `sibling` has and this one lacks."""
    found = []
    listing = entries(ckpt.path)
    theirs = entries(sibling) if sibling else []
    for part in contract.parts:
        present = part.matches(listing, ckpt.path)
        others = part.matches(theirs, sibling) if sibling else []
        if not present:
            severity = ERROR if part.absent is RUN and others else None if part.absent in (RUN, None) else \
                Severity(part.absent)
            if severity and not part.core and part not in contract.model:  # damage, reported as such
                run = f" (the run's {os.path.basename(sibling)} has {others[0].rstrip('/')})" if others else ""
                found.append(Problem(part.code, severity, f"no {part.what}{run}: {part.why}", ckpt.path))
            continue
        severity = Severity(part.absent) if part.absent in (Absent.ERROR, Absent.WARNING) else ERROR
        if part.series:
            numbers = {part.number(e) for e in present}
            top = max(numbers)
            if part.several and any(re.search(r"\d", e) and part.number(e) == 0 for e in present):
                top = max(top, 1)
            if part.per_rank:
                top = max(top, world_size(ckpt) - 1)
            for number in sorted(set(range(top + 1)) - numbers):
                found.append(Problem(part.code, severity, f"{part.member(number)} is missing, though "
                                     f"{', '.join(e.rstrip('/') for e in present[:3])} is there: {part.why}",
                                     _full(ckpt.path, part.member(number))))
            numbers |= set(range(top + 1))
            lost = sorted({part.number(e) for e in others} - numbers)
            lost_names = [part.member(n) for n in lost]
        else:
            lost_names = [] if part.stepped else [e.rstrip("/") for e in others if e not in present]
        for name in lost_names:
            found.append(Problem(part.code, severity, f"{name} is missing, though the run's "
                                 f"{os.path.basename(sibling)} has it: {part.why}", _full(ckpt.path, name)))
    return found


def implied(contract: Contract, ckpt: Checkpoint, lost: list[Problem]) -> list[Problem]:
    """What the present files imply is missing (ckpttool.trainers.implications), beyond what `absence` found
    (`lost`): a scheduler its optimizer had (an error where the contract says the trainer always saves it), an
    optimizer its scheduler steps, the model a numbered optimizer trains."""
    listing = entries(ckpt.path)
    scheduler = next((p for p in contract.parts if p.code == Code.MISSING_SCHEDULER), None)
    found = implications.scheduler_problems(
        ckpt, always_saved=scheduler is not None and scheduler.absent == Absent.ERROR,
        lost_reported=any(p.code == Code.MISSING_SCHEDULER for p in lost), series=True)
    optimizers = next((p for p in contract.parts if p.code == Code.MISSING_OPTIMIZER and p.series), None)
    models = [part.number(e) for part in contract.model if part.series for e in part.matches(listing, ckpt.path)]
    if optimizers and models:
        numbers = {c.name: optimizers.number(os.path.basename(c.files[0])) for c in ckpt.components
                   if c.role == "optimizer" and c.files}
        found += implications.model_problems(ckpt, numbers, 1 + max(models))
    return found


def world_size(ckpt: Checkpoint) -> int:
    """How many processes saved the checkpoint, as far as its files show: DCP names each rank's data file
    `__{rank}_{n}.distcp` (filesystem.py _generate_uuid / FileSystemWriter); 1 where nothing says more."""
    ranks = [int(m.group(1)) for f in ckpt.files if (m := re.fullmatch(r"__(\d+)_\d+\.distcp", os.path.basename(f)))]
    return max(ranks, default=0) + 1


def nearest_sibling(path: str, saves: dict[int, str], step: int | None) -> str | None:
    """The run's checkpoint nearest to `path`, an older one first (the same program wrote it just before); never a
    temporary dir, whose save did not finish."""
    others = {n: p for n, p in saves.items() if os.path.abspath(p) != os.path.abspath(path) and os.path.isdir(p)
              and not re.fullmatch(r".*(?:-tmp|\.tmp)", os.path.basename(os.path.abspath(p)))}
    if not others or step is None:
        return None
    older = [n for n in others if n < step]
    return others[max(older) if older else min(others)]


def unaccounted(contract: Contract, path: str) -> list[str]:
    """Entries of a checkpoint dir that no part and no not-read rule names (for the sweep: a contract must account
    for every file its trainer writes)."""
    listing = entries(path)
    named = {e for part in contract.parts for e in part.matches(listing, path)}
    return [e for e in listing if e not in named and not any(re.fullmatch(p, e) for p, _ in contract.not_read)]
