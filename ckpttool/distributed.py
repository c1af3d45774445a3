"""`verify` and `manifest` spread over the processes of a torchrun launch (one node or many).

Under torchrun (WORLD_SIZE > 1, with RANK and MASTER_ADDR set) every process reads the checkpoint's metadata the same
way, so every process asks for the same list of jobs (file pieces to hash, zip members to CRC, tensors to scan) in
the same order. Each process runs its share, balanced by bytes, on all its cores, and the results are gathered over
torch.distributed (gloo unless CKPTTOOL_DIST_BACKEND says otherwise), so every process then holds exactly what one
process would have computed: the report, the manifest and the exit code are the same bit for bit. Rank 0 prints and
writes; the others stay silent. Outside torchrun none of this runs and torch.distributed is never imported.
"""

from __future__ import annotations

import os

from ckpttool.model import Code

DISTRIBUTED_COMMANDS = ("verify", "manifest")


def launched() -> bool:
    """Whether torchrun (or another launcher setting its environment) started this process as one of several (a
    WORLD_SIZE that is no number is no launch: torchrun always sets one)."""
    world = os.environ.get("WORLD_SIZE", "1")
    return world.isdigit() and int(world) > 1 and "RANK" in os.environ and "MASTER_ADDR" in os.environ


def _seconds(name: str, default: float, unit: float = 1.0) -> float:
    """A positive, finite duration from the environment variable `name` (in units of `unit` seconds)."""
    import math

    from ckpttool.errors import UsageError

    raw = os.environ.get(name, "")
    try:
        value = float(raw) if raw else default
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0 < value * unit < 10 ** 7):
        raise UsageError(f"{name}={raw!r}: give a positive number of {'minutes' if unit == 60 else 'seconds'}")
    return value * unit


_started = False  # set by `start`: a process group a trainer started for itself is not ckpttool's to use
_work_group = None  # the group the shared work gathers over, with the long timeout (the default group: the join's)


def active() -> bool:
    """Whether this ckpttool command started a process group to share its work over."""
    return _started


def rank() -> int:
    return int(os.environ["RANK"]) if launched() else 0


def is_leader() -> bool:
    """Rank 0, or the only process: the one that prints and writes."""
    return rank() == 0


def enter(command: str):
    """Under torchrun: verify and manifest start the process group (every rank but 0 silenced); any other command
    runs on rank 0 alone, the others exit at once."""
    import sys

    if command not in DISTRIBUTED_COMMANDS:
        if not is_leader():
            sys.exit(0)
        return
    if not is_leader():
        silence()
    start()


def start():
    """Join the other processes within CKPTTOOL_DIST_JOIN_S (a rank that died before joining ends every rank with
    one line, not a wait of the whole work timeout), then gather the work over a group whose timeout is
    CKPTTOOL_DIST_TIMEOUT_MIN (a rank waits this long for the slowest)."""
    import datetime

    import torch.distributed as dist

    from ckpttool.errors import UsageError

    global _started, _work_group
    backend = os.environ.get("CKPTTOOL_DIST_BACKEND", "gloo")
    join = _seconds("CKPTTOOL_DIST_JOIN_S", 300)
    work = _seconds("CKPTTOOL_DIST_TIMEOUT_MIN", 60, unit=60)
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=join))
        _work_group = dist.new_group(backend=backend, timeout=datetime.timedelta(seconds=work))
    except (RuntimeError, ValueError, OSError) as e:  # DistStoreError, a refused or timed-out connection
        raise UsageError(f"under torchrun: not all {os.environ.get('WORLD_SIZE')} processes joined within {join:g} s "
                         f"({type(e).__name__}); start them together, raise CKPTTOOL_DIST_JOIN_S, or run without "
                         "torchrun") from None
    _started = True


def stop():
    global _started, _work_group
    if _started:
        import torch.distributed as dist

        dist.destroy_process_group()
        _started, _work_group = False, None


def silence():
    """Send this process's stdout and stderr to /dev/null (every rank but 0): one report, from rank 0."""
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.dup2(null, 2)
    os.close(null)


def share(sizes: list[int]) -> list[int]:
    """The indices of the jobs this process runs: the largest first, each to the least loaded process, so every
    process gets about the same number of bytes (and the same answer on every process)."""
    import torch.distributed as dist

    world, me = dist.get_world_size(), dist.get_rank()
    load = [0] * world
    mine = []
    for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        owner = min(range(world), key=lambda r: (load[r], r))
        load[owner] += max(1, sizes[index])
        if owner == me:
            mine.append(index)
    return sorted(mine)


def run_shared(items: list, sizes: list[int], run):
    """`run(my items)` on this process's share of `items`; every process gets every result, in `items` order. An
    error on any process is raised on all of them (a process left waiting would hang the launch)."""
    import torch.distributed as dist

    from ckpttool.errors import CkptError

    same_everywhere("the work to share", [repr(item) for item in items], sizes)
    mine = share(sizes)
    try:
        outcome = ("ok", dict(zip(mine, run([items[i] for i in mine]))))
    except CkptError as e:  # a damaged tensor: the same one-line report on every process
        outcome = ("checkpoint", (e.code, e.reason, e.path))
    except OSError as e:
        outcome = ("raised", e)
    except Exception as e:  # noqa: BLE001 - carried to every process, then raised there
        outcome = ("raised", RuntimeError(f"{type(e).__name__}: {e}"))
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, outcome, group=_work_group)
    merged = {}
    for status, value in gathered:
        if status == "checkpoint":
            raise CkptError(*value)
        if status == "raised":
            raise value
        merged.update(value)
    return [merged[i] for i in range(len(items))]


def same_everywhere(what: str, *values):
    """Raise, on every process alike, unless every process holds the same `values`: ranks that see other bytes
    (another copy of the checkpoint on another node, a file changed between the reads) would otherwise share out
    different work, or report different verdicts, and exit with different codes."""
    import json

    import torch.distributed as dist
    import xxhash

    from ckpttool.errors import CkptError

    digest = xxhash.xxh3_128_hexdigest(json.dumps(values, sort_keys=True, default=str).encode("utf-8"))
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, digest, group=_work_group)
    odd = [r for r, d in enumerate(gathered) if d != gathered[0]]
    if odd:
        raise CkptError(Code.CORRUPT, f"the processes do not see the same checkpoint: {what} differs on rank "
                        f"{', '.join(map(str, odd))} from rank 0 (another copy on another node, or files changed "
                        "while they were read); verify it from one process, or give every rank the same files")
