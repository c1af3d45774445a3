"""transformers.Trainer (transformers 5.x trainer.py `_save_checkpoint`, trainer_utils.py).

`{output_dir}/checkpoint-{global_step}`: the model (`model.safetensors`, sharded with an index for large models,
`pytorch_model.bin` from versions with save_safetensors=False, or `adapter_model.safetensors` for a PEFT model),
`training_args.bin` (a pickled TrainingArguments: never read here), `optimizer.pt` (under FSDP Accelerate's
`optimizer.bin` or `optimizer_0/`; under DeepSpeed the engine's own `global_step{N}/` save, which holds the optimizer
and, when DeepSpeed's config names the scheduler, the scheduler: `_save_optimizer_and_scheduler` then writes no
scheduler.pt), `scheduler.pt`,
`scaler.pt` (the Accelerate GradScaler, with fp16), `rng_state.pth` (`rng_state_{rank}.pth` with several
processes), and last `trainer_state.json` (`global_step`: optimizer steps attempted, fp16-skipped ones included;
`epoch` is a float).
The scheduler steps only `if not self.accelerator.optimizer_step_was_skipped`, and earlier versions stepped it every
step: it may equal the optimizer's updates or the global step. `resume_from_checkpoint=True`: `get_last_checkpoint`,
the highest N among dirs matching `^checkpoint-(\\d+)$`, unverified. `save_total_limit`: `rotate_checkpoints` deletes
the oldest (by mtime), keeping the newest and the best.
"""

from __future__ import annotations

import os
import re

from ckpttool.formats import pretrained_files
from ckpttool.formats.pickles import NUMPY_RNG_GLOBALS
from ckpttool.formats.statedir import role
from ckpttool.model import GLOBAL_STEP, Code
from ckpttool.trainers.accelerate import (FSDP_FILES, FSDP_MODELS, FSDP_OPTIMIZERS, FSDP_PARTS, MANIFEST, TORCH_LOAD,
                                          is_fsdp)
from ckpttool.trainers.base import Profile
from ckpttool.trainers.contract import (ADAPTER, ADAPTER_CONTENT, ENGINE, JSON, RUN, TAG, Absent, Contract, Part,
                                       entries)
from ckpttool.trainers.deepspeed import ENGINE_COUNTERS
from ckpttool.trainers.diffusers import highest_checkpoint

FILES = (
    role(pretrained_files.pattern(pretrained_files.TRANSFORMERS_WEIGHTS), "model", "model"),
    role(pretrained_files.pattern(pretrained_files.ADAPTER_WEIGHTS), "model", "adapter"),
    role(r"optimizer\.pt", "optimizer", "optimizer"),
    role(r"scheduler\.pt", "scheduler", "scheduler"),
    role(r"scaler\.pt", "scaler", "scaler"),
    role(r"rng_state\.pth", "rng", "rng_state"),
    role(r"rng_state_(\d+)\.pth", "rng", "rng_state_{n}"),
    role(r"optimizer\.bin", "optimizer", "optimizer"),  # FSDP full state, through Accelerate's save_fsdp_optimizer
    role(r"global_step(\d+)", "optimizer", "deepspeed", folder=True),  # the DeepSpeed engine's save
) + FSDP_PARTS
OWN_FILES = ("trainer_state.json", "optimizer.pt", "scheduler.pt", "rng_state.pth", "rng_state_0.pth",
             "training_args.bin")
TRAINER_STATE = "trainer_state.json"

# What Trainer.train(resume_from_checkpoint=...) reads (transformers 5.24 trainer.py): train() loads
# trainer_state.json (TrainerState.load_from_json), _load_from_checkpoint the weights (or load_fsdp_model under FSDP;
# under DeepSpeed deepspeed_load_checkpoint, the engine's save named by `latest`), _load_optimizer_and_scheduler both
# states (only when both files are there), _load_scaler the scaler when there, _load_rng_state this process's RNG.
LOAD = ("transformers 5.24 trainer.py train, _load_from_checkpoint, _load_optimizer_and_scheduler, _load_scaler, "
        "_load_rng_state; integrations/deepspeed.py deepspeed_load_checkpoint")
