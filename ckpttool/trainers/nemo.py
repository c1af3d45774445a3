"""NVIDIA NeMo 2 (nemo/lightning/pytorch/callbacks/model_checkpoint.py ModelCheckpoint; nemo/lightning/io/pl.py
MegatronCheckpointIO; nemo/lightning/pytorch/strategies/megatron_strategy.py save_checkpoint, load_checkpoint;
nemo/lightning/resume.py AutoResume; nemo/lightning/ckpt_utils.py; read at 8cfedd7, samples written by it on CPU).

Lightning's `X.ckpt` is a directory `X/` (ckpt_to_dir), named `{name}--{val_loss}-{epoch}-{consumed_samples}` by
default (`...-last` for save_last). Inside: `weights/`, a megatron-core dist_checkpointing save (torch_dist: the
model under `module.` and the optimizer in DCP data files, `common.pt` with Lightning's checkpoint dict: epoch,
global_step, loops, lr_schedulers, callbacks, the datamodule's consumed_samples; `metadata.json` written last), and
`context/` (io.json, model.yaml, artifacts, and `<uuid4>` files cloudpickled for objects JSON cannot hold: only
io.load_context unpickles them, never the resume). Each save is marked by an empty sibling file `{name}-unfinished`,
touched before anything is written and removed once the save is final; ModelCheckpoint.setup deletes every dir
still marked. AutoResume takes the `*last` dirs without a marker, the newest by lstat mtime, and returns
`weights/` when there is one, else the dir itself, unchecked: a `-last` dir holding only `context/` (a non-Megatron
strategy wrote its weights as a `.ckpt` file beside it) is resumed from and fails. The step comes from `loops`
(the optimizer steps Lightning counted), the data position from the datamodule's consumed_samples; the final save
holds no optimizer unless save_optim_on_train_end.
"""

from __future__ import annotations

import os
import re

from ckpttool.formats.statedir import role
from ckpttool.model import EPOCH, ERROR, GLOBAL_STEP, SCHEDULER_STEPS, Code, Component, Problem, Record, StepSource
from ckpttool.trainers.base import Profile, dig, weights_only_problem
from ckpttool.trainers.megatron import has_dist_config

WEIGHTS, CONTEXT, COMMON, CONFIG = "weights", "context", "common.pt", "metadata.json"
UNFINISHED = "-unfinished"
STEP = re.compile(r".*(?:^|-)step=(\d+)(?:-.*)?")
SAMPLES = re.compile(r".*(?:^|-)consumed_samples=(\d+)(?:\.0+)?(?:-.*)?")
LOOP_STEP = ("fit_loop", "epoch_loop.automatic_optimization.optim_progress", "optimizer", "step", "total",
             "completed")
SOURCE = ("NeMo nemo/lightning/pytorch/callbacks/model_checkpoint.py (ModelCheckpoint _save_checkpoint, "
          "set/remove_checkpoint_unfinished_marker, _remove_unfinished_checkpoints), nemo/lightning/io/pl.py "
          "MegatronCheckpointIO, megatron_strategy.py (save_checkpoint, load_checkpoint), nemo/lightning/resume.py "
          "AutoResume._find_trainer_ckpt_path")


def unfinished_marker(path: str) -> str:
    """The sibling marker a save in progress has (format_checkpoint_unfinished_marker_path)."""
    return os.path.abspath(os.path.normpath(path)) + UNFINISHED


