"""Nerogar/OneTrainer (modules/trainer/GenericTrainer.py __backup, __prune_backups, start;
modules/util/TrainProgress.py; modules/util/config/TrainConfig.py get_last_backup_path;
modelSaver/mixin/InternalModelSaverMixin.py, LoRASaverMixin.py; modelLoader/mixin/InternalModelLoaderMixin.py,
LoRALoaderMixin.py; read at 23df383).

A backup is `{workspace}/backup/{YYYY-MM-DD_HH-MM-SS}-backup-{global_step}-{epoch}-{epoch_step}/`, written in this
order: the model (`lora/lora.safetensors`, `embeddings/{uuid}.safetensors`, or a diffusers pipeline at its root for a
fine-tune), `optimizer/optimizer.pt` (the state dict plus `param_group_mapping`), `ema/ema.pt` when EMA is on, then
`meta.json` {"train_progress": {epoch, epoch_step, epoch_sample, global_step}}, the only place the counters live, then
`onetrainer_config/`. A failed backup is removed, but only as far as rmtree manages. `global_step` counts batches
(micro-steps), not optimizer updates. No LR scheduler or RNG state is saved: the schedule is rebuilt from
global_step. `continue_last_backup` takes the backup dir whose name sorts last (the newest timestamp, never checked):
without meta.json a LoRA fails to load and a fine-tune restarts its counters at 0; with meta.json, a lost
`lora.safetensors` re-initialises the LoRA and a lost optimizer or EMA file restarts it, all without a word
(`contextlib.suppress(FileNotFoundError)`). `rolling_backup_count` deletes every dir in backup/ past the newest N by
name.
"""

from __future__ import annotations

import json
import os
import re

from ckpttool.formats.pickles import TORCH_WEIGHTS_ONLY
from ckpttool.formats.statedir import role
from ckpttool.model import EPOCH, ERROR, MICRO_STEPS, Code, Problem, Record, StepSource
from ckpttool.trainers.base import MARKER_LIMIT, Profile, marker_text, moment_problems, numbered_dirs
from ckpttool.trainers.contract import ENGINE, JSON, RUN, Contract, Part

