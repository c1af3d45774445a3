"""The zip container of a torch.save file (torch >= 1.6): its members, where their bytes lie, and the pickles
beside `data.pkl` (a member named like one is scanned, never built). Read through a bounded window, so a forged
directory cannot make a read run past the file or a deflated member inflate without end."""

from __future__ import annotations

import io
import os
import struct
import zipfile
import zlib

from ckpttool.errors import CkptError
from ckpttool.formats import ZIP_MAGIC
from ckpttool.formats.pickles import SCAN_OPCODES, RawPickle, scan_records, union, unpickle_at
from ckpttool.model import Code


class Window(io.RawIOBase):
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


def read_zip(path, size, allowed, opener, base=0) -> RawPickle:
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
        others = other_pickles_globals(raw, [m for m in members if m is not info and not
                                              m.filename.startswith(prefix + "data/")], budget)
        try:
            if info is None:
                raise CkptError(Code.CORRUPT, "zip archive has no data.pkl in its first folder: not a torch.save file",
                                path)
            data = member_bytes(raw, info, path)
            stream = io.BytesIO(data)
            obj, unpickler = unpickle_at(stream, allowed, path, pkl)
        except CkptError as e:
            salvaged = _salvage(raw, info) if info is not None else None
            unsafe = [g for g in others + (scan_records(salvaged, budget) if salvaged else []) if g not in allowed]
            if e.code == Code.UNSAFE_PICKLE or not unsafe:
                raise
            raise CkptError(Code.UNSAFE_PICKLE, f"pickles in the archive import {', '.join(dict.fromkeys(unsafe))}, "
                            f"outside the allow-list; the archive is also damaged ({e.reason})", path) from None
        trailing = data[stream.tell():]  # more pickles after the first STOP: torch stops there, others read on
        globals_seen = union([unpickler.globals_seen, others, scan_records(trailing, budget) if trailing else []])
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
    # a global another pickle of the archive names was only scanned, not unpickled: taken as called
    called = unpickler.called | (set(globals_seen) - set(unpickler.globals_seen))
    return RawPickle(obj, "torch zip", storages, globals_seen, [g for g in globals_seen if g not in allowed], called,
                     unpickler.runs_methods)


def stored_members(path: str, span: tuple[int, int] | None = None) -> list[tuple[zipfile.ZipInfo, int]]:
    """(member, where its data starts in the file) of each stored member of a torch zip, or of the torch.save blob
    at `span` (a DCP item). Raises CkptError or a zip error when the directory cannot be read."""
    with (Window(path, *span) if span else open(path, "rb")) as raw:
        zf = zipfile.ZipFile(raw)
        return [(info, (span[0] if span else 0) + zip_data_offset(raw, info, path)) for info in zf.infolist()
                if info.compress_type == zipfile.ZIP_STORED]


def member_bytes(raw, info: zipfile.ZipInfo, path: str) -> bytes:
    """A small zip member's bytes as torch's reader (miniz) gets them: stored or deflated, checked against its
    CRC-32. Any damage is a CkptError naming the member, never zipfile's or zlib's own exception."""
    name = info.filename
    if info.flag_bits & ENCRYPTED:
        raise CkptError(Code.CORRUPT, f"zip member {name} is marked encrypted, which torch never writes nor reads",
                        path)
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


def other_pickles_globals(raw, members, budget: list) -> list[str]:
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
