"""`gated_train(trainer, resume_from_checkpoint=True|PATH, **train_kwargs)`: `transformers.Trainer.train`, resuming
only from a checkpoint that passes ckpttool's gate.

`True` means the newest checkpoint under `args.output_dir` that passes (not `get_last_checkpoint`'s highest number);
each newer one it skips is logged ("ckpttool.gate"). Before anything is loaded the live model is compared with the
checkpoint (keys, shapes, dtypes, tied weights; a PEFT model as the adapter it saves), and so are the optimizer and
LR scheduler the Trainer will create: built here with its own `create_optimizer` / `create_scheduler`, compared, and
dropped, so that train() builds them as it always does. A refusal raises `ResumeGateError` with nothing loaded and
no step trained. Checkpoints of DDP, FSDP (sharded and full) and DeepSpeed runs are read as the Trainer writes them;
under FSDP and DeepSpeed, where the Trainer creates the optimizer inside the wrapped model, only the model is compared
beforehand. Before the first step trains (everything then loaded) the checkpoint's files are confirmed unchanged
since the gate passed them: a file a save or sync job replaced in between raises `ResumeGateError`.

`ManifestCallback()` (`Trainer(callbacks=[ManifestCallback()])`) seals every checkpoint the Trainer saves with
ckpttool's manifest (ckpttool.integrations.sealing), so a stale or rotted file is caught later.
"""

from __future__ import annotations

import glob
import os

from transformers import TrainerCallback

from ckpttool.gate import GateReport, ResumeGateError, check_resume, confirm_unchanged, latest_passing, live_world_size
from ckpttool.model import ERROR, Code, Problem


class AdapterView:
    """A PEFT model seen as the adapter its save_pretrained writes (get_peft_model_state_dict): the keys a LoRA
    checkpoint holds, without the adapter name."""

    def __init__(self, model):
        self.model = model

    def state_dict(self):
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(self.model)


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "active_adapters")


def _holds_adapter(path: str) -> bool:
    from ckpttool.formats.pretrained_files import ADAPTER_WEIGHTS, weights_file

    return weights_file(path, ADAPTER_WEIGHTS) is not None


def _gate_model(trainer, path: str):
    """What the checkpoint at `path` is compared with: the adapter view of a PEFT model whose checkpoint holds an
    adapter, else the model (a plain model against an adapter, or the reverse, is a key mismatch: the adapter is
    missing on one side)."""
    model = trainer.model
    return AdapterView(model) if _is_peft(model) and _holds_adapter(path) else model


def _probe_optimizer_and_scheduler(trainer):
    """The optimizer and scheduler train() will create, built now for the gate and dropped again; None under FSDP and
    DeepSpeed (created inside the wrapped model) or when the caller passed their own."""
    if trainer.optimizer is not None or trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:
        return trainer.optimizer, trainer.lr_scheduler
    try:
        optimizer = trainer.create_optimizer()
        scheduler = trainer.create_scheduler(num_training_steps=max(trainer.args.max_steps, 1), optimizer=optimizer)
    finally:
        trainer.optimizer, trainer.lr_scheduler = None, None
        trainer._created_lr_scheduler = False
    return optimizer, scheduler


def gated(trainer, resume_from_checkpoint=True, expected_step=None, require_manifest=False) -> GateReport:
    """The gate's report on the checkpoint train() will resume from; raises ResumeGateError (nothing loaded) when
    there is none."""
    optimizer, scheduler = _probe_optimizer_and_scheduler(trainer)
    world = max(trainer.args.world_size, live_world_size())
    if resume_from_checkpoint is True:
        run_dir = trainer.args.output_dir
        passed = latest_passing(run_dir, model=trainer.model, optimizer=optimizer, scheduler=scheduler,
                                expected_step=expected_step, require_manifest=require_manifest, world_size=world,
                                model_for=lambda p: _gate_model(trainer, p))
        if passed is None:
            raise ResumeGateError(run_dir, [Problem(Code.MISSING_FILE, ERROR,
                                                    f"no checkpoint under {run_dir} passes the gate (each skipped one "
                                                    "is logged by ckpttool.gate)",
                                                    fix="start without resume_from_checkpoint, or repair a checkpoint "
                                                        "(ckpttool verify says what is wrong with each)")])
        return passed
    path = os.fspath(resume_from_checkpoint)
    return check_resume(path, model=_gate_model(trainer, path), optimizer=optimizer, scheduler=scheduler,
                        expected_step=expected_step, require_manifest=require_manifest, world_size=world)


def _confirming(passed: GateReport):
    """A TrainerCallback that confirms, before the first step trains (the model, optimizer, scheduler and RNG state
    then loaded), that the checkpoint's files did not change since the gate passed them."""
    class ConfirmLoaded(TrainerCallback):
        def __init__(self):
            self.done = False

        def confirm(self):
            if not self.done:
                self.done = True
                confirm_unchanged(passed)

        def on_step_begin(self, args, state, control, **kwargs):
            self.confirm()

        def on_train_end(self, args, state, control, **kwargs):
            self.confirm()

    return ConfirmLoaded()


def gated_train(trainer, resume_from_checkpoint=True, expected_step=None, require_manifest=False, **train_kwargs):
    """trainer.train(resume_from_checkpoint=...) from a checkpoint that passes the gate; `False`/`None` trains from
    scratch as train() does."""
    if resume_from_checkpoint in (None, False):
        return trainer.train(resume_from_checkpoint=None, **train_kwargs)
    passed = gated(trainer, resume_from_checkpoint, expected_step=expected_step, require_manifest=require_manifest)
    confirming = _confirming(passed)
    trainer.add_callback(confirming)
    try:
        return trainer.train(resume_from_checkpoint=passed.path, **train_kwargs)
    finally:
        trainer.remove_callback(confirming)


def saved_checkpoint(args, state) -> str | None:
    """The folder Trainer._save_checkpoint just wrote: `checkpoint-{global_step}` under output_dir, or under the
    trial's folder inside it during a hyperparameter search (trainer.py _get_output_dir), where only one trial has
    one (trials run side by side in one output_dir may both: then which is this one's cannot be told)."""
    name = f"checkpoint-{state.global_step}"
    direct = os.path.join(args.output_dir, name)
    if os.path.isdir(direct):
        return direct
    nested = [p for p in glob.glob(os.path.join(glob.escape(args.output_dir), "*", name)) if os.path.isdir(p)]
    return nested[0] if len(nested) == 1 else None


class ManifestCallback(TrainerCallback):
    """Seals each checkpoint with ckpttool's manifest. `on_save` runs on every rank straight after the Trainer's
    writes (transformers 5.25 trainer.py _maybe_log_save_evaluate: _save_checkpoint, then on_save; older
    checkpoints already rotated out), with no barrier after each rank's own files (rng_state_N.pth): so a barrier
    first, then the process that saves (args.should_save: rank 0, or each node's first with save_on_each_node)
    writes the manifest, then a barrier again."""

    def on_save(self, args, state, control, **kwargs):
        from ckpttool.integrations.sealing import log, seal_after_save, torch_barrier

        path = saved_checkpoint(args, state)
        if path is None and args.should_save:
            log.error("not sealing: no single checkpoint-%s under %s", state.global_step, args.output_dir)
        seal_after_save(path, writes=args.should_save and path is not None, barrier=torch_barrier)  # every rank
