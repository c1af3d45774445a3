"""torch.save files (.pt .pth .bin .ckpt): zip and legacy layouts, read through the safe pickle reader.

Only the pickle and the zip directory are read; each tensor becomes a `TensorInfo` that points at its storage's
bytes. Training dicts are split into components (model, optimizer, scheduler, EMA, ...), and every step or epoch
they state is recorded.
"""

from __future__ import annotations

import io
import math
import os
import re
import struct
import zipfile
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field

import xxhash

from ckpttool import paths
from ckpttool.errors import CkptError
from ckpttool.formats import TORCH_SUFFIXES, ZIP_MAGIC
from ckpttool.formats.pickles import (SAFE_GLOBALS, SCAN_OPCODES, STORAGE_DTYPES, UNSCANNED, DtypeRef, GlobalRef,
                                      LayoutTensor, Opaque, RepicklingPickler, TensorRef, scan_records, unpickle)
from ckpttool.model import (ERROR, OPTIMIZER_UPDATES, SCHEDULER_STEPS, WARNING, Checkpoint, Code, Component, Location,
                            Problem, Record, StepSource, TensorInfo, contiguous_strides, dtype_bytes,
                            uncarried_tensors)

SUFFIXES = TORCH_SUFFIXES
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

# Keys of a training dict, by the component role they hold.
COMPONENT_KEYS = {
    "model": ("model_state_dict", "state_dict", "model", "module", "net", "network", "weights", "params"),
    "ema": ("ema", "ema_state_dict", "model_ema", "ema_model", "ema_params", "ema_weights"),
    "optimizer": ("optimizer_state_dict", "optimizer", "optim", "opt", "optimizer_states", "optimizers"),
    "scheduler": ("scheduler_state_dict", "lr_scheduler", "scheduler", "lr_scheduler_state_dict", "lr_schedulers",
                  "schedulers"),
    "scaler": ("scaler", "grad_scaler", "scaler_state_dict", "amp"),
    "rng": ("rng_state", "rng_states", "random_states", "rng"),
}
STEP_KEYS = ("global_step", "step", "iteration", "iter", "num_updates", "total_steps", "current_step")
EPOCH_KEYS = ("epoch", "current_epoch", "epochs")


def detect(path: str) -> bool:
    if not os.path.isfile(path):
        return False
    if path.endswith(SUFFIXES):
        return True
    with open(path, "rb") as f:
        head = f.read(4)
    return head == ZIP_MAGIC or head[:1] == b"\x80"


@dataclass
class RawPickle:
    """A torch file's top-level object, with storage keys resolved to byte ranges in the file."""

    obj: object
    layout: str
    storages: dict = field(default_factory=dict)  # key -> (StorageRef, data offset)
    globals_seen: list = field(default_factory=list)
    unsafe_globals: list = field(default_factory=list)


def read_raw(path: str, allowed=SAFE_GLOBALS, span: tuple[int, int] | None = None, data: bytes | None = None
             ) -> RawPickle:
    """The file's pickle and storages; with `span` (offset, length), of a torch.save blob embedded in the file (a DCP
    item), with storage offsets still counted from the start of the file; with `data`, of a blob in memory (`path`
    then only names it in errors)."""
    if data is None:
        paths.regular(path)
    size = len(data) if data is not None else span[1] if span else os.path.getsize(path)
    opener = ((lambda: io.BytesIO(data)) if data is not None else (lambda: _Window(path, *span)) if span else
              (lambda: open(path, "rb")))
    with opener() as f:
        head = f.read(4)
    if not head:
        raise CkptError(Code.TRUNCATED, "file is empty", path)
    try:
        if head == ZIP_MAGIC:
            return _read_zip(path, size, allowed, opener, base=span[0] if span else 0)
        if span or data is not None:
            raise CkptError(Code.CORRUPT, "the embedded item is not a torch.save archive", path)
        return _read_legacy(path, size, allowed)
    except (OSError, ValueError, OverflowError, MemoryError) as e:  # offsets and sizes a damaged file made absurd
        raise CkptError(Code.CORRUPT, f"cannot be read as a torch file ({type(e).__name__}: {e})", path) from None


class _Window(io.RawIOBase):
    """`length` bytes of a file from `offset`, read as a file of their own (zipfile seeks from its end)."""

    def __init__(self, path, offset, length):
        super().__init__()
        self._file, self._start, self._length, self._pos = open(path, "rb"), offset, length, 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def seek(self, pos, whence=io.SEEK_SET):
        self._pos = max(0, pos + (0, self._pos, self._length)[whence])
        return self._pos

    def tell(self):
        return self._pos

    def readinto(self, buffer):
        wanted = max(0, min(len(buffer), self._length - self._pos))
        self._file.seek(self._start + self._pos)
        n = self._file.readinto(memoryview(buffer)[:wanted])
        self._pos += n
        return n

    def close(self):
        self._file.close()
        super().close()


ZIP_ERRORS = (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError, struct.error, OverflowError,
              KeyError, IndexError)  # what zipfile raises on a damaged directory (UnicodeDecodeError is a ValueError)
ENCRYPTED = 0x1


