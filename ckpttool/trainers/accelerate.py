"""Accelerate `save_state` dirs (accelerate/checkpointing.py `save_accelerator_state`, accelerator.py `save_state`).

Files: `model{_i}.safetensors` / `pytorch_model{_i}.bin`, `optimizer{_i}.bin`, `scheduler{_i}.bin`, `sampler{_i}.bin`,
`dl_state_dict{_i}.bin`, `scaler.pt`, `random_states_{rank}.pkl` (one per process), `custom_checkpoint_{i}.pkl`;
FSDP: `pytorch_model_fsdp_{i}/` and `optimizer_{i}/` DCP dirs. No completion marker is written.
Counters: the RNG file's `step` is `Accelerator.step`, the gradient-accumulation micro-step counter (never the
optimizer step). A prepared scheduler is an `AcceleratedScheduler` (accelerate/scheduler.py `step`): it returns early
when `optimizer.step_was_skipped` (fp16 overflow), and otherwise steps once per process unless `split_batches`.
Automatic naming (`ProjectConfiguration(automatic_checkpoint_naming=True)`) writes `checkpoints/checkpoint_{N}`, N
counting saves; `load_state()` with no dir loads the highest N, and `total_limit` deletes the oldest first.
"""

from __future__ import annotations

import os
import re
from dataclasses import replace

from ckpttool.formats.pickles import DTENSOR_GLOBALS, NUMPY_RNG_GLOBALS, TORCH_WEIGHTS_ONLY
from ckpttool.formats.statedir import role
from ckpttool.model import MICRO_STEPS, SAVES, WARNING, Code, Record
from ckpttool.trainers.base import Profile
from ckpttool.trainers.contract import RUN, Absent, Contract, Part, entries

# FSDP (accelerate.utils save_fsdp_model / save_fsdp_optimizer): full `optimizer.bin`, sharded DCP dirs
FSDP_PARTS = (
    role(r"pytorch_model_fsdp(?:_(\d+))?", "model", "model{_n}", folder=True),
    role(r"optimizer(?:_(\d+))?", "optimizer", "optimizer{_n}", folder=True),
)
FILES = (
    role(r"model(?:_(\d+))?\.safetensors", "model", "model{_n}"),
    role(r"pytorch_model(?:_(\d+))?\.bin", "model", "model{_n}"),
    role(r"pytorch_model_fsdp(?:_(\d+))?\.bin", "model", "model{_n}"),
    role(r"pytorch_model_fsdp_rank(\d+)\.bin", "model", "model_rank{n}"),
    role(r"pytorch_lora_weights\.safetensors", "model", "lora"),
    role(r"optimizer(?:_(\d+))?\.bin", "optimizer", "optimizer{_n}"),
    role(r"scheduler(?:_(\d+))?\.bin", "scheduler", "scheduler{_n}"),
    role(r"sampler(?:_(\d+))?\.bin", "sampler", "sampler{_n}"),
    role(r"dl_state_dict(?:_(\d+))?\.bin", "dataloader", "dl_state_dict{_n}"),
    role(r"scaler\.pt", "scaler", "scaler"),
    role(r"random_states_(\d+)\.pkl", "rng", "random_states_{n}"),
    role(r"custom_checkpoint_(\d+)\.pkl", "custom", "custom_checkpoint_{n}"),
) + FSDP_PARTS
MARKERS = ("random_states_0.pkl", "optimizer.bin", "scheduler.bin", "model.safetensors", "pytorch_model.bin",
           "pytorch_lora_weights.safetensors", "pytorch_model_fsdp_0", "scaler.pt")
RNG_FILE = re.compile(r"random_states_(\d+)\.pkl")

# What `Accelerator.load_state(dir)` reads (accelerate 1.15 accelerator.py load_state, checkpointing.py
# load_accelerator_state, utils/fsdp_utils.py load_fsdp_model / load_fsdp_optimizer): one file per prepared object,
# numbered from 0, each loaded with torch.load or safetensors, so a missing or damaged one raises.
LOAD = "accelerate 1.15 accelerator.py load_state, checkpointing.py load_accelerator_state"
MODELS = Part("model weights (model.safetensors or pytorch_model.bin, then model_1, ...)",
              (r"model(?:_(\d+))?\.safetensors", r"pytorch_model(?:_(\d+))?\.bin"), series=True,
              template="model{_n}.safetensors", why="load_accelerator_state loads one per prepared model, in order, "
              "and raises FileNotFoundError for a missing one")
