"""ostris/ai-toolkit (jobs/process/BaseSDTrainProcess.py save, get_latest_save_path, load_training_state_from_metadata,
run; toolkit/metadata.py get_meta_for_safetensors; read at 27a03a9, version 0.12.26).

A job saves into `{training_folder}/{name}/`: `{name}_{step:09d}.safetensors` every `save_every` steps and
`{name}.safetensors` at the end, each with `training_info` = {"step", "epoch"} (JSON) in its header, and ONE
`optimizer.pt` (the optimizer's state_dict, nothing else) overwritten after every save. A full fine-tune saved in
diffusers format is a folder `{name}_{step:09d}/` whose `aitk_meta.yaml` carries the same `training_info`. The save at
loop index s follows s + 1 optimizer steps (its iteration is trained before it is saved), and a resume restarts the
loop at s: each resume trains one step again, so the optimizer's `step` is s + 1 plus the resumes before it.
Resuming is automatic: the save with the newest ctime among `{name}*`, its weights, its `training_info.step` (none:
step 0, silently) and whatever `optimizer.pt` holds now, loaded in a try/except that only prints: the optimizer of
another save, or none, is taken without a word. The LR scheduler is never saved (rebuilt and stepped to the step).
`max_step_saves_to_keep` deletes the oldest `{name}_*` saves by ctime, never `optimizer.pt` or the final save.
"""

from __future__ import annotations

import json
import os
import re

from ckpttool import paths
from ckpttool.model import EPOCH, ERROR, GLOBAL_STEP, WARNING, Code, Problem, Record, StepSource
from ckpttool.trainers.base import Profile, marker_text

NAME = re.compile(r"(.+)_(\d{9})(?:\.safetensors)?")
OPTIMIZER = "optimizer.pt"
META_YAML = "aitk_meta.yaml"
SOURCE = ("ai-toolkit jobs/process/BaseSDTrainProcess.py (save, get_latest_save_path, "
          "load_training_state_from_metadata, run: the optimizer.pt load), toolkit/metadata.py")


def training_info(metadata: dict) -> dict | None:
    """The `training_info` a save records (a JSON string in a safetensors header, a mapping in aitk_meta.yaml)."""
    info = metadata.get("training_info")
    if isinstance(info, str):
        try:
            info = json.loads(info)
        except (ValueError, RecursionError):
            return None
    return info if isinstance(info, dict) else None


def is_aitoolkit(metadata: dict) -> bool:
    """Whether a header says ai-toolkit wrote it: `software` {"name": "ai-toolkit", ...} (toolkit/metadata.py)."""
    software = metadata.get("software")
    try:
        software = json.loads(software) if isinstance(software, str) else software
    except (ValueError, RecursionError):
        return False
    return isinstance(software, dict) and software.get("name") == "ai-toolkit"


def _job(path: str) -> str:
    """The job a save belongs to: `mylora` for mylora_000000250.safetensors and for the final mylora.safetensors."""
    base = os.path.basename(os.path.abspath(path))
    m = NAME.fullmatch(base)
    return m.group(1) if m else base.removesuffix(".safetensors")


def aitoolkit_header(path: str) -> dict | None:
    """The header metadata of a safetensors file ai-toolkit wrote (its `software` says so); None for any other
    file, or one that cannot be read (a link, a FIFO, a cut header)."""
    from ckpttool.errors import CkptError
    from ckpttool.formats.safetensors import read_header

    if os.path.islink(path) or not os.path.isfile(path):
        return None
    try:
        metadata = read_header(path)[1]
    except (CkptError, OSError):
        return None
    return metadata if is_aitoolkit(metadata) else None


def saved_step(path: str) -> int | None:
    """The step an ai-toolkit save's header records (training_info); None when it records none or is no such save."""
    step = (training_info(aitoolkit_header(path) or {}) or {}).get("step")
    return step if type(step) is int and step >= 0 else None