NAME = re.compile(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d-backup-(\d+)-(\d+)-(\d+)")
META = "meta.json"
SOURCE = ("OneTrainer modules/trainer/GenericTrainer.py (__backup, __prune_backups, start), modules/util/"
          "TrainProgress.py, modules/util/config/TrainConfig.py get_last_backup_path, modelSaver/mixin/"
          "InternalModelSaverMixin.py _save_internal_data, modelLoader/mixin/InternalModelLoaderMixin.py "
          "_load_internal_data, LoRALoaderMixin.py")
PROGRESS = ("epoch", "epoch_step", "epoch_sample", "global_step")

META_PART = Part("meta.json (train_progress: epoch, epoch_step, epoch_sample, global_step)", (re.escape(META),),
                 kind=JSON, core=True,
                 why="written after the model and optimizer, so without it the backup never finished; a LoRA "
                 "backup then fails to load ('not an internal model') and a fine-tune restarts its counters at 0")
OPTIMIZER = Part("optimizer state (optimizer/optimizer.pt)", (r"optimizer/",), folders=ENGINE,
                 content=("optimizer.pt",), code=Code.MISSING_OPTIMIZER,
                 why="_load_internal_data loads it under contextlib.suppress(FileNotFoundError): the optimizer "
                 "restarts without a word")
EMA = Part("EMA weights (ema/ema.pt)", (r"ema/",), folders=ENGINE, content=("ema.pt",), absent=RUN,
           why="loaded under contextlib.suppress(FileNotFoundError): the EMA restarts from the weights without a word")
LORA = Part("LoRA weights (lora/lora.safetensors)", (r"lora/",), folders=ENGINE, content=("lora.safetensors",),
            absent=None, why="LoRALoaderMixin leaves lora_state_dict None and the LoRA is initialised afresh")
EMBEDDINGS = Part("embeddings (embeddings/{uuid}.safetensors)", (r"embeddings/",), folders=ENGINE, absent=None,
                  why="the embedding falls back to the file the config names")
PIPELINE = Part("the fine-tuned model (a diffusers pipeline: model_index.json and its folders)",
                (r"model_index\.json",), kind=JSON, absent=None, why="the fine-tune loads its model from it")
NOT_READ = (("onetrainer_config/", "the run's settings, copied for reference; the resume reads the config it is "
             "given"),
            (r"(?:transformer|unet|prior|decoder|text_encoder(?:_\d)?|tokenizer(?:_\d)?|vae|scheduler|"
             r"image_encoder|feature_extractor)/", "a folder of the fine-tune's diffusers pipeline"))


class OneTrainer(Profile):
    name = "onetrainer"
    layout = "OneTrainer backup dir"
    source = SOURCE
    name_pattern = NAME
    name_meaning = MICRO_STEPS  # global_step counts batches: with accumulation, more than the optimizer's updates
    saves_rng = False
    needs_scheduler = False  # rebuilt from global_step (create_lr_scheduler last_epoch)
    training_state_only = True  # a backup is written for continue_last_backup; its exports go to save/
    file_roles = (role(r"lora/lora\.safetensors", "model", "lora"), role(r"embeddings/.+\.safetensors", "model",
                                                                         "embeddings"),
                  role(r"optimizer/optimizer\.pt", "optimizer", "optimizer"), role(r"ema/ema\.pt", "ema", "ema"))
    # InternalModelLoaderMixin: torch.load(..., weights_only=True) of the optimizer and EMA files
    weights_only_loads = ((r"optimizer\.pt|ema\.pt", TORCH_WEIGHTS_ONLY, True),)
    latest_rule = "continue_last_backup: the dir in backup/ whose name sorts last (the newest timestamp), unchecked"
    total_limit_rule = "rolling_backup_count: every dir in backup/ past the newest N by name"

    def claims_path(self, path):
        """A dir named as a backup, inside `backup/` or holding OneTrainer's own files (meta.json, its folders)."""
        full = os.path.abspath(path)
        if not os.path.isdir(path) or not NAME.fullmatch(os.path.basename(full)):
            return False
        return os.path.basename(os.path.dirname(full)) == "backup" or any(
            os.path.exists(os.path.join(path, e)) for e in (META, "lora", "optimizer", "ema", "onetrainer_config"))

    def interpret(self, ckpt):
        meta = os.path.join(ckpt.path, META)
        text = marker_text(ckpt.path, META)
        if text is None and os.path.isfile(meta) and not os.path.islink(meta):
            ckpt.add_problem(Code.CORRUPT, ERROR, f"{META} is larger than any train progress ({MARKER_LIMIT >> 20} "
                             "MiB): not read", meta)
        try:
            doc = json.loads(text) if text is not None else None
        except (ValueError, RecursionError):
            doc = None
        progress = doc.get("train_progress") if isinstance(doc, dict) else None
        bad = [k for k in PROGRESS if not (type((progress or {}).get(k)) is int and 0 <= progress[k] < 1 << 63)]
        if isinstance(progress, dict) and bad:
            ckpt.add_problem(Code.CORRUPT, ERROR, f"{META} train_progress has no count for {', '.join(bad)}: "
                             "_load_internal_data builds TrainProgress from all four (KeyError, or a run that "
                             "counts from a wrong step)", meta)
        if isinstance(progress, dict):
            ckpt.files.append(os.path.join(ckpt.path, META))
            ckpt.metadata["train_progress"] = {k: progress.get(k) for k in PROGRESS}
            for key, meaning in (("global_step", MICRO_STEPS), ("epoch", EPOCH)):
                if type(progress.get(key)) is int:
                    ckpt.steps.append(StepSource(f"meta.json {key}", progress[key], meaning,
                                                 record=Record.STATE_FILE, key=f"train_progress.{key}", file=META))
        elif text is not None:
            ckpt.add_problem(Code.CORRUPT, ERROR, f"{META} holds no train_progress object: _load_internal_data "
                             "raises KeyError", os.path.join(ckpt.path, META))
        super().interpret(ckpt)

    def run_saves(self, path):
        """global_step (batches, as named) -> path of every backup beside this one."""
        return numbered_dirs(os.path.dirname(os.path.abspath(os.path.normpath(path))), NAME)

    def own_latest(self, run_dir):
        try:
            dirs = sorted(e for e in os.listdir(run_dir) if os.path.isdir(os.path.join(run_dir, e)))
        except OSError:
            return None
        return os.path.join(run_dir, dirs[-1]) if dirs else None

    def resume_contract(self, ckpt):
        return Contract(SOURCE, (META_PART, OPTIMIZER, EMA, LORA, EMBEDDINGS, PIPELINE),
                        model=(LORA, EMBEDDINGS, PIPELINE), not_read=NOT_READ,
                        model_why="a LoRA is initialised afresh, an embedding falls back to its original file, and a "
                        "fine-tune has no model to load")

    def resume_problems(self, ckpt):
        """The contract, then the name against meta.json: continue_last_backup goes by the name alone. The optimizer's
        initial_lr implies no lost scheduler: OneTrainer never saves one and rebuilds it from global_step."""
        from ckpttool.trainers import contract

        terms = self.resume_contract(ckpt)
        sibling = contract.nearest_sibling(ckpt.path, self.run_saves(ckpt.path), self.name_number(ckpt.path))
        problems = self.loader_problems(ckpt) + moment_problems(ckpt) + contract.absence(terms, ckpt, sibling)
        m = NAME.fullmatch(os.path.basename(os.path.abspath(ckpt.path)))
        progress = ckpt.metadata.get("train_progress") or {}
        named = dict(zip(("global_step", "epoch", "epoch_step"), map(int, m.groups()))) if m else {}
        differ = [f"{k} {named[k]} in the name, {progress[k]} in {META}" for k in named
                  if type(progress.get(k)) is int and progress[k] != named[k]]
        if differ:
            problems.append(Problem(Code.STEP_MISMATCH, ERROR, f"{'; '.join(differ)}: the backup's files are from "
                                    "another save than its name says, and the resume takes meta.json's counters",
                                    os.path.join(ckpt.path, META)))
        return problems + _update_problems(ckpt, progress.get("global_step"))


SIBLINGS = 4  # the run's other backups (and workspace configs) asked for the run's settings when this one lacks them


def _accumulation(settings: str) -> int | None:
    """gradient_accumulation_steps in a copy of the run's settings (a backup's onetrainer_config/args.json, the
    workspace's config/<date>.json)."""
    text = marker_text(os.path.dirname(settings), os.path.basename(settings))
    try:
        value = json.loads(text).get("gradient_accumulation_steps") if text is not None else None
    except (ValueError, RecursionError, AttributeError):
        return None
    return value if type(value) is int and value >= 1 else None


def _update_problems(ckpt, global_step) -> list[Problem]:
    """Backups are written only at accumulation boundaries, so the optimizer has made exactly global_step //
    gradient_accumulation_steps updates (the run's settings are copied into onetrainer_config/args.json); another
    count means the optimizer file is another backup's."""
    backups = os.path.dirname(os.path.abspath(ckpt.path))
    siblings = sorted(numbered_dirs(backups, NAME).items(), key=lambda item: -item[0])
    sources = [os.path.join(p, "onetrainer_config", "args.json") for p in [ckpt.path] + [p for _, p in
                                                                                        siblings[:SIBLINGS]]]
    config = os.path.join(os.path.dirname(backups), "config")  # the workspace's snapshot of each start's settings
    try:
        sources += [os.path.join(config, e) for e in sorted(os.listdir(config), reverse=True)[:SIBLINGS]
                    if e.endswith(".json")]
    except OSError:
        pass
    # onetrainer_config/ is written last: a cut backup lacks it
    accumulation = next((a for a in map(_accumulation, sources) if a is not None), None)
    updates = max((s.value for s in ckpt.steps if s.record is Record.OPTIMIZER), default=None)
    if type(global_step) is not int or accumulation is None or updates is None or \
            updates == global_step // accumulation:
        return []
    return [Problem(Code.STEP_MISMATCH, ERROR, f"optimizer/optimizer.pt has made {updates} updates, but a backup at "
                    f"global_step {global_step} with gradient_accumulation_steps {accumulation} follows "
                    f"{global_step // accumulation}: the optimizer file is another backup's, and the resume would "
                    "take it without a word", os.path.join(ckpt.path, "optimizer", "optimizer.pt"))]