FSDP_MODELS = Part("FSDP model state (pytorch_model_fsdp_0/ sharded, pytorch_model_fsdp.bin full)",
                   (r"pytorch_model_fsdp(?:_(\d+))?/", r"pytorch_model_fsdp(?:_(\d+))?\.bin",
                    r"pytorch_model_fsdp(?:_(\d+))?_rank\d+\.bin"), series=True, template="pytorch_model_fsdp_{n}/",
                   why="fsdp_utils.py load_fsdp_model reads it for every prepared model (dist_cp.load of the folder, "
                   "or torch.load of the file): the resume raises")
OPTIMIZERS = Part("optimizer state (optimizer.bin, optimizer_1.bin, ...)", (r"optimizer(?:_(\d+))?\.bin",),
                  code=Code.MISSING_OPTIMIZER, series=True, template="optimizer{_n}.bin",
                  why="load_accelerator_state loads one per prepared optimizer and raises FileNotFoundError")
FSDP_OPTIMIZERS = Part("FSDP optimizer state (optimizer_0/ sharded, optimizer.bin full)",
                       (r"optimizer_(\d+)/", r"optimizer(?:_(\d+))?\.bin"), code=Code.MISSING_OPTIMIZER, series=True,
                       template="optimizer_{n}/", why="fsdp_utils.py load_fsdp_optimizer reads it for every prepared "
                       "optimizer: the resume raises")
SCHEDULERS = Part("LR scheduler state (scheduler.bin, scheduler_1.bin, ...)", (r"scheduler(?:_(\d+))?\.bin",),
                  code=Code.MISSING_SCHEDULER, series=True, template="scheduler{_n}.bin",
                  why="load_accelerator_state loads one per prepared scheduler and raises FileNotFoundError; without "
                  "it warmup and the schedule restart")
# A loop that prepares no LR scheduler saves none, and load_state loads only the prepared ones: only the run's other
# checkpoints tell that one was lost (the scripts built on Accelerate always prepare one and require it).
ANY_SCHEDULERS = replace(SCHEDULERS, absent=RUN, why="load_accelerator_state loads one per prepared scheduler and "
                         "raises FileNotFoundError (a loop that prepares none saves none)")
SAMPLERS = Part("sampler state (sampler.bin)", (r"sampler(?:_(\d+))?\.bin",), absent=RUN, series=True,
                template="sampler{_n}.bin", why="load_accelerator_state loads it for a dataloader whose sampler is "
                "a SeedableRandomSampler over an IterableDatasetShard")
DATALOADERS = Part("stateful dataloader state (dl_state_dict.bin)", (r"dl_state_dict(?:_(\d+))?\.bin",),
                   absent=RUN, series=True, template="dl_state_dict{_n}.bin",
                   why="load_accelerator_state loads it when it exists (use_stateful_dataloader): the data position")
SCALER = Part("GradScaler state (scaler.pt)", (r"scaler\.pt",), absent=RUN,
              why="load_state loads it whenever the run has a scaler (fp16) and raises FileNotFoundError without it")
RNG = Part("RNG state (random_states_N.pkl, one per process)", (r"random_states_(\d+)\.pkl",), absent=Absent.WARNING,
           damaged=WARNING, code=Code.MISSING_RNG, series=True, per_rank=True, template="random_states_{n}.pkl",
           why="load_accelerator_state catches a missing or unreadable one ('Could not load random states') and "
           "goes on: data order and dropout are not bit-exact")
CUSTOM = Part("registered objects' state (custom_checkpoint_N.pkl)", (r"custom_checkpoint_(\d+)\.pkl",), absent=RUN,
              series=True, template="custom_checkpoint_{n}.pkl",
              why="load_state raises RuntimeError unless there is one per object registered with register_for_"
              "checkpointing")
MANIFEST = (r"ckpttool-manifest\.json", "ckpttool's manifest: read by verify, not by the resume")


def is_fsdp(path: str) -> bool:
    """Whether Accelerate saved the models through FSDP (save_fsdp_model / save_fsdp_optimizer names)."""
    return any(e.startswith("pytorch_model_fsdp") or re.fullmatch(r"optimizer_\d+/", e) for e in entries(path))


def state_contract(path: str, source: str, model_why: str, models=(MODELS,), extra=(), not_read=(),
                   schedulers=SCHEDULERS) -> Contract:
    """The contract of a save_state dir: Accelerate's own parts (their FSDP forms where FSDP saved it), `models`
    where a script's load hook reads the weights from elsewhere, and the script's `extra` parts."""
    fsdp = is_fsdp(path)
    models = (FSDP_MODELS,) if fsdp else models
    parts = models + (FSDP_OPTIMIZERS if fsdp else OPTIMIZERS, schedulers, SAMPLERS, DATALOADERS, SCALER, RNG, CUSTOM)
    return Contract(source, parts + tuple(extra), model=models, model_why=model_why,
                    not_read=(MANIFEST,) + tuple(not_read))