def _read_zip(path, size, allowed, opener, base=0) -> RawPickle:
    with opener() as raw:  # zipfile reads the directory once, here; members are read from `raw` directly
        try:
            zf = zipfile.ZipFile(raw)
        except zipfile.BadZipFile:
            if _has_end_record(opener, size):
                raise CkptError(Code.CORRUPT, "zip directory is damaged", path) from None
            raise CkptError(Code.TRUNCATED, "zip directory is missing: the file was cut short (partial copy or "
                            "interrupted save)", path) from None
        except ZIP_ERRORS as e:
            raise CkptError(Code.CORRUPT, f"zip directory cannot be read ({type(e).__name__}: {e})", path) from None
        members = zf.infolist()
        names = [m.filename for m in members]
        if len(set(names)) != len(names):  # torch.save never writes one name twice
            twice = next(n for n in names if names.count(n) > 1)
            raise CkptError(Code.CORRUPT, f"zip archive holds two members named {twice}: readers disagree on which "
                            "one the file means (torch.load takes the last, a reader walking the local headers the "
                            "first), so no check can vouch for the values a load gets", path)
        # torch reads `<first entry's top folder>/data.pkl` (caffe2/serialize/inline_container.cc, init())
        first = members[0].filename if members else ""
        pkl = first[: first.find("/") + 1] + "data.pkl"
        prefix = pkl[: -len("data.pkl")]
        info = next((m for m in members if m.filename == pkl), None)
        budget = [SCAN_OPCODES]  # one file's scans share it: four huge extra members cost what one does
        others = _other_pickles_globals(raw, [m for m in members if m is not info and not
                                              m.filename.startswith(prefix + "data/")], budget)
        try:
            if info is None:
                raise CkptError(Code.CORRUPT, "zip archive has no data.pkl in its first folder: not a torch.save file",
                                path)
            data = member_bytes(raw, info, path)
            stream = io.BytesIO(data)
            obj, unpickler = _unpickle_at(stream, allowed, path, pkl)
        except CkptError as e:
            salvaged = _salvage(raw, info) if info is not None else None
            unsafe = [g for g in others + (scan_records(salvaged, budget) if salvaged else []) if g not in allowed]
            if e.code == Code.UNSAFE_PICKLE or not unsafe:
                raise
            raise CkptError(Code.UNSAFE_PICKLE, f"pickles in the archive import {', '.join(dict.fromkeys(unsafe))}, "
                            f"outside the allow-list; the archive is also damaged ({e.reason})", path) from None
        trailing = data[stream.tell():]  # more pickles after the first STOP: torch stops there, others read on
        globals_seen = _union([unpickler.globals_seen, others, scan_records(trailing, budget) if trailing else []])
        members = []
        for key, ref in unpickler.storages.items():
            member = f"{prefix}data/{key}"
            try:
                info = zf.getinfo(member)
            except KeyError:
                raise CkptError(Code.CORRUPT, f"storage {key!r} is referenced by {pkl} but {member} is missing",
                                path) from None
            if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & ENCRYPTED:
                raise CkptError(Code.CORRUPT, f"{member} is compressed or encrypted; torch writes storages as they are",
                                path)
            if info.file_size < ref.nbytes:
                raise CkptError(Code.CORRUPT, f"{member} holds {info.file_size} bytes but its tensors need "
                                f"{ref.nbytes}", path)
            members.append((key, ref, info))
        storages = {}
        for (key, ref, info), offset in zip(members, _data_offsets(raw, [m[2] for m in members], path)):
            if offset + info.file_size > size:
                raise CkptError(Code.TRUNCATED, f"{info.filename} ends past the end of the file", path)
            storages[key] = (ref, base + offset)
    return RawPickle(obj, "torch zip", storages, globals_seen, [g for g in globals_seen if g not in allowed])


def stored_members(path: str, span: tuple[int, int] | None = None) -> list[tuple[zipfile.ZipInfo, int]]:
    """(member, where its data starts in the file) of each stored member of a torch zip, or of the torch.save blob
    at `span` (a DCP item). Raises CkptError or a zip error when the directory cannot be read."""
    with (_Window(path, *span) if span else open(path, "rb")) as raw:
        zf = zipfile.ZipFile(raw)
        return [(info, (span[0] if span else 0) + zip_data_offset(raw, info, path)) for info in zf.infolist()
                if info.compress_type == zipfile.ZIP_STORED]


def member_bytes(raw, info: zipfile.ZipInfo, path: str) -> bytes:
    """A small zip member's bytes as torch's reader (miniz) gets them: stored or deflated, checked against its
    CRC-32. Any damage is a CkptError naming the member, never zipfile's or zlib's own exception."""
    name = info.filename
    if info.flag_bits & ENCRYPTED:
        raise CkptError(Code.CORRUPT, f"zip member {name} is marked encrypted, which torch never writes nor reads", path)
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise CkptError(Code.CORRUPT, f"zip member {name} uses compression method {info.compress_type}, which torch "
                        "cannot read", path)
    if info.compress_type == zipfile.ZIP_DEFLATED and info.file_size > inflate_limit(info.compress_size):
        raise CkptError(Code.CORRUPT, f"zip member {name} would inflate from {info.compress_size} to {info.file_size} "
                        "bytes: torch never compresses its members, and ckpttool does not inflate a bomb", path)
    raw.seek(zip_data_offset(raw, info, path))
    data = raw.read(info.compress_size)
    if len(data) < info.compress_size:
        raise CkptError(Code.TRUNCATED, f"zip member {name} ends past the end of the file", path)
    if info.compress_type == zipfile.ZIP_DEFLATED:
        try:
            data = zlib.decompressobj(-15).decompress(data, info.file_size + 1)  # never more than declared
        except zlib.error as e:
            raise CkptError(Code.CORRUPT, f"zip member {name} cannot be inflated ({e})", path) from None
    if len(data) != info.file_size:
        raise CkptError(Code.CORRUPT, f"zip member {name} holds {len(data)} bytes, its directory entry says "
                        f"{info.file_size}", path)
    if zlib.crc32(data) != info.CRC:
        raise CkptError(Code.CORRUPT, f"zip member {name} fails its CRC-32 check (damaged bytes)", path)
    return data


