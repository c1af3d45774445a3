"""The data model every reader fills in and every operation consumes.

Readers describe a checkpoint without loading tensor data: each tensor is a name, a dtype, a shape and a
`Location` (file, byte offset, byte length) from which it can be read on demand.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from enum import StrEnum
from typing import NamedTuple

from ckpttool.dtypes import BITS


class Severity(StrEnum):
    ERROR = "error"  # the checkpoint must not be used as it is: exit 1, the gate refuses
    WARNING = "warning"  # worth knowing; nothing fails on it


ERROR, WARNING = Severity.ERROR, Severity.WARNING


class Code(StrEnum):
    """The problem codes of the contract (../shared/CONTRACT.md, README): stable, add more, never rename."""

    TRUNCATED = "truncated"
    CORRUPT = "corrupt"
    MISSING_FILE = "missing_file"
    CHECKSUM_MISMATCH = "checksum_mismatch"
    NO_MANIFEST = "no_manifest"
    STEP_MISMATCH = "step_mismatch"
    MISSING_OPTIMIZER = "missing_optimizer"
    MISSING_SCHEDULER = "missing_scheduler"
    MISSING_RNG = "missing_rng"
    WEIGHTS_ONLY = "weights_only"
    UNSAFE_PICKLE = "unsafe_pickle"
    NEEDS_SAFE_GLOBALS = "needs_safe_globals"
    UNSAFE_PATH = "unsafe_path"
    NONFINITE = "nonfinite"
    NO_TENSORS = "no_tensors"
    QUANTIZED_KEYS = "quantized_keys"
    KEY_MISMATCH = "key_mismatch"
    SHAPE_MISMATCH = "shape_mismatch"
    DTYPE_MISMATCH = "dtype_mismatch"
    VALUE_MISMATCH = "value_mismatch"
    OPTIMIZER_MISMATCH = "optimizer_mismatch"
    SCHEDULER_MISMATCH = "scheduler_mismatch"
    WORLD_SIZE_MISMATCH = "world_size_mismatch"
    CUSTOM_CHECKPOINT_MISMATCH = "custom_checkpoint_mismatch"
    UNSUPPORTED_LAYOUT = "unsupported_layout"
    LOSSY_CAST = "lossy_cast"
    LFS_POINTER = "lfs_pointer"
    NOT_A_CHECKPOINT = "not_a_checkpoint"
    INCOMPLETE_DOWNLOAD = "incomplete_download"


# What makes a checkpoint's bytes unusable (as against a resume that would lose state, or a mismatch with a model).
DAMAGE = frozenset({Code.TRUNCATED, Code.CORRUPT, Code.MISSING_FILE, Code.CHECKSUM_MISMATCH, Code.NO_MANIFEST})


class Status(StrEnum):
    """A verify check's result."""

    PASS = "pass"
    FAIL = "fail"
    WARN = "warn"
    NOTE = "note"  # nothing checked, but something to know (no manifest to check against)
    SKIP = "skip"  # nothing to check


def dtype_bytes(dtype: str, shape) -> int:
    return (math.prod(shape) * BITS.get(dtype, 8) + 7) // 8


@dataclass
class Problem:
    """One thing found wrong, from the reader or check that finds it to the renderer that prints it."""

    code: Code
    severity: Severity
    message: str
    path: str | None = None
    key: str | None = None
    component: str | None = None  # the component it concerns, when a reader knows
    fix: str | None = None  # what to run about it (the gate says it for every problem it can)
    remap: str | None = None  # the `ckpttool remap` option that aligns the keys, where one does (never shown)

    def __post_init__(self):
        self.code, self.severity = Code(self.code), Severity(self.severity)  # a misspelt code fails where it is made

    def to_json(self) -> dict:
        out = {"code": self.code.value, "severity": self.severity.value, "message": self.message}
        if self.component:
            out["component"] = self.component
        if self.path:
            out["path"] = self.path
        if self.key:
            out["key"] = self.key
        if self.fix:
            out["fix"] = self.fix
        return out


def errors(problems) -> list[Problem]:
    return [p for p in problems if p.severity is ERROR]


