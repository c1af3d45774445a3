"""Re-verifying an unchanged checkpoint costs one hash of its bytes, not another parse.

A clean `verify` report that was checked against a manifest is remembered in the user's cache folder, with the
identity (device, inode, size, mtime, ctime) of every file and folder that verify read, and the manifest's piece
digests. A later verify with the same options, whose files and folders all keep that identity, hashes every byte
again against those digests: bit rot leaves a file's identity alone, and the hash is what catches it. When every
piece matches, the bytes are the ones that were parsed and checked before, so the remembered report is returned.
Any difference (a changed identity, a piece that differs, another option, another ckpttool version) falls through
to a full verify, which names what changed.

A file changed within RACY_SECONDS of a verify is not remembered: a second write in the same timestamp tick would
keep its identity (git treats its index the same way). CKPTTOOL_CACHE_DIR moves the folder; set it to the empty
string to switch remembering off. The cache is only ever an optimisation: a folder that cannot be written, or an
entry that cannot be read, just means a full verify.
"""

from __future__ import annotations

import json
import os
import time

import xxhash

from ckpttool import __version__, hashing

RACY_SECONDS = 2.0


def cache_dir() -> str | None:
    configured = os.environ.get("CKPTTOOL_CACHE_DIR")
    if configured is not None:
        return configured or None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "ckpttool", "verify")


def _entry_path(path: str | None, config_file: str | None, options: dict) -> str | None:
    """Where the report of verify(path, **options) is kept; None when it is not kept (switched off, or a --config,
    one more file it would have to watch)."""
    folder = cache_dir()
    if folder is None or path is None or config_file is not None:
        return None
    key = json.dumps([os.path.realpath(path), sorted(options.items())], sort_keys=True)
    return os.path.join(folder, xxhash.xxh3_128_hexdigest(key.encode("utf-8")) + ".json")  # a name, not a proof


def _identity(path: str) -> list[int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def recall(path: str | None, config_file: str | None = None, **options) -> dict | None:
    """The remembered report when nothing verify read has changed and every byte still matches, else None. Light
    on imports: the CLI asks before it loads the readers."""
    from ckpttool import distributed

    entry_path = _entry_path(path, config_file, options)
    if entry_path is None or distributed.active():
        return None
    try:
        with open(entry_path, encoding="utf-8") as f:
            entry = json.load(f)
        if entry.get("tool") != __version__ or any(_identity(p) != ident for p, ident in entry["identity"].items()):
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
    return {**entry["report"], "path": path, "recalled": True}


def remember(report: dict, ckpt, manifest: tuple[str, dict] | None, path: str, config_file: str | None = None,
             **options):
    """Keep a clean report checked against a manifest (its path and document), unless something it read changed
    too recently."""
    from ckpttool import distributed
    from ckpttool.operations.manifest import covered_files

    entry_path = _entry_path(path, config_file, options)
    if (entry_path is None or distributed.active() or not report["ok"] or report["problems"] or manifest is None
            or ckpt is None or not any(c["check"] == "checksums" and c["status"] == "pass" for c in report["checks"])):
        return
    manifest, manifest_doc = manifest
    folder = os.path.dirname(manifest)
    pieces = {os.path.join(folder, rel): info["pieces"] for rel, info in manifest_doc["files"].items()}
    read = set(pieces) | set(covered_files(ckpt)) | set(ckpt.files) | {manifest}
    if os.path.isdir(ckpt.path):
        read |= {dirpath for dirpath, _, _ in os.walk(ckpt.path)}
    read = {os.path.abspath(p) for p in read}
    read |= {os.path.dirname(p) for p in list(read)}
    identity = {p: _identity(p) for p in sorted(read)}
    newest = max((max(i[3], i[4]) for i in identity.values() if i), default=0) / 1e9
    if None in identity.values() or time.time() - newest < RACY_SECONDS:
        return
    entry = {"tool": __version__, "identity": identity, "piece_size": manifest_doc.get("piece_size",
                                                                                     hashing.PIECE_SIZE),
             "pieces": pieces, "report": report}
    try:
        os.makedirs(os.path.dirname(entry_path), exist_ok=True)
        staging = f"{entry_path}.{os.getpid()}.tmp"
        with open(staging, "w", encoding="utf-8") as f:
            json.dump(entry, f)
        os.replace(staging, entry_path)
    except OSError:
        pass  # a cache that cannot be written only means the next verify is a full one