PICKLE_SUFFIXES = (".pkl", ".pickle", ".joblib", ".dat", ".data")
SCAN_LIMIT = 256 << 20  # bytes of one extra member scanned for pickled globals
INFLATE_FLOOR, INFLATE_RATIO = 16 << 20, 32  # deflated pickles compress a few times; bombs a thousand


def inflate_limit(compressed: int) -> int:
    """The most bytes a deflated member is inflated to: memory stays proportional to the file's own size."""
    return min(SCAN_LIMIT, max(INFLATE_FLOOR, INFLATE_RATIO * compressed))


def _other_pickles_globals(raw, members, budget: list) -> list[str]:
    """Globals of the pickles among `members` (the ones torch.load does not unpickle: other loaders and scanners do),
    within one opcode `budget`. A member counts as a pickle by its name or by its first byte (PROTO); damage is read
    through, as they would."""
    seen = []
    for info in members:
        data = _salvage(raw, info)
        if data and (info.filename.endswith(PICKLE_SUFFIXES) or data[:1] == b"\x80"):
            seen.extend(scan_records(data, budget))
    return seen


def _salvage(raw, info) -> bytes | None:
    """A member's bytes as its local header places them, whatever its flags, CRC or name say; None if unreadable."""
    try:
        local = _local_header(raw, info)
        if local is None:
            return None
        raw.seek(local[1])
        data = raw.read(min(info.compress_size, SCAN_LIMIT))
        if info.compress_type == zipfile.ZIP_DEFLATED:
            data = zlib.decompressobj(-15).decompress(data, inflate_limit(len(data)))
        return data
    except (OSError, zlib.error, ValueError, OverflowError):
        return None


def globals_of(path: str) -> tuple[list[str], bool]:
    """(every global the pickles of a torch or pickle file name, whether they were walked to the end), damaged or
    not, read as opcodes (pickles.scan_opcodes): for a file a checkpoint holds but its resume never loads
    (transformers' training_args.bin), which other tools, older library versions and torch.load(weights_only=False)
    still unpickle."""
    from ckpttool.formats.pickles import scan_opcodes

    with open(path, "rb") as raw:
        if raw.read(4) != ZIP_MAGIC:
            raw.seek(0)
            return scan_opcodes(raw)
        try:
            members = zipfile.ZipFile(raw).infolist()
        except ZIP_ERRORS:
            return [], True  # no directory to find the members by: the pickle is unreachable for torch.load too
        names = _other_pickles_globals(raw, members, [SCAN_OPCODES])
        return [n for n in dict.fromkeys(names) if n != UNSCANNED], UNSCANNED not in names


# Classes a checkpoint's own metadata pickles hold as data (transformers' training_args.bin: TrainingArguments, its
# enums and dataclasses, Accelerate's state); any other global a file nobody reads on resume names is worth a word.
INERT_PREFIXES = ("transformers.training_args", "transformers.trainer_utils.", "transformers.trainer_pt_utils.",
                  "transformers.integrations.deepspeed.Hf", "trl.trainer.", "accelerate.state.",
                  "accelerate.utils.dataclasses.", "peft.utils.peft_types.", "enum.", "torch.device", "torch.dtype",
                  "argparse.Namespace", "pathlib.", "datetime.", "collections.", "copyreg._reconstructor",
                  "builtins.object", "builtins.set", "builtins.frozenset", "builtins.slice", "builtins.complex",
                  "builtins.bytearray")


def code_in_files(files: list[str], folder: str) -> list:
    """Problems of the pickle files among `files` (by name or first byte), read as opcodes: a global that runs code
    when unpickled (pickles.runs_code) is `unsafe_pickle`, an error; a global ckpttool does not know to be inert, or
    a pickle too long to walk to its end, a warning of that code."""
    from ckpttool.formats.pickles import SAFE_GLOBALS, runs_code

    found = []
    for full in files:
        with open(full, "rb") as f:
            head = f.read(4)
        if not (full.endswith(SUFFIXES + PICKLE_SUFFIXES) or head == ZIP_MAGIC or head[:1] == b"\x80"):
            continue
        names, complete = globals_of(full)
        rel = os.path.relpath(full, folder)
        code = [g for g in names if runs_code(g)]
        unknown = [g for g in names if g not in SAFE_GLOBALS and not runs_code(g) and not g.startswith(INERT_PREFIXES)]
        if code:
            found.append(Problem(Code.UNSAFE_PICKLE, ERROR, f"{rel} imports {', '.join(code)}, which runs code when "
                                 "unpickled: the resume does not load it, but torch.load(weights_only=False), older "
                                 "library versions and other tools do; it was not executed. Delete it if you did not "
                                 "put it there", full))
        elif unknown:
            found.append(Problem(Code.UNSAFE_PICKLE, WARNING, f"{rel} names {', '.join(unknown[:8])}, which ckpttool does "
                                 "not know to be inert: the resume does not load it, but pickle.load would import and "
                                 "may call them; it was not executed", full))
        elif not complete:
            found.append(Problem(Code.UNSAFE_PICKLE, WARNING, f"{rel} is too long to scan to its end (4,000,000 opcodes): "
                                 "the resume does not load it, but pickle.load would, and what lies past that point "
                                 "was not looked at", full))
    return found


