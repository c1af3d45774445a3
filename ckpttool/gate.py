"""The pre-resume gate other trainers call: `check_resume(path, model, optimizer, scheduler, expected_step)`, and
`latest_valid(run_dir, ...)`, the newest checkpoint of a run that passes it.

It runs everything `ckpttool verify --for-resume` checks, then compares the checkpoint with the live objects a
resume will load it into: model keys, shapes and dtypes (prefixes and optimum-quanto layouts recognised and named),
the optimizer's parameter groups, and the world size it was saved with against the live one. Nothing is loaded into
the objects; a failing gate raises `ResumeGateError` before any weight is touched, and its message says what to run
to fix each problem. The hooks for each trainer are in `ckpttool.integrations`.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field

from ckpttool.errors import CkptError, UsageError
from ckpttool.keys import compare
from ckpttool.model import DAMAGE, ERROR, WARNING, Code, Problem, errors
from ckpttool.operations.verify import verify_checkpoint
from ckpttool.trainers.base import MOMENT

RNG_FILE = re.compile(r"(?:random_states|rng_state)_(\d+)\.(?:pkl|pth)")
log = logging.getLogger("ckpttool.gate")


class ResumeGateError(Exception):
    """The checkpoint must not be resumed from. `.problems`: [{"code", "severity", "message", "fix", ...}, ...], the
    problems that refuse it as the contract gives them (plain dicts: a trainer may log or json.dumps them)."""

    def __init__(self, path: str, problems: list):
        self.path = path
        self.problems = as_dicts(problems)
        lines = [f"refusing to resume from {path}:"]
        for p in self.problems:
            lines.append(f"  [{p['code']}] {p['message']}" + (f"\n      fix: {p['fix']}" if p.get("fix") else ""))
        super().__init__("\n".join(lines))

    def __reduce__(self):  # pickled whole (a process pool, a launcher carrying it to another rank)
        return type(self), (self.path, self.problems)


SNAPSHOT_LIMIT = 100_000  # files whose identity a snapshot records (a checkpoint of more is rare; the rest unchecked)


@dataclass(frozen=True)
class Snapshot:
    """What the gate checked, by the identity of every file of the checkpoint: (device, inode, size, mtime_ns). A file
    replaced between the check and the library's load (a rolling save, a sync job renaming a new copy in) or
    rewritten in place changes it; `confirm_unchanged` after the load refuses such a resume. Not the ctime, which a
    backup hard-linking the files also changes."""

    path: str
    files: tuple

    @classmethod
    def of(cls, path: str) -> "Snapshot":
        entries = []
        walk = os.walk(path) if os.path.isdir(path) else [(os.path.dirname(path) or ".", [],
                                                           [os.path.basename(path)])]
        for folder, dirs, names in walk:
            dirs.sort()
            for name in sorted(names):
                full = os.path.join(folder, name)
                try:
                    st = os.stat(full)
                except OSError:
                    continue
                entries.append((full, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
                if len(entries) >= SNAPSHOT_LIMIT:
                    return cls(path, tuple(entries))
        return cls(path, tuple(entries))

    def changed(self) -> list[str]:
        """The files added, removed, replaced or rewritten since the snapshot was taken."""
        now = {e[0]: e for e in Snapshot.of(self.path).files}
        then = {e[0]: e for e in self.files}
        return sorted(f for f in set(now) | set(then) if now.get(f) != then.get(f))


def confirm_unchanged(report: "GateReport"):
    """Raise ResumeGateError if any file of the checkpoint the gate passed changed since (the hooks call it after the
    library loaded): the bytes checked must be the bytes loaded."""
    changed = report.snapshot.changed() if report.snapshot is not None else []
    if changed:
        names = [os.path.relpath(f, report.path) if os.path.isdir(report.path) else f for f in changed[:5]]
        raise ResumeGateError(report.path, [Problem(Code.CHECKSUM_MISMATCH, ERROR,
                                                    f"{', '.join(names)}{' ...' if len(changed) > 5 else ''} changed "
                                                    "between the gate's check and the library's load (replaced or "
                                                    "rewritten: a save or a sync still writing into it?); what was "
                                                    "loaded is not what was checked, so this resume must not go on",
                                                    fix="stop what writes into the checkpoint, then resume again")])


def as_dicts(problems: list) -> list[dict]:
    """The gate's problems as the contract gives them to trainers: plain dicts (Problems turned into them here, at the
    API's edge; dicts a caller built are taken as they are)."""
    return [p.to_json() if isinstance(p, Problem) else dict(p) for p in problems]


