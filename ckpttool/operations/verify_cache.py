"""Verifying a checkpoint whose bytes match its manifest costs one hash of those bytes, not another parse.

A clean `verify` report checked against a manifest is remembered in the user's cache folder together with what it
was derived from, all of it content: the names in every folder verify looked in (and whether each is a folder), the
digest of the manifest, and the manifest's piece digests of every file. `ckpttool manifest` remembers the reports
(without and with --for-resume) as it writes the manifest, having just parsed, CRC-checked and hashed every byte,
so even the first verify after it recalls; a full verify remembers its own. A later verify with the same options
lists those folders again, hashes the manifest, and hashes every byte of the checkpoint against the digests: when
all match, the names and bytes are the ones that were checked, and the remembered report is returned. Any
difference (a file added, removed or changed, a new manifest, other options, another ckpttool version) falls
through to a full verify, which names what changed.

No timestamp or inode is trusted, so a write within the clock tick of a verify cannot hide. Folders are listed
before the checkpoint is read and again after the report is made; a report is only remembered when the two agree.
CKPTTOOL_CACHE_DIR moves the folder; set it to the empty string to switch remembering off. The cache is only ever an
optimisation: a folder that cannot be written, or an entry that cannot be read, just means a full verify.
"""

from __future__ import annotations

import json
import os

import xxhash

from ckpttool import __version__, hashing
from ckpttool.model import Status, VerifyReport

MAX_ENTRIES = 1024  # the oldest are removed beyond this: a trainer that writes a manifest per save adds two a save


def cache_dir() -> str | None:
    configured = os.environ.get("CKPTTOOL_CACHE_DIR")
    if configured is not None:
        return configured or None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "ckpttool", "verify")


def _entry_path(path: str | None, config_file: str | None, options: dict) -> str | None:
    """Where the report of verify(path, **options) is kept; None when it is not kept (switched off, or a --config,
    one more file it would have to watch). --require-manifest is left out of the key: a remembered report was
    checked against a manifest, so it reads the same with or without it."""
    folder = cache_dir()
    if folder is None or path is None or config_file is not None:
        return None
    options = {k: v for k, v in options.items() if k != "require_manifest"}
    key = json.dumps([os.path.realpath(path), sorted(options.items())], sort_keys=True)
    return os.path.join(folder, xxhash.xxh3_128_hexdigest(key.encode("utf-8")) + ".json")  # a name, not a proof


def listings(path: str) -> dict[str, list[str]] | None:
    """The names in every folder verify looks in for `path`: the folder holding it, and every folder under it when
    it is one. A folder's name ends in "/". None when one cannot be listed."""
    path = os.path.abspath(os.path.normpath(path))
    folders = [os.path.dirname(path)]
    if os.path.isdir(path):
        folders.extend(dirpath for dirpath, _, _ in os.walk(path))
    try:
        return {folder: sorted(e.name + "/" if e.is_dir() else e.name for e in os.scandir(folder))
                for folder in folders}
    except OSError:
        return None


def file_digest(path: str) -> str | None:
    try:
        digest, _ = hashing.hash_range(path, 0, os.path.getsize(path))
    except OSError:
        return None
    return digest


def recall(path: str | None, config_file: str | None = None, **options) -> VerifyReport | None:
    """The remembered report when every folder verify looks in holds the same names and every byte still matches,
    else None. Light on imports: the CLI asks before it loads the readers."""
    from ckpttool import distributed

    entry_path = _entry_path(path, config_file, options)
    if entry_path is None or distributed.active():
        return None
    try:
        with open(entry_path, encoding="utf-8") as f:
            entry = json.load(f)
        if entry.get("tool") != __version__ or listings(path) != entry["listings"] or \
                file_digest(entry["manifest"]) != entry["manifest_digest"]:
            return None
        pieces, piece_size = entry["pieces"], int(entry["piece_size"])
        jobs = [(p, offset, length) for p in pieces for offset, length in hashing.pieces(os.path.getsize(p),
                                                                                         piece_size)]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    results = hashing.run_jobs(jobs, hashing.hash_range, sum(j[2] for j in jobs), "verifying")
    got: dict[str, list[str]] = {}
    for (p, _, length), (digest, read) in zip(jobs, results):
        got.setdefault(p, []).append(digest if read == length else None)
    if got != pieces:
        return None
    try:
        report = VerifyReport.from_json(entry["report"])
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    report.path, report.recalled = path, True
    return report


def remember(report: VerifyReport, ckpt, manifest, path: str, before: dict | None, config_file: str | None = None,
             **options):
    """Keep a clean report checked against a manifest, (its path, document, digest of its bytes), when the folders
    listed `before` the checkpoint was read still hold the same names and cover every file it read."""
    from ckpttool import distributed
    from ckpttool.checksums import covered_files

    entry_path = _entry_path(path, config_file, options)
    if (entry_path is None or before is None or distributed.active() or not report.ok or report.problems
            or manifest is None or ckpt is None
            or not any(c.check == "checksums" and c.status is Status.PASS for c in report.checks)):
        return
    target, doc, digest = manifest
    folder = os.path.dirname(target)
    pieces = {os.path.join(folder, rel): info["pieces"] for rel, info in doc["files"].items()}
    read = {os.path.abspath(p) for p in set(covered_files(ckpt)) | set(ckpt.files)} - {os.path.abspath(target)}
    if not read <= set(pieces) or not {os.path.dirname(p) for p in read | {target}} <= set(before) or \
            listings(path) != before:
        return  # a file no digest covers, a folder not listed, or a name that came or went while it was read
    entry = {"tool": __version__, "listings": before, "manifest": target, "manifest_digest": digest,
             "piece_size": doc.get("piece_size", hashing.PIECE_SIZE), "pieces": pieces, "report": report.to_json()}
    try:
        os.makedirs(os.path.dirname(entry_path), exist_ok=True)
        staging = f"{entry_path}.{os.getpid()}.tmp"
        with open(staging, "w", encoding="utf-8") as f:
            json.dump(entry, f)
        os.replace(staging, entry_path)
        _evict(os.path.dirname(entry_path))
    except OSError:
        pass  # a cache that cannot be written only means the next verify is a full one


def _evict(folder: str):
    entries = [e for e in os.scandir(folder) if e.name.endswith(".json")]
    if len(entries) > MAX_ENTRIES:
        entries.sort(key=lambda e: e.stat().st_mtime_ns)
        for e in entries[:len(entries) - MAX_ENTRIES]:
            os.remove(e.path)
