"""What a damaged torch.save file still holds (`ckpttool repair`): the tensors whose storages are whole and check out.

A cut most often loses the zip directory, which sits at the end. torch's writer (miniz, streaming) puts the pickle
first, then one stored member per storage: a local header whose CRC and sizes are zero (flag bit 3), the bytes, then
a data descriptor `PK\\x07\\x08` with the CRC-32 and sizes (FORMATS.md). So the archive is walked from the front: the
pickle ends at its STOP opcode and gives each storage's byte count, the descriptor after a member gives the CRC-32
its bytes must pass. What the directory still lists fills what the walk could not reach. A legacy (pre-1.6) file
has its five pickles first, then each storage as an 8-byte element count and its bytes, with no checksum.
"""

from __future__ import annotations

import os
import struct
import zipfile
from dataclasses import dataclass

from ckpttool import hashing
from ckpttool.errors import CkptError
from ckpttool.formats import ZIP_MAGIC
from ckpttool.formats.pickles import RawPickle, TensorRef, unpickle
from ckpttool.formats.torchlegacy import LEGACY_MAGIC
from ckpttool.formats.torchtree import flatten, tensor_info
from ckpttool.formats.torchzip import ZIP_ERRORS, zip_data_offset
from ckpttool.model import Code, Salvaged

DESCRIPTOR = b"PK\x07\x08"
DESCRIPTOR_SEARCH = 1 << 20  # bytes searched for the descriptor of a small member of unknown size (version, ...)
ZIP64_SIZE = 0xFFFFFFFF


@dataclass
class _Member:
    data: int  # where its bytes start in the file
    length: int
    crc: int | None  # None: the descriptor that carries it was cut away


def salvage(path: str) -> Salvaged:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise CkptError(Code.TRUNCATED, "file is empty: nothing to save", path)
    return _salvage_zip(path, size) if head == ZIP_MAGIC else _salvage_legacy(path, size)


def _salvage_zip(path: str, size: int) -> Salvaged:
    with open(path, "rb") as f:
        walked, parsed, stopped = _walk(f, size, path)
    listed = _listed(path)
    members = {**walked, **listed}  # torch.load reads through the directory: where it still lists a member, it wins
    how = "zip directory intact" if listed else f"zip directory lost: members walked from the front ({stopped})"
    if parsed is None:
        parsed = _pickle_from_directory(path, members)
    obj, unpickler, prefix = parsed[:3]
    pickle_member = members.get(prefix + "data.pkl")
    if pickle_member is not None and pickle_member.crc is not None:
        crc, _ = hashing.crc32_range(path, pickle_member.data, pickle_member.length)
        if crc != pickle_member.crc:
            raise CkptError(Code.CORRUPT, f"{prefix}data.pkl fails its CRC-32 check: the pickle that names and shapes "
                            "every tensor is damaged, so no tensor can be trusted", path)
    out = Salvaged(path, "torch", tree=obj, how=how, unsafe_globals=unpickler.unsafe_globals)
    refs = {}
    for _, leaf in flatten(obj):
        if isinstance(leaf, TensorRef):
            refs.setdefault(leaf.storage.key, leaf.storage)
    verdicts = _storage_verdicts(path, size, {key: (members.get(f"{prefix}data/{key}"), ref.nbytes)
                                               for key, ref in refs.items()})
    storages = {key: (refs[key], members[f"{prefix}data/{key}"].data) for key, why in verdicts.items() if not why}
    raw = RawPickle(obj, "torch zip", storages)
    for name, leaf in flatten(obj):
        if isinstance(leaf, TensorRef):
            why = verdicts[leaf.storage.key]
            if why:
                out.lost.append((name, f"its storage {why}"))
            else:
                out.kept.append(tensor_info(name, leaf, raw, path))
    return out