def _has_end_record(opener, size: int) -> bool:
    """Whether the zip end-of-central-directory signature is in the file's tail (absent: the file was cut short)."""
    with opener() as f:
        f.seek(max(0, size - 65557))
        return b"PK\x05\x06" in f.read()


def _local_header(raw, info) -> tuple[bytes, int] | None:
    """(the name in a member's local header, where its data starts), or None if no local header is there."""
    raw.seek(info.header_offset)
    header = raw.read(30)
    if len(header) < 30 or header[:4] != ZIP_MAGIC:
        return None
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return raw.read(name_len), info.header_offset + 30 + name_len + extra_len


def _data_offsets(raw, infos: list, path: str) -> list[int]:
    """zip_data_offset of many members; from a plain file through one positioned read (os.pread) per member, not
    seeks and buffered reads (which a file of 100,000 tensors paid for each one). No mapping: a file cut short while
    it is read must stay an error, not a SIGBUS."""
    if len(infos) < 256 or not isinstance(raw, io.BufferedReader):
        return [zip_data_offset(raw, info, path) for info in infos]
    fd = raw.fileno()
    return [zip_data_offset(_PreadHeader(fd, info), info, path) for info in infos]


class _PreadHeader:
    """A member's local header and the name after it, read with one os.pread of the length the directory's name
    has; _local_header's seek/read calls are served from it (a read past it falls back to a pread)."""

    def __init__(self, fd, info):
        self._fd, self._start, self._pos = fd, info.header_offset, info.header_offset
        self._data = os.pread(fd, 30 + len(info.orig_filename.encode("utf-8")), info.header_offset)

    def seek(self, pos):
        self._pos = pos

    def read(self, n):
        at = self._pos - self._start
        data = self._data[at:at + n] if 0 <= at and at + n <= len(self._data) else os.pread(self._fd, n, self._pos)
        self._pos += len(data)
        return data


def zip_data_offset(raw, info, path) -> int:
    """Where a member's data starts: after its local header, whose name must be the directory's."""
    local = _local_header(raw, info)
    if local is None:
        raise CkptError(Code.CORRUPT, f"zip local header of {info.filename} is damaged", path)
    if local[0] != info.orig_filename.encode("utf-8" if info.flag_bits & 0x800 else "cp437", "replace"):
        raise CkptError(Code.CORRUPT, f"zip local header of {info.filename} names another file", path)
    return local[1]


def _read_legacy(path, size, allowed) -> RawPickle:
    """Pre-1.6 torch.save: magic, protocol, sys_info, the object, storage keys, then raw storages in order.

    torch.load unpickles all five records, so each one's globals are scanned, not only the object's."""
    with open(path, "rb") as f:
        first, magic_record = _unpickle_at(f, allowed, path, "first pickle")
        if first != LEGACY_MAGIC:
            # Not a torch legacy file: torch.load unpickles this first pickle, takes it for a bad magic number, stops.
            if magic_record.storages:
                raise CkptError(Code.CORRUPT, "pickle references torch storages but carries none", path)
            # pickle.load called again (joblib, custom loaders, scanners) reads on: scan the records that follow
            seen = _union([magic_record.globals_seen, scan_records(f.read(SCAN_LIMIT))])
            return RawPickle(first, "pickle", {}, seen, [g for g in seen if g not in allowed])
        _, protocol_record = _unpickle_at(f, allowed, path, "protocol record")
        _, sys_info_record = _unpickle_at(f, allowed, path, "sys_info record")
        obj, unpickler = _unpickle_at(f, allowed, path, "object pickle")
        keys, keys_record = _unpickle_at(f, allowed, path, "storage key list")
        if not isinstance(keys, list):
            raise CkptError(Code.CORRUPT, "legacy storage key list is not a list", path)
        storages, pos = {}, f.tell()
        for key in keys:
            ref = unpickler.storages.get(str(key))
            if ref is None:
                raise CkptError(Code.CORRUPT, f"legacy storage {key!r} is not referenced by the object", path)
            f.seek(pos)
            head = f.read(8)
            if len(head) < 8:
                raise CkptError(Code.TRUNCATED, f"file ends before storage {key!r}", path)
            (numel,) = struct.unpack("<q", head)
            length = numel * ref.itemsize
            if numel < ref.numel:
                raise CkptError(Code.CORRUPT, f"storage {key!r} holds {numel} elements, its tensors need {ref.numel}", path)
            if pos + 8 + length > size:
                raise CkptError(Code.TRUNCATED, f"storage {key!r} ends past the end of the file: it was cut short", path)
            storages[str(key)] = (ref, pos + 8)
            pos += 8 + length
        missing = set(unpickler.storages) - set(storages)
        if missing:
            raise CkptError(Code.CORRUPT, f"storages {sorted(missing)[:5]} have no data", path)
    records = (magic_record, protocol_record, sys_info_record, unpickler, keys_record)
    return RawPickle(obj, "torch legacy", storages, _union(r.globals_seen for r in records),
                     _union(r.unsafe_globals for r in records))


