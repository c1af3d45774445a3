"""Outputs appear whole or not at all: written to a temporary sibling, flushed, then renamed into place.

Staging names carry the writer's pid (`.out.pt.ckpttool-1234-ab12cd.tmp`), so concurrent writers never share one and
a leftover from a killed run can be told from a live one: the next write to the same destination, and `prune`,
remove those whose process is gone. Staging is created with the modes a plain file or folder gets under the user's
umask (not mkstemp's 0600), so the renamed output is as readable to a team as one `cp` or `torch.save` wrote.
A write that fails for lack of space or permission becomes one `OutputError` naming the output and what it needed.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import os
import re
import secrets
import shutil
import time

from ckpttool.errors import OutputError

STAGING = re.compile(r"^\.(?P<target>.+)\.ckpttool-(?P<pid>\d+)-[0-9a-f]+\.tmp$")
STALE_AFTER_S = 600  # a staging entry untouched this long, whose pid is not running here, is a killed run's leftover
WRITE_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
                errno.EFBIG: "the file is larger than the file-size limit allows (ulimit -f, or the filesystem's "
                             "largest file)",
                errno.EROFS: "the filesystem is read-only", errno.EACCES: "permission denied",
                errno.EPERM: "operation not permitted", errno.EIO: "an I/O error occurred"}


def staging_path(dst: str) -> str:
    folder, name = os.path.split(os.path.abspath(dst.rstrip(os.sep)))
    return os.path.join(folder, f".{name}.ckpttool-{os.getpid()}-{secrets.token_hex(3)}.tmp")


def make_staging_file(dst: str) -> str:
    remove_stale(dst)
    path = staging_path(dst)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # 0666 less the umask
    return path


def make_staging_dir(dst: str) -> str:
    remove_stale(dst)
    path = staging_path(dst)
    os.mkdir(path, 0o777)  # 0777 less the umask
    return path


def publish(staged: str, dst: str):
    """Move a complete output into place. A file replaces a file in one rename. A folder cannot replace anything in
    one rename, so the old output is renamed aside first (under a staging name, which the next write or `prune`
    removes if this is interrupted), the new one renamed in, and the old one deleted last: at every moment one whole
    output exists, at `dst` or aside, never a half-deleted one."""
    if not os.path.lexists(dst) or not (os.path.isdir(staged) or os.path.isdir(dst)):
        os.replace(staged, dst)
        return
    aside = staging_path(dst)
    os.rename(dst, aside)
    try:
        os.rename(staged, dst)
    except BaseException:
        os.rename(aside, dst)  # the old output back where it was
        raise
    discard(aside)


def discard(path: str):
    """Remove a staging file or folder, whatever is left of it."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        with contextlib.suppress(OSError):
            os.unlink(path)


def write_synced(path: str, data) -> None:
    """Write `data` (bytes or any buffer) to `path` and fsync it, through Python I/O: a full disk is an OSError.
    In place: for a file inside a folder that is itself staged, or for a staging file."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_text(path: str, text: str):
    write_bytes(path, text.encode("utf-8"))


def write_bytes(path: str, data: bytes):
    """`data` at `path`, through a staging sibling renamed into place: never a partial file."""
    with guard(path, len(data)):
        tmp = make_staging_file(path)
        try:
            write_synced(tmp, data)
            os.replace(tmp, path)
        finally:
            discard(tmp)


def failed_write(folder: str) -> OSError:
    """The OSError behind a write a library reported only as its own error (torch's C++ archive writer): a file in
    `folder` at the file-size limit (EFBIG), else a full disk (ENOSPC), else an I/O error."""
    import resource

    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    sizes = [os.lstat(os.path.join(parent, name)).st_size for parent, _, names in os.walk(folder) for name in names]
    if limit != resource.RLIM_INFINITY and any(size >= limit - (1 << 16) for size in sizes):
        code = errno.EFBIG
    elif shutil.disk_usage(folder).free < (1 << 20):
        code = errno.ENOSPC
    else:
        code = errno.EIO
    return OSError(code, os.strerror(code))


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _last_touched(path: str) -> float:
    if not os.path.isdir(path) or os.path.islink(path):
        return os.lstat(path).st_mtime
    newest = os.lstat(path).st_mtime
    for folder, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                newest = max(newest, os.lstat(os.path.join(folder, name)).st_mtime)
    return newest


def stale_staging(folder: str, target: str | None = None) -> list[str]:
    """ckpttool staging entries in `folder` (for `target` only, if given) left by runs that were killed: the pid in
    the name is not running on this host and nothing in it changed for STALE_AFTER_S (a writer on another node of a
    shared filesystem keeps touching its staging, so it is never taken for a leftover)."""
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    stale = []
    for name in names:
        match = STAGING.match(name)
        if not match or (target is not None and match["target"] != target):
            continue
        full = os.path.join(folder, name)
        with contextlib.suppress(OSError):
            if not _pid_running(int(match["pid"])) and time.time() - _last_touched(full) > STALE_AFTER_S:
                stale.append(full)
    return stale


def remove_stale(dst: str):
    folder, name = os.path.split(os.path.abspath(dst.rstrip(os.sep)))
    for path in stale_staging(folder, name):
        discard(path)


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "bytes" else f"{n} bytes"
        n /= 1024


_outputs: contextvars.ContextVar[tuple] = contextvars.ContextVar("outputs", default=())


@contextlib.contextmanager
def guard(dst: str, needed: int | None):
    """Turn a failed write of the output at `dst` into one OutputError: what happened, how much the output needed,
    how much room there is, what to do. Errors on other paths (the input) pass through unchanged. Guards nest: the
    outermost output (a state dir, not the file staged inside it) is the one named."""
    outer = _outputs.get()
    token = _outputs.set(outer + ((dst, needed),))
    try:
        yield
    except OSError as e:
        dst, needed = (outer or ((dst, needed),))[0]
        if outer or e.errno not in WRITE_ERRNOS or not _about_output(e, dst):
            raise
        raise OutputError(describe(e, dst, needed)) from None
    finally:
        _outputs.reset(token)


def _about_output(e: OSError, dst: str) -> bool:
    """A write error carries no file name; an open/mkdir/rename error names the output, its staging or its folder."""
    if not e.filename:
        return True
    folder, name = os.path.split(os.path.abspath(dst.rstrip(os.sep)))
    named, own = os.path.abspath(os.fsdecode(e.filename)), os.path.join(folder, name)
    return named in (folder, own) or named.startswith((os.path.join(folder, f".{name}."), own + os.sep, own + "."))


def describe(e: OSError, dst: str, needed: int | None) -> str:
    folder = os.path.dirname(os.path.abspath(dst.rstrip(os.sep)))
    reason = WRITE_ERRNOS[e.errno]
    what = f"the output needs about {_size(needed)}" if needed else ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        with contextlib.suppress(OSError):
            free = shutil.disk_usage(folder).free
            what += ("; " if what else "") + f"{_size(free)} free in {folder}"
        advice = "free some space or write somewhere with more room"
        if e.errno == errno.EFBIG:
            advice = "raise the limit (ulimit -f) or write to another filesystem"
    else:
        advice = f"write to a folder you can write to, not {folder}"
    detail = f" ({what})" if what else ""
    return f"{dst}: cannot write the output: {reason}{detail}; nothing was written, {advice}"
