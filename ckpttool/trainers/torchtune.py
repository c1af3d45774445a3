"""torchtune 0.6.1 (torchtune/training/checkpointing/_checkpointer.py, _utils.py;
recipes/full_finetune_single_device.py, lora_finetune_single_device.py, full_finetune_distributed.py): the FullModel
HF, Meta and TorchTune checkpointers write `{output_dir}/epoch_{N}/` (N: the 0-based epoch just finished) with the
weights (`model-0000X-of-0000Y.safetensors` and its index, or one `model-00001-of-00001.bin`), `adapter_model.pt`
(+ PEFT `adapter_model.safetensors`, `adapter_config.json`) for LoRA. The recipe state (seed, epochs_run,
total_epochs, max_steps_per_epoch, optimizer, dataloader) goes to ONE file, `{output_dir}/recipe_state/recipe_state.pt`,
overwritten at every intermediate save and not written by the final one (`save_checkpoint(intermediate_checkpoint=
False)`); older layouts keep a `recipe_state.pt` inside the epoch folder. The recipes add 1 to `epochs_run` before
saving, so the state of `epoch_N` says `epochs_run = N + 1`: that folder is the one resume point, and every other
folder's weights would be resumed with another epoch's optimizer and counters. No LR scheduler or RNG state is saved
(the recipes rebuild the schedule from epochs_run); no folder is ever deleted. The async distributed path saves each
intermediate epoch as a DCP dir `dist_epoch_{N}/` instead (TorchtuneDist).
"""

from __future__ import annotations

import os
import re

from ckpttool.formats.pickles import TORCH_WEIGHTS_ONLY
from ckpttool.formats.statedir import role
from ckpttool.model import EPOCH, ERROR, Code, Problem, Record, StepSource
from ckpttool.trainers.base import Profile, moment_problems, numbered_dirs
from ckpttool.trainers.contract import Contract, Part

NAME = re.compile(r"epoch_(\d+)")
DIST_NAME = re.compile(r"dist_epoch_(\d+)")
RECIPE_DIR, RECIPE_FILE = "recipe_state", "recipe_state.pt"
SHARD = r"model-\d{5}-of-\d{5}\.(?:safetensors|bin)"
ADAPTER = "adapter_model.pt"
# The recipe lists the shard files it resumes from (checkpoint_files) and load_checkpoint reads those; a LoRA resume
# reads adapter_model.pt of the highest epoch_N (get_adapter_checkpoint_path). Either holds the model.
WEIGHTS = Part("model weights (model-0000X-of-0000Y.safetensors or .bin)", (SHARD,), absent=None,
               why="load_checkpoint reads every shard checkpoint_files names")
ADAPTER_PART = Part(f"LoRA adapter weights ({ADAPTER})", (re.escape(ADAPTER),), absent=None,
                    why="a LoRA resume raises ValueError('Adapter weights not found') without them")
# copy_files copies every non-weight file of the input dir into each epoch folder; the PEFT-format adapter and the
# index are for other tools (from_pretrained, PEFT): the resume opens none of them
NOT_READ = tuple((p, "copied or exported for other tools; torchtune's resume does not open it") for p in (
    r"config\.json", r"generation_config\.json", r"params\.json", r"adapter_config\.json",
    r"adapter_model\.(?:safetensors|bin)", r"(?:model\.safetensors|pytorch_model\.bin)\.index\.json",
    r"tokenizer.*", r"special_tokens_map\.json", r"original_repo_id\.json", r"original/", r"LICENSE.*", r"README.*",
    r".*\.model", r".*\.tiktoken"))
# _update_recipe_state reads these four and raises KeyError("Checkpoint does not contain the required keys ...")
# without any; setup() then indexes ckpt_dict["optimizer"] and ["dataloader"] directly.
REQUIRED_KEYS = ("seed", "epochs_run", "total_epochs", "max_steps_per_epoch")
SOURCE = ("torchtune 0.6.1 training/checkpointing/_checkpointer.py (FullModelHFCheckpointer, "
          "FullModelMetaCheckpointer, FullModelTorchTuneCheckpointer save_checkpoint/load_checkpoint), _utils.py "
          "(get_recipe_checkpoint_path, "
          "get_adapter_checkpoint_path, get_largest_iter_folder), recipes/full_finetune_single_device.py and "
          "lora_finetune_single_device.py (save_checkpoint, _update_recipe_state, setup)")