def _union(lists) -> list:
    """The names of several pickles' globals, each once, in the order first seen."""
    return list(dict.fromkeys(name for names in lists for name in names))


def _unpickle_at(f, allowed, path, what):
    try:
        return unpickle(f, allowed, what=what)
    except CkptError as e:
        raise CkptError(e.code, e.reason, path) from None


# --- structure: from the unpickled object to components and step sources ---


def tensor_info(name: str, ref: TensorRef, raw: RawPickle, path: str) -> TensorInfo:
    storage, offset = raw.storages[ref.storage.key]
    location = Location(path, offset, storage.nbytes, ref.storage_offset, ref.stride, storage.location)
    return TensorInfo(name, ref.dtype, ref.shape, location, storage_key=storage.key, conj=ref.conj, neg=ref.neg)


def flatten(obj, prefix="", seen=None):
    """Yield (dotted name, leaf) for every tensor and scalar in a nested object, modules included."""
    seen = set() if seen is None else seen
    if isinstance(obj, (TensorRef, LayoutTensor, int, float, str, bool, bytes)) or obj is None:
        yield prefix, obj
        return
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    elif isinstance(obj, Opaque):
        fields = obj.fields()
        if "_parameters" in fields:  # a pickled nn.Module: walk it like its state_dict
            items = list(fields.get("_parameters", {}).items()) + list(fields.get("_buffers", {}).items())
            items += list(fields.get("_modules", {}).items())
        else:
            items = fields.items()
    else:
        return
    for key, value in items:
        yield from flatten(value, f"{prefix}.{key}" if prefix else str(key), seen)


def rebuild(obj, replace, prefix="", memo=None):
    """A copy of an unpickled object with each TensorRef replaced by `replace(dotted name)` (names as `flatten`
    gives them: a container reached twice is rebuilt once, at its first name, and shared as it was). Only plain data
    is carried: sets and allow-listed objects (numpy RNG state) are rebuilt from contents checked to be inert, so a
    payload hidden inside them is never written back out; anything else is CkptError (unsafe_pickle)."""
    memo = {} if memo is None else memo
    if isinstance(obj, TensorRef):
        return replace(prefix)
    if isinstance(obj, PLAIN) or obj is None:
        return obj
    if id(obj) in memo:
        return memo[id(obj)]
    join = (lambda k: f"{prefix}.{k}" if prefix else str(k))
    if isinstance(obj, dict):
        for key in obj:
            _check_inert(key, f"{prefix or 'the object'} key")
        out = type(obj)() if isinstance(obj, OrderedDict) else {}
        memo[id(obj)] = out
        out.update((k, rebuild(v, replace, join(k), memo)) for k, v in obj.items())
        return out
    if isinstance(obj, list):
        out = memo[id(obj)] = []
        out.extend(rebuild(v, replace, join(i), memo) for i, v in enumerate(obj))
        return out
    if isinstance(obj, tuple):
        memo[id(obj)] = out = tuple(rebuild(v, replace, join(i), memo) for i, v in enumerate(obj))
        return out
    _check_inert(obj, prefix or "the object")  # sets, complex numbers, numpy RNG state: carried as they are
    return obj


PLAIN = (int, float, str, bool, bytes)
INERT_DEPTH = 64


def _check_inert(obj, where: str, depth: int = 0, seen=None):
    """Raise CkptError (unsafe_pickle) unless `obj` is plain data all the way down: scalars, containers of them,
    torch dtypes, and objects of allow-listed globals built from such data (each object visited once)."""
    seen = set() if seen is None else seen
    if isinstance(obj, PLAIN + (complex, DtypeRef)) or obj is None:
        return
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if depth > INERT_DEPTH:
        raise CkptError(Code.UNSAFE_PICKLE, f"{where} nests too deeply to be checked; ckpttool does not rebuild it")
    if isinstance(obj, (list, tuple, set, frozenset)):
        parts = list(obj)
    elif isinstance(obj, dict):
        parts = [x for item in obj.items() for x in item]
    elif isinstance(obj, type) and issubclass(obj, Opaque) and obj.global_name in SAFE_GLOBALS:
        parts = []
    elif isinstance(obj, Opaque) and obj.global_name in SAFE_GLOBALS:
        parts = [obj.args, obj.state, obj.items, obj.entries]
    else:
        name = obj.global_name if isinstance(obj, Opaque) or isinstance(obj, type) and issubclass(obj, Opaque) \
            else type(obj).__name__
        raise CkptError(Code.UNSAFE_PICKLE, f"{where} holds a {name}, which ckpttool does not rebuild (it never writes "
                        "back a global outside the allow-list); convert the weights alone with --component")
    for part in parts:
        _check_inert(part, where, depth + 1, seen)


