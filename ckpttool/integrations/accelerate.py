"""`install_resume_gate(accelerator, fallback=True)`: `accelerator.load_state(dir)` runs ckpttool's gate first and
raises `ResumeGateError` before any weight, optimizer or RNG state is loaded; every prepared model, optimizer and
scheduler is compared with the part it loads from (model_1, optimizer_1, ...). With automatic checkpoint naming,
`load_state()` takes the newest `checkpoint_N` that passes, loaded by name (Accelerate's own takes the entry of
checkpoints/ with the highest first number in its name, unverified: accelerate 1.16 accelerator.py load_state), each
newer one skipped logged by "ckpttool.gate"; `fallback=False` gates the one Accelerate picks instead, and refuses when
that is not the run's newest `checkpoint_N` (a stray `checkpoint_10_old` sorts after `checkpoint_2`).

`install_sealing(accelerator)` seals every dir `save_state` writes (automatic naming included) with ckpttool's
manifest (ckpttool.integrations.sealing)."""

from __future__ import annotations

import functools
import os
import re

from ckpttool.gate import ResumeGateError, check_resume, confirm_unchanged, latest_passing
from ckpttool.model import ERROR, Code, Problem
from ckpttool.trainers.accelerate import AccelerateAutomatic
from ckpttool.trainers.base import numbered_dirs


def _custom_object_problems(path: str, accelerator) -> list[Problem]:
    """Accelerate compares custom_checkpoint_*.pkl files with registered objects only after it has loaded the
    weights, optimizer and schedulers; checked here, a mismatch stops the resume before anything is loaded."""
    files = [e for e in os.listdir(path) if re.fullmatch(r"custom_checkpoint_\d+\.pkl", e)]
    registered = len(accelerator._custom_objects)
    if len(files) == registered:
        return []
    return [Problem(Code.CUSTOM_CHECKPOINT_MISMATCH, ERROR,
                    f"{len(files)} custom_checkpoint_*.pkl files but {registered} objects registered with "
                    "accelerator.register_for_checkpointing: Accelerate would fail after loading the weights",
                    fix="register the same objects (in the same order) as the run that saved it")]


def _accelerates_pick(run_dir: str) -> str:
    """What load_state() with automatic naming will load, refused unless it is the run's newest checkpoint_N."""
    profile = AccelerateAutomatic()
    pick = profile.own_latest(os.path.dirname(run_dir))
    if pick is None:
        raise ResumeGateError(run_dir, [Problem(Code.MISSING_FILE, ERROR,
                                                f"load_state() cannot pick from {run_dir}: it is empty, or an entry "
                                                "has no number in its name (Accelerate sorts every entry by its "
                                                "first number and raises IndexError)")])
    saves = numbered_dirs(run_dir, profile.name_pattern)
    newest = saves[max(saves)] if saves else None
    if newest is not None and os.path.abspath(pick) != os.path.abspath(newest):
        raise ResumeGateError(pick, [Problem(Code.STEP_MISMATCH, ERROR,
                                             f"load_state() would load {os.path.basename(pick)} (the first number in "
                                             f"its name sorts highest), not {os.path.basename(newest)}, the run's "
                                             "newest checkpoint_N: the resume would go back to an older or foreign "
                                             "state", fix=f"move {pick} out of {run_dir}, or pass load_state() the "
                                                          "folder to load")])
    return pick


def install_resume_gate(accelerator, expected_step=None, require_manifest=False, fallback=True):
    """Wrap `accelerator.load_state` so every call is gated; returns the accelerator."""
    original = accelerator.load_state

    def live():
        models = [accelerator.unwrap_model(m) for m in accelerator._models]
        schedulers = [getattr(s, "scheduler", s) for s in accelerator._schedulers]
        return dict(model=models or None, optimizer=list(accelerator._optimizers) or None,
                    scheduler=schedulers or None, expected_step=expected_step, require_manifest=require_manifest,
                    world_size=accelerator.num_processes)

    @functools.wraps(original)
    def gated_load_state(input_dir=None, *args, **kwargs):
        path, passed = input_dir, None
        if path is None and accelerator.project_configuration.automatic_checkpoint_naming:
            run_dir = os.path.join(accelerator.project_dir or ".", "checkpoints")
            if fallback:  # the newest checkpoint_N that passes, loaded by name
                passed = latest_passing(run_dir, **live())
                if passed is None:
                    raise ResumeGateError(run_dir, [Problem(Code.MISSING_FILE, ERROR,
                                                            f"no checkpoint_N under {run_dir} passes the gate (each "
                                                            "skipped one is logged by ckpttool.gate)")])
                path = passed.path
            else:
                path = _accelerates_pick(run_dir)
        if path is None:
            return original(input_dir, *args, **kwargs)
        problems = _custom_object_problems(path, accelerator) if os.path.isdir(path) else []
        if passed is None:
            try:
                passed = check_resume(path, **live())
            except ResumeGateError as e:
                problems = e.problems + problems
        if problems:
            raise ResumeGateError(path, problems)
        loaded = original(path, *args, **kwargs)  # what was checked is what loads: Accelerate does not pick again
        confirm_unchanged(passed)  # the bytes loaded are the bytes checked
        return loaded

    accelerator.load_state = gated_load_state
    return accelerator


