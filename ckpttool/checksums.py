"""Checksums, one home for what `manifest` writes and `verify` checks: which files a manifest covers, where it lives,
the xxh3-128 of files (in pieces) and of each tensor's bytes, reading a manifest back, and the CRC-32s that torch zip
archives (and each DCP item) carry.

The manifest is JSON. A directory's sits inside it (`ckpttool-manifest.json`), a file's beside it
(`<file>.ckpttool-manifest.json`), a consistency_models family's beside its members
(`family<step>.ckpttool-manifest.json`). Paths in it are relative to the manifest's folder.
"""

from __future__ import annotations

import json
import os
import zipfile

import xxhash

from ckpttool import hashing, paths, steps
from ckpttool.errors import CkptError
from ckpttool.formats import ZIP_MAGIC
from ckpttool.model import ERROR, Checkpoint, Code, Problem

MANIFEST_NAME = "ckpttool-manifest.json"
MANIFEST_SUFFIX = ".ckpttool-manifest.json"
VERSION = 1


def manifest_path(ckpt: Checkpoint) -> str:
    path = os.path.abspath(ckpt.path)
    if os.path.isdir(path):
        return os.path.join(path, MANIFEST_NAME)
    if ckpt.format == "family":
        step = steps.global_step(ckpt)
        return os.path.join(os.path.dirname(path), f"family{step:06d}{MANIFEST_SUFFIX}")
    return path + MANIFEST_SUFFIX


def covered_files(ckpt: Checkpoint) -> list[str]:
    """Every file a manifest covers: all regular files under a checkpoint dir, else the files the reader used; never
    a FIFO, device or socket (opening one blocks or reads without end), nor a link out of the checkpoint (the readers
    report both)."""
    if os.path.isdir(ckpt.path):
        found = []
        for dirpath, dirnames, filenames in os.walk(ckpt.path):
            dirnames.sort()
            for name in sorted(filenames):
                full = os.path.join(dirpath, name)
                if name != MANIFEST_NAME and not name.endswith(".tmp") and not paths.unsafe(full, ckpt.path):
                    found.append(full)
        return found
    return sorted({os.path.abspath(f) for f in ckpt.files if os.path.isfile(f)})


def tensor_ranges(ckpt: Checkpoint, folder: str) -> list[dict]:
    """One entry per distinct stored byte range (a storage shared by tied tensors is hashed once); a tensor saved
    in chunks (DCP over several ranks) has one per chunk, with the chunk's offsets in the tensor."""
    ranges: dict[tuple, dict] = {}
    for comp in ckpt.components:
        for t in comp.tensors:
            for offsets, loc in t.pieces():
                key = (loc.file, loc.offset, loc.length)
                entry = ranges.setdefault(key, {"file": os.path.relpath(loc.file, folder), "names": [],
                                                "offset": loc.offset, "length": loc.length})
                if offsets is not None:
                    entry["chunk"] = list(offsets)
                entry["names"].append(t.name if comp.role == "model" and comp.name == "model" else
                                      f"{comp.name}/{t.name}")
    return sorted(ranges.values(), key=lambda e: (e["file"], e["offset"]))


def hash_files(paths: list[str], label="hashing") -> dict[str, dict]:
    """{path: {"size", "xxh3_128", "pieces"}} for each file, pieces of every file hashed in parallel."""
    jobs, owners = [], []
    for path in paths:
        for offset, length in hashing.pieces(os.path.getsize(path)):
            jobs.append((path, offset, length))
            owners.append(path)
    total = sum(j[2] for j in jobs)
    results = hashing.run_jobs(jobs, hashing.hash_range, total, label)
    out = {p: {"size": os.path.getsize(p), "pieces": []} for p in paths}
    for (path, _, length), (digest, read) in zip(jobs, results):
        if read != length:
            raise CkptError(Code.TRUNCATED, "file shrank while it was being hashed", path)
        out[path]["pieces"].append(digest)
    for entry in out.values():
        entry["xxh3_128"] = hashing.root_digest(entry["pieces"])
    return out


