"""Paths a checkpoint names, kept inside it: one home for the rules every reader, walk and writer follows.

A checkpoint is untrusted bytes. Its own metadata (a manifest's `files`, a DCP `relative_path`, DeepSpeed's `latest`,
a shard index's `weight_map`) may name `../outside` or `/etc/hostname`, and its folder may hold links out of it or
FIFOs that block whoever opens them. Nothing is read through a path that leaves the checkpoint (a Hugging Face cache
snapshot's links into its own `blobs/` excepted), and only regular files are ever opened.
"""

from __future__ import annotations

import os
import stat

from ckpttool.errors import CkptError
from ckpttool.model import Code


def within(path: str, root: str) -> bool:
    """Whether `path`, every link resolved, is `root` or lies under it (`root`'s own links resolved too)."""
    real, top = os.path.realpath(path), os.path.realpath(root)
    return real == top or real.startswith(top.rstrip(os.sep) + os.sep)


def overlap(a: str, b: str) -> bool:
    """Whether two paths, links resolved, are the same or one holds the other."""
    return within(a, b) or within(b, a)


def inside(root: str, relative: str, what: str, source: str | None = None) -> str:
    """`root/relative` for a path a checkpoint's own metadata (the file `source`) names; CkptError (corrupt) when it
    is absolute, climbs out with `..`, or reaches outside `root` through a link."""
    if not isinstance(relative, str) or not relative or "\0" in relative:
        raise CkptError(Code.CORRUPT, f"{what} {relative!r} is not a file name", source)
    joined = os.path.normpath(os.path.join(root, relative))
    if os.path.isabs(relative) or leaves(joined, root):
        raise CkptError(Code.CORRUPT, f"{what} {relative!r} points outside the checkpoint; it was not read", source)
    return joined


def snapshot_blob(path: str, root: str) -> bool:
    """A Hugging Face cache snapshot's link into its repo's own `blobs/` (models--org--name/snapshots/REV/... ->
    ../../blobs/SHA): the one kind of link out of a checkpoint folder that is followed."""
    real = os.path.realpath(path)
    parts = os.path.realpath(root).split(os.sep)
    if "snapshots" not in parts:
        return False
    repo = os.sep.join(parts[: len(parts) - parts[::-1].index("snapshots") - 1])
    return os.path.basename(repo).startswith(("models--", "datasets--", "spaces--")) and \
        real.startswith(os.path.join(repo, "blobs") + os.sep)


def leaves(path: str, root: str) -> bool:
    """Whether reading `path` (inside `root`'s folder tree) would follow a link out of `root`."""
    return not within(path, root) and not snapshot_blob(path, root)


def unsafe(path: str, root: str) -> str | None:
    """Why `path`, under `root`, is never opened: a FIFO, device or socket, or a link out of `root`; None when it may
    be."""
    if kind := special(path):
        return kind
    return f"a link out of the checkpoint, to {os.path.realpath(path)}" if leaves(path, root) else None


def plain_name(name: str) -> bool:
    """A bare entry name, as DCP's data files, DeepSpeed's tags and shards beside their index are named: no folder
    part, not `.` or `..`, no NUL (no path can hold one)."""
    return bool(name) and os.path.basename(name) == name and name not in (".", "..") and "\0" not in name


def folder_named(parent: str, name: str) -> str | None:
    """`parent/name` when `name` (what a `latest` file holds) is a plain name of a folder inside `parent`, not a
    link out of it; else None."""
    target = os.path.join(parent, name)
    return target if plain_name(name) and os.path.isdir(target) and not leaves(target, parent) else None


def special(path: str) -> str | None:
    """What a non-regular, non-folder entry is (a FIFO, a device, a socket), which opening could block on or read
    without end; None for regular files, folders, links and paths that do not exist."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    return ("a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else
            "a character device" if stat.S_ISCHR(mode) else "a block device" if stat.S_ISBLK(mode) else
            "not a regular file")


def regular(path: str):
    """Raise CkptError (corrupt) unless `path` is a regular file (or does not exist, which the caller reports): the
    readers' guard before they open anything."""
    kind = special(path)
    if kind:
        raise CkptError(Code.CORRUPT, f"{kind}, not a regular file: never opened (reading it could block or never end)",
                        path)
