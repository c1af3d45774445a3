"""Downloads into the Hugging Face cache that did not finish (huggingface_hub file_download.py
_hf_hub_download_to_cache_dir, _download_to_tmp_and_move, read at 2.4.0): a file is fetched into
`models--org--name/blobs/<etag>.incomplete` (`<etag>.<8 hex>.incomplete` since huggingface_hub made the name unique
per process), renamed to `blobs/<etag>` when complete, and only then linked from `snapshots/<rev>/<file>`. A download
cut short leaves the partial blob and no link; a link whose blob is gone (a cache copied without `blobs/`, or cleaned)
points at nothing.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import struct

from ckpttool.errors import CkptError
from ckpttool.model import Code

CACHE_SNAPSHOT = re.compile(r"(.*/(models|datasets|spaces)--([^/]+)--([^/]+))/snapshots/([0-9a-f]{6,64})(?:/(.*))?")
PARTIAL = re.compile(r"([0-9a-f]{6,128})(?:\.[0-9a-f]{8})?\.incomplete")
BLOBS_LISTED = 10_000  # entries of a repo's blobs/ looked at for partial downloads
HEADER_LIMIT = 100_000_000  # as the safetensors reader


def snapshot_of(path: str) -> dict | None:
    """The cache repo, repo id, type, revision and file (relative to the snapshot) that `path` is or lies in."""
    m = CACHE_SNAPSHOT.fullmatch(os.path.abspath(path))
    if not m:
        return None
    return {"repo": m.group(1), "type": m.group(2).rstrip("s"), "repo_id": f"{m.group(3)}/{m.group(4)}",
            "revision": m.group(5), "file": m.group(6)}


def _command(snap: dict, file: str | None) -> str:
    """The command that fetches `file` (all of the snapshot: None), every name quoted for a shell."""
    kind = "" if snap["type"] == "model" else f" --repo-type {snap['type']}"
    target = shlex.quote(snap["repo_id"]) + (" " + shlex.quote(file) if file else "")
    return f"hf download {target} --revision {snap['revision']}{kind}"


def partials(snap: dict) -> dict[str, str]:
    """etag -> path of every partial download in the cache repo's blobs/."""
    blobs = os.path.join(snap["repo"], "blobs")
    try:
        with os.scandir(blobs) as entries:
            found = {}
            for n, entry in enumerate(entries):
                if n == BLOBS_LISTED:
                    break
                if (m := PARTIAL.fullmatch(entry.name)) and entry.is_file(follow_symlinks=False):
                    found[m.group(1)] = entry.path
            return found
    except OSError:
        return {}


def expected_size(partial: str) -> int | None:
    """The size the file will have, where the part that arrived says it: a safetensors header (8 + its length + the
    end of its last tensor)."""
    try:
        with open(partial, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return None
            (length,) = struct.unpack("<Q", head)
            if not 2 <= length <= HEADER_LIMIT or os.path.getsize(partial) < 8 + length:
                return None
            header = json.loads(f.read(length))
    except (OSError, ValueError, RecursionError, struct.error):
        return None
    if not isinstance(header, dict):
        return None
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)
            and isinstance(v.get("data_offsets"), list) and len(v["data_offsets"]) == 2]
    return 8 + length + max(ends) if ends and all(type(e) is int and e >= 0 for e in ends) else None


def _arrived(partial: str) -> str:
    size = os.path.getsize(partial)
    total = expected_size(partial)
    return f"{size:,} of {total:,} bytes ({100 * size // total}%)" if total else f"{size:,} bytes"


def dangling(path: str) -> CkptError:
    """The error for a link to nothing: `incomplete_download` where it is a cache snapshot's link whose blob is still
    being (or stopped being) downloaded, else `missing_file` naming what it pointed at."""
    target = os.path.normpath(os.path.join(os.path.dirname(path), os.readlink(path)))
    snap = snapshot_of(path)
    name = os.path.basename(path)
    if snap is None:
        return CkptError(Code.MISSING_FILE, f"{name} is a link to {target}, which does not exist", path)
    partial = partials(snap).get(os.path.basename(target))
    if partial:
        return CkptError(Code.INCOMPLETE_DOWNLOAD, f"{name}: its download stopped; "
                         f"{os.path.relpath(partial, snap['repo'])} holds {_arrived(partial)}. Run "
                         f"`{_command(snap, snap['file'])}` to finish it", path)
    return CkptError(Code.MISSING_FILE, f"{name} links to {os.path.relpath(target, snap['repo'])}, which is not in "
                     f"the cache (copied or cleaned without it); run `{_command(snap, snap['file'])}` to fetch it",
                     path)


def unfinished(folder: str) -> list[CkptError]:
    """A cache snapshot's downloads that stopped before their link was made: one `incomplete_download` per partial
    blob in its repo (huggingface_hub links a file only once it is whole, so the name is not known)."""
    snap = snapshot_of(folder)
    if snap is None:
        return []
    return [CkptError(Code.INCOMPLETE_DOWNLOAD, f"a download into this cache repo stopped: "
                      f"{os.path.relpath(partial, snap['repo'])} holds {_arrived(partial)} and no file of the snapshot "
                      f"links to it yet. Run `{_command(snap, None)}` to finish it", partial)
            for _, partial in sorted(partials(snap).items())]