class NeMo(Profile):
    name = "nemo"
    layout = "NeMo 2 checkpoint dir (weights/ + context/)"
    source = SOURCE
    saves_rng = False
    needs_scheduler = False  # lr_schedulers is [] where none was configured; a configured one is always saved
    file_roles = (role(WEIGHTS, "model", WEIGHTS, folder=True),)
    latest_rule = ("AutoResume: the *last dirs without an -unfinished marker, the newest by modification time, "
                   "weights/ or else the dir itself, unchecked")
    total_limit_rule = "ModelCheckpoint(save_top_k=k): the k best by the monitored metric, plus the -last save"

    def claims_path(self, path):
        """A dir with `weights/` holding a dist checkpoint, or with NeMo's `context/io.json` (a -last dir that lost, or
        never had, its weights: AutoResume still takes it)."""
        if not os.path.isdir(path):
            return False
        weights = os.path.join(path, WEIGHTS)
        return (os.path.isfile(os.path.join(path, CONTEXT, "io.json")) or os.path.isfile(os.path.join(weights, CONFIG))
                or (os.path.isfile(os.path.join(weights, COMMON)) and os.path.isdir(weights)))

    def name_counters(self, path):
        """`step=N` where the filename template has it; else the consumed_samples the default template puts in the
        name (no step: it orders the saves, and is shown, never compared)."""
        name = os.path.basename(os.path.abspath(path))
        if m := STEP.fullmatch(name):
            return [StepSource("directory name step", int(m.group(1)), GLOBAL_STEP, record=Record.NAME)]
        if m := SAMPLES.fullmatch(name):
            return [StepSource("directory name consumed_samples", int(m.group(1)), None, record=Record.NAME)]
        return []

    def interpret(self, ckpt):
        for comp in ckpt.components:  # the model's DCP items are under `module.`
            if comp.role == "model" and comp.name == "module":
                comp.name = "model"
        self._common(ckpt)
        super().interpret(ckpt)

    def _common(self, ckpt):
        """weights/common.pt, Lightning's checkpoint dict without the tensors: its counters, LR schedulers and
        consumed_samples (read by the safe reader, nothing executed)."""
        from ckpttool.errors import CkptError
        from ckpttool.formats.torchfile import note_pickle, read_raw
        from ckpttool.formats.torchtree import plain

        full = os.path.join(ckpt.path, WEIGHTS, COMMON)
        if not os.path.isfile(full) or os.path.islink(full):
            return
        ckpt.files.append(full)
        try:
            raw = read_raw(full)
        except CkptError as e:
            ckpt.add_problem(e.code, ERROR, f"{WEIGHTS}/{COMMON}: {e.reason}", full)
            return
        note_pickle(ckpt, raw, full)
        obj = raw.obj if isinstance(raw.obj, dict) else {}
        ckpt.metadata["nemo_common_keys"] = sorted(str(k) for k in obj)
        for key, meaning in (("global_step", GLOBAL_STEP), ("epoch", EPOCH)):
            if type(obj.get(key)) is int:
                ckpt.steps.append(StepSource(f"common.pt {key}", obj[key], meaning, record=Record.TRAINING_DICT,
                                             key=key, file=COMMON))
        completed = dig(obj.get("loops"), *LOOP_STEP)
        if type(completed) is int:
            ckpt.steps.append(StepSource("common.pt loops optimizer steps", completed, GLOBAL_STEP,
                                         record=Record.LOOPS, key=".".join(LOOP_STEP), file=COMMON))
        schedulers = obj.get("lr_schedulers")
        if isinstance(schedulers, list) and schedulers:
            ckpt.components.append(Component("lr_schedulers", "scheduler", files=[full], tree=schedulers))
            for s in schedulers:
                if isinstance(s, dict) and type(s.get("last_epoch")) is int:
                    ckpt.steps.append(StepSource("lr_schedulers last_epoch", s["last_epoch"], SCHEDULER_STEPS,
                                                 record=Record.SCHEDULER, key="lr_schedulers.last_epoch", file=COMMON))
        samples = [v.get("consumed_samples") for v in obj.values() if isinstance(v, dict) and
                   type(v.get("consumed_samples")) is int]
        ckpt.metadata["nemo"] = {"loops": "loops" in obj, "optimizer_states": "optimizer" in obj,
                                 "consumed_samples": samples[0] if samples else None,
                                 "lightning_version": plain(obj.get("pytorch-lightning_version"))}

    def completion_problems(self, ckpt):
        """No weights/ (AutoResume resumes from the dir anyway and the load fails), weights/ without metadata.json
        or common.pt (dist_checkpointing writes metadata.json last), or the -unfinished marker still beside it."""
        problems = []
        folder = os.path.basename(os.path.abspath(ckpt.path))
        weights = os.path.join(ckpt.path, WEIGHTS)
        if os.path.isfile(unfinished_marker(ckpt.path)):
            problems.append(Problem(Code.MISSING_FILE, ERROR, f"{folder}{UNFINISHED} is beside it: NeMo marks a save "
                                    "unfinished until it is final, so this one never finished (ModelCheckpoint.setup "
                                    "deletes it on the next start)", unfinished_marker(ckpt.path)))
        if not os.path.isdir(weights) or os.path.islink(weights):
            problems.append(Problem(Code.MISSING_FILE, ERROR, f"{folder} has no {WEIGHTS}/: AutoResume still returns "
                                    "it (a -last dir of context/ only, left by a .ckpt file save) and the load fails; "
                                    "resume from a dir with weights", ckpt.path))
            return problems
        if not os.path.isfile(os.path.join(weights, CONFIG)):
            problems.append(Problem(Code.MISSING_FILE, ERROR, f"{WEIGHTS}/ has no {CONFIG}, which dist_checkpointing "
                                    "writes last: the save never finished, and the load raises 'not a distributed "
                                    "checkpoint'", os.path.join(weights, CONFIG)))
        elif not has_dist_config(weights):
            ckpt.files.append(os.path.join(weights, CONFIG))
            problems.append(Problem(Code.CORRUPT, ERROR, f"{WEIGHTS}/{CONFIG} names no sharded_backend: it was cut or "
                                    "overwritten, and the load raises 'not a distributed checkpoint'",
                                    os.path.join(weights, CONFIG)))
        else:
            ckpt.files.append(os.path.join(weights, CONFIG))
        if not os.path.isfile(os.path.join(weights, COMMON)):
            problems.append(Problem(Code.MISSING_FILE, ERROR, f"{WEIGHTS}/ has no {COMMON}: the loops, schedulers and "
                                    "counters are lost, and load_common raises", os.path.join(weights, COMMON)))
        return problems

    def resume_contract(self, ckpt):
        from ckpttool.trainers.contract import Contract, Part

        weights = Part("weights/ (the megatron-core dist checkpoint: .metadata, data files, common.pt)",
                       (rf"{WEIGHTS}/",), absent=None,
                       why="MegatronStrategy.load_checkpoint reads the model and optimizer through it")
        return Contract(SOURCE, (weights,), not_read=((
            rf"{CONTEXT}/", "read by io.load_context (AutoResume restore_config, nemo.lightning.io), never by the "
            "resume; its <uuid4> files are cloudpickles that run code when loaded"),))

    def run_saves(self, path):
        """global step (in the name) -> path of the run's dirs, where the filename template holds the step."""
        folder = os.path.dirname(os.path.abspath(os.path.normpath(path)))
        try:
            entries = os.listdir(folder)
        except OSError:
            return {}
        return {int(m.group(1)): os.path.join(folder, e) for e in entries if (m := STEP.fullmatch(e)) and
                os.path.isdir(os.path.join(folder, e))}

    def own_latest(self, run_dir):
        """_find_trainer_ckpt_path: the `*last` dirs (links to dirs count) without a marker, the newest by lstat."""
        try:
            entries = [os.path.join(run_dir, e) for e in os.listdir(run_dir) if e.endswith("last")]
        except OSError:
            return None
        last = [e for e in entries if os.path.isdir(e) and not os.path.exists(unfinished_marker(e))]
        return max(last, key=lambda e: os.lstat(e).st_mtime) if last else None

    def resume_problems(self, ckpt):
        """Lightning's fit restore through MegatronStrategy.load_checkpoint: the model and, while fitting, the
        optimizer items (dist_checkpointing.load raises for missing ones), the loops (the step) from common.pt."""
        roles = {c.role for c in ckpt.components}
        if not os.path.isdir(os.path.join(ckpt.path, WEIGHTS)):
            return []  # completion_problems says it
        problems = self.loader_problems(ckpt)
        if "model" not in roles:
            problems.append(Problem(Code.MISSING_FILE, ERROR, f"{WEIGHTS}/ holds no model items (module.*): the load "
                                    "fails", ckpt.path))
        if "optimizer" not in roles:
            return problems + [weights_only_problem(ckpt)]  # the final save, unless save_optim_on_train_end
        nemo = ckpt.metadata.get("nemo") or {}
        if nemo and not nemo.get("loops"):
            problems.append(Problem(Code.STEP_MISMATCH, ERROR, f"{COMMON} has no loops: Lightning restores no "
                                    "progress and the run starts again at step 0 with trained weights",
                                    os.path.join(ckpt.path, WEIGHTS, COMMON)))
        return problems