class CheckResult(NamedTuple):
    """One row of verify's table: a check, how it came out, and why."""

    check: str
    status: Status
    detail: str = ""

    def to_json(self) -> dict:
        return {"check": self.check, "status": self.status.value, "detail": self.detail}


@dataclass(eq=False)  # compared by to_json
class VerifyReport:
    """What `verify` found: every check with its result, and the problems behind them."""

    path: str
    step: int | None
    format: str | None
    layout: str | None = None
    trainer: str | None = None
    checks: list = field(default_factory=list)  # CheckResult
    problems: list = field(default_factory=list)  # Problem
    recalled: bool = False  # remembered from an earlier verify of the same bytes (operations/verify_cache.py)
    profile: object = field(default=None, repr=False)  # the trainer profile that read it (never shown; None when
    # recalled: the cache keeps JSON, and `trainer` names the profile)

    @property
    def ok(self) -> bool:
        return not errors(self.problems)

    def to_json(self) -> dict:
        out = {"path": self.path, "ok": self.ok, "step": self.step, "format": self.format, "layout": self.layout,
               "trainer": self.trainer, "checks": [c.to_json() for c in self.checks],
               "problems": [p.to_json() for p in self.problems]}
        if self.recalled:
            out["recalled"] = True
        return out

    @classmethod
    def from_json(cls, doc: dict) -> "VerifyReport":
        """A report kept by to_json (the verify cache's own file)."""
        return cls(doc["path"], doc["step"], doc["format"], doc.get("layout"), doc.get("trainer"),
                   [CheckResult(c["check"], Status(c["status"]), c["detail"]) for c in doc["checks"]],
                   [Problem(p["code"], p["severity"], p["message"], p.get("path"), p.get("key"), p.get("component"),
                            p.get("fix")) for p in doc["problems"]], bool(doc.get("recalled")))


def to_json(value):
    """A report made JSON-able at the edge (cli.py): typed objects by their to_json, inside dicts and lists too."""
    if hasattr(value, "to_json"):
        return value.to_json()
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    return value


@dataclass
class Location:
    """Where a tensor's bytes live: `length` bytes at `offset` of `file`, stored as `storage_dtype`."""

    file: str
    offset: int
    length: int
    storage_offset: int = 0  # in elements, for views into a larger torch storage
    stride: tuple | None = None
    device: str = "cpu"  # where torch saved it (`cuda:0` reads fine on a CPU box)
    encoding: str = "raw"  # "raw" bytes, or "torch.save" (a DCP item: a whole torch.save blob)


@dataclass(frozen=True)
class Chunk:
    """One rank's piece of a sharded tensor: `sizes` elements at `offsets` (a DCP shard), or with one offset and one
    size, a run of the flattened tensor (a DeepSpeed ZeRO partition's slice)."""

    offsets: tuple
    sizes: tuple
    location: Location