def hash_tensors(entries: list[dict], folder: str) -> list[str | None]:
    """Each entry's xxh3-128, many small tensors to a task (None: its range runs past the end of the file)."""
    return hashing.run_batched([(os.path.join(folder, e["file"]), e["offset"], e["length"]) for e in entries],
                               hashing.hash_ranges, "hashing tensors")


def load(target: str) -> tuple[dict, str]:
    """The manifest document at `target`, and the xxh3-128 of the bytes it was read from."""
    try:
        with open(target, "rb") as f:
            data = f.read()
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CkptError(Code.CORRUPT, f"manifest is not valid JSON ({e})", target) from None
    if not isinstance(doc, dict) or doc.get("ckpttool_manifest") != VERSION or not isinstance(doc.get("files"), dict):
        raise CkptError(Code.CORRUPT, "not a ckpttool manifest of a version this tool reads", target)
    if doc.get("algorithm") != hashing.ALGORITHM:
        raise CkptError(Code.CORRUPT, f"manifest uses {doc.get('algorithm')!r}, expected {hashing.ALGORITHM}", target)
    _check_shape(doc, os.path.dirname(os.path.abspath(target)), target)
    return doc, xxhash.xxh3_128_hexdigest(data)


MIN_PIECE_SIZE = 4096  # a manifest of 1-byte pieces cost ~2 KB of RAM per checked byte; ckpttool writes 64 MiB
MAX_PIECE_SIZE = 1 << 40