def recipe_state_path(path: str) -> str | None:
    """The recipe state an `epoch_N` folder is resumed with: its own `recipe_state.pt` (older layouts), else the run's
    shared `recipe_state/recipe_state.pt` (get_recipe_checkpoint_path); None when there is neither."""
    own = os.path.join(path, RECIPE_FILE)
    shared = os.path.join(os.path.dirname(os.path.abspath(os.path.normpath(path))), RECIPE_DIR, RECIPE_FILE)
    return next((p for p in (own, shared) if os.path.isfile(p) and not os.path.islink(p)), None)


class Torchtune(Profile):
    name = "torchtune"
    layout = "torchtune epoch_N"
    source = SOURCE
    name_pattern = NAME
    saves_rng = False
    needs_scheduler = False  # the recipes rebuild the schedule from epochs_run (last_epoch=global_step - 1)
    # safe_torch_load: torch.load(weights_only=True) with torch's own allow-list (torchtune adds none)
    latest_rule = ("get_largest_iter_folder: the highest epoch_N for the adapter, and the one shared "
                   "recipe_state/recipe_state.pt whatever folder the weights come from")
    total_limit_rule = "none: every epoch_N folder is kept"

    file_roles = (role(SHARD, "model", "model"), role(re.escape(ADAPTER), "model", "adapter"))
    weights_only_loads = ((rf"{SHARD}|{re.escape(ADAPTER)}|{re.escape(RECIPE_FILE)}", TORCH_WEIGHTS_ONLY, True),)

    def resume_contract(self, ckpt):
        return Contract(SOURCE, (WEIGHTS, ADAPTER_PART), model=(WEIGHTS, ADAPTER_PART),
                        model_why="load_checkpoint finds no weights to load (ValueError: No file with name ...)",
                        not_read=NOT_READ)

    def claims_path(self, path):
        if not os.path.isdir(path) or self.name_number(path) is None:
            return False
        listing = _listing(path)
        return (RECIPE_FILE in listing or ADAPTER in listing or any(re.fullmatch(r"model-\d{5}-of-00001\..*", e)
                                                                    for e in listing)
                or os.path.isdir(os.path.join(os.path.dirname(os.path.abspath(path)), RECIPE_DIR)))

    def name_counters(self, path):
        return []  # epoch_N's N is the 0-based epoch index, not a count: epochs_run (N + 1) is, see resume_problems

    def interpret(self, ckpt):
        from ckpttool.formats import torchfile
        from ckpttool.errors import CkptError

        recipe = recipe_state_path(ckpt.path)
        ckpt.metadata["recipe_state"] = recipe
        if recipe is not None:
            try:
                part = torchfile.read(recipe, role=None)
            except CkptError as e:
                ckpt.add_problem(e.code, ERROR, f"the recipe state: {e.reason}", recipe)
            else:
                ckpt.absorb_problems(part)
                ckpt.components.extend(c for c in part.components if c.role != "model")
                ckpt.files.append(recipe)
                ckpt.metadata["recipe"] = {k: part.metadata.get(k) for k in REQUIRED_KEYS}
        epochs_run = (ckpt.metadata.get("recipe") or {}).get("epochs_run")
        if type(epochs_run) in (int, bool):  # a bool counts as torch's range() counts it
            ckpt.steps.append(StepSource("recipe_state.pt epochs_run", int(epochs_run), EPOCH, record=Record.STATE_FILE,
                                         key="epochs_run", file=RECIPE_FILE))
        super().interpret(ckpt)

    def own_latest(self, run_dir):
        """With async checkpointing the recipe resumes from the highest dist_epoch_N with a .metadata
        (_get_latest_intermediate_checkpoint); otherwise from the highest epoch_N."""
        dist = {n: p for n, p in numbered_dirs(run_dir, DIST_NAME).items()
                if os.path.isfile(os.path.join(p, ".metadata"))}
        found = dist or numbered_dirs(run_dir, NAME)
        return found[max(found)] if found else None

    def run_saves(self, path):
        return {}  # its number counts epochs, not steps

    def resume_problems(self, ckpt):
        """The contract's parts, then the recipe state: there, whole, and this folder's (epochs_run N + 1). Nothing is
        implied about a scheduler: the recipes build one (initial_lr in the optimizer) and never save it."""
        from ckpttool.trainers import contract

        problems = self.loader_problems(ckpt) + moment_problems(ckpt)
        problems += contract.absence(self.resume_contract(ckpt), ckpt, None)
        folder = os.path.basename(os.path.abspath(ckpt.path))
        recipe = ckpt.metadata.get("recipe_state")
        if recipe is None:
            return problems + [Problem(Code.MISSING_FILE, ERROR, f"no recipe state for {folder} (neither "
                                       f"{RECIPE_FILE} in it nor {RECIPE_DIR}/{RECIPE_FILE} beside it): "
                                       "resume_from_checkpoint raises ValueError('If should_load_recipe_state is "
                                       "True, recipe_checkpoint file must be provided.')", ckpt.path)]
        state = ckpt.metadata.get("recipe") or {}
        lost = [k for k in REQUIRED_KEYS if state.get(k) is None]
        if lost and "recipe" in ckpt.metadata:
            problems.append(Problem(Code.MISSING_FILE, ERROR, f"the recipe state lacks {', '.join(lost)}: "
                                    "_update_recipe_state raises KeyError('Checkpoint does not contain the required "
                                    "keys needed for updating recipe state')", recipe))
        if "recipe" in ckpt.metadata and not any(c.role == "optimizer" for c in ckpt.components):
            problems.append(Problem(Code.MISSING_OPTIMIZER, ERROR, "the recipe state holds no optimizer state: the "
                                    "recipe's setup indexes ckpt_dict['optimizer'] and raises KeyError", recipe))
        number, epochs_run = self.name_number(ckpt.path), state.get("epochs_run")
        if epochs_run is not None and type(epochs_run) not in (int, bool):
            problems.append(Problem(Code.CORRUPT, ERROR, f"the recipe state's epochs_run is {str(epochs_run)[:40]!r}, "
                                    "not an epoch count: the recipe's range(epochs_run, total_epochs) raises "
                                    "TypeError", recipe))
        elif epochs_run is not None and number is not None and int(epochs_run) != number + 1:
            problems.append(Problem(Code.STEP_MISMATCH, ERROR, _not_its_state(folder, number, int(epochs_run)),
                                    recipe))
        return problems