@dataclass
class GateReport:
    path: str
    step: int | None
    problems: list = field(default_factory=list)  # warnings only when it passed: dicts, as ResumeGateError's
    snapshot: Snapshot | None = None  # the checkpoint's files as the gate found them before reading them

    def __post_init__(self):
        self.problems = as_dicts(self.problems)

    @property
    def ok(self) -> bool:
        return not any(p["severity"] == ERROR for p in self.problems)


def _fix(problem: Problem, path: str, model_file: str | None) -> str | None:
    """What to run about `problem` of the checkpoint at `path`."""
    code = problem.code
    run_dir = os.path.dirname(os.path.abspath(path))
    if code in DAMAGE:
        return f"resume from an earlier intact checkpoint: ckpttool latest --for-resume {run_dir}"
    if code == Code.STEP_MISMATCH:
        return f"see which step source is wrong with `ckpttool verify {path}`, then fix the config or pick the " \
               "checkpoint that matches"
    if code == Code.WEIGHTS_ONLY:
        return "point the resume at the training-state dir named above, not at exported weights"
    if code in (Code.MISSING_OPTIMIZER, Code.MISSING_SCHEDULER):
        return "this checkpoint cannot continue the schedule; resume from a full training-state checkpoint " \
               f"(ckpttool latest --for-resume {run_dir}) or start the schedule deliberately from scratch"
    if code == Code.UNSAFE_PICKLE:
        return "load it only if you trust where it came from; or re-save the tensors with `ckpttool convert`"
    if code in (Code.QUANTIZED_KEYS, Code.KEY_MISMATCH) and model_file:
        option = "--dequantize" if code == Code.QUANTIZED_KEYS else problem.remap
        if not option:
            return None
        suffix = "dequantized" if code == Code.QUANTIZED_KEYS else "remapped"
        if os.path.isdir(path):  # a state dir is remapped whole: the other files come along, the manifest is renewed
            target = f"{os.path.normpath(path)}-{suffix}"
            return f"ckpttool remap {path} {target} {option}, then resume from {target}"
        stem, ext = os.path.splitext(model_file)
        return f"ckpttool remap {model_file} {stem}-{suffix}{ext} {option}"
    return None


def _prefixes(keys, others: set):
    """Each prefix ending in "." that turns a key of `keys` into one of `others` when taken off it, once each."""
    seen = set()
    for key in keys:
        dot = key.find(".")
        while dot != -1:
            prefix = key[:dot + 1]
            if key[dot + 1:] in others and prefix not in seen:
                seen.add(prefix)
                yield prefix
            dot = key.find(".", dot + 1)


def _prefix_remap(ckpt_keys, model_keys) -> str | None:
    """The --strip-prefix/--add-prefix option that turns the checkpoint's keys into the model's, if one does, tried
    from every key (not the first alone: a counter such as `averaged_steps` beside `module.`-prefixed weights has no
    counterpart). Top-level names without a "." (counters, not weights) need not map."""
    model_set, ckpt_set = set(model_keys), set(ckpt_keys)
    weights = [k for k in ckpt_keys if "." in k]
    for prefix in _prefixes(weights, model_set):
        if all(k[len(prefix):] in model_set for k in weights if k.startswith(prefix)):
            return f"--strip-prefix {prefix}"
    for prefix in _prefixes(model_keys, ckpt_set):
        if weights and all(prefix + k in model_set for k in weights):
            return f"--add-prefix {prefix}"
    return None


def _several(live) -> list:
    """The live objects of one kind: none, one, or a list of them (every model an Accelerator prepared)."""
    return [] if live is None else list(live) if isinstance(live, (list, tuple)) else [live]


def _part(ckpt, role: str, index: int):
    """The saved part the index-th live object of `role` loads from: Accelerate names them model, model_1, ...
    (optimizer_1, scheduler_1); the first may be any component of that role."""
    if index == 0:
        return ckpt.component(role)
    return next((c for c in ckpt.components if c.name == f"{role}_{index}"), None)