def _check_shape(doc: dict, folder: str, target: str):
    """A manifest is checkpoint bytes like any other: every path it names stays inside its folder (never opened
    outside it: a matching hash would confirm a guess at another file), every count is an int in bounds, and the
    pieces listed are exactly those its sizes and piece size make."""
    def bad(why):
        raise CkptError(Code.CORRUPT, f"manifest {why}; verify cannot trust it: rewrite it with `ckpttool manifest "
                        f"--force` once the checkpoint verifies", target)

    piece_size = doc.get("piece_size", hashing.PIECE_SIZE)
    if type(piece_size) is not int or not MIN_PIECE_SIZE <= piece_size <= MAX_PIECE_SIZE:
        bad(f"gives piece_size {str(piece_size)[:40]!r}, outside {MIN_PIECE_SIZE} to {MAX_PIECE_SIZE} bytes")
    for rel, entry in doc["files"].items():
        try:
            paths.inside(folder, rel, "file")
        except CkptError as e:  # forged, not rotted: an error whether or not a manifest is required
            raise CkptError(Code.UNSAFE_PATH, f"manifest lists {e.reason}; verify cannot trust it", target) from None
        if not isinstance(entry, dict) or type(entry.get("size")) is not int or entry["size"] < 0 or \
                not isinstance(entry.get("pieces"), list) or not all(isinstance(p, str) for p in entry["pieces"]):
            bad(f"entry for {rel!r} is not {{size, pieces}}")
        if len(entry["pieces"]) != max(1, -(-entry["size"] // piece_size)):
            bad(f"entry for {rel!r} lists {len(entry['pieces'])} pieces, its size makes "
                f"{max(1, -(-entry['size'] // piece_size))}")
    tensors = doc.get("tensors", [])
    if not isinstance(tensors, list):
        bad("has a tensors field that is not a list")
    for e in tensors:
        ok = isinstance(e, dict) and isinstance(e.get("file"), str) and e["file"] in doc["files"] and \
            all(type(e.get(k)) is int and e[k] >= 0 for k in ("offset", "length")) and \
            isinstance(e.get("names"), list) and e["names"] and all(isinstance(n, str) for n in e["names"])
        if not ok:
            bad(f"has a tensor entry {str(e)[:80]!r} that is not {{file it lists, offset, length, names}}")


# --- CRC-32s ---

def _crc_problems(members: list[tuple[str, zipfile.ZipInfo, int, str]]) -> list[Problem]:
    """Check stored zip members, each (file, member, data offset, what it holds), against their CRC-32s on all
    cores, batched per file so that many small members cost few tasks. Under torchrun every process compares the
    CRCs with its own copy's directory: those must be the same everywhere, or each would judge another file."""
    from ckpttool import distributed

    if distributed.active():
        distributed.same_everywhere("the zip directories' CRC-32s", [info.CRC for _, info, _, _ in members])
    crcs = hashing.run_batched([(path, offset, info.file_size) for path, info, offset, _ in members],
                               hashing.crc32_ranges, "CRC")
    return [Problem(Code.CORRUPT, ERROR, f"{what} fails its CRC-32 check (damaged bytes)", path)
            for i, (path, info, _, what) in enumerate(members) if crcs[i] != info.CRC]


def zip_crc_problems(path: str) -> list[Problem]:
    """Every stored member of a torch zip against its CRC-32."""
    try:
        from ckpttool.formats import torchzip

        members = torchzip.stored_members(path)
    except (zipfile.BadZipFile, OSError, CkptError, ValueError, NotImplementedError):
        return []  # the reader has already reported why this file cannot be read
    return _crc_problems([(path, info, offset, f"zip member {info.filename}") for info, offset in members])


def dcp_item_crc_problems(ckpt: Checkpoint) -> list[Problem]:
    """Each tensor item of a DCP dir is a torch.save blob of its own (filesystem.py _write_item): its members'
    CRC-32s name the tensor, or the chunk of it, whose bytes were damaged."""
    members, unreadable, sizes = [], [], {}
    for comp in ckpt.components:
        for t in comp.tensors:
            name = t.name if comp.role == "model" and comp.name == "model" else f"{comp.name}/{t.name}"
            for offsets, loc in t.pieces():
                if loc.file not in sizes:  # one stat per data file, not per item
                    sizes[loc.file] = os.path.getsize(loc.file) if os.path.isfile(loc.file) else -1
                if loc.encoding != "torch.save" or loc.offset + loc.length > sizes[loc.file]:
                    continue  # a missing or cut-short file: the reader has named what it lost
                what = f"tensor {name}" + (f" (chunk at {offsets})" if offsets else "") + \
                    f" in {os.path.basename(loc.file)}"
                try:
                    from ckpttool.formats import torchzip

                    found = torchzip.stored_members(loc.file, (loc.offset, loc.length))
                except (zipfile.BadZipFile, OSError, CkptError, ValueError, NotImplementedError):
                    unreadable.append(Problem(Code.CORRUPT, ERROR, f"{what}: its torch.save blob at byte {loc.offset} "
                                              "cannot be read (damaged bytes)", loc.file))
                    continue
                members.extend((loc.file, info, offset, what) for info, offset in found)
    return unreadable + _crc_problems(members)


def crc_problems(ckpt: Checkpoint) -> tuple[list[Problem], str]:
    """Every CRC-32 a checkpoint's zip archives carry, checked: (problems, what was checked, in words)."""
    problems = []
    dcp_files = {loc.file for c in ckpt.components for t in c.tensors for _, loc in t.pieces()
                 if loc.encoding == "torch.save"}
    zips = [f for f in ckpt.files if os.path.isfile(f) and f not in dcp_files and _is_zip(f)]
    for f in zips:
        problems.extend(zip_crc_problems(f))
    if dcp_files:
        problems.extend(dcp_item_crc_problems(ckpt))
    checked = ", ".join(([f"{len(zips)} torch zip CRCs"] if zips else []) +
                        ([f"item CRCs of {len(dcp_files)} DCP data files"] if dcp_files else []))
    return problems, checked


def _is_zip(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == ZIP_MAGIC