def _storage_verdicts(path: str, size: int, storages: dict) -> dict[str, str | None]:
    """Storage key -> why it is lost, or None when whole; the CRC-32s of the candidates computed on all cores."""
    verdicts, jobs, keys = {}, [], []
    for key, (member, nbytes) in storages.items():
        verdicts[key] = _storage_verdict(size, member, nbytes)
        if verdicts[key] is None:
            jobs.append((path, member.data, member.length))
            keys.append(key)
    results = hashing.run_jobs(jobs, hashing.crc32_range, sum(job[2] for job in jobs), "checking CRC-32s")
    for key, (crc, done), job in zip(keys, results, jobs):
        if done != job[2]:
            verdicts[key] = f"is cut: {done} of its {job[2]} bytes are in the file"
        elif crc != storages[key][0].crc:
            verdicts[key] = "fails its CRC-32 check (damaged bytes)"
    return verdicts


def _storage_verdict(size: int, member: _Member | None, nbytes: int) -> str | None:
    """Why a storage is lost before its bytes are read, or None when its CRC-32 is to be checked."""
    if member is None:
        return "is gone (the file was cut before it, or the archive is damaged there)"
    if member.data + nbytes > size:
        return f"is cut: its bytes end at byte {member.data + nbytes}, the file at {size}"
    if member.length < nbytes:
        return f"holds {member.length} bytes, its tensors need {nbytes}"
    if member.crc is None:
        return "cannot be checked: the CRC-32 after its bytes was cut away"
    return None


def _walk(f, size: int, path: str):
    """Members found from the front, name -> _Member; the pickle (object, unpickler, prefix) if reached; why the walk
    stopped."""
    members, parsed, pos, prefix = {}, None, 0, None
    while True:
        header = _pread(f, pos, 30)
        if header[:4] == b"PK\x01\x02":
            return members, parsed, "reached the directory"
        if len(header) < 30:
            return members, parsed, f"cut at byte {size}"
        if header[:4] != ZIP_MAGIC:
            return members, parsed, f"no member header at byte {pos}"
        _, _, flags, method, _, _, crc, csize, _usize, name_len, extra_len = struct.unpack("<4s5H3L2H", header)
        name_bytes, extra = _pread(f, pos + 30, name_len), _pread(f, pos + 30 + name_len, extra_len)
        if len(name_bytes) + len(extra) < name_len + extra_len:
            return members, parsed, f"cut inside the member header at byte {pos}"
        name = name_bytes.decode("utf-8", "replace")
        data = pos + 30 + name_len + extra_len
        if prefix is None:
            prefix = name[: name.find("/") + 1]
        if name == prefix + "data.pkl" and parsed is None:
            parsed = _pickle_at(f, data, path, prefix)
        if not flags & 0x8:  # sizes in the local header itself
            csize = _zip64_size(extra, csize)
            members[name] = _Member(data, csize, crc)
            pos = data + csize
            continue
        if method != zipfile.ZIP_STORED:
            return members, parsed, f"{name} is compressed with its size after it"
        length = _known_length(name, prefix, parsed, f, data)
        if length is None:
            return members, parsed, f"the end of {name} cannot be found"
        found = _descriptor(f, data + length, length)
        members[name] = _Member(data, length, found[0] if found else None)
        if found is None:
            return members, parsed, f"cut or damaged after {name}"
        pos = data + length + found[1]


def _known_length(name, prefix, parsed, f, data) -> int | None:
    if parsed is not None and name == prefix + "data.pkl":
        return parsed[3]
    if parsed is not None and name.startswith(prefix + "data/"):
        ref = parsed[1].storages.get(name[len(prefix) + 5:])
        if ref is not None:
            return ref.nbytes
    window = _pread(f, data, DESCRIPTOR_SEARCH)  # a small record: its descriptor names its own length
    at = window.find(DESCRIPTOR)
    while at >= 0:
        if at + 16 <= len(window) and struct.unpack("<L", window[at + 8:at + 12])[0] == at:
            return at
        at = window.find(DESCRIPTOR, at + 1)
    return None


def _descriptor(f, at: int, length: int) -> tuple[int, int] | None:
    """(CRC-32, descriptor size) of the data descriptor at `at` for a member of `length` bytes, or None."""
    raw = _pread(f, at, 24)
    if raw[:4] != DESCRIPTOR or len(raw) < 16:
        return None
    crc, compressed, size = struct.unpack("<LLL", raw[4:16])
    if compressed == size == length:
        return crc, 16
    if len(raw) == 24 and struct.unpack("<QQ", raw[8:24]) == (length, length):  # zip64: miniz past 4 GiB
        return crc, 24
    return None


