"""Lightning `.ckpt` files (lightning/pytorch/trainer/connectors/checkpoint_connector.py `dump_checkpoint`).

Top-level keys: `epoch`, `global_step` (`fit_loop.epoch_loop.global_step`: optimizer steps Lightning called, skipped
fp16 updates included), `pytorch-lightning_version`, `state_dict` (model), `loops` (progress counters), `callbacks`
(ModelCheckpoint state ...), `optimizer_states` (list), `lr_schedulers` (list, empty when none is configured),
the precision plugin's state under its class name (`MixedPrecision`: the GradScaler), `hparams_name` and
`hyper_parameters`. No RNG state is saved. Schedulers step per step or per epoch (`interval`, not saved).
`ModelCheckpoint` names files `epoch={epoch}-step={step}.ckpt` (`-v1` on clashes) and `last.ckpt`;
`ckpt_path="last"` loads the `last*.ckpt` with the newest mtime. `save_top_k` deletes the worst-scoring.

Sharded strategies (FSDPStrategy(state_dict_type="sharded"), ModelParallelStrategy, and Fabric's) make the same name
a directory (pytorch/strategies/fsdp.py `save_checkpoint`): a DCP state dict {"model", "optimizer_0", ...} written by
every rank, and `meta.pt` (rank 0, torch.save) with the rest of the checkpoint dict: epoch, global_step, loops,
lr_schedulers, callbacks. `load_checkpoint` loads the DCP part, then `meta.pt`; a directory without `meta.pt` is no
sharded checkpoint to it (`_is_sharded_checkpoint`) and it raises.
"""

from __future__ import annotations

import functools
import os
import re

from ckpttool.formats.pickles import DTENSOR_GLOBALS, TORCH_WEIGHTS_ONLY
from ckpttool.model import EPOCH, ERROR, GLOBAL_STEP, Code, Problem, Record, StepSource
from ckpttool.trainers import implications
from ckpttool.trainers.base import Profile, dig, moment_problems, weights_only_problem

STEP_IN_NAME = re.compile(r".*step=(\d+)(?:-v\d+)?\.ckpt")
LAST = re.compile(r"last(?:-v?\d+)?\.ckpt")
LOOP_OPTIMIZER_PROGRESS = "epoch_loop.automatic_optimization.optim_progress"  # under loops["fit_loop"]
META = "meta.pt"
SHARDED_LOAD = "lightning 2.6 pytorch/strategies/fsdp.py FSDPStrategy.load_checkpoint, _is_sharded_checkpoint"


class Lightning(Profile):
    name = "lightning"
    layout = "Lightning .ckpt"
    source = "lightning 2.6 trainer/connectors/checkpoint_connector.py dump_checkpoint, callbacks/model_checkpoint.py"
    key_roles = {"callbacks": "callbacks", "MixedPrecision": "scaler", "hyper_parameters": "config",
                 "datamodule_hyper_parameters": "config"}
    counter_meanings = ((Record.TRAINING_DICT, "global_step", GLOBAL_STEP), (Record.TRAINING_DICT, "epoch", EPOCH),
                        (Record.LOOPS, ".*", GLOBAL_STEP))
    name_pattern = STEP_IN_NAME
    saves_rng = False
    scheduler_rule = "per step or per epoch, as configured (the interval is not saved)"
    scheduler_may_step_per_epoch = True
    # lightning 2.6 fabric/utilities/cloud_io.py _load: torch.load(f, weights_only=None), which torch >= 2.6 takes as
    # True: Trainer.fit(ckpt_path=...) refuses what torch's own allow-list does not name (a numpy.float64 hparam);
    # a sharded dir's meta.pt the same (strategies/fsdp.py, model_parallel.py). Lightning adds no safe globals.
    weights_only_loads = ((r".*\.ckpt|meta\.pt", frozenset(TORCH_WEIGHTS_ONLY | DTENSOR_GLOBALS), True),)
    latest_rule = 'ckpt_path="last": the last*.ckpt with the newest modification time'
    total_limit_rule = "ModelCheckpoint(save_top_k=k) deletes all but the k best-scoring files"

    def claims(self, ckpt):
        return ckpt.format == "torch" and "pytorch-lightning_version" in ckpt.metadata

    def interpret(self, ckpt):
        completed = dig(ckpt.metadata.get("loops"), "fit_loop", LOOP_OPTIMIZER_PROGRESS, "optimizer", "step", "total",
                         "completed")
        if type(completed) is int:
            ckpt.steps.append(StepSource("loops optimizer.step.total.completed", completed, record=Record.LOOPS,
                                         key=f"fit_loop.{LOOP_OPTIMIZER_PROGRESS}.optimizer.step.total.completed"))
        super().interpret(ckpt)

    def run_saves(self, path):
        folder = os.path.dirname(os.path.abspath(path))
        saves = {}
        for entry in os.listdir(folder):
            if m := STEP_IN_NAME.fullmatch(entry):
                saves[int(m.group(1))] = os.path.join(folder, entry)
        return saves

    def own_latest(self, run_dir):
        last = [os.path.join(run_dir, e) for e in os.listdir(run_dir) if LAST.fullmatch(e)]
        return max(last, key=os.path.getmtime) if last else None

    def resume_problems(self, ckpt):
        keys = set(ckpt.metadata.get("top_level_keys", []))
        if not {"optimizer_states", "lr_schedulers"} & keys:  # save_weights_only=True writes neither
            return [weights_only_problem(ckpt)] if "state_dict" in keys else super().resume_problems(ckpt)
        problems = self.loader_problems(ckpt) + moment_problems(ckpt)
        if not [c for c in ckpt.components if c.role == "optimizer"]:
            problems.append(Problem(Code.MISSING_OPTIMIZER, ERROR, "no optimizer_states: a resume would restart the "
                                    "optimizer", ckpt.path))
        if "lr_schedulers" not in keys:  # an empty list means no scheduler was configured
            problems.append(Problem(Code.MISSING_SCHEDULER, ERROR, "no lr_schedulers key: a resume would restart "
                                    "the LR schedule", ckpt.path))
        # Lightning saves the schedulers configure_optimizers returned; one built beside them is not saved
        return problems + implications.scheduler_problems(ckpt, always_saved=False,
                                                          lost_reported="lr_schedulers" not in keys)