def _has_tensors(obj) -> bool:
    return any(isinstance(leaf, (TensorRef, LayoutTensor)) for _, leaf in flatten(obj))


def _role_of_dict(obj) -> str | None:
    """Role of a file that holds one state_dict (Accelerate's optimizer.bin, scheduler.bin, ...), or of a non-empty
    list of state dicts of one role (Lightning's optimizer_states, lr_schedulers): one level of list, each item
    looked at once (a list that holds itself, or shares its items 60 levels deep, costs its length, not 2^60)."""
    if isinstance(obj, list) and obj:
        roles = {_own_role(item) if not isinstance(item, list) else None for item in obj}
        return roles.pop() if len(roles) == 1 else None
    return _own_role(obj)


def _own_role(obj) -> str | None:
    if not isinstance(obj, dict):
        return None
    keys = set(map(str, obj))
    if {"state", "param_groups"} <= keys:
        return "optimizer"
    if "last_epoch" in keys and ({"base_lrs", "_step_count"} & keys):
        return "scheduler"
    if {"random_state", "torch_manual_seed"} & keys:
        return "rng"
    if {"scale", "growth_factor"} <= keys:
        return "scaler"
    return None


NUMBERED_PARTS = re.compile(r"^(model|optimizer|scheduler|random_states|custom_checkpoint|scaler)_\d+$")
NUMBERED_ROLES = {"model": "model", "optimizer": "optimizer", "scheduler": "scheduler", "random_states": "rng",
                  "custom_checkpoint": "custom", "scaler": "scaler"}


def role_of_key(key: str) -> str | None:
    """The role of a training dict's top-level key (also Accelerate's numbered part names, as convert writes them)."""
    for role, keys in COMPONENT_KEYS.items():
        if key in keys:
            return role
    m = NUMBERED_PARTS.match(key)
    return NUMBERED_ROLES[m.group(1)] if m else None


def analyse(raw: RawPickle, path: str, role_hint: str | None = None, name_hint: str | None = None):
    """Components and step sources of one torch file's object."""
    obj = raw.obj
    components, steps, metadata = [], [], {}

    def component(name, role, value):
        leaves = list(flatten(value))
        tensors = [tensor_info(n, leaf, raw, path) for n, leaf in leaves if isinstance(leaf, TensorRef)]
        comp = Component(name, role, files=[path], tensors=tensors, tree=value, pickle_globals=raw.globals_seen,
                         uncarried=[(n, leaf.layout) for n, leaf in leaves if isinstance(leaf, LayoutTensor)])
        components.append(comp)
        steps.extend(_component_steps(comp, value, raw, path))
        return comp

    own_role = _role_of_dict(obj)
    training_keys = [k for k in obj if isinstance(k, str) and role_of_key(k)] if isinstance(obj, dict) else []
    if own_role or role_hint in ("optimizer", "scheduler", "rng", "scaler", "sampler", "dataloader", "custom"):
        component(name_hint or own_role or role_hint, own_role or role_hint, obj)
    elif training_keys and any(_has_tensors(obj[k]) or _role_of_dict(obj[k]) for k in training_keys):
        metadata["top_level_keys"] = [str(k) for k in obj]
        for key, value in obj.items():
            named_role = role_of_key(key) if isinstance(key, str) else None
            role = named_role or _role_of_dict(value)
            if role and (_has_tensors(value) or _role_of_dict(value) or role in ("rng", "custom")):
                taken = key if NUMBERED_PARTS.match(key) or not named_role else role
                component(taken if taken not in [c.name for c in components] else key, role, value)
            elif _has_tensors(value):
                component(str(key), "extra", value)
            else:
                _scalars_into(metadata, str(key), value)
        for key in STEP_KEYS + EPOCH_KEYS:
            value = obj.get(key)
            if type(value) is int or (isinstance(value, float) and value.is_integer()):
                steps.append(StepSource(f"training dict '{key}'", int(value), record=Record.TRAINING_DICT, key=key,
                                        file=os.path.basename(path)))  # the trainer profile names it
    else:
        role = role_hint or "model"
        component(name_hint or role, role, obj)
    return components, steps, metadata


def _scalars_into(metadata, key, value):
    """Keep a training dict's plain values (numbers, strings, nested dicts and lists of them, such as Lightning's
    `loops` counters) as JSON-able metadata; other objects by their class name."""
    metadata[key] = plain(value)


SHOWN_ITEMS = 32  # of a list or dict shown as metadata; the rest are counted


PLAIN_NODES = 4096  # values one picture shows at most: shared children would otherwise be shown once per path