def _zip64_size(extra: bytes, csize: int) -> int:
    if csize != ZIP64_SIZE:
        return csize
    pos = 0
    while pos + 4 <= len(extra):
        kind, n = struct.unpack("<HH", extra[pos:pos + 4])
        if kind == 1 and n >= 16:
            return struct.unpack("<Q", extra[pos + 12:pos + 20])[0]  # uncompressed, then compressed size
        pos += 4 + n
    return csize


def _pickle_at(f, data: int, path: str, prefix: str):
    f.seek(data)
    try:
        obj, unpickler = unpickle(f, what=f"{prefix}data.pkl")
    except CkptError as e:
        raise CkptError(e.code, f"{e.reason}: the pickle names and shapes every tensor, so none can be located",
                        path) from None
    return obj, unpickler, prefix, f.tell() - data


def _listed(path: str) -> dict[str, _Member]:
    """The members the zip directory lists, when it can still be read; {} when it cannot."""
    try:
        with open(path, "rb") as raw:
            out = {}
            for info in zipfile.ZipFile(raw).infolist():
                try:
                    out[info.filename] = _Member(zip_data_offset(raw, info, path), info.file_size, info.CRC)
                except CkptError:
                    continue
            return out
    except ZIP_ERRORS:
        return {}


def _pickle_from_directory(path: str, members: dict[str, _Member]):
    pickles = [name for name in members if name.endswith("data.pkl") and name.count("/") == 1]
    if not pickles:
        raise CkptError(Code.CORRUPT, "no data.pkl could be found: the pickle that names every tensor is gone", path)
    prefix = pickles[0][: -len("data.pkl")]
    with open(path, "rb") as f:
        return _pickle_at(f, members[pickles[0]].data, path, prefix)


def _salvage_legacy(path: str, size: int) -> Salvaged:
    with open(path, "rb") as f:
        try:
            magic, _ = unpickle(f, what="first pickle")
            if magic != LEGACY_MAGIC:
                raise CkptError(Code.CORRUPT,
                                "neither a torch zip nor a legacy torch.save file (its first pickle is not "
                                "torch's magic number)")
            for what in ("protocol record", "sys_info record"):
                unpickle(f, what=what)
            obj, unpickler = unpickle(f, what="object pickle")
            keys, _ = unpickle(f, what="storage key list")
        except CkptError as e:
            raise CkptError(e.code, f"{e.reason}: the pickles come before every storage and locate them, so none can "
                            "be located", path) from None
        pos = f.tell()
        whole, lost = {}, {}
        for key in keys if isinstance(keys, list) else []:
            key, ref = str(key), unpickler.storages.get(str(key))
            head = _pread(f, pos, 8)
            if ref is None or len(head) < 8:
                break
            (numel,) = struct.unpack("<q", head)
            if numel != ref.numel:
                lost[key] = f"reads {numel} elements where its tensors say {ref.numel}: the bytes from here on " \
                            "cannot be placed"
                break
            end = pos + 8 + numel * ref.itemsize
            if end > size:
                lost[key] = f"is cut: its bytes end at byte {end}, the file at {size}"
                break
            whole[key] = (ref, pos + 8)
            pos = end
    out = Salvaged(path, "torch", tree=obj, how="torch legacy: storages read in order", checked=False,
                   unsafe_globals=unpickler.unsafe_globals)
    raw = RawPickle(obj, "torch legacy", whole)
    for name, leaf in flatten(obj):
        if isinstance(leaf, TensorRef):
            key = leaf.storage.key
            if key in whole:
                out.kept.append(tensor_info(name, leaf, raw, path))
            else:
                out.lost.append((name, f"its storage {lost.get(key, 'is not in the file: the file ends before it')}"))
    return out


def _pread(f, at: int, n: int) -> bytes:
    return os.pread(f.fileno(), n, at)
