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

`install_sealing(trainer)` seals every checkpoint the trainer saves (ModelCheckpoint's, last.ckpt, a manual
`trainer.save_checkpoint`, sharded dirs included) with ckpttool's manifest (ckpttool.integrations.sealing).
"""

from __future__ import annotations

import functools
import logging
import os

from lightning.pytorch.plugins.io import TorchCheckpointIO

from ckpttool.gate import GateReport, ResumeGateError, check_resume, confirm_unchanged, latest_passing

log = logging.getLogger("ckpttool.gate")


def gate(path, model=None, fallback=False, expected_step=None, world_size=None) -> GateReport:
    """The gate's report on `path` when it passes; with `fallback`, else on the newest checkpoint beside it that does
    (logged); else raises ResumeGateError. Its snapshot confirms, after the load, that the files did not change."""
    path = os.fspath(path)
    try:
        return check_resume(path, model=model, expected_step=expected_step, world_size=world_size)
    except ResumeGateError as refused:
        if not fallback:
            raise
        run_dir = os.path.dirname(os.path.abspath(path))
        log.warning("skipping %s: %s: %s", path, ", ".join(sorted({p["code"] for p in refused.problems})),
                    refused.problems[0]["message"])
        found = latest_passing(run_dir, model=model, expected_step=expected_step, world_size=world_size)
        if found is None:
            raise
        log.warning("resuming from %s instead of %s", found.path, path)
        return found


class GatedCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint I/O with every load gated first (saves are Lightning's own)."""

    def __init__(self, fallback: bool = False, model=None, expected_step=None):
        super().__init__()
        self.fallback = fallback
        self.model = model
        self.expected_step = expected_step

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        passed = gate(path, model=self.model, fallback=self.fallback, expected_step=self.expected_step)
        if map_location is None:
            loaded = super().load_checkpoint(passed.path, weights_only=weights_only)
        else:
            loaded = super().load_checkpoint(passed.path, map_location=map_location, weights_only=weights_only)
        confirm_unchanged(passed)  # the bytes loaded are the bytes checked
        return loaded


def install_resume_gate(trainer, fallback: bool = False, expected_step=None):
    """Gate `trainer.strategy.load_checkpoint` (every strategy, sharded checkpoint dirs included), comparing the
    trainer's LightningModule; returns the trainer."""
    strategy = trainer.strategy
    original = strategy.load_checkpoint

    @functools.wraps(original)
    def gated_load_checkpoint(checkpoint_path, *args, **kwargs):
        passed = gate(checkpoint_path, model=trainer.lightning_module, fallback=fallback, expected_step=expected_step,
                      world_size=trainer.world_size)
        loaded = original(passed.path, *args, **kwargs)
        confirm_unchanged(passed)  # the bytes loaded are the bytes checked
        return loaded

    strategy.load_checkpoint = gated_load_checkpoint
    return trainer


def install_sealing(trainer):
    """Seal each checkpoint right after `trainer.save_checkpoint` wrote it, and drop a file's manifest when Lightning
    deletes the file; returns the trainer. Lightning has no callback hook after a save (Callback.on_save_checkpoint
    runs before the write), so `Trainer.save_checkpoint` is wrapped: it runs on every rank and ends with
    `strategy.barrier` once every rank's part is written (lightning 2.6 trainer/trainer.py save_checkpoint), and
    ModelCheckpoint removes older checkpoints only after it returns (callbacks/model_checkpoint.py), through
    `strategy.remove_checkpoint` on global zero."""
    from ckpttool.integrations.sealing import forget, seal_after_save

    save, remove = trainer.save_checkpoint, trainer.strategy.remove_checkpoint

    @functools.wraps(save)
    def sealed_save_checkpoint(filepath, *args, **kwargs):
        result = save(filepath, *args, **kwargs)
        seal_after_save(os.fspath(filepath), writes=trainer.is_global_zero,
                        barrier=lambda: trainer.strategy.barrier("ckpttool.seal"))
        return result

    @functools.wraps(remove)
    def remove_checkpoint(filepath):
        remove(filepath)
        if trainer.is_global_zero:
            forget(os.fspath(filepath))

    trainer.save_checkpoint = sealed_save_checkpoint
    trainer.strategy.remove_checkpoint = remove_checkpoint
    return trainer
