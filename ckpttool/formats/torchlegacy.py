"""The legacy torch.save layout (before torch 1.6, or `_use_new_zipfile_serialization=False`): five pickles in a row
(magic number, protocol, system info, the object, the storage keys), then each storage's bytes."""

from __future__ import annotations

import struct

from ckpttool.errors import CkptError
from ckpttool.formats.pickles import RawPickle, scan_records, union, unpickle_at
from ckpttool.formats.torchzip import SCAN_LIMIT
from ckpttool.model import Code


LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def read_legacy(path, size, allowed) -> RawPickle:
    """Pre-1.6 torch.save: magic, protocol, sys_info, the object, storage keys, then raw storages in order.

    torch.load unpickles all five records, so each one's globals are scanned, not only the object's."""
    with open(path, "rb") as f:
        first, magic_record = unpickle_at(f, allowed, path, "first pickle")
        if first != LEGACY_MAGIC:
            # Not a torch legacy file: torch.load unpickles this first pickle, takes it for a bad magic number, stops.
            if magic_record.storages:
                raise CkptError(Code.CORRUPT, "pickle references torch storages but carries none", path)
            # pickle.load called again (joblib, custom loaders, scanners) reads on: scan the records that follow
            seen = union([magic_record.globals_seen, scan_records(f.read(SCAN_LIMIT))])
            called = magic_record.called | (set(seen) - set(magic_record.globals_seen))  # scanned only: as called
            return RawPickle(first, "pickle", {}, seen, [g for g in seen if g not in allowed], called,
                             magic_record.runs_methods)
        _, protocol_record = unpickle_at(f, allowed, path, "protocol record")
        _, sys_info_record = unpickle_at(f, allowed, path, "sys_info record")
        obj, unpickler = unpickle_at(f, allowed, path, "object pickle")
        keys, keys_record = unpickle_at(f, allowed, path, "storage key list")
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
                raise CkptError(Code.CORRUPT, f"storage {key!r} holds {numel} elements, its tensors need {ref.numel}",
                                path)
            if pos + 8 + length > size:
                raise CkptError(Code.TRUNCATED, f"storage {key!r} ends past the end of the file: it was cut short",
                                path)
            storages[str(key)] = (ref, pos + 8)
            pos += 8 + length
        missing = set(unpickler.storages) - set(storages)
        if missing:
            raise CkptError(Code.CORRUPT, f"storages {sorted(missing)[:5]} have no data", path)
    records = (magic_record, protocol_record, sys_info_record, unpickler, keys_record)
    return RawPickle(obj, "torch legacy", storages, union(r.globals_seen for r in records),
                     union(r.unsafe_globals for r in records), set().union(*(r.called for r in records)),
                     set().union(*(r.runs_methods for r in records)))