def _missing_part(role: str, index: int, count: int) -> Problem:
    return Problem(Code.MISSING_FILE, ERROR,
                   f"the run prepared {count} {role}s, but the checkpoint holds no {role}_{index}: load_state "
                   "would load the others into place and then fail on it")


def _model_problems(ckpt, model, comp=None) -> tuple[list[Problem], str | None]:
    from ckpttool.operations.diff import model_tensors, problems_of

    comp = comp or ckpt.model
    if comp is None:
        return [], None
    model_file = next((f for f in comp.files if f.endswith((".safetensors", ".bin", ".pt", ".pth"))), None)
    live = model_tensors(model)
    report = compare(comp.tensors, live, labels=("the checkpoint", "the model"))
    tied = _tied_and_present(model, report)
    report.only_b = [k for k in report.only_b if k not in tied]
    problems = problems_of(report, "the checkpoint", "the model", dtype_severity=WARNING, strict=True)
    if tied:  # safetensors saving drops tied copies (save_model, transformers' save_pretrained); loading re-ties
        problems.append(Problem(Code.KEY_MISMATCH, WARNING,
                                f"{', '.join(sorted(tied)[:5])} not in the checkpoint, but tied in the model to "
                                f"{', '.join(sorted(set(tied.values()))[:5])}, which it holds: load with "
                                "strict=False (as transformers does) or re-tie after loading"))
    if report.rules:  # keys match only after a prefix rule: say which remap option fixes the load
        prefix_problem = next(p for p in problems if p.code is Code.KEY_MISMATCH)
        prefix_problem.remap = _prefix_remap([t.name for t in comp.tensors], [t.name for t in live])
    return problems, model_file


def _tied_and_present(model, report) -> dict[str, str]:
    """Model keys the checkpoint lacks that share storage with a key it holds (tied weights): {missing: present}."""
    pointers = {}
    for key, value in model.state_dict().items():
        storage = value.untyped_storage()
        if value.device.type == "meta" or not storage.nbytes():  # every meta tensor points at 0: none is tied
            continue
        pointers.setdefault((str(value.device), storage.data_ptr(), storage.nbytes()), []).append(key)
    present = {key for key, _, _ in report.common}
    tied = {}
    for group in pointers.values():
        held = [k for k in group if k in present]
        for key in group:
            if held and key in report.only_b:
                tied[key] = held[0]
    return tied


def _optimizer_problems(ckpt, optimizer, comp=None) -> list[Problem]:
    comp = comp or ckpt.component("optimizer")
    saved = comp.tree if comp is not None else None
    if not isinstance(saved, dict) or not isinstance(saved.get("param_groups"), list):
        return []
    live = optimizer.state_dict()["param_groups"]
    saved_groups = saved["param_groups"]
    saved_sizes = [len(g.get("params", [])) if isinstance(g, dict) else 0 for g in saved_groups]
    live_sizes = [len(g["params"]) for g in live]
    if saved_sizes != live_sizes:
        return [Problem(Code.OPTIMIZER_MISMATCH, ERROR,
                        f"the saved optimizer has parameter groups of sizes {saved_sizes}, the live one "
                        f"{live_sizes}: load_state_dict would refuse it (different trainable parameters?)")]
    problems = []
    shapes = {}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for t in comp.tensors:  # only the moments kept in the parameter's own shape: Adafactor's row and column
        m = MOMENT.fullmatch(t.name)  # factors and 8-bit states' absmax are smaller by design
        if m and m.group(1) is None and int(m.group(2)) < len(params):
            param = params[int(m.group(2))]
            if t.shape and tuple(t.shape) != tuple(param.shape):
                shapes[int(m.group(2))] = (t.name, list(t.shape), list(param.shape))
    for index, (name, saved_shape, live_shape) in sorted(shapes.items()):
        problems.append(Problem(Code.SHAPE_MISMATCH, ERROR,
                                f"optimizer {name}: saved {saved_shape}, parameter {index} is {live_shape}",
                                key=name))
    return problems


