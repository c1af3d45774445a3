"""Reading a checkpoint as one unit: the step above the format readers and the trainer profiles, which composes them.

    path -> trainers.for_path (names and files only) -> a formats reader (bytes -> Checkpoint)
         -> profile.interpret (what the parts and counters mean) -> quanto.annotate

Data flows down: `formats/` knows file formats and never trainers; `trainers/` knows what a trainer's files mean and
may use the readers for nested parts; only this module asks both.
"""

from __future__ import annotations

import gc
import os
from contextlib import contextmanager

from ckpttool import trainers
from ckpttool.errors import UsageError
from ckpttool.formats import readers_for
from ckpttool.model import ERROR, WARNING, Checkpoint, Code


def open_checkpoint(path: str) -> Checkpoint:
    """Read what is at `path` without loading tensor data. Raises UsageError (no such path, unknown layout) or
    CkptError (a single file too broken to read)."""
    with _cycle_collector_paused():
        return _open(path)


@contextmanager
def _cycle_collector_paused():
    """Reading a file of 100,000 tensors makes millions of acyclic objects; the cycle collector's passes over them
    took half the parse. Paused while a checkpoint is read (the CLI pauses it for the whole command)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _open(path: str) -> Checkpoint:
    if not os.path.exists(path):
        if os.path.islink(path):  # a link to nothing: a file whose download stopped, or whose target was lost
            from ckpttool.formats import hub_cache

            raise hub_cache.dangling(path)
        raise UsageError(f"{path}: no such file or directory")
    profile = trainers.for_path(path)
    if profile is not None and (why := profile.run_folder(path)):
        raise UsageError(why)
    files = profile.state_dir_files() if profile is not None else None
    if files is not None and os.path.isdir(path):
        from ckpttool.formats import statedir

        ckpt = statedir.read(path, files)
    else:
        reader = next((r for r in readers_for(path) if r.detect(path)), None)
        ckpt = reader.read(path) if reader else None
    if ckpt is not None:
        from ckpttool.formats import quanto

        ckpt.profile = trainers.interpret(ckpt, profile)
        quanto.annotate(ckpt)
        if os.path.isdir(path):
            _look_at_the_rest(ckpt)
        return ckpt
    if os.path.isdir(path):
        raise UsageError(f"{path}: no checkpoint layout recognised in this directory (expected a trainer's state dir "
                         "such as checkpoint-N, a DCP dir or a sharded index); point at a checkpoint file or state dir")
    raise UsageError(f"{path}: not a checkpoint file ckpttool reads (.pt .pth .bin .ckpt .safetensors, an index "
                     "or a state dir)")


WALK_LIMIT = 100_000  # entries of one checkpoint dir looked at; a dir of more is reported, not walked without end


def _look_at_the_rest(ckpt: Checkpoint):
    """What the readers did not open in a checkpoint dir: links out of it and special files (`unsafe_path`, never
    followed or opened), and pickles the resume never loads that would run code (`unsafe_pickle`)."""
    from ckpttool import paths
    from ckpttool.formats.torchfile import code_in_files

    read, unread = {os.path.abspath(f) for f in ckpt.files}, []
    for seen, (full, is_file) in enumerate(_entries(ckpt.path)):
        if seen == WALK_LIMIT:
            ckpt.add_problem(Code.UNSAFE_PATH, WARNING, f"more than {WALK_LIMIT} entries: only the first were checked "
                             "for links out of the checkpoint and pickles that run code", ckpt.path)
            break
        if kind := paths.unsafe(full, ckpt.path):
            ckpt.add_problem(Code.UNSAFE_PATH, ERROR, f"{os.path.relpath(full, ckpt.path)} is {kind}: never followed "
                             "or opened; a resume that reads it reads something that is not this checkpoint's (copy "
                             "the file in, or remove it)", full)
        elif is_file and os.path.abspath(full) not in read and os.path.isfile(full):
            unread.append(full)
    ckpt.problems.extend(code_in_files(unread, ckpt.path))


def _entries(folder: str):
    """(path, whether os.walk lists it as a file) of everything under `folder`, sorted, links not followed."""
    for parent, dirs, files in os.walk(folder):
        dirs.sort()
        yield from ((os.path.join(parent, d), False) for d in dirs)
        yield from ((os.path.join(parent, f), True) for f in sorted(files))


def guess_format(path: str) -> str:
    """Best guess of the format name for a path that failed to read."""
    from ckpttool.formats import dcp, deepspeed, safetensors, sharded

    if os.path.isdir(path):
        return ("accelerate" if trainers.is_state_dir(path) else "dcp" if dcp.detect(path) else
                "deepspeed" if deepspeed.detect(path) else "unknown")
    if path.endswith(sharded.INDEX_SUFFIX):
        return "sharded"
    return "safetensors" if safetensors.detect(path) else "torch"