def plain(value, depth=0, budget=None):
    """A JSON-able picture of an unpickled value: numbers and strings as they are, short bytes as their repr,
    tensors by dtype and shape, other objects by their class name; long lists and dicts cut short, and the whole
    picture cut at PLAIN_NODES values (a dict of shared children 30 deep would otherwise be expanded 2^30 times)."""
    budget = [PLAIN_NODES] if budget is None else budget
    budget[0] -= 1
    if budget[0] < 0:
        return "..."
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    if isinstance(value, (bytes, bytearray)):
        return repr(bytes(value)) if len(value) <= 64 else f"<{len(value)} bytes>"
    if isinstance(value, TensorRef):
        return f"<tensor {value.dtype}{list(value.shape)}>"
    if isinstance(value, Opaque):
        return f"<{value.global_name}>"
    if depth < 8 and isinstance(value, dict):
        shown = {str(k): plain(v, depth + 1, budget) for k, v in list(value.items())[:SHOWN_ITEMS]}
        if len(value) > SHOWN_ITEMS:
            shown["..."] = f"{len(value) - SHOWN_ITEMS} more"
        return shown
    if depth < 8 and isinstance(value, (list, tuple)):
        shown = [plain(v, depth + 1, budget) for v in value[:SHOWN_ITEMS]]
        return shown + [f"... {len(value) - SHOWN_ITEMS} more"] if len(value) > SHOWN_ITEMS else shown
    return f"<{type(value).__name__}>"


def _component_steps(comp: Component, value, raw: RawPickle, path: str):
    if comp.role == "optimizer":
        for state in _optimizer_dicts(value):
            step = optimizer_step(state, raw, path)
            if step is not None:
                yield StepSource(f"{comp.name} state step", step, OPTIMIZER_UPDATES, record=Record.OPTIMIZER,
                                 key=f"{comp.name}.step", file=os.path.basename(path))
    elif comp.role == "scheduler":
        for sched in value if isinstance(value, list) else [value]:
            if isinstance(sched, dict) and type(sched.get("last_epoch")) is int:
                yield StepSource(f"{comp.name} last_epoch", sched["last_epoch"], SCHEDULER_STEPS,
                                 record=Record.SCHEDULER, key=f"{comp.name}.last_epoch", file=os.path.basename(path))
    elif comp.role == "rng" and isinstance(value, dict) and type(value.get("step")) is int:
        yield StepSource(f"{comp.name} step", value["step"], record=Record.RNG,  # what it counts, the profile says
                         key=f"{comp.name}.step", file=os.path.basename(path))


def _optimizer_dicts(value, seen=None):
    seen = set() if seen is None else seen
    if id(value) in seen:  # a list shared or holding itself is looked at once
        return
    seen.add(id(value))
    if isinstance(value, dict) and "state" in value:
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _optimizer_dicts(item, seen)


def optimizer_step(state_dict, raw: RawPickle, path: str) -> int | None:
    """The largest per-parameter `step` (equal for every parameter updated each step)."""
    steps = []
    state = state_dict.get("state")
    for per_param in (state.values() if isinstance(state, dict) else []):
        step = per_param.get("step") if isinstance(per_param, dict) else None
        if isinstance(step, TensorRef):
            step = read_scalar(tensor_info("step", step, raw, path))
        if isinstance(step, (int, float)) and not isinstance(step, bool):
            steps.append(int(step))
    return max(steps) if steps else None


SCALAR_FORMATS = {"float32": "<f", "float64": "<d", "int64": "<q", "int32": "<i", "float16": "<e"}


def saved_tensor(name: str, loc: Location, shape) -> TensorInfo:
    """A DCP item (a whole torch.save blob inside a data file) as the tensor it holds, its storage located by the safe
    reader without torch. CkptError when the blob is damaged or does not hold a `shape` tensor."""
    try:
        raw = read_raw(loc.file, span=(loc.offset, loc.length))
    except CkptError as e:
        raise CkptError(e.code, f"tensor {name}: the piece at byte {loc.offset} cannot be read ({e.reason})",
                        loc.file) from None
    if not isinstance(raw.obj, TensorRef) or tuple(raw.obj.shape) != tuple(shape):
        raise CkptError(Code.CORRUPT, f"tensor {name}: the piece at byte {loc.offset} is not a {tuple(shape)} tensor",
                        loc.file)
    return tensor_info(name, raw.obj, raw, loc.file)


def read_scalar(info: TensorInfo):
    """Value of a one-element tensor read straight from its bytes (a few bytes, no torch import)."""
    fmt = SCALAR_FORMATS.get(info.dtype)
    if fmt is None or info.numel != 1:
        return None
    size = struct.calcsize(fmt)
    with open(info.location.file, "rb") as f:
        f.seek(info.location.offset + info.location.storage_offset * size)
        data = f.read(size)
    return struct.unpack(fmt, data)[0] if len(data) == size else None


def read(path: str, *, role: str | None = None, name: str | None = None) -> Checkpoint:
    """`role`: what the file is as part of a larger checkpoint (None: what its contents say); `name`: its component's
    name there."""
    raw = read_raw(path)
    components, steps, metadata = analyse(raw, path, role, name)
    ckpt = Checkpoint(path, "torch", raw.layout, components=components, steps=steps, metadata=metadata,
                      files=[path])
    note_pickle(ckpt, raw, path)
    if uncarried := uncarried_tensors(components):
        ckpt.add_problem(Code.UNSUPPORTED_LAYOUT, WARNING, f"{uncarried}; torch.load gives them, their values are not "
                         "checked, and convert, remap, average and diff refuse this file rather than drop them", path)
    return ckpt


