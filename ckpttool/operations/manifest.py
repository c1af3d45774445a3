"""`ckpttool manifest`: xxh3-128 checksums of a checkpoint's files (in pieces) and of each tensor's bytes.

The manifest is JSON. A directory's sits inside it (`ckpttool-manifest.json`), a file's beside it
(`<file>.ckpttool-manifest.json`), a consistency_models family's beside its members
(`family<step>.ckpttool-manifest.json`). Paths in it are relative to the manifest's folder.
"""

from __future__ import annotations

import datetime
import json
import os

import xxhash

from ckpttool import __version__, atomic, distributed, hashing, steps
from ckpttool.errors import CkptError, UsageError
from ckpttool.formats import open_checkpoint
from ckpttool.model import Checkpoint

MANIFEST_NAME = "ckpttool-manifest.json"
MANIFEST_SUFFIX = ".ckpttool-manifest.json"
VERSION = 1
BLOCKING = ("truncated", "corrupt", "missing_file")  # a manifest of a broken checkpoint would bless the damage


def manifest_path(ckpt: Checkpoint) -> str:
    path = os.path.abspath(ckpt.path)
    if os.path.isdir(path):
        return os.path.join(path, MANIFEST_NAME)
    if ckpt.format == "family":
        step = steps.global_step(ckpt)
        return os.path.join(os.path.dirname(path), f"family{step:06d}{MANIFEST_SUFFIX}")
    return path + MANIFEST_SUFFIX


def covered_files(ckpt: Checkpoint) -> list[str]:
    """Every file a manifest covers: all files under a checkpoint dir, else the files the reader used."""
    if os.path.isdir(ckpt.path):
        found = []
        for dirpath, dirnames, filenames in os.walk(ckpt.path):
            dirnames.sort()
            for name in sorted(filenames):
                if name != MANIFEST_NAME and not name.endswith(".tmp"):
                    found.append(os.path.join(dirpath, name))
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
            raise CkptError("truncated", "file shrank while it was being hashed", path)
        out[path]["pieces"].append(digest)
    for entry in out.values():
        entry["xxh3_128"] = hashing.root_digest(entry["pieces"])
    return out


def hash_tensors(entries: list[dict], folder: str) -> list[str | None]:
    """Each entry's xxh3-128, many small tensors to a task (None: its range runs past the end of the file)."""
    return hashing.run_batched([(os.path.join(folder, e["file"]), e["offset"], e["length"]) for e in entries],
                               hashing.hash_ranges, "hashing tensors")


def build(ckpt: Checkpoint) -> dict:
    """The manifest document of a readable checkpoint."""
    broken = [p for p in ckpt.problems if p.code in BLOCKING and p.severity == "error"]
    if broken:
        first = broken[0]
        raise CkptError(first.code, f"not writing a manifest for a broken checkpoint: {first.message} "
                        f"({first.path}); run `ckpttool verify` for the full list", ckpt.path)
    from ckpttool.operations.verify import crc_problems

    damaged, _ = crc_problems(ckpt)
    if damaged:
        raise CkptError("corrupt", f"not writing a manifest for a damaged checkpoint: {damaged[0].message} "
                        f"({damaged[0].path}); run `ckpttool verify` for the full list", ckpt.path)
    folder = os.path.dirname(manifest_path(ckpt))
    files = hash_files(covered_files(ckpt))
    tensors = tensor_ranges(ckpt, folder)
    for entry, digest in zip(tensors, hash_tensors(tensors, folder)):
        entry[hashing.ALGORITHM] = digest
    doc = {
        "ckpttool_manifest": VERSION,
        "tool": f"ckpttool {__version__}",
        "created": _created(),
        "algorithm": hashing.ALGORITHM,
        "piece_size": hashing.PIECE_SIZE,
        "format": ckpt.format,
        "layout": ckpt.layout,
        "step": steps.global_step(ckpt),
        "crcs_checked": True,  # every zip CRC held when it was written: verify need not check them while bytes match
        "files": {os.path.relpath(p, folder): info for p, info in files.items()},
        "tensors": tensors,
    }
    return doc


def _created() -> str:
    """Now, or SOURCE_DATE_EPOCH when set (the reproducible-builds convention): two runs then write the same bytes."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH", "")
    when = (datetime.datetime.fromtimestamp(int(epoch), datetime.timezone.utc) if epoch.isdigit() else
            datetime.datetime.now(datetime.timezone.utc))
    return when.isoformat(timespec="seconds")


def write(path: str, force: bool = False, staged_dir: bool = False) -> dict:
    """Write the manifest for `path`; an existing one is replaced only with `force`. `staged_dir`: `path` is a folder
    still being staged by its writer (a trainer's `checkpoint-N.tmp`), so the manifest is written straight into it
    under its own name: the folder's rename publishes it, and no temporary name of its own ever appears."""
    from ckpttool.operations import verify_cache

    before = verify_cache.listings(path) if verify_cache.cache_dir() else None  # listed before anything is read
    ckpt = open_checkpoint(path)
    target = manifest_path(ckpt)
    if os.path.exists(target) and not force:
        raise UsageError(f"{target}: a manifest already exists; pass --force to replace it (verify first if "
                         "you are not sure the checkpoint is still intact)")
    doc = build(ckpt)
    text = json.dumps(doc, indent=1) + "\n"
    result = {"manifest": target, "files": len(doc["files"]), "tensors": len(doc["tensors"]),
              "bytes": sum(f["size"] for f in doc["files"].values()), "step": doc["step"]}
    if not distributed.is_leader():  # under torchrun every rank hashed its share; rank 0 writes
        return result
    if staged_dir:
        data = text.encode("utf-8")
        with atomic.guard(target, len(data)):
            atomic.write_synced(target, data)
    else:
        atomic.write_text(target, text)
        _remember_reports(path, ckpt, target, doc, text.encode("utf-8"), before)
    return result


def _remember_reports(path: str, ckpt: Checkpoint, target: str, doc: dict, data: bytes, before: dict | None):
    """Every byte was just parsed, CRC-checked and hashed: hand verify's cache the reports (without and with
    --for-resume) that a verify gives while the bytes match, so the first verify after this one is a hash."""
    from ckpttool.operations import verify, verify_cache

    if before is None:
        return
    folder, name = os.path.split(target)
    with_manifest = {f: sorted({*names, name}) if f == folder else names for f, names in before.items()}
    for for_resume in (False, True):
        report = verify.report_while_matching(path, ckpt, target, doc, for_resume=for_resume)
        verify_cache.remember(report, ckpt, (target, doc, xxhash.xxh3_128_hexdigest(data)), path, with_manifest,
                              expect_step=None, for_resume=for_resume, finite=False)


def load(target: str) -> tuple[dict, str]:
    """The manifest document at `target`, and the xxh3-128 of the bytes it was read from."""
    try:
        with open(target, "rb") as f:
            data = f.read()
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CkptError("corrupt", f"manifest is not valid JSON ({e})", target) from None
    if not isinstance(doc, dict) or doc.get("ckpttool_manifest") != VERSION or not isinstance(doc.get("files"), dict):
        raise CkptError("corrupt", "not a ckpttool manifest of a version this tool reads", target)
    if doc.get("algorithm") != hashing.ALGORITHM:
        raise CkptError("corrupt", f"manifest uses {doc.get('algorithm')!r}, expected {hashing.ALGORITHM}", target)
    return doc, xxhash.xxh3_128_hexdigest(data)