class LightningSharded(Lightning):
    """A sharded strategy's checkpoint directory: the DCP reader reads the model and optimizers, this profile adds
    what meta.pt holds (its counters, schedulers, loops, callbacks) through the torch reader."""

    layout = "Lightning sharded checkpoint dir (FSDP / ModelParallel)"
    source = SHARDED_LOAD + ", save_checkpoint"

    def claims_path(self, path):
        from ckpttool.formats import dcp

        return os.path.isdir(path) and (os.path.isfile(os.path.join(path, META)) or (
            path.rstrip("/").endswith(".ckpt") and dcp.detect(path)))

    def claims(self, ckpt):
        return False

    def interpret(self, ckpt):
        from ckpttool.errors import CkptError
        from ckpttool.formats import torchfile

        meta = os.path.join(ckpt.path, META)
        keys = {"state_dict"} if ckpt.model is not None else set()
        keys |= {"optimizer_states"} if any(c.role == "optimizer" for c in ckpt.components) else set()
        if os.path.isfile(meta) and os.path.getsize(meta):
            try:
                part = torchfile.read(meta)
            except CkptError as e:
                ckpt.add_problem(e.code, ERROR, f"{META}: {e.reason}", e.path or meta)
            else:
                ckpt.absorb_problems(part)
                ckpt.files.extend(part.files)
                ckpt.components.extend(c for c in part.components if c.role != "model")
                ckpt.steps.extend(part.steps)
                keys |= set(part.metadata.get("top_level_keys", []))
                ckpt.metadata.update({k: v for k, v in part.metadata.items() if k != "top_level_keys"})
        ckpt.metadata["top_level_keys"] = sorted(keys)
        super().interpret(ckpt)

    def resume_contract(self, ckpt):
        return sharded_contract()


@functools.cache
def sharded_contract():
    """What a sharded (FSDP) checkpoint dir's load reads; built on first use, as a .ckpt file (the common case) never
    needs it and the contract module costs start-up."""
    from ckpttool.trainers.contract import PRESENT, Contract, Part

    meta = Part("meta.pt (epoch, global_step, loops, LR schedulers, callbacks)", (r"meta\.pt",), core=True,
                why="without it the directory is no sharded checkpoint to Lightning (_is_sharded_checkpoint), which "
                "raises ValueError; load_checkpoint loads it with torch.load, which raises on a damaged one")
    dcp_metadata = Part("the DCP metadata (.metadata, written last)", (r"\.metadata",), kind=PRESENT,
                        why="_distributed_checkpoint_load reads the model and optimizer shards through it")
    shards = Part("the model and optimizer shards (__R_N.distcp, one per rank)", (r"__(\d+)_\d+\.distcp",),
                  kind=PRESENT, series=True, per_rank=True, template="__{n}_0.distcp",
                  why="every rank's shard is read back by dcp.load, which raises for a missing one")
    return Contract(SHARDED_LOAD, (meta, dcp_metadata, shards))
