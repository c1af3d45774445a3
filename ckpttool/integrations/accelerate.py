"""`install_resume_gate(accelerator, fallback=True)`: `accelerator.load_state(dir)` runs ckpttool's gate first and
raises `ResumeGateError` before any weight, optimizer or RNG state is loaded. With automatic checkpoint naming,
`load_state()` takes the newest `checkpoint_N` that passes (Accelerate's own takes the highest N, unverified:
accelerate 1.15 accelerator.py load_state), each newer one skipped logged by "ckpttool.gate"; `fallback=False` gates
the one Accelerate picks instead."""

from __future__ import annotations

import functools
import os
import re

from ckpttool.gate import ResumeGateError, check_resume, latest_valid
from ckpttool.trainers.accelerate import AccelerateAutomatic


def _custom_object_problems(path: str, accelerator) -> list[dict]:
    """Accelerate compares custom_checkpoint_*.pkl files with registered objects only after it has loaded the
    weights, optimizer and schedulers; checked here, a mismatch stops the resume before anything is loaded."""
    files = [e for e in os.listdir(path) if re.fullmatch(r"custom_checkpoint_\d+\.pkl", e)]
    registered = len(accelerator._custom_objects)
    if len(files) == registered:
        return []
    return [{"code": "custom_checkpoint_mismatch", "severity": "error",
             "message": f"{len(files)} custom_checkpoint_*.pkl files but {registered} objects registered with "
                        "accelerator.register_for_checkpointing: Accelerate would fail after loading the weights",
             "fix": "register the same objects (in the same order) as the run that saved it"}]


def install_resume_gate(accelerator, expected_step=None, require_manifest=False, fallback=True):
    """Wrap `accelerator.load_state` so every call is gated; returns the accelerator."""
    original = accelerator.load_state

    def live():
        models = [accelerator.unwrap_model(m) for m in accelerator._models]
        optimizers = accelerator._optimizers
        schedulers = [getattr(s, "scheduler", s) for s in accelerator._schedulers]
        return dict(model=models[0] if models else None, optimizer=optimizers[0] if optimizers else None,
                    scheduler=schedulers[0] if schedulers else None, expected_step=expected_step,
                    require_manifest=require_manifest, world_size=accelerator.num_processes)

    @functools.wraps(original)
    def gated_load_state(input_dir=None, *args, **kwargs):
        path = input_dir
        if path is None and accelerator.project_configuration.automatic_checkpoint_naming:
            run_dir = os.path.join(accelerator.project_dir or ".", "checkpoints")
            if fallback:  # the newest checkpoint_N that passes, loaded by name
                path = latest_valid(run_dir, **live())
                if path is None:
                    raise ResumeGateError(run_dir, [{"code": "missing_file", "severity": "error", "message": (
                        f"no checkpoint_N under {run_dir} passes the gate (each skipped one is logged by "
                        "ckpttool.gate)")}])
                input_dir = path
            else:
                path = AccelerateAutomatic().own_latest(accelerator.project_dir or ".")  # what load_state() loads
        if path is not None:
            problems = [] if not os.path.isdir(path) else _custom_object_problems(path, accelerator)
            try:
                check_resume(path, **live())
            except ResumeGateError as e:
                problems = e.problems + problems
            if problems:
                raise ResumeGateError(path, problems)
        return original(input_dir, *args, **kwargs)

    accelerator.load_state = gated_load_state
    return accelerator