@dataclass
class TensorInfo:
    name: str
    dtype: str
    shape: tuple
    location: Location | None = None
    storage_key: str | None = None  # tensors sharing a storage (tied weights, views) share this
    chunks: tuple = ()  # a tensor saved in pieces (DCP, one per shard): location is None, the reader assembles it
    conj: bool = False  # the values are the stored data conjugated (torch's conj bit, saved by torch.save)
    neg: bool = False  # the values are the stored data negated (torch's neg bit)

    @property
    def readable(self) -> bool:
        """Whether its bytes can be read: one location, or chunks."""
        return self.location is not None or bool(self.chunks)

    def pieces(self) -> list[tuple[tuple | None, Location]]:
        """(chunk offsets, or None for a whole tensor; location) of each stored piece of this tensor."""
        if self.chunks:
            return [(c.offsets, c.location) for c in self.chunks]
        return [(None, self.location)] if self.location is not None else []

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return dtype_bytes(self.dtype, self.shape)

    def byte_range(self):
        """(file, offset, length) of exactly this tensor's bytes when they lie contiguous on disk and are its values
        as they are (no conj or neg bit to apply), else None."""
        loc = self.location
        if loc is None or loc.encoding != "raw" or self.conj or self.neg:
            return None
        numel = math.prod(self.shape)
        if not numel:
            return None
        if loc.stride is not None and numel > 1 and tuple(loc.stride) != contiguous_strides(self.shape):
            return None
        nbytes = dtype_bytes(self.dtype, self.shape)
        return loc.file, loc.offset + loc.storage_offset * max(1, nbytes // numel), nbytes


@functools.lru_cache(maxsize=4096)
def contiguous_strides(shape: tuple) -> tuple:
    """The strides of a contiguous (row-major) tensor of this shape; cached, as a checkpoint repeats a few shapes
    over thousands of tensors."""
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


# What a counter counts: a small closed set (see ckpttool/steps.py for how each is compared).
GLOBAL_STEP = "global_step"  # the trainer's training steps, fp16-skipped updates included
OPTIMIZER_UPDATES = "optimizer_updates"  # updates the optimizer really applied (its state's `step`)
SCHEDULER_STEPS = "scheduler_steps"  # LR scheduler steps (`last_epoch`)
SAVES = "saves"  # checkpoints saved so far (Accelerate's automatic checkpoint_N)
EPOCH = "epoch"
MICRO_STEPS = "micro_steps"  # gradient-accumulation micro-batches (Accelerate's RNG-file `step`)
SKIPPED_UPDATES = "skipped_updates"  # updates the trainer itself counted as fp16-skipped (DeepSpeed skipped_steps)
EMA_UPDATES = "ema_updates"  # steps an EMA of the weights took (diffusers EMAModel.optimization_step)


class Record(StrEnum):
    """The kind of record a counter was read from: what a trainer profile matches on (with the key), never the
    label shown to users."""

    NAME = "name"  # the checkpoint's own file or folder name
    TRAINING_DICT = "training_dict"  # a top-level key of a torch-saved training dict
    OPTIMIZER = "optimizer"  # an optimizer state's per-parameter `step`
    SCHEDULER = "scheduler"  # an LR scheduler state (`last_epoch`, `last_batch_iteration`)
    RNG = "rng"  # an RNG state's `step` (Accelerate's random_states_N.pkl)
    STATE_FILE = "state_file"  # a JSON file of counters (trainer_state.json, train_state.json ...)
    ENGINE = "engine"  # DeepSpeed's model states file
    CLIENT_STATE = "client_state"  # what a DeepSpeed caller saved beside the engine's state
    DCP_STATE = "dcp_state"  # a non-tensor item of a torch.distributed.checkpoint
    LOOPS = "loops"  # Lightning's loop progress counters


@dataclass
class StepSource:
    """One counter a checkpoint states. `meaning` is one of the constants above, or None while unknown (the
    trainer profile names it from `record` and `key`; a counter with no meaning is shown but never compared)."""

    source: str  # shown to users, e.g. "directory name", "train_state.json current_step", "optimizer state step"
    value: int
    meaning: str | None = None
    note: str | None = None  # e.g. why a counter is never compared
    record: Record = field(kw_only=True)  # where it was read
    key: str = field(default="", kw_only=True)  # its key path in that record ("global_step", "lr_scheduler.last_epoch")
    file: str | None = field(default=None, kw_only=True)  # the file it was read from, relative to the checkpoint
    # where several files each carry it (one per rank): (file, value) of each; `value` is the largest
    per_file: tuple[tuple[str, int], ...] = field(default=(), kw_only=True)
    # whether every file of one save holds the same value (ZeRO partitions, each process's RNG file), or a file's may
    # lag in a healthy save (the largest of the per-parameter optimizer steps a DCP data file holds)
    per_file_exact: bool = field(default=True, kw_only=True)

    @property
    def kind(self) -> str:
        return "epoch" if self.meaning == EPOCH else "step"


@dataclass
class Component:
    """One part of a checkpoint: model weights, optimizer, scheduler, EMA, RNG state, ..."""

    name: str
    role: str  # model | optimizer | scheduler | ema | rng | scaler | sampler | dataloader | custom | extra
    files: list = field(default_factory=list)
    tensors: list = field(default_factory=list)
    metadata: dict = field(default_factory=dict)
    tree: object = None  # torch inputs: the unpickled object (TensorRef leaves), so convert can rebuild it
    pickle_globals: list = field(default_factory=list)  # torch inputs: the globals its file's pickle names
    uncarried: list = field(default_factory=list)  # (name, layout) of tensors in layouts ckpttool does not read

    @property
    def nbytes(self) -> int:
        """Bytes on disk: a torch storage shared by several tensors (tied weights, views) counts once."""
        total, seen = 0, set()
        for t in self.tensors:
            if t.storage_key is None:
                total += t.nbytes
            elif (t.location and t.location.file, t.storage_key) not in seen:
                seen.add((t.location and t.location.file, t.storage_key))
                total += t.location.length if t.location else t.nbytes
        return total


def uncarried_tensors(components, shown: int = 8) -> str | None:
    """The components' tensors in layouts ckpttool does not read (sparse, quantized, nested ...), in words, or None:
    "2 tensors in layouts ckpttool does not read: a (sparse_coo), b (quantized)"."""
    names = [f"{name} ({layout})" for comp in components for name, layout in comp.uncarried]
    if not names:
        return None
    more = " ..." if len(names) > shown else ""
    return f"{len(names)} tensors in layouts ckpttool does not read: {', '.join(names[:shown])}{more}"


@dataclass
class Checkpoint:
    """What a reader found at a path."""

    path: str
    format: str  # torch | safetensors | sharded | accelerate | dcp | family
    layout: str  # e.g. "torch zip", "diffusers checkpoint-N", "kohya -state dir"
    components: list = field(default_factory=list)
    steps: list = field(default_factory=list)
    metadata: dict = field(default_factory=dict)
    problems: list = field(default_factory=list)
    files: list = field(default_factory=list)
    quantization: dict | None = None
    pickle_globals: list = field(default_factory=list)  # every global any pickle in it names
    trainer: str | None = None  # the trainer profile that recognised it (ckpttool/trainers/), None when unknown
    profile: object = field(default=None, repr=False, compare=False)  # that profile itself (never shown)
    # a torch training dict's top-level values that are no part (epoch, args, a best metric), as unpickled: what
    # convert carries into a .pt (metadata holds their picture, for showing)
    extras: dict = field(default_factory=dict, repr=False, compare=False)

    def component(self, role_or_name: str) -> Component | None:
        for c in self.components:
            if c.name == role_or_name:
                return c
        for c in self.components:
            if c.role == role_or_name:
                return c
        return None

    @property
    def model(self) -> Component | None:
        return self.component("model")

    def add_problem(self, code, severity, message, path=None, key=None, component=None):
        self.problems.append(Problem(code, severity, message, path, key, component))

    def absorb_problems(self, part: "Checkpoint"):
        """Take over what a member file's reading found: its problems, pickle globals and save devices."""
        self.problems.extend(part.problems)
        self.pickle_globals.extend(g for g in part.pickle_globals if g not in self.pickle_globals)
        devices = set(self.metadata.get("saved_on_devices", [])) | set(part.metadata.get("saved_on_devices", []))
        if devices:
            self.metadata["saved_on_devices"] = sorted(devices)

    @property
    def has_errors(self) -> bool:
        return any(p.severity == ERROR for p in self.problems)


@dataclass
class Salvaged:
    """What a damaged file still holds (`ckpttool repair`): the tensors whose bytes are all there (and pass every check
    the file carries: a zip CRC-32, offsets that fit), and those lost, each with why. A salvage reader fills it
    without loading tensor data; `kept` point into the damaged file, so their bytes can be copied out as they are."""

    path: str
    format: str  # safetensors | torch
    kept: list = field(default_factory=list)  # TensorInfo
    lost: list = field(default_factory=list)  # (tensor name, why)
    metadata: dict = field(default_factory=dict)  # safetensors `__metadata__`
    tree: object = None  # torch: the unpickled object (TensorRef leaves), to rebuild without the lost tensors
    dropped: set = field(default_factory=set)  # torch: dotted paths of parts left out whole (an incomplete optimizer)
    unsafe_globals: list = field(default_factory=list)  # torch: what its pickle imports outside the allow-list
    how: str = ""  # how it was read, e.g. "zip directory lost: local headers walked from the front"
    checked: bool = True  # the file carries checksums (zip CRC-32s) that the kept bytes passed

    @property
    def saves_anything(self) -> bool:
        """Tensors were kept, or a torch file's object came back whole (a scheduler state holds no tensor at all)."""
        return bool(self.kept) or (self.format == "torch" and not self.lost and "" not in self.dropped)