TRAINER_STATE_PART = Part("trainer_state.json (the global step, written last)", (r"trainer_state\.json",), kind=JSON,
                          core=True, why="Trainer writes it last, after the model, optimizer, scheduler and RNG "
                          "state, so without it the save never finished; train() loads it with "
                          "TrainerState.load_from_json and raises")
MODEL_FILES = Part("model weights (model.safetensors, pytorch_model.bin or a sharded index)",
                   (pretrained_files.pattern(pretrained_files.TRANSFORMERS_WEIGHTS),),
                   absent=None, why="_load_from_checkpoint loads them with load_state_dict")
ADAPTER_FILES = Part("PEFT adapter weights (adapter_model.safetensors)",
                     (pretrained_files.pattern(pretrained_files.ADAPTER_WEIGHTS),),
                     absent=None, why="_load_from_checkpoint calls model.load_adapter on the checkpoint dir")
ADAPTER_DIRS = Part("PEFT adapters saved in subfolders", (r"[^/]+/",), absent=RUN, folders=ADAPTER,
                    content=ADAPTER_CONTENT, why="_load_from_checkpoint calls load_adapter on each subfolder")
CONFIG = Part("model config (config.json)", (r"config\.json",), kind=JSON, absent=None,
              why="_load_from_checkpoint parses it with PreTrainedConfig.from_json_file when it is there")
OPTIMIZER = Part("optimizer state (optimizer.pt)", (r"optimizer\.pt",), code=Code.MISSING_OPTIMIZER,
                 why="_load_optimizer_and_scheduler loads the optimizer and scheduler only when both files are there: "
                 "without it both silently restart (Adam moments and the step count from zero)")
SCHEDULER = Part("LR scheduler state (scheduler.pt)", (r"scheduler\.pt",), code=Code.MISSING_SCHEDULER,
                 why="_load_optimizer_and_scheduler loads the optimizer and scheduler only when both files are there: "
                 "without it both silently restart (warmup and the schedule from step 0)")
DEEPSPEED_SCHEDULER = Part("LR scheduler state (scheduler.pt)", (r"scheduler\.pt",), absent=RUN,
                           code=Code.MISSING_SCHEDULER, why="under DeepSpeed _load_optimizer_and_scheduler loads it "
                           "unless DeepSpeed's config names the scheduler (then the engine's save holds it)")
SCALER = Part("GradScaler state (scaler.pt)", (r"scaler\.pt",), absent=RUN,
              why="_load_scaler loads it when it is there; an fp16 run without it restarts its loss scale")
RNG = Part("RNG state (rng_state.pth, or rng_state_N.pth per process)", (r"rng_state\.pth", r"rng_state_(\d+)\.pth"),
           absent=Absent.WARNING, code=Code.MISSING_RNG, series=True, several=True, per_rank=True,
           template="rng_state_{n}.pth",
           why="_load_rng_state skips a missing one with an info message (not bit-exact), but torch.load raises on a "
           "damaged one")
LATEST = Part("DeepSpeed's `latest` (the tag to load)", (r"latest",), kind=TAG,
              why="deepspeed_load_checkpoint calls engine.load_checkpoint(tag=None), which reads the tag from it; "
              "without it the load returns None and the Trainer raises 'failed to resume from checkpoint'")
ENGINE_SAVE = Part("DeepSpeed engine save (global_stepN/: model, optimizer and scheduler states)",
                   (r"global_step(\d+)/",), folders=ENGINE, stepped=True, code=Code.MISSING_OPTIMIZER,
                   why="deepspeed_load_checkpoint raises 'Can't find a valid checkpoint' without a global_step* dir")
NOT_READ = (
    (r"training_args\.bin", "TrainingArguments come from the caller; the pickle is never loaded on resume"),
    (r"generation_config\.json", "read by generate(), not by the resume"),
    (r"(?:tokenizer|tokenizer_config|special_tokens_map|added_tokens|preprocessor_config|processor_config|"
     r"chat_template)\.json|vocab\..*|merges\.txt|spiece\.model|chat_template\.jinja",
     "the processing class saved for export; the resume uses the one the caller passes"),
    (r"README\.md", "a model card"),
    (r"adapter_config\.json", "PEFT's load_adapter keeps the live model's config for an adapter it already has "
     "(peft 0.21 PeftModel.load_adapter: the config is read only for a new adapter name)"),
    (r"zero_to_fp32\.py", "DeepSpeed's consolidation script, copied in for users"),
    MANIFEST,
)
MODEL_WHY = "_load_from_checkpoint raises ValueError: Can't find a valid checkpoint at <dir>"