def _scheduler_problems(saved, scheduler) -> list[Problem]:
    """The saved scheduler state against the live scheduler's: a state without a key the live class keeps in its
    own (LambdaLR's lr_lambdas, StepLR's step_size) comes from another class, and load_state_dict raises (KeyError)
    or leaves that setting as the fresh run has it. Private keys (`_is_initial`, `_get_lr_called_within_step`) come
    and go between torch versions and only warn."""
    live = scheduler.state_dict()
    if not isinstance(saved, dict) or not isinstance(live, dict):
        return []
    saved_keys, live_keys = set(map(str, saved)), set(map(str, live))
    if saved_keys == live_keys:
        return []
    kind = type(getattr(scheduler, "scheduler", scheduler)).__name__  # Accelerate wraps the scheduler it prepared
    missing = sorted(k for k in live_keys - saved_keys if not k.startswith("_") and k != "verbose")
    if missing:
        return [Problem(Code.SCHEDULER_MISMATCH, ERROR,
                        f"the saved scheduler state lacks {', '.join(missing[:6])}, which the live {kind} keeps: "
                        "it was saved by another scheduler class, and loading it into this one fails (LambdaLR: "
                        "KeyError 'lr_lambdas') or silently keeps the fresh run's settings; build the scheduler "
                        "the run was saved with")]
    return [Problem(Code.SCHEDULER_MISMATCH, WARNING,
                    f"saved scheduler state has keys {sorted(saved_keys)[:6]}, the live {kind} "
                    f"{sorted(live_keys)[:6]}: saved by another torch version, or another scheduler class?")]


def _trainable_count_problems(ckpt, model) -> list[Problem]:
    """Without the live optimizer: the parameters the saved optimizers cover against the model's trainable ones. An
    optimizer built over the same model covers each once; a different count means another set of trainable
    parameters (a frozen or added layer), which load_state_dict refuses, unless the optimizer deliberately covers a
    subset: a warning, which the live optimizer turns into a verdict."""
    saved = 0
    for comp in ckpt.components:
        if comp.role != "optimizer":
            continue
        groups = comp.tree.get("param_groups") if isinstance(comp.tree, dict) else None
        if not isinstance(groups, list):
            return []
        saved += sum(len(g.get("params", [])) if isinstance(g, dict) else 0 for g in groups)
    trainable = sum(1 for p in model.parameters() if p.requires_grad)
    if not saved or saved == trainable:
        return []
    return [Problem(Code.OPTIMIZER_MISMATCH, WARNING,
                    f"the saved optimizer state covers {saved} parameters, the live model has {trainable} "
                    "trainable ones: unless the optimizer covers only some of them, load_state_dict will refuse "
                    "it (pass optimizer= to the gate to know)")]


def live_world_size() -> int:
    """The processes of this run: torch.distributed's world when it is up, else torchrun's WORLD_SIZE, else 1."""
    import sys

    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def _world_size_problems(ckpt, live: int) -> list[Problem]:
    """The world size the checkpoint was saved with against the live one, and what follows: DCP reshards on load;
    DeepSpeed ZeRO loads each rank's partition by rank; Accelerate's and transformers' RNG files are one per rank."""
    from ckpttool.trainers.contract import world_size as dcp_ranks

    problems = []
    zero = ckpt.metadata.get("data_parallel_world_size")
    if zero and zero != live:
        tag = ckpt.path
        problems.append(Problem(Code.WORLD_SIZE_MISMATCH, ERROR,
                                f"saved by {zero} data-parallel ranks under ZeRO-{ckpt.metadata.get('zero_stage')},"
                                f" resuming with {live}: DeepSpeed loads each rank's optimizer partition by rank",
                                fix="convert it to a universal checkpoint (python -m "
                                f"deepspeed.checkpoint.ds_to_universal --input_folder {tag} --output_folder "
                                f"{tag}_universal) and load that with checkpoint: {{load_universal: true}}, or resume "
                                "with the same number of ranks"))
    ranks = sorted({int(m.group(1)) for f in ckpt.files if (m := RNG_FILE.fullmatch(os.path.basename(f)))})
    saved = len(ranks) if ranks else 1 if any(os.path.basename(f) in ("rng_state.pth",) for f in ckpt.files) else 0
    if saved and saved != live and not zero:
        what = (f"ranks {saved} to {live - 1} start with fresh RNG state" if live > saved else
                f"the RNG state of ranks {live} to {saved - 1} is not used")
        problems.append(Problem(Code.WORLD_SIZE_MISMATCH, WARNING,
                                f"saved by {saved} processes (one RNG file each), resuming with {live}: {what}; "
                                "the resume works but is not bit-exact" +
                                (f" (the DCP state reshards from {dcp_ranks(ckpt)} ranks on load)"
                                if dcp_ranks(ckpt) > 1 else "")))
    return problems