def job_saves(folder: str, job: str) -> dict[int, str]:
    """step -> path of the job's saves in `folder`: the numbered ones (files and diffusers folders) by their name, the
    final `{job}.safetensors` by the step its header records."""
    try:
        entries = os.listdir(folder)
    except OSError:
        return {}
    saves = {int(m.group(2)): os.path.join(folder, e) for e in entries
             if (m := NAME.fullmatch(e)) and m.group(1) == job}
    final = os.path.join(folder, f"{job}.safetensors")
    if saves and os.path.isfile(final) and (step := saved_step(final)) is not None:
        saves.setdefault(step, final)
    return saves


class AiToolkit(Profile):
    name = "ai-toolkit"
    layout = "ai-toolkit {name}_{step:09d} save"
    source = SOURCE
    name_pattern = re.compile(r".+_(\d{9})(?:\.safetensors)?")
    saves_rng = False
    needs_scheduler = False  # rebuilt and stepped to the resumed step (lr_scheduler.step(step_num))
    latest_rule = ("get_latest_save_path: the {name}* save with the newest ctime (a copy or touch changes it), with "
                   "whatever optimizer.pt holds now")
    total_limit_rule = "max_step_saves_to_keep: the oldest {name}_* saves by ctime; never optimizer.pt or the final"

    # (built when asked: a safetensors file is offered to this profile by its header, and inspecting one must not
    # import the pickle and state-dir readers)
    @property
    def weights_only_loads(self):
        """run(): optimizer.load_state_dict(torch.load(optimizer.pt, weights_only=True)) in a try/except that
        prints."""
        from ckpttool.formats.pickles import TORCH_WEIGHTS_ONLY

        return ((re.escape(OPTIMIZER), TORCH_WEIGHTS_ONLY, False),)

    @property
    def file_roles(self):
        """A diffusers-format save is read as a state dir (its transformer/ as the model); optimizer.pt is never
        inside it."""
        from ckpttool.formats.statedir import role

        return (role(re.escape(OPTIMIZER), "optimizer", "optimizer"),)

    def resume_contract(self, ckpt):
        """A diffusers-format save's model folder, as the fine-tune's from_pretrained reads it (the resume sets
        model_config.name_or_path to the save); a file save has no contract of parts."""
        from ckpttool.trainers.contract import PRESENT, PRETRAINED, PRETRAINED_CONTENT, Contract, Part

        if not os.path.isdir(ckpt.path):
            return None
        model = Part("the model (transformer/ or unet/: config.json and weights)", (r"(?:transformer|unet)/",),
                     folders=PRETRAINED, content=PRETRAINED_CONTENT, absent=None,
                     why="the resume loads the fine-tuned model from it (run: model_config.name_or_path)")
        meta = Part(f"{META_YAML} (training_info: the step)", (re.escape(META_YAML),), kind=PRESENT,
                    code=Code.STEP_MISMATCH, why="load_training_state_from_metadata reads the step from it")
        return Contract(SOURCE, (model, meta), model=(model,), model_why="the resume has no model to load")

    def claims_path(self, path):
        """A diffusers-format save: `{name}_{step:09d}/` with aitk_meta.yaml or the model folder it writes beside it
        (a file save is claimed by its header); or a job's save folder (`run_folder` says so)."""
        if self.run_folder(path):
            return True
        return (os.path.isdir(path) and bool(NAME.fullmatch(os.path.basename(os.path.abspath(path)))) and
                any(os.path.exists(os.path.join(path, e)) for e in (META_YAML, "transformer", "unet")))

    def run_folder(self, path):
        """A job's save folder (config.yaml, optimizer.pt and the saves) is no checkpoint: say what to run instead."""
        if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "config.yaml")):
            return None
        try:
            entries = os.listdir(path)
        except OSError:
            return None
        if not any(NAME.fullmatch(e) and aitoolkit_header(os.path.join(path, e)) is not None for e in entries):
            return None
        return (f"{path}: an ai-toolkit job folder (its saves and the one optimizer.pt they share), no checkpoint; "
                f"verify one save in it, or run `ckpttool latest --for-resume {path}`")

    def claims(self, ckpt):
        return ckpt.format == "safetensors" and is_aitoolkit(ckpt.metadata)

    def name_counters(self, path):
        return [] if not NAME.fullmatch(os.path.basename(os.path.abspath(path))) else super().name_counters(path)

    def interpret(self, ckpt):
        from ckpttool.errors import CkptError
        from ckpttool.formats import torchfile

        metadata = ckpt.metadata
        if os.path.isdir(ckpt.path):
            metadata = _yaml_meta(ckpt.path) or {}
            if metadata and not is_aitoolkit(metadata):  # the meta dict ends with `software` and `format`
                ckpt.add_problem(Code.CORRUPT, ERROR, f"{META_YAML} lacks the software entry ai-toolkit writes after "
                                 "training_info: it was cut short, or is not ai-toolkit's",
                                 os.path.join(ckpt.path, META_YAML))
        info = {k: v for k, v in (training_info(metadata) or {}).items() if k in ("step", "epoch") and
                 type(v) in (int, float, str, bool)}  # the two counters, never a nested or aliased structure
        ckpt.metadata["training_info"] = info or None
        for key, meaning in (("step", GLOBAL_STEP), ("epoch", EPOCH)):
            if type(info.get(key)) is int:
                ckpt.steps.append(StepSource(f"training_info {key}", info[key], meaning, record=Record.STATE_FILE,
                                             key=f"training_info.{key}", file=os.path.basename(ckpt.path)))
        folder = os.path.dirname(os.path.abspath(ckpt.path))
        optimizer = os.path.join(folder, OPTIMIZER)
        if os.path.lexists(optimizer) and paths.unsafe(optimizer, folder) or os.path.islink(optimizer):
            ckpt.add_problem(Code.UNSAFE_PATH, ERROR, f"{OPTIMIZER} is a link or no regular file: never followed or "
                             "opened; ai-toolkit's resume would load whatever it points to", optimizer)
            optimizer = None
        ckpt.metadata["optimizer_file"] = optimizer if optimizer and os.path.isfile(optimizer) else None
        if ckpt.metadata["optimizer_file"]:
            try:
                part = torchfile.read(optimizer, role="optimizer", name="optimizer")
            except CkptError as e:
                ckpt.add_problem(e.code, ERROR, f"{OPTIMIZER}: {e.reason}", optimizer)
            else:
                ckpt.absorb_problems(part)
                ckpt.components.extend(part.components)
                ckpt.files.append(optimizer)
                for s in part.steps:  # s + 1 plus one per resume: shown, compared by resume_problems only
                    s.meaning = None
                    ckpt.steps.append(s)
        super().interpret(ckpt)

    def run_saves(self, path):
        return job_saves(os.path.dirname(os.path.abspath(path)), _job(path))

    def own_latest(self, run_dir):
        """get_latest_save_path: the newest ctime among the job's saves (every job in the folder: the name is the
        config's, which the folder does not say)."""
        try:
            entries = [os.path.join(run_dir, e) for e in os.listdir(run_dir)]
        except OSError:
            return None
        jobs = {m.group(1) for e in entries if (m := NAME.fullmatch(os.path.basename(e)))}
        saves = [e for e in entries if any(os.path.basename(e).startswith(j) for j in jobs) and not os.path.islink(e)
                 and (e.endswith(".safetensors") and os.path.isfile(e) or os.path.isdir(e))]
        return max(saves, key=_ctime) if saves else None

    def resume_problems(self, ckpt):
        problems = self.loader_problems(ckpt)
        info = ckpt.metadata.get("training_info") or {}
        step = info.get("step") if type(info.get("step")) is int else None
        if step is None:
            problems.append(Problem(Code.STEP_MISMATCH, ERROR, "no training_info step in this save: ai-toolkit's "
                                    "resume (load_training_state_from_metadata) then starts at step 0 without a "
                                    "word, with the trained weights and a schedule from the start", ckpt.path))
        optimizer = ckpt.metadata.get("optimizer_file")
        if optimizer is None:
            return problems + [Problem(Code.MISSING_OPTIMIZER, ERROR, f"no {OPTIMIZER} beside this save: ai-toolkit "
                                       "resumes with a fresh optimizer without a word", ckpt.path)]
        optimizer_step = max((s.value for s in ckpt.steps if s.record is Record.OPTIMIZER), default=None)
        # saves written after this one, whole enough to be read (a save a crash cut short never wrote its optimizer),
        # that the optimizer's step count does not rule out (a save at s follows at least s + 1 steps)
        saves = self.run_saves(ckpt.path)  # each final save's header read once
        newer = {n: p for n, p in saves.items() if step is not None and n > step and
                 os.path.abspath(p) != os.path.abspath(ckpt.path) and _intact(p) and
                 (optimizer_step is None or optimizer_step >= _follows(n, p))}
        if newer:
            owner = os.path.basename(newer[max(newer)])
            problems.append(Problem(Code.STEP_MISMATCH, ERROR, f"{OPTIMIZER} is overwritten at every save, so it is "
                                    f"{owner}'s (step {max(newer)}), not this save's (step {step}): a resume from here "
                                    f"would take another step's optimizer without a word; resume from {owner}",
                                    optimizer))
            return problems
        # a numbered save at loop index s follows s + 1 steps; the final one records the step count itself
        taken = None if step is None else _follows(step, ckpt.path)
        if taken is not None and optimizer_step is not None and optimizer_step < taken:
            problems.append(Problem(Code.STEP_MISMATCH, ERROR, f"{OPTIMIZER} has taken {optimizer_step} steps, fewer "
                                    f"than the {taken} this save follows: it is an earlier save's (its own was "
                                    "never written: ai-toolkit only prints 'Could not save optimizer'), and a resume "
                                    "would take it without a word", optimizer))
        elif taken is not None and optimizer_step is not None and \
                optimizer_step - taken >= (interval := _save_interval(saves)):
            problems.append(Problem(Code.STEP_MISMATCH, WARNING, f"{OPTIMIZER} has taken {optimizer_step} steps, "
                                    f"{optimizer_step - taken} more than this save follows: each resume trains one "
                                    f"step again, but {optimizer_step - taken} is at least a save interval "
                                    f"({interval}), so it may be a later save's whose weights were deleted; resume "
                                    "from this save only if that save never existed", optimizer))
        if not any(c.role == "optimizer" for c in ckpt.components) and not problems:
            problems.append(Problem(Code.MISSING_OPTIMIZER, ERROR, f"{OPTIMIZER} holds no optimizer state: ai-toolkit "
                                    "resumes with a fresh optimizer", optimizer))
        return problems


