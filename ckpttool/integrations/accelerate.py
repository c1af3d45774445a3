"""`install_resume_gate(accelerator)`: `accelerator.load_state(dir)` runs ckpttool's gate first and raises
`ResumeGateError` before any weight, optimizer or RNG state is loaded."""

from __future__ import annotations

import functools
import os
import re

from ckpttool.gate import check_resume


def _automatic_dir(accelerator) -> str | None:
    """The dir Accelerate itself would load with automatic checkpoint naming (the highest checkpoint_N)."""
    folder = os.path.join(accelerator.project_dir or ".", "checkpoints")
    if not os.path.isdir(folder):
        return None
    numbered = [(int(m.group(1)), e) for e in os.listdir(folder) if (m := re.fullmatch(r"checkpoint_(\d+)", e))]
    return os.path.join(folder, max(numbered)[1]) if numbered else None


def install_resume_gate(accelerator, expected_step=None, require_manifest=False):
    """Wrap `accelerator.load_state` so every call is gated; returns the accelerator."""
    original = accelerator.load_state

    @functools.wraps(original)
    def gated_load_state(input_dir=None, *args, **kwargs):
        path = input_dir
        if path is None and accelerator.project_configuration.automatic_checkpoint_naming:
            path = _automatic_dir(accelerator)
        if path is not None:
            models = [accelerator.unwrap_model(m) for m in accelerator._models]
            optimizers = accelerator._optimizers
            schedulers = [getattr(s, "scheduler", s) for s in accelerator._schedulers]
            check_resume(path, model=models[0] if models else None, optimizer=optimizers[0] if optimizers else None,
                         scheduler=schedulers[0] if schedulers else None, expected_step=expected_step,
                         require_manifest=require_manifest)
        return original(input_dir, *args, **kwargs)

    accelerator.load_state = gated_load_state
    return accelerator
