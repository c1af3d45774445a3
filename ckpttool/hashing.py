"""Streaming xxh3-128 checksums of byte ranges, on every core, with bounded memory.

Files are hashed in fixed pieces so that one large file is spread over all cores; reads use `os.preadv` into a
reused buffer per worker (no mmap page-fault storms, no copies of the file in memory). xxhash and zlib release the
GIL, so threads really run in parallel.
"""

from __future__ import annotations

import os
import sys
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import xxhash

PIECE_SIZE = 64 << 20  # manifest piece size: the unit of parallel hashing and of mismatch reporting
BUFFER_SIZE = 4 << 20
ALGORITHM = "xxh3_128"


def read_pieces(path: str, offset: int, length: int):
    """Yield the `length` bytes of `path` from `offset` as views of one reused buffer (use each before the next);
    stops early if the file is short (the caller compares what it got)."""
    buf = bytearray(min(BUFFER_SIZE, max(length, 1)))
    view = memoryview(buf)
    done = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        while done < length:
            n = os.preadv(fd, [view[: min(len(buf), length - done)]], offset + done)
            if n <= 0:
                break
            yield view[:n]
            done += n
    finally:
        os.close(fd)


def _read_ranges(path: str, offset: int, length: int, consume):
    """Feed `length` bytes of `path` from `offset` to `consume(memoryview)`; returns the bytes actually read."""
    done = 0
    for piece in read_pieces(path, offset, length):
        consume(piece)
        done += len(piece)
    return done


def hash_range(path: str, offset: int, length: int) -> tuple[str, int]:
    """(xxh3-128 hex digest, bytes read) of a byte range; fewer bytes read than asked means the file is short."""
    h = xxhash.xxh3_128()
    done = _read_ranges(path, offset, length, h.update)
    return h.hexdigest(), done


def crc32_range(path: str, offset: int, length: int) -> tuple[int, int]:
    crc = 0

    def consume(view):
        nonlocal crc
        crc = zlib.crc32(view, crc)

    done = _read_ranges(path, offset, length, consume)
    return crc & 0xFFFFFFFF, done


def pieces(size: int, piece_size: int | None = None) -> list[tuple[int, int]]:
    """(offset, length) of each piece of a file of `size` bytes (one empty piece for an empty file)."""
    piece_size = piece_size or PIECE_SIZE
    return [(o, min(piece_size, size - o)) for o in range(0, size, piece_size)] or [(0, 0)]


def root_digest(piece_digests: list[str]) -> str:
    """A file's digest: xxh3-128 of its pieces' digests (for a one-piece file, that piece's digest itself)."""
    if len(piece_digests) == 1:
        return piece_digests[0]
    return xxhash.xxh3_128(b"".join(bytes.fromhex(d) for d in piece_digests)).hexdigest()


def workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


@contextmanager
def progress(total_bytes: int, label: str):
    """A click progress bar on a terminal (stderr), nothing when piped; yields an `advance(nbytes)` function."""
    if total_bytes < (256 << 20) or not sys.stderr.isatty():
        yield lambda n: None
        return
    import click

    with click.progressbar(length=total_bytes, label=label, file=sys.stderr) as bar:
        yield bar.update


def run_jobs(jobs, fn, total_bytes: int = 0, label: str = "hashing"):
    """Run fn(*job) for every (path, offset, length) job on all cores; results in job order. Under torchrun the
    jobs are shared out among the processes, and each gets every result (ckpttool.distributed)."""
    from ckpttool import distributed

    if distributed.active():
        return distributed.run_shared(jobs, [job[2] for job in jobs],
                                      lambda mine: _run_local(mine, fn, sum(j[2] for j in mine), label))
    return _run_local(jobs, fn, total_bytes, label)


def _run_local(jobs, fn, total_bytes: int, label: str):
    with progress(total_bytes, label) as advance, ThreadPoolExecutor(workers()) as pool:
        results = []
        for job, result in zip(jobs, pool.map(lambda job: fn(*job), jobs)):
            advance(job[2])
            results.append(result)
        return results
