"""Crash-safe checkpoints in Accelerate's layout, and their restore.

A checkpoint is written to `checkpoint-N.tmp`, every file fsynced, a ckpttool manifest added, then renamed to
`checkpoint-N` and the parent fsynced: a kill at any moment leaves either no `checkpoint-N` or a complete one.
`latest` never picks a `.tmp` dir, and the next save of that step clears it.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import signal
import threading
import time
from dataclasses import dataclass

import torch
from safetensors.torch import load_file, save

from ckpttool import atomic

STATE_JSON = "training_state.json"
CONDITIONS = "determinism"  # the key in STATE_JSON for what a bit-exact resume must share (trainer/determinism.py)
EMA_DIR = "ema"


def fault(point: str, step: int):
    """Test hook: TRAINER_FAULT=point:step kills this process with SIGKILL there (see tests/test_trainer.py)."""
    wanted = os.environ.get("TRAINER_FAULT", "")
    if wanted == f"{point}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def rng_state() -> dict:
    """This process's RNG state, in the keys Accelerate's `random_states_{rank}.pkl` uses."""
    state = {"step": 0, "random_state": random.getstate(), "torch_manual_seed": torch.get_rng_state()}
    try:
        import numpy as np

        state["numpy_random_seed"] = np.random.get_state()
    except ImportError:
        pass
    if torch.cuda.is_available():
        state["torch_cuda_manual_seed"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict):
    random.setstate(state["random_state"])
    torch.set_rng_state(state["torch_manual_seed"])
    if "numpy_random_seed" in state:
        import numpy as np

        np.random.set_state(state["numpy_random_seed"])
    if "torch_cuda_manual_seed" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["torch_cuda_manual_seed"])


def _rng_safe_globals():
    """What torch.load(weights_only=True) must allow for an RNG file (numpy state), as Accelerate allows it."""
    try:
        import numpy as np
    except ImportError:
        return []
    core = getattr(np, "_core", None) or np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def _detached(obj):
    """A deep copy with every tensor cloned to CPU: what the background writer may own while training goes on."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return type(obj)((k, _detached(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_detached(v) for v in obj)
    return obj


@dataclass
class Snapshot:
    step: int
    epoch: int
    model: dict | None  # rank 0 only
    optimizer: dict | None
    scheduler: dict | None
    ema: dict | None
    rng: dict
    quantization_map: dict | None = None  # optimum-quanto's map, saved as quanto_qmap.json beside the weights
    scaler: dict | None = None  # fp16 GradScaler state, saved as Accelerate's scaler.pt
    conditions: dict | None = None  # threads, torch, device kind (trainer/determinism.py)


def snapshot(step, epoch, model, optimizer, scheduler, ema, rank: int, quantization_map=None,
             scaler=None, conditions=None) -> Snapshot:
    main = rank == 0
    return Snapshot(step, epoch, _detached(model.state_dict()) if main else None,
                    _detached(optimizer.state_dict()) if main else None,
                    _detached(scheduler.state_dict()) if main else None,
                    _detached(ema) if main else None, rng_state(), quantization_map,
                    _detached(scaler.state_dict()) if main and scaler is not None else None, conditions)


# Every file is serialized in memory and written by atomic.write_synced (Python I/O, fsynced), so a full disk is an
# OSError this process handles: torch.save's own file writer aborts the process on one (a C++ exception from a
# destructor), and safetensors' file writer raises its own error type.
def _save_torch(obj, path):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic.write_synced(path, buffer.getbuffer())


def _save_weights(tensors: dict, path):
    atomic.write_synced(path, save({k: v.contiguous() for k, v in tensors.items()}, metadata={"format": "pt"}))


def checkpoint_dir(output_dir: str, step: int) -> str:
    return os.path.join(output_dir, f"checkpoint-{step}")


def prepare(output_dir: str, step: int, rank: int, barrier) -> str:
    """Every rank, on the training thread: rank 0 makes a fresh `checkpoint-N.tmp`; all wait until it exists."""
    tmp = checkpoint_dir(output_dir, step) + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a save that was killed
        with atomic.guard(checkpoint_dir(output_dir, step), None):  # a read-only disk: one line, not a traceback
            os.makedirs(tmp)
    barrier()
    return tmp