def install_sealing(accelerator):
    """Seal each dir `accelerator.save_state` writes; returns the accelerator. save_state returns the dir, each process
    writing its own RNG file (and scaler, dataloader state) with no barrier before it returns (accelerate 1.16
    accelerator.py save_state, checkpointing.py save_accelerator_state); automatic naming deletes the oldest first.

    Under FSDP, DeepSpeed and Megatron-LM save_state is collective (every process calls it), so the process that
    saves (the main one, or each node's first with save_on_each_node) seals between two barriers. Under plain DDP a
    loop may call it on the main process only (the diffusers scripts: `if accelerator.is_main_process:`), where a
    barrier would wait for ever. There every process that enters save_state says so, and says when its part is
    written, through torch.distributed's key-value store (no collective): the main process seals a save once every
    other process has written its part. Where no other process has entered save_state by the next
    `wait_for_everyone` (after which every process is past the save), or by a later `save_state`, `end_training` or
    exit at least ALONE_AFTER_S after it (processes that save together enter it together), the saves are this
    process's alone and are sealed then. Saving into a named dir again drops its old manifest first, which would
    describe the old bytes. One process alone seals at once."""
    import atexit
    import time

    from accelerate.utils import DistributedType

    from ckpttool.checksums import MANIFEST_NAME
    from ckpttool.integrations.sealing import log, seal, seal_after_save

    collective = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED,
                                                  DistributedType.MEGATRON_LM)
    save, wait, end = accelerator.save_state, accelerator.wait_for_everyone, accelerator.end_training
    deferred = not collective and accelerator.num_processes > 1
    store = _store() if deferred else None
    others = [r for r in range(accelerator.num_processes) if r != accelerator.process_index]
    pending: list[tuple[int, str, float]] = []  # (this process's save count, dir, when written) not yet sealed
    saves = [0]

    on_each_node = accelerator.project_configuration.save_on_each_node
    writer = accelerator.is_local_main_process if on_each_node else accelerator.is_main_process

    def flush(later: bool, barrier: bool = False):
        """Seal each pending save every other process has written its part of; `later` (a later call, or exit) and
        long enough after it, or just after a `barrier`: also those no other process entered (this one's alone)."""
        for item in list(pending):
            number, path, written = item
            done = store is not None and store.check([f"{SEAL_KEY}/{number}/{r}" for r in others])
            alone = (barrier or later and time.monotonic() - written >= ALONE_AFTER_S) and \
                (store is None or not store.check([ENTERED_KEY]))
            if done or alone:
                pending.remove(item)
                if os.path.isdir(path):  # a total limit may have deleted it since
                    seal(path)

    @functools.wraps(save)
    def sealed_save_state(output_dir=None, *args, **kwargs):
        number = saves[0]
        saves[0] += 1
        if deferred and store is not None and not writer:
            store.set(ENTERED_KEY, "1")
        if deferred and writer:
            flush(later=True)
            automatic = accelerator.project_configuration.automatic_checkpoint_naming
            stale = None if output_dir is None or automatic else os.path.join(os.fspath(output_dir), MANIFEST_NAME)
            if stale and os.path.isfile(stale):
                os.remove(stale)  # ours, of the save this one replaces: sealed again once this one is complete
        location = os.fspath(save(output_dir, *args, **kwargs))
        if collective:
            seal_after_save(location, writes=writer, barrier=wait)
        elif not deferred:
            seal(location)
        elif writer:
            pending.append((number, location, time.monotonic()))
            flush(later=False)
        elif store is not None:
            store.set(f"{SEAL_KEY}/{number}/{accelerator.process_index}", "1")
        return location

    @functools.wraps(wait)
    def wait_then_seal(*args, **kwargs):
        result = wait(*args, **kwargs)
        if writer:
            flush(later=True, barrier=True)
        return result

    @functools.wraps(end)
    def seal_then_end(*args, **kwargs):
        if writer:
            flush(later=True)
        return end(*args, **kwargs)

    def at_exit():
        if pending and writer:
            flush(later=True)
            for _, path, _ in pending:
                log.warning("not sealing %s: another process's part of it was not known to be written", path)

    accelerator.save_state = sealed_save_state
    accelerator.wait_for_everyone = wait_then_seal
    accelerator.end_training = seal_then_end
    if deferred:
        atexit.register(at_exit)
    return accelerator


SEAL_KEY = "ckpttool/sealing/written"  # + /{save number}/{process}: that process's part of that save is on disk
ENTERED_KEY = "ckpttool/sealing/entered"  # a process other than the one that seals entered save_state
ALONE_AFTER_S = 30.0  # seconds after a save by which processes that save together have all entered save_state


def _store():
    """torch.distributed's key-value store of the default group (every launch has one), or None where there is
    none; then a save is sealed at the next save_state, wait_for_everyone or end_training."""
    try:
        from torch.distributed import distributed_c10d

        return distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - no process group, or a launcher without a store: seal later instead
        return None