def _not_its_state(folder: str, number: int, epochs_run: int) -> str:
    """Why the recipe state is not `folder`'s: every intermediate save overwrites it, the final writes none."""
    owner = f"epoch_{epochs_run - 1}" if epochs_run > 0 else "no epoch"
    if epochs_run == number:
        return (f"{folder} is the final save: torchtune writes no recipe state at the end of training, and the recipe "
                f"state there is {owner}'s (epochs_run {epochs_run}); a resume from {folder} would load its weights "
                f"with {owner}'s optimizer and train epoch {number} again. Resume from {owner}, or not at all: the "
                "run finished")
    return (f"the recipe state is {owner}'s (epochs_run {epochs_run}, {folder} needs {number + 1}): every "
            f"intermediate save overwrites the one recipe_state.pt, so only {owner} can be resumed; {folder}'s "
            "weights would get another epoch's optimizer and counters")


def _listing(path: str) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except OSError:
        return []


EARLIER_READ = 2  # earlier dist_epoch dirs read to compare data files with (each costs a DCP metadata read)
DIST_KEYS = ("model", "optimizer") + REQUIRED_KEYS  # CheckpointClient.load_distributed_checkpoint's template
DIST_SOURCE = ("torchtune 0.6.1 training/checkpointing/_checkpointer.py (DistributedCheckpointer save_checkpoint, "
               "_get_latest_intermediate_checkpoint), _checkpoint_client.py (CheckpointClient save_checkpoint, "
               "load_distributed_checkpoint), recipes/full_finetune_distributed.py setup")


