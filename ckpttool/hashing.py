"""Streaming xxh3-128 checksums of byte ranges, on every core, with bounded memory.

Files are hashed in fixed pieces so that one large file is spread over all cores; reads use `os.preadv` into a
reused buffer per worker (no mmap page-fault storms, no copies of the file in memory). xxhash and zlib release the
GIL, so threads really run in parallel.
"""

from __future__ import annotations

import os
import sys
import zlib
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


def _per_range(path: str, ranges: list[tuple[int, int]], of_bytes, of_range) -> list:
    """of_bytes(data) for each small (offset, length) range of one file, of_range(path, offset, length) streamed for a
    large one; None for a range the file does not fully hold. Many small ranges (an optimizer state of 100,000
    tensors) cost one task, not one each."""
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        for offset, length in ranges:
            if length <= BUFFER_SIZE:
                data = os.pread(fd, length, offset)
                out.append(of_bytes(data) if len(data) == length else None)
            else:
                value, done = of_range(path, offset, length)
                out.append(value if done == length else None)
    finally:
        os.close(fd)
    return out


def hash_ranges(path: str, ranges: list[tuple[int, int]]) -> list[str | None]:
    """xxh3-128 hex digest of each range (see _per_range)."""
    return _per_range(path, ranges, xxhash.xxh3_128_hexdigest, hash_range)


def crc32_ranges(path: str, ranges: list[tuple[int, int]]) -> list[int | None]:
    """CRC-32 of each range (see _per_range)."""
    return _per_range(path, ranges, lambda data: zlib.crc32(data) & 0xFFFFFFFF, crc32_range)


def run_batched(ranges: list[tuple[str, int, int]], fn, label: str) -> list:
    """fn(path, [(offset, length), ...]) over (path, offset, length) ranges, grouped per file into batches run on
    all cores (and shared out under torchrun); one result per range, in order."""
    by_file: dict[str, list[int]] = {}
    for i, (path, _, _) in enumerate(ranges):
        by_file.setdefault(path, []).append(i)
    jobs, owners = [], []
    for path, indices in by_file.items():
        spans = [ranges[i][1:] for i in indices]
        for batch in batches(spans):
            jobs.append((path, [spans[b] for b in batch], sum(spans[b][1] for b in batch)))
            owners.append([indices[b] for b in batch])
    results = run_jobs(jobs, lambda path, spans, _size: fn(path, spans), sum(j[2] for j in jobs), label)
    out = [None] * len(ranges)
    for owned, result in zip(owners, results):
        for i, value in zip(owned, result):
            out[i] = value
    return out


def batches(ranges: list[tuple[int, int]], batch_bytes: int = 64 << 20, batch_count: int = 4096) -> list[list[int]]:
    """Indices of `ranges` grouped into batches of about `batch_bytes` or `batch_count` ranges, in order."""
    groups, current, size = [], [], 0
    for i, (_, length) in enumerate(ranges):
        if current and (size + length > batch_bytes or len(current) >= batch_count):
            groups.append(current)
            current, size = [], 0
        current.append(i)
        size += length
    return groups + [current] if current else groups


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


PROGRESS_MIN_BYTES = 256 << 20  # below this a command ends before a bar would tell anything
_bar_active = False  # one bar at a time: an outer one (convert) covers the writes inside it


def _terminal() -> bool:
    return sys.stderr.isatty()


def _wants_progress() -> bool:
    """A person is watching: stderr is a terminal, and the command was not asked for JSON."""
    if not _terminal():
        return False
    import click

    ctx = click.get_current_context(silent=True)
    return not (ctx is not None and ctx.params.get("as_json"))


@contextmanager
def progress(total_bytes: int, label: str):
    """A progress bar on stderr (bytes done and total, rate, ETA) while a person watches; nothing when piped, with
    --json, for small jobs, or inside another bar. Yields an `advance(nbytes)` function."""
    global _bar_active
    if total_bytes < PROGRESS_MIN_BYTES or _bar_active or not _wants_progress():
        yield lambda n: None
        return
    import time

    import click

    from ckpttool.render import human_bytes

    start, done = time.monotonic(), 0

    def status(_item):
        rate = done / max(time.monotonic() - start, 1e-9)
        return f"{human_bytes(done)} of {human_bytes(total_bytes)}, {human_bytes(rate)}/s"

    _bar_active = True
    try:
        with click.progressbar(length=total_bytes, label=label, file=sys.stderr, show_eta=True, show_percent=True,
                               item_show_func=status) as bar:
            def advance(nbytes):
                nonlocal done
                done += nbytes
                bar.update(nbytes, done)
            yield advance
    finally:
        _bar_active = False


def run_jobs(jobs, fn, total_bytes: int = 0, label: str = "hashing"):
    """Run fn(*job) for every (path, offset, length) job on all cores; results in job order. Under torchrun the
    jobs are shared out among the processes, and each gets every result (ckpttool.distributed)."""
    from ckpttool import distributed

    if distributed.active():
        return distributed.run_shared(jobs, [job[2] for job in jobs],
                                      lambda mine: _run_local(mine, fn, sum(j[2] for j in mine), label))
    return _run_local(jobs, fn, total_bytes, label)


def _run_local(jobs, fn, total_bytes: int, label: str):
    if len(jobs) == 1 and total_bytes < PROGRESS_MIN_BYTES:  # no pool to start, no bar to show (start-up matters)
        return [fn(*jobs[0])]
    from concurrent.futures import ThreadPoolExecutor

    with progress(total_bytes, label) as advance, ThreadPoolExecutor(workers()) as pool:
        results = []
        for job, result in zip(jobs, pool.map(lambda job: fn(*job), jobs)):
            advance(job[2])
            results.append(result)
        return results