def live_parallel_layout() -> dict:
    """The live Megatron run's model-parallel sizes, by the names its args use, where megatron.core's parallel_state
    is imported and initialised (nothing is imported for it); else {}."""
    import sys

    mpu = sys.modules.get("megatron.core.parallel_state")
    try:
        if mpu is None or not mpu.model_parallel_is_initialized():
            return {}
        return {"tensor_model_parallel_size": mpu.get_tensor_model_parallel_world_size(),
                "pipeline_model_parallel_size": mpu.get_pipeline_model_parallel_world_size(),
                "data_parallel_size": mpu.get_data_parallel_world_size()}
    except (AttributeError, RuntimeError, AssertionError):
        return {}


def _parallel_problems(ckpt, live: dict) -> list[Problem]:
    """The model-parallel layout a Megatron checkpoint was saved with against the live one: the legacy per-rank files
    are not resharded (check_checkpoint_args asserts equal tensor and pipeline sizes); a torch_dist save is, except
    the distributed optimizer's dp_reshardable state across a data-parallel change (load_checkpoint raises)."""
    saved = ckpt.metadata.get("megatron") or {}
    names = {"tensor_model_parallel_size": "tensor", "pipeline_model_parallel_size": "pipeline"}
    if ckpt.metadata.get("megatron_legacy"):
        differ = [f"{names[k]}-parallel {saved[k]} saved, {live[k]} live" for k in names
                  if type(saved.get(k)) is int and type(live.get(k)) is int and saved[k] != live[k]]
        if differ:
            return [Problem(Code.WORLD_SIZE_MISMATCH, ERROR, f"{'; '.join(differ)}: the legacy format (--ckpt-format "
                            "torch) keeps one file per model-parallel rank and is not resharded on load; Megatron's "
                            "check_checkpoint_args raises AssertionError", ckpt.path,
                            fix="resume with the sizes it was saved with, or convert it with Megatron's "
                            "tools/checkpoint/convert.py to the live sizes")]
        return []
    dp_saved, dp_live = saved.get("data_parallel_size"), live.get("data_parallel_size")
    if saved.get("distrib_optim_sharding_type") == "dp_reshardable" and type(dp_saved) is int and \
            type(dp_live) is int and dp_saved != dp_live:
        return [Problem(Code.WORLD_SIZE_MISMATCH, ERROR, f"data-parallel {saved['data_parallel_size']} saved, "
                        f"{live['data_parallel_size']} live, with the distributed optimizer's dp_reshardable state: "
                        "Megatron's load_checkpoint raises RuntimeError", ckpt.path,
                        fix="resume with the data-parallel size it was saved with, or save with "
                        "--dist-ckpt-optim-fully-reshardable")]
    return []


def check_resume(path, model=None, optimizer=None, scheduler=None, expected_step=None, *, require_manifest=False,
                 world_size=None, parallel=None):
    """Gate a resume from `path`. Returns a GateReport (with any warnings) or raises ResumeGateError, and nothing
    else: a checkpoint too malformed even to be read is refused, never an exception of the reader's escaping into
    the trainer. `model`, `optimizer` and `scheduler` may each be a list (every one an Accelerator prepared: the
    i-th is compared with model_i, optimizer_i, scheduler_i). `world_size`: the live run's number of processes (by
    default torch.distributed's, else WORLD_SIZE, else 1). `parallel`: a Megatron run's live sizes by its args' names
    (tensor_model_parallel_size, pipeline_model_parallel_size, data_parallel_size; by default megatron.core's
    parallel_state where it is initialised)."""
    path = os.fspath(path)
    if parallel is not None and not (isinstance(parallel, dict) and all(
            type(v) is int and v > 0 for v in parallel.values())):  # the caller's mistake, never the checkpoint's
        raise TypeError(f"check_resume(parallel=...) takes a dict of positive ints by Megatron's args names "
                        f"(tensor_model_parallel_size, ...), not {parallel!r:.80}")
    try:
        return _check_resume(path, model, optimizer, scheduler, expected_step, require_manifest=require_manifest,
                             world_size=world_size, parallel=parallel)
    except UsageError as e:
        raise ResumeGateError(path, [Problem(Code.MISSING_FILE, ERROR, str(e))]) from None
    except CkptError as e:
        raise ResumeGateError(path, [Problem(e.code, ERROR, str(e))]) from None
    except (RecursionError, MemoryError, ArithmeticError, ValueError, TypeError, AttributeError, KeyError, IndexError,
            OSError) as e:
        raise ResumeGateError(path, [Problem(Code.CORRUPT, ERROR, f"{path} cannot be read "
                                      f"({type(e).__name__}: {str(e)[:200]}); resume from another checkpoint")]) \
            from None