def note_pickle(ckpt: Checkpoint, raw: RawPickle, path: str):
    """Record the globals a pickle names, its unsafe ones as a problem, and the devices it was saved from."""
    ckpt.pickle_globals.extend(g for g in raw.globals_seen if g not in ckpt.pickle_globals)
    if raw.unsafe_globals:
        ckpt.add_problem(Code.UNSAFE_PICKLE, ERROR,
                         f"pickle imports {', '.join(raw.unsafe_globals)}, outside the allow-list: torch.load "
                         "would run that code (or refuse with weights_only); it was not executed. Load it only if "
                         "you trust its source, or re-save the tensors with `ckpttool convert`", path)
    devices = sorted({ref.location for ref, _ in raw.storages.values()})
    if devices:
        known = set(ckpt.metadata.get("saved_on_devices", []))
        ckpt.metadata["saved_on_devices"] = sorted(known | set(devices))


class _StorageStub:
    def __init__(self, key, storage_class: GlobalRef, numel):
        self.key, self.storage_class, self.numel = key, storage_class, numel


class _SizeStub(tuple):
    """Pickles as torch.Size(dims) does."""

    def __reduce__(self):
        return GlobalRef("torch.Size"), (tuple(self),)


class _TensorStub:
    """Pickles exactly as torch.save pickles a contiguous tensor with its own storage, without importing torch."""

    def __init__(self, storage, shape, dtype: str):
        self.storage, self.shape, self.dtype = storage, shape, dtype

    def __reduce_ex__(self, protocol):
        args = (self.storage, 0, _SizeStub(self.shape), contiguous_strides(tuple(self.shape)), False, OrderedDict())
        if self.storage.storage_class.name == UNTYPED_STORAGE:
            return GlobalRef("torch._utils._rebuild_tensor_v3"), args + (DtypeRef(self.dtype),)
        return GlobalRef("torch._utils._rebuild_tensor_v2"), args


UNTYPED_STORAGE = "torch.storage.UntypedStorage"  # the class's own module, as torch.save names it


def _storage_class(dtype_name) -> GlobalRef:
    """The storage class torch.save names for a dtype: a typed one where the dtype has it, else UntypedStorage."""
    for cls_name, name in STORAGE_DTYPES.items():
        if name == dtype_name and cls_name != "UntypedStorage":
            return GlobalRef(f"torch.{cls_name}")
    return GlobalRef(UNTYPED_STORAGE)


class Writer:
    """Streams a torch.save-compatible zip: the pickle (built from the specs) first, then one storage per tensor,
    through `ArchiveWriter` (64-byte aligned, CRC-32 per record). Loads with weights_only=True and mmap=True. Torch is
    imported only to write tensors given in memory (`write`); copying bytes from another file (`write_raw`) needs none."""

    def __init__(self, path: str, specs: list[tuple[str, str, tuple]], wrap=None):
        """`wrap(state_dict) -> object` builds the pickled top level (a training dict, say); default: the state dict."""
        from ckpttool.formats.ziparchive import ArchiveWriter

        state = OrderedDict()
        self._order = []
        for i, (name, dtype, shape) in enumerate(specs):
            storage_class = _storage_class(dtype)
            numel = math.prod(shape)
            count = dtype_bytes(dtype, shape) if storage_class.name == UNTYPED_STORAGE else numel
            state[name] = _TensorStub(_StorageStub(str(i), storage_class, count), tuple(shape), dtype)
            self._order.append((name, dtype, tuple(shape)))
        root = wrap(state) if wrap else state

        class Pickler(RepicklingPickler):
            def persistent_id(self, obj):
                if isinstance(obj, _StorageStub):
                    return ("storage", obj.storage_class, obj.key, "cpu", obj.numel)
                return None

        buffer = io.BytesIO()
        Pickler(buffer, protocol=2).dump(root)
        data = buffer.getvalue()
        self._id = "%040d" % (int(xxhash.xxh3_128_hexdigest(data), 16) % 10**40)  # stable for the same content
        self._zip = ArchiveWriter(path)
        self._zip.write_record("data.pkl", data)
        self._zip.write_record(".format_version", b"1")
        self._zip.write_record(".storage_alignment", b"64")
        self._zip.write_record("byteorder", b"little")
        self._next = 0

    def _expect(self, name: str, nbytes: int):
        expected = self._order[self._next]
        if expected[0] != name or dtype_bytes(expected[1], expected[2]) != nbytes:
            raise ValueError(f"writer expected {expected}, got {name} of {nbytes} bytes")

    def write(self, name: str, tensor):
        import torch

        got = (name, str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape))
        if got != self._order[self._next]:
            raise ValueError(f"writer expected {self._order[self._next]}, got {got}")
        flat = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        self._zip.write_record(f"data/{self._next}", flat.numpy())
        self._next += 1

    def write_raw(self, name: str, src_path: str, offset: int, length: int):
        """Write a storage straight from another file's bytes, file to file (ArchiveWriter.write_copy)."""
        self._expect(name, length)
        self._zip.write_copy(f"data/{self._next}", src_path, offset, length)
        self._next += 1

    def close(self):
        if self._next != len(self._order):
            raise ValueError(f"writer closed after {self._next} of {len(self._order)} tensors")
        self._zip.close(self._id)

    def abort(self):
        self._zip.abort()