def write_files(tmp: str, snap: Snapshot, rank: int):
    """Every rank writes its RNG file (appearing under its name only when complete); rank 0 writes the rest."""
    part = os.path.join(tmp, f"random_states_{rank}.pkl.part")
    _save_torch(snap.rng, part)
    os.replace(part, os.path.join(tmp, f"random_states_{rank}.pkl"))
    if rank != 0:
        return
    _save_weights(snap.model, os.path.join(tmp, "model.safetensors"))
    fault("mid-save", snap.step)
    _save_torch(snap.optimizer, os.path.join(tmp, "optimizer.bin"))
    _save_torch(snap.scheduler, os.path.join(tmp, "scheduler.bin"))
    if snap.scaler is not None:
        _save_torch(snap.scaler, os.path.join(tmp, "scaler.pt"))
    os.makedirs(os.path.join(tmp, EMA_DIR))
    _save_weights(snap.ema, os.path.join(tmp, EMA_DIR, "model.safetensors"))
    state = {"global_step": snap.step, "epoch": snap.epoch}
    if snap.conditions:
        state[CONDITIONS] = snap.conditions
    documents = {STATE_JSON: state}
    if snap.quantization_map:
        documents["quanto_qmap.json"] = snap.quantization_map
    for name, doc in documents.items():
        atomic.write_synced(os.path.join(tmp, name), json.dumps(doc).encode("utf-8"))


def publish(output_dir: str, tmp: str, snap: Snapshot, world: int, total_limit: int | None = None,
            timeout: float = 1800.0) -> str:
    """Rank 0: once every rank's RNG file is in, add the manifest, rename into place, fsync, prune. Waits by
    looking at the files rather than through collectives, so it can run on a background thread."""
    deadline = time.monotonic() + timeout
    for rank in range(world):
        while not os.path.exists(os.path.join(tmp, f"random_states_{rank}.pkl")):
            if time.monotonic() > deadline:
                raise TimeoutError(f"rank {rank} never wrote its RNG file into {tmp}")
            time.sleep(0.01)
    from ckpttool.operations.manifest import write as write_manifest

    write_manifest(tmp, staged_dir=True)
    fault("before-publish", snap.step)
    final = checkpoint_dir(output_dir, snap.step)
    if os.path.exists(final):  # re-saving a step (after a resume): swap the old one out, then drop it
        old = final + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    fd = os.open(output_dir, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    if total_limit:
        from ckpttool.operations.prune import prune

        for row in prune(output_dir, keep=total_limit)["delete"]:
            print(f"[trainer] checkpoints_total_limit={total_limit}: removed {row['path']}", flush=True)
    return final


def write_and_publish(output_dir: str, tmp: str, snap: Snapshot, rank: int, world: int,
                      total_limit: int | None = None):
    """What one rank does for a save after `prepare`: on the training thread, or on the background saver. A full
    disk (or a read-only one) removes the staging dir and raises ckpttool's OutputError: one line, what it needed."""
    try:
        with atomic.guard(checkpoint_dir(output_dir, snap.step), _nbytes(snap.__dict__)):
            write_files(tmp, snap, rank)
            if rank == 0:
                publish(output_dir, tmp, snap, world, total_limit)
    except atomic.OutputError:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def _nbytes(obj) -> int:
    """Bytes of tensor data in a nested snapshot (what a save needs, near enough)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


class BackgroundSaver:
    """Writes snapshots on a thread, one at a time, so training steps do not wait for the disk."""

    def __init__(self):
        self._thread = None
        self._error = None

    def submit(self, fn, *args):
        self.wait()

        def run():
            try:
                fn(*args)
            except BaseException as e:  # surfaced on the training thread at the next wait()
                self._error = e
        self._thread = threading.Thread(target=run, name="checkpoint-writer", daemon=False)
        self._thread.start()

    def wait(self):
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def load(path: str, model, optimizer, scheduler, ema: dict, rank: int, scaler=None) -> dict:
    """Restore everything from a gated checkpoint; returns its training_state.json (global_step, epoch, and the
    conditions it was trained under where recorded)."""
    device = next(model.parameters()).device
    model.load_state_dict(load_file(os.path.join(path, "model.safetensors"), device=str(device)), strict=True)
    optimizer.load_state_dict(torch.load(os.path.join(path, "optimizer.bin"), map_location=device, weights_only=True))
    scheduler.load_state_dict(torch.load(os.path.join(path, "scheduler.bin"), weights_only=True))
    if scaler is not None:
        scaler.load_state_dict(torch.load(os.path.join(path, "scaler.pt"), weights_only=True))
    ema_file = os.path.join(path, EMA_DIR, "model.safetensors")
    if os.path.exists(ema_file):
        saved = load_file(ema_file, device=str(device))
        for name in ema:
            ema[name].copy_(saved[name])
    with torch.serialization.safe_globals(_rng_safe_globals()):
        restore_rng(torch.load(os.path.join(path, f"random_states_{rank}.pkl"), weights_only=True))
    with open(os.path.join(path, STATE_JSON), encoding="utf-8") as f:
        return json.load(f)