def _check_resume(path, model, optimizer, scheduler, expected_step, *, require_manifest, world_size, parallel=None):
    before = Snapshot.of(path)
    report, ckpt = verify_checkpoint(path, for_resume=True, expect_step=expected_step,
                                     require_manifest=require_manifest)
    problems = list(report.problems)
    model_file = None
    if not any(p.code in DAMAGE for p in errors(problems)):  # damaged: nothing to compare
        models, optimizers, schedulers = _several(model), _several(optimizer), _several(scheduler)
        if ckpt is not None:
            for i, live in enumerate(models):
                comp = _part(ckpt, "model", i)
                if i and comp is None:
                    problems.append(_missing_part("model", i, len(models)))
                    continue
                found, file = _model_problems(ckpt, live, comp)
                problems += found
                model_file = model_file or file
            for i, live in enumerate(optimizers):
                comp = _part(ckpt, "optimizer", i)
                problems += [_missing_part("optimizer", i, len(optimizers))] if i and comp is None else \
                    _optimizer_problems(ckpt, live, comp)
            if models and not optimizers:
                problems += _trainable_count_problems(ckpt, models[0])
            problems += _world_size_problems(ckpt, world_size or live_world_size())
            problems += _parallel_problems(ckpt, parallel if parallel is not None else live_parallel_layout())
            for i, live in enumerate(schedulers):
                comp = _part(ckpt, "scheduler", i)
                if i and comp is None:
                    problems.append(_missing_part("scheduler", i, len(schedulers)))
                elif comp is not None:
                    problems += _scheduler_problems(comp.tree, live)
    for p in problems:
        p.fix = _fix(p, path, model_file) or p.fix
    if refusals := errors(problems):
        raise ResumeGateError(path, refusals)
    passed = GateReport(path, report.step, problems, before)
    confirm_unchanged(passed)  # nothing changed while it was being checked, either
    return passed


def latest_valid(run_dir, model=None, optimizer=None, scheduler=None, expected_step=None, *, require_manifest=False,
                 world_size=None, model_for=None) -> str | None:
    """The path of `latest_passing`'s report (see there), or None."""
    report = latest_passing(run_dir, model, optimizer, scheduler, expected_step, require_manifest=require_manifest,
                            world_size=world_size, model_for=model_for)
    return report.path if report is not None else None


def latest_passing(run_dir, model=None, optimizer=None, scheduler=None, expected_step=None, *, require_manifest=False,
                   world_size=None, model_for=None) -> GateReport | None:
    """The gate's report on the newest checkpoint under `run_dir` that passes it (its snapshot for
    `confirm_unchanged` after the load), for any trainer ckpttool recognises (ordered by the
    number in its name, as `ckpttool latest` does); each newer one it skips is logged (logger "ckpttool.gate") with
    its codes. None when none passes, or `run_dir` is no directory. `model_for(path)`: what to compare a candidate
    with, where that depends on the checkpoint (a PEFT model and an adapter checkpoint)."""
    from ckpttool.discovery import discover

    run_dir = os.fspath(run_dir)
    if not os.path.isdir(run_dir):
        log.warning("no checkpoints: %s is not a directory", run_dir)
        return None
    for candidate in discover(run_dir):
        if candidate.skip:
            log.warning("skipping %s: missing_file: %s", candidate.path, candidate.skip)
            continue
        try:
            report = check_resume(candidate.path, model=model_for(candidate.path) if model_for else model,
                                  optimizer=optimizer, scheduler=scheduler, expected_step=expected_step,
                                  require_manifest=require_manifest, world_size=world_size)
        except ResumeGateError as e:
            log.warning("skipping %s: %s: %s", candidate.path, ", ".join(sorted({p["code"] for p in e.problems})),
                        e.problems[0]["message"])
            continue
        log.info("resuming from %s", candidate.path)
        return report
    log.warning("no checkpoint under %s passes the gate", run_dir)
    return None
