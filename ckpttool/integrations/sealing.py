"""Sealing a checkpoint as it is saved: ckpttool's manifest written into it (or beside a single file) right after the
trainer's save, by one process once every process's files are on disk. The manifest records every file's checksums,
so what no counter shows is caught later: a file left by another save, a rank's file that was never rewritten, bit
rot. `verify` then reports such a file as `checksum_mismatch`, and `latest` and the gate skip the checkpoint.

Each library's hook (beside its gate in this package) calls `seal_after_save` with its own barrier and its own
answer to "does this process write"; the files are hashed straight after they were written, from the page cache.
"""

from __future__ import annotations

import logging
import os

from ckpttool.checksums import MANIFEST_SUFFIX
from ckpttool.errors import CkptError

log = logging.getLogger("ckpttool.seal")


def seal(path: str) -> dict | None:
    """Write the manifest of the checkpoint just saved at `path`, replacing one an earlier save into the same place
    left (a rolling dir, Lightning's last.ckpt); None, logged, where the save is broken or cannot be sealed (the
    training goes on: `ckpttool verify` says what is wrong, and the gate refuses it)."""
    from ckpttool.operations.manifest import write

    try:
        return write(local(path), force=True, writer=True)
    except CkptError as e:
        log.error("not sealing %s: %s (%s)", path, e.reason, e.code)
    except Exception as e:  # noqa: BLE001 - whatever a checkpoint holds, sealing it never ends the training
        log.error("not sealing %s: %s: %s", path, type(e).__name__, e)
    return None


def local(path) -> str:
    """A local path for `path`, which may be a `file://` URL (Lightning and fsspec take them); other URLs are no
    local path, and sealing them fails with the reason logged."""
    path = os.fspath(path)
    return path[len("file://"):] if path.startswith("file://") else path


def seal_after_save(path: str, *, writes: bool, barrier) -> dict | None:
    """Every process calls this after its part of the save: `barrier()` until all files are on disk, the one process
    that `writes` seals `path`, and `barrier()` again so that no process starts the next save into the same place
    (or deletes this one) while it is being hashed."""
    barrier()
    result = seal(path) if writes else None
    barrier()
    return result


def forget(path: str):
    """A single-file checkpoint the trainer deleted (its total limit) takes its manifest with it; a directory's
    manifest went with the directory."""
    path = local(path)
    beside = path + MANIFEST_SUFFIX
    if os.path.isfile(beside) and not os.path.lexists(path):
        os.remove(beside)


def torch_barrier():
    """A barrier across the processes of the default torch.distributed group, where one is running."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