class Transformers(Profile):
    name = "transformers"
    layout = "transformers.Trainer checkpoint-N"
    source = "transformers 5.x trainer.py _save_checkpoint / _inner_training_loop, trainer_utils.py get_last_checkpoint"
    file_roles = FILES
    state_files = {TRAINER_STATE: {"global_step": GLOBAL_STEP}}
    # _load_optimizer_and_scheduler, _load_scaler, _load_from_checkpoint (and load_sharded_checkpoint, PEFT's
    # load_adapter, Accelerate's FSDP loaders): torch.load(weights_only=True); _load_rng_state: the same inside
    # trainer_pt_utils.safe_globals() (numpy's RNG pieces). None of them catches a refusal.
    weights_only_loads = (
        (r"optimizer\.pt|scheduler\.pt|scaler\.pt|pytorch_model(?:-\d+-of-\d+)?\.bin|adapter_model\.bin|optimizer\.bin|"
         + FSDP_FILES, TORCH_LOAD, True),
        (r"rng_state(?:_\d+)?\.pth", frozenset(TORCH_LOAD | NUMPY_RNG_GLOBALS), True),
    )
    counter_meanings = ENGINE_COUNTERS  # the DeepSpeed engine's step counts optimizer steps as global_step does
    name_pattern = re.compile(r"checkpoint-(\d+)")
    latest_rule = "resume_from_checkpoint=True: get_last_checkpoint, the highest N among checkpoint-N dirs, unverified"
    total_limit_rule = "save_total_limit: rotate_checkpoints deletes the oldest, keeping the newest and the best"

    def resume_contract(self, ckpt):
        """The layout decides what the resume reads: under DeepSpeed (a global_stepN/ dir) the engine's save, under
        FSDP (pytorch_model_fsdp*, optimizer.bin or optimizer_N/) the FSDP states; model.safetensors beside them is an
        export copy then, not read."""
        listing = entries(ckpt.path)
        shared = (TRAINER_STATE_PART, CONFIG, SCALER, RNG)
        if any(ENGINE_SAVE.matches([e], ckpt.path) for e in listing):
            return Contract(LOAD, (LATEST, ENGINE_SAVE, DEEPSPEED_SCHEDULER) + shared, model=(ENGINE_SAVE,),
                            model_why=MODEL_WHY, not_read=NOT_READ + (
                                (r"model\.safetensors|pytorch_model\.bin", "an export copy: under DeepSpeed the "
                                 "resume loads the engine's own save"),))
        if is_fsdp(ckpt.path) or "optimizer.bin" in listing:
            return Contract(LOAD, (FSDP_MODELS, FSDP_OPTIMIZERS, SCHEDULER) + shared, model=(FSDP_MODELS,),
                            model_why=MODEL_WHY, not_read=NOT_READ + (
                                (r"model\.safetensors|pytorch_model\.bin", "an export copy: under FSDP the resume "
                                 "loads pytorch_model_fsdp* with load_fsdp_model"),))
        models = (MODEL_FILES, ADAPTER_FILES, ADAPTER_DIRS)
        return Contract(LOAD, models + (OPTIMIZER, SCHEDULER) + shared, model=models,
                        model_why=MODEL_WHY, not_read=NOT_READ)

    def claims_path(self, path):
        """Its own files; or, cut short right after `save_model`, a top-level config.json beside the weights
        (Accelerate and diffusers dirs keep configs only inside save_pretrained subfolders)."""
        if not os.path.isdir(path):
            return False
        if any(os.path.exists(os.path.join(path, f)) for f in OWN_FILES):
            return True
        weights = pretrained_files.TRANSFORMERS_WEIGHTS + pretrained_files.ADAPTER_WEIGHTS
        return self.name_number(path) is not None and os.path.isfile(os.path.join(path, pretrained_files.CONFIG)) and \
            pretrained_files.weights_file(path, weights) is not None and \
            not os.path.exists(os.path.join(path, "random_states_0.pkl"))

    def own_latest(self, run_dir):
        return highest_checkpoint(run_dir, self.name_pattern)