def has_accelerate_files(path: str) -> bool:
    return os.path.isdir(path) and any(os.path.exists(os.path.join(path, m)) for m in MARKERS)


# accelerate 1.16 checkpointing.py load_accelerator_state reads these through utils/other.py `load`:
# torch.load(weights_only=True) with TORCH_SAFE_GLOBALS added; a random_states file it cannot load is skipped.
# FSDP's files go through utils/fsdp_utils.py: a plain torch.load(weights_only=True). Importing accelerate imports
# torch.distributed.tensor, which allow-lists DTensor.
TORCH_LOAD = frozenset(TORCH_WEIGHTS_ONLY | DTENSOR_GLOBALS)
ACCELERATE_LOAD = frozenset(TORCH_LOAD | NUMPY_RNG_GLOBALS)
FSDP_FILES = r"pytorch_model_fsdp(?:_\d+)?(?:_rank\d+)?\.bin|optimizer_\d+_rank\d+\.bin"
WEIGHTS_ONLY_LOADS = (
    (FSDP_FILES, TORCH_LOAD, True),
    (r"(?:optimizer|scheduler|sampler|dl_state_dict|pytorch_model)(?:_\d+)?\.bin|scaler\.pt", ACCELERATE_LOAD, True),
    (r"random_states_\d+\.pkl", ACCELERATE_LOAD, False),
)


class Accelerate(Profile):
    name = "accelerate"
    layout = "Accelerate save_state dir"
    source = "accelerate 1.15: checkpointing.py save_accelerator_state, scheduler.py AcceleratedScheduler.step"
    file_roles = FILES
    weights_only_loads = WEIGHTS_ONLY_LOADS
    counter_meanings = ((Record.RNG, r"random_states_\d+\.step", MICRO_STEPS),)
    # every process runs the same loop, so Accelerator.step (+1 per accumulate(), 0 again at the end of each pass over
    # the dataloader: accelerator.py _do_sync) is the same in every random_states_{process}.pkl of one save
    per_rank_counters = ((r"random_states_\d+\.step", "Accelerator.step (in each process's random_states_N.pkl)"),)
    scheduler_rule = "AcceleratedScheduler: skipped with the optimizer on fp16 overflow, else once per process"
    scheduler_steps_per_process = True

    built_on = "accelerate"  # SimpleTuner, kohya, diffusers' scripts and the reference trainer too
    claims_by_shared_files = True

    def claims_path(self, path):
        return has_accelerate_files(path)

    def resume_contract(self, ckpt):
        return state_contract(ckpt.path, LOAD, "load_state has no weights to load into the prepared model and raises "
                              "FileNotFoundError", schedulers=ANY_SCHEDULERS)

    def scheduler_multiples(self, ckpt):
        """Without split_batches a prepared scheduler steps once per process: one RNG file per process."""
        processes = sum(1 for f in ckpt.files if RNG_FILE.fullmatch(os.path.basename(f)))
        return {1, max(1, processes)}


class AccelerateAutomatic(Accelerate):
    layout = "Accelerate automatic checkpoint_N"
    name_pattern = re.compile(r"checkpoint_(\d+)")
    name_meaning = SAVES
    latest_rule = "Accelerator.load_state() with automatic naming: the highest checkpoint_N under checkpoints/"
    total_limit_rule = "ProjectConfiguration.total_limit: the oldest checkpoint_N dirs are deleted before a save"

    def claims_path(self, path):
        return self.name_number(path) is not None and has_accelerate_files(path)

    def own_latest(self, run_dir):
        """What load_state() with automatic naming loads (accelerate 1.16 accelerator.py load_state): every entry
        of checkpoints/, files and stray folders too, sorted by the first number in its name, the last one (ties
        kept in listing order); None where it would fail (no entry, or one without a number: IndexError)."""
        folder = os.path.join(run_dir, "checkpoints") if os.path.isdir(os.path.join(run_dir, "checkpoints")) \
            else run_dir
        try:
            entries = os.listdir(folder)
        except OSError:
            return None
        numbers = [re.findall(r"[0-9]+", entry) for entry in entries]
        if not entries or not all(numbers):
            return None
        ordered = sorted(zip(entries, numbers), key=lambda item: int(item[1][0]))
        return os.path.join(folder, ordered[-1][0])