def _follows(step: int, path: str) -> int:
    """The optimizer steps a save at `step` follows: a numbered save is written after its loop index's step; the
    final save records the step count itself."""
    return step + 1 if NAME.fullmatch(os.path.basename(os.path.abspath(path))) else step


def _intact(path: str) -> bool:
    """Whether a save is whole enough to be a save: a regular file whose header reads, or a folder with its yaml."""
    if os.path.islink(path):
        return False
    if os.path.isdir(path):
        return os.path.isfile(os.path.join(path, META_YAML))
    return os.path.isfile(path) and saved_step(path) is not None


def _save_interval(saves: dict[int, str]) -> float:
    """The smallest distance between the run's saves (save_every); infinite with fewer than two."""
    steps = sorted(saves)
    return min((b - a for a, b in zip(steps, steps[1:])), default=float("inf"))


def _ctime(path: str) -> float:
    try:
        return os.lstat(path).st_ctime
    except OSError:
        return 0.0


def _yaml_meta(folder: str) -> dict | None:
    """aitk_meta.yaml of a diffusers-format save (the meta dict, yaml-dumped by the model's save_model)."""
    import yaml

    text = marker_text(folder, META_YAML)
    try:
        doc = yaml.safe_load(text) if text is not None else None
    except (yaml.YAMLError, RecursionError):
        return None
    return doc if isinstance(doc, dict) else None