class TorchtuneDist(Torchtune):
    """`enable_async_checkpointing`: every intermediate epoch is one DCP dir `dist_epoch_{N}/` holding the model,
    the optimizer and the recipe's counters (seed, epochs_run, total_epochs, max_steps_per_epoch, dataloader) as
    items; the final epoch is still an `epoch_{N}` folder of the HF (or other) checkpointer, with no recipe state.
    The resume loads the highest dist_epoch_N that has a `.metadata`; if any item of its template is missing the load
    fails, the recipe warns and "Training will start from the base checkpoint"."""

    layout = "torchtune dist_epoch_N (DCP)"
    source = DIST_SOURCE
    name_pattern = DIST_NAME
    file_roles = ()
    weights_only_loads = ()  # dcp.load, not torch.load
    latest_rule = "_get_latest_intermediate_checkpoint: the highest dist_epoch_N with a .metadata"

    def claims_path(self, path):
        return os.path.isdir(path) and self.name_number(path) is not None

    def resume_contract(self, ckpt):
        return None  # one DCP dir: the reader checks its data files against .metadata

    def run_saves(self, path):
        """The run's earlier dist_epoch_N dirs by the step each holds (their number counts epochs), so a data file
        left by one of them is told by its bytes; each is read (its DCP metadata and small items) to learn it."""
        from ckpttool import steps
        from ckpttool.checkpoint import open_checkpoint
        from ckpttool.errors import CkptError, UsageError

        number = self.name_number(path)
        saves = {}
        earlier = {n: p for n, p in numbered_dirs(os.path.dirname(os.path.abspath(os.path.normpath(path))),
                                                  DIST_NAME).items() if number is not None and n < number}
        for n, sibling in sorted(earlier.items())[-EARLIER_READ:]:  # the nearest: a stale file is a recent save's
            try:
                step = steps.global_step(open_checkpoint(sibling))
            except (CkptError, UsageError, OSError):
                continue
            if step is not None:
                saves[step] = sibling
        return saves

    def interpret(self, ckpt):
        objects = ckpt.metadata.get("objects") or {}
        ckpt.metadata["recipe"] = {k: objects.get(k) for k in REQUIRED_KEYS}
        epochs_run = objects.get("epochs_run")
        if type(epochs_run) in (int, bool):
            ckpt.steps.append(StepSource("epochs_run item", int(epochs_run), EPOCH, record=Record.DCP_STATE,
                                         key="epochs_run"))
        Profile.interpret(self, ckpt)

    def resume_problems(self, ckpt):
        folder = os.path.basename(os.path.abspath(ckpt.path))
        objects = ckpt.metadata.get("objects") or {}
        roles = {c.role for c in ckpt.components}
        lost = [k for k in DIST_KEYS if (k in ("model", "optimizer") and k not in roles) or
                (k not in ("model", "optimizer") and k not in objects)]
        problems = []
        if lost:
            problems.append(Problem(Code.MISSING_FILE, ERROR, f"{folder} has no {', '.join(lost)}: "
                                    "load_distributed_checkpoint fails, and the recipe warns and starts from the base "
                                    "checkpoint (epoch 0, a fresh optimizer)", ckpt.path))
        number, epochs_run = self.name_number(ckpt.path), objects.get("epochs_run")
        if epochs_run is not None and type(epochs_run) not in (int, bool):
            problems.append(Problem(Code.CORRUPT, ERROR, f"epochs_run is {str(epochs_run)[:40]!r}, not an epoch "
                                    "count: the recipe's range(epochs_run, total_epochs) raises TypeError", ckpt.path))
        elif epochs_run is not None and number is not None and int(epochs_run) != number + 1:
            problems.append(Problem(Code.STEP_MISMATCH, ERROR, f"epochs_run is {int(epochs_run)}, but {folder} is "
                                    f"saved after epoch {number} (epochs_run {number + 1}): its items are from "
                                    "another save", ckpt.path))
        optimizer = next((c for c in ckpt.components if c.role == "optimizer"), None)
        if optimizer is not None and not optimizer.tensors and "optimizer" not in lost:
            problems.append(Problem(Code.MISSING_OPTIMIZER, ERROR, f"{folder}'s optimizer holds no per-parameter "
                                    "state: load_distributed_checkpoint's template (after _init_optim_state) asks for "
                                    "every moment, the load fails and the recipe starts from the base checkpoint",
                                    ckpt.path))
        return problems + moment_problems(ckpt)
