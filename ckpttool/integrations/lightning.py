"""Lightning resumes through ckpttool's gate.

`GatedCheckpointIO`, a `CheckpointIO` plugin: `Trainer(plugins=[GatedCheckpointIO()]).fit(model, ckpt_path=...)`
gates the path before `torch.load` runs on it, so a damaged checkpoint, or a pickle that would run code, is refused
before anything is read into memory. With `fallback=True` a refused checkpoint is replaced by the newest valid one
beside it (each skipped one logged by "ckpttool.gate"). Give it `model=` (the LightningModule) to compare its keys,
shapes and dtypes as well.

Sharded strategies (FSDPStrategy(state_dict_type="sharded"), ModelParallelStrategy) load their checkpoint
directories without a CheckpointIO; `install_resume_gate(trainer)` gates the strategy's own `load_checkpoint`
instead, for every strategy, with the trainer's LightningModule compared (lightning 2.6
trainer/connectors/checkpoint_connector.py resume_start calls `trainer.strategy.load_checkpoint(path)`).
"""

from __future__ import annotations

import functools
import logging
import os

from lightning.pytorch.plugins.io import TorchCheckpointIO

from ckpttool.gate import ResumeGateError, check_resume, latest_valid

log = logging.getLogger("ckpttool.gate")


def gate_path(path, model=None, fallback=False, expected_step=None, world_size=None) -> str:
    """`path` when it passes the gate; with `fallback`, else the newest checkpoint beside it that does (logged);
    else raises ResumeGateError."""
    path = os.fspath(path)
    try:
        check_resume(path, model=model, expected_step=expected_step, world_size=world_size)
        return path
    except ResumeGateError as refused:
        if not fallback:
            raise
        run_dir = os.path.dirname(os.path.abspath(path))
        log.warning("skipping %s: %s: %s", path, ", ".join(sorted({p["code"] for p in refused.problems})),
                    refused.problems[0]["message"])
        found = latest_valid(run_dir, model=model, expected_step=expected_step, world_size=world_size)
        if found is None:
            raise
        log.warning("resuming from %s instead of %s", found, path)
        return found


class GatedCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint I/O with every load gated first (saves are Lightning's own)."""

    def __init__(self, fallback: bool = False, model=None, expected_step=None):
        super().__init__()
        self.fallback = fallback
        self.model = model
        self.expected_step = expected_step

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        path = gate_path(path, model=self.model, fallback=self.fallback, expected_step=self.expected_step)
        if map_location is None:
            return super().load_checkpoint(path, weights_only=weights_only)
        return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)


def install_resume_gate(trainer, fallback: bool = False, expected_step=None):
    """Gate `trainer.strategy.load_checkpoint` (every strategy, sharded checkpoint dirs included), comparing the
    trainer's LightningModule; returns the trainer."""
    strategy = trainer.strategy
    original = strategy.load_checkpoint

    @functools.wraps(original)
    def gated_load_checkpoint(checkpoint_path, *args, **kwargs):
        path = gate_path(checkpoint_path, model=trainer.lightning_module, fallback=fallback,
                         expected_step=expected_step, world_size=trainer.world_size)
        return original(path, *args, **kwargs)

    strategy.load_checkpoint = gated_load_checkpoint
    return trainer
