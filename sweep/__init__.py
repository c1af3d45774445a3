"""`python -m sweep` (`make sweep`): every file of healthy checkpoints the real libraries wrote is deleted, cut to half
its size and emptied, one at a time, in a copy of its run; each damaged copy goes through `inspect`, `verify
--for-resume`, the gate and `repair`'s plan, and `latest --for-resume`, `prune` (its plan) and `report` on the run, and
the outcome must be the one the trainer's resume contract (ckpttool/trainers/contract.py) says:
  - an error where the trainer's own resume fails or loses state, a warning where it loses only reproducibility,
    nothing new for a file the contract lists as not read on resume;
  - never an exception, never a file that no contract part and no not-read rule accounts for;
  - `latest --for-resume` never picks a copy whose damage is an error, and `repair` never calls it healthy.
Layouts without a profile contract (a single .pt or .ckpt file, a DCP dir, a DeepSpeed save) are read whole by their
format reader: any damage there is an error, except in the files the DeepSpeed engine never reads.

Then every file of the newest checkpoint is replaced by the same file of the run's previous checkpoint (`stale`: a
rank that failed to write, an interrupted copy, a backup restored over it): a file carrying a counter whose value
differs between the two saves must give an error, and so must every file of a sealed checkpoint (one with a
ckpttool manifest); the others can be told stale only by checksums, and are listed (`only_checksums`).
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass

os.environ.setdefault("CKPTTOOL_CACHE_DIR", "")  # every verify is a full one

from ckpttool.model import (  # noqa: E402
    EPOCH, ERROR, GLOBAL_STEP, OPTIMIZER_UPDATES, SCHEDULER_STEPS, SKIPPED_UPDATES, WARNING, Code, Problem,
    VerifyReport, errors)

from ckpttool.synthetic.damage import EMPTY, MISSING, STALE, TRUNCATED, damage_file  # noqa: E402
from fixtures import DATA, sample  # noqa: E402

MODES = (MISSING, TRUNCATED, EMPTY)  # the damage kinds `ckpttool fixtures` names; STALE: the previous save's copy
NOT_READ_ANYWHERE = (("zero_to_fp32.py", "DeepSpeed's consolidation script, copied in for users"),)


@dataclass(frozen=True)
class Target:
    """A healthy checkpoint to damage: `checkpoint` inside the run folder `run` (copied whole, so that the run's
    other checkpoints are there as a resume would find them)."""
    name: str
    run: str
    checkpoint: str  # relative to run
    stale_only: bool = False  # a sealed run: only its files swapped for the previous save's (each must be an error)


@dataclass
class Case:
    target: Target
    file: str  # relative to the checkpoint ("" when the checkpoint is the file)
    mode: str  # one of MODES, or STALE
    expected: str | None  # ERROR, WARNING, or None (nothing new)
    why: str
    source: str | None = None  # STALE: the previous checkpoint's copy of the file
    outcome: str | None = None  # the worst new severity verify reported
    failure: str | None = None  # why the case failed, or None

    @property
    def label(self) -> str:
        return f"{self.target.name}: {self.mode} {self.file or os.path.basename(self.target.checkpoint)}"


def targets(runs: dict[str, str], corpus: dict[str, str] | None = None, reference: str | None = None,
            sealed: dict[str, str] | None = None) -> list[Target]:
    """The newest checkpoint of every real-library run the tests build (`runs`: ckpttool.synthetic.runs.build_runs), of
    every committed real-run sample (fixtures.sample), of the state dirs of the fixture corpus that Accelerate's
    save_state wrote with the kohya, SimpleTuner and diffusers hooks (`corpus`: fixtures.generate.build), and of a
    reference-trainer run (`reference`)."""
    found = []
    for name, run in sorted(runs.items()):
        if name == "peft":
            found.append(Target(name, os.path.dirname(run), os.path.basename(run)))
        elif name.startswith("lightning"):
            found.append(Target(name, run, _newest(run, lambda e: e.endswith(".ckpt") and "step=" in e)))
        elif name == "torchtitan":
            found.append(Target(name, run, _newest(run, lambda e: e.startswith("step-"))))
        else:
            found.append(Target(name, run, _newest(run, lambda e: e.startswith("checkpoint"))))
    data = os.path.abspath(DATA)
    for name in ("transformers", "accelerate"):
        run = os.path.join(data, "fp16", name)
        found.append(Target(f"fp16_{name}", run, _newest(run, lambda e: e.startswith("checkpoint"))))
    found.append(Target("fp16_lightning", os.path.join(data, "fp16", "lightning"), "epoch=0-step=10.ckpt"))
    found.append(Target("transformers4_bin", os.path.join(data, "transformers4_bin"), "checkpoint-4"))
    for name in ("transformers_zero2", "fp16_transformers"):
        run = os.path.join(data, "deepspeed", name)
        found.append(Target(f"deepspeed_{name}", run, _newest(run, lambda e: e.startswith("checkpoint"))))
    for name in ("zero2", "zero3", "zero2_bf16", "fp16_zero2"):
        save = sample("deepspeed", name)
        found.append(Target(f"deepspeed_{name}", os.path.dirname(save), name))
    found.append(Target("cuda_accelerate_fp16", os.path.join(data, "cuda"), "accelerate_fp16"))
    for name, newest in (("full", "epoch_1"), ("lora", "epoch_0"), ("meta", "epoch_0"), ("dcp", "dist_epoch_1")):
        found.append(Target(f"torchtune_{name}", sample("torchtune", name), newest))
    found.append(Target("megatron_torch_dist", sample("megatron", "torch_dist_tp2"), "iter_0000010"))
    found.append(Target("megatron_legacy", os.path.join(data, "megatron", "legacy_tp2"), "iter_0000010"))
    found.append(Target("megatron_core019", os.path.join(data, "megatron", "torch_dist_core019"), "iter_0000010"))
    found.append(Target("composer", sample("composer", "run"), "ep0-ba6-rank0.pt"))
    found.append(Target("composer_sharded", os.path.join(data, "composer", "sharded"), "ep0-ba4"))
    found.append(Target("nemo", sample("nemo", "checkpoints"),
                        "default--val_loss=2.1200-epoch=0-consumed_samples=32.0-last"))
    for name, save in (("run", "mylora.safetensors"), ("midrun", "mylora_000000004.safetensors"),
                       ("diffusers_save", "mylora_000000004")):
        found.append(Target(f"aitoolkit_{name}", sample("aitoolkit", name, "mylora"), save))
    for name in ("workspace", "workspace_ema"):
        backup = sample("onetrainer", name, "backup")
        found.append(Target(f"onetrainer_{name}", backup, _newest(backup, lambda e: "-backup-" in e)))
    for name in sorted(os.listdir(os.path.join(data, "fsdp"))):
        run = os.path.join(data, "fsdp", name)
        found.append(Target(name, run, _newest(run, lambda e: e.startswith("checkpoint") or e.endswith(".ckpt"))))
    for key in ("kohya_step_state", "simpletuner", "accelerate", "diffusers_lora") if corpus else ():
        path = corpus[key]
        found.append(Target(f"corpus_{key}", os.path.dirname(path), os.path.basename(path)))
    if reference:
        found.append(Target("reference_trainer", reference, _newest(reference, lambda e: e.startswith("checkpoint"))))
    for name, run in sorted((sealed or {}).items()):  # a single-file save swapped whole is told by its name already
        if name != "lightning":
            found.append(Target(f"sealed_{name}", run, _newest(run, lambda e: e.startswith("checkpoint")), True))
    found.append(Target("sealed_deepspeed_zero2", os.path.join(data, "deepspeed"), "sealed_zero2", True))
    return found


def reference_run(out: str) -> str:
    """A run of the reference trainer (python -m trainer), saving every 2 of 4 steps."""
    import subprocess

    subprocess.run([sys.executable, "-m", "trainer", "--output-dir", out, "--max-steps", "4", "--checkpointing-steps",
                    "2", "--batch-size", "8"], check=True, capture_output=True,
                   cwd=os.path.join(os.path.dirname(__file__), ".."))
    return out


def _newest(run: str, wanted) -> str:
    import re

    names = [e for e in os.listdir(run) if wanted(e)]
    return max(names, key=lambda e: [int(n) for n in re.findall(r"\d+", e)] or [0])


PER_KIND = 6  # files of one kind (names alike but for their numbers) damaged per checkpoint


def files_of(path: str) -> list[str]:
    """The files of a checkpoint to damage in turn; of many files alike but for their numbers (a DCP dir written one
    file per item, as torchtune's is: 110 `__0_N.distcp`), an evenly spread PER_KIND, the first and last among them:
    each is read by the same rule, and damaging every one would cost the sweep minutes and show nothing more."""
    import re

    if os.path.isfile(path):
        return [""]
    every = sorted(os.path.relpath(os.path.join(d, f), path) for d, _, names in os.walk(path) for f in names)
    kinds: dict[str, list[str]] = {}
    for rel in every:
        kinds.setdefault(re.sub(r"\d+", "#", rel), []).append(rel)
    kept = set()
    for members in kinds.values():
        step = max(1, (len(members) - 1) / (PER_KIND - 1)) if len(members) > PER_KIND else 1
        kept |= {members[round(i * step)] for i in range(min(len(members), PER_KIND))} | {members[-1]}
    return [rel for rel in every if rel in kept]


def expectation(healthy: str, rel: str, mode: str) -> tuple[str | None, str]:
    """What damaging `rel` in the checkpoint `healthy` must give, and why: from its trainer's resume contract."""
    from ckpttool.trainers import contract as terms

    name = os.path.basename(rel)
    if any(name == n for n, _ in NOT_READ_ANYWHERE):
        return None, "not read"
    ckpt, profile, deal = _understood(healthy)
    if deal is None:
        tag = ckpt.metadata.get("tag_from") and os.path.relpath(ckpt.path, healthy)
        if tag and os.sep in rel and rel.split(os.sep)[0] != tag:
            return None, "not read: load_checkpoint(tag=None) loads only the tag `latest` names"
        return ERROR, "read whole by its format reader"
    top = rel.split(os.sep)[0] + ("/" if os.sep in rel else "")
    if any(terms.re.fullmatch(p, top) for p, _ in deal.not_read):
        return None, "not read on resume"
    part = next((p for p in deal.parts if p.matches([top], healthy)), None)
    if part is None:
        return "unaccounted", f"{top} is in no part of {profile.name}'s contract"
    if os.sep in rel or mode != MISSING:
        return part.damaged, f"{part.what}: damaged"
    listing = terms.entries(healthy)
    if part in deal.model and not any(e != top for p in deal.model for e in p.matches(listing, healthy)):
        return ERROR, "the only model weights"
    if part.core:
        return ERROR, f"{part.what}: core"
    sibling = terms.nearest_sibling(healthy, profile.run_saves(healthy),
                                    next((s.value for s in profile.name_counters(healthy)), None))
    theirs = part.matches(terms.entries(sibling), sibling) if sibling else []
    if part.absent in (ERROR, WARNING):
        if part.series and len(part.matches(listing, healthy)) > 1 and part.number(top) == max(
                part.number(e) for e in part.matches(listing, healthy)) and not theirs and not part.several \
                and not (part.per_rank and terms.world_size(ckpt) > part.number(top)):
            return None, "the last of a series, and no other checkpoint of the run to show it"
        return part.absent, f"{part.what}: absent"
    if part.absent == terms.RUN and (part.stepped and theirs or top in theirs):
        return ERROR, f"{part.what}: the run's other checkpoints have it"
    if part in deal.model:
        return None, f"{part.what}: another model part holds the model"
    return None, f"{part.what}: read only when present"


@functools.lru_cache(maxsize=8)
def _understood(healthy: str):
    """The healthy checkpoint, its trainer profile and resume contract (None for a file), read once per target."""
    from ckpttool import trainers
    from ckpttool.checkpoint import open_checkpoint

    ckpt = open_checkpoint(healthy)
    profile = trainers.profile_of(ckpt)
    return ckpt, profile, profile.resume_contract(ckpt) if os.path.isdir(healthy) else None


def baseline(target: Target, work: str) -> set:
    """The problems of the healthy checkpoint in a copy at `work` (what damage is told apart from)."""
    from ckpttool.operations.verify import verify

    copy = os.path.join(work, "run")
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(target.run, copy, symlinks=True)
    return _keys(verify(os.path.join(copy, target.checkpoint), for_resume=True, recall=False), copy)


def run_case(case: Case, work: str, before: set) -> Case:
    from ckpttool.errors import UsageError
    from ckpttool.gate import ResumeGateError, check_resume
    from ckpttool.operations.inspect import inspect
    from ckpttool.operations.latest import latest
    from ckpttool.operations.prune import plan
    from ckpttool.operations.repair import plan as repair_plan
    from ckpttool.operations.report import report as run_report
    from ckpttool.operations.verify import verify

    target = case.target
    copy = os.path.join(work, "run")
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(target.run, copy, symlinks=True)
    checkpoint = os.path.join(copy, target.checkpoint)
    damage_file(os.path.join(checkpoint, case.file) if case.file else checkpoint, case.mode, case.source)
    try:
        report = verify(checkpoint, for_resume=True, recall=False)
        inspect(checkpoint)
        run = os.path.dirname(checkpoint)
        picked = latest(run, for_resume=True)["path"]
        plan(run, keep=1)
        run_report(run, for_resume=True)
        try:
            check_resume(checkpoint)
        except ResumeGateError:
            pass
        fixes = repair_plan(checkpoint).fixes
    except UsageError as e:
        case.failure = f"usage error instead of a report: {e}"
        return case
    except Exception as e:  # noqa: BLE001 - an escape is what the sweep exists to find
        case.failure = f"{type(e).__name__}: {e}"
        return case
    new = [p for p in report.problems if _key(p, copy) not in before]
    case.outcome = ERROR if errors(new) else WARNING if new else None
    if case.expected == "unaccounted":
        case.failure = case.why
    elif case.expected == ERROR and case.outcome != ERROR:
        case.failure = f"expected an error ({case.why}), got {case.outcome or 'nothing new'}"
    elif case.expected == WARNING and case.outcome != WARNING:
        case.failure = f"expected a warning ({case.why}), got {case.outcome or 'nothing new'}"
    elif case.expected is None and case.outcome == ERROR and case.mode != STALE:  # a stale file is damage anyway
        case.failure = f"expected nothing new ({case.why}), got an error: {new}"
    elif case.outcome == ERROR and picked and os.path.abspath(picked) == os.path.abspath(checkpoint):
        case.failure = "latest --for-resume picked it"
    elif case.outcome == ERROR and not fixes:
        case.failure = "repair says there is nothing to repair"
    if case.failure and new:
        case.failure += " | " + "; ".join(f"{p.severity} {p.code}: {p.message[:160]}" for p in new)
    return case


def _key(problem: Problem, root: str) -> tuple:
    path = os.path.relpath(problem.path, root) if problem.path else ""
    return problem.code, problem.severity, path


def _keys(report: VerifyReport, root: str) -> set:
    return {_key(p, root) for p in report.problems}


def cases(target: Target, modes=MODES) -> list[Case]:
    healthy = os.path.join(target.run, target.checkpoint)
    found = []
    for rel in files_of(healthy):
        for mode in modes:
            if mode == MISSING and not rel:
                continue  # deleting the whole checkpoint leaves nothing to verify
            expected, why = expectation(healthy, rel, mode)
            found.append(Case(target, rel, mode, expected, why))
    return found


def previous(target: Target) -> tuple[str, str] | None:
    """(the newest checkpoint, the one saved before it) as folders whose files correspond by name: two checkpoints
    of the run, or two tags of a DeepSpeed save dir (the one `latest` names, and the one before); None where the run
    kept only one."""
    import re

    from ckpttool.formats import deepspeed

    healthy = os.path.join(target.run, target.checkpoint)
    if os.path.isdir(healthy) and os.path.isfile(os.path.join(healthy, deepspeed.LATEST)):
        run, newest = healthy, os.path.basename(deepspeed.tag_dir(healthy) or "")
    else:
        run, newest = target.run, target.checkpoint
    prefix = re.sub(r"\d+.*", "", newest)
    number = _numbers(newest)
    older = [e for e in os.listdir(run) if e != newest and e.startswith(prefix) and re.sub(r"\d+.*", "", e) == prefix
             and _numbers(e) < number and (os.path.isdir(os.path.join(run, e)) == os.path.isdir(healthy))]
    if not older:
        return None
    return os.path.join(run, newest), os.path.join(run, max(older, key=_numbers))


def _numbers(name: str) -> list[int]:
    import re

    return [int(n) for n in re.findall(r"\d+", name)]


def _counters(ckpt) -> dict[tuple[str, str], int]:
    """(file, counter) -> value of every counter the checkpoint states with the file it was read from, whose meaning
    lets it tell another save: steps, updates, scheduler steps, epochs; a counter of accumulation micro-steps (which
    restarts at each epoch's end) only where every process's file of one save carries it (ckpttool.steps)."""
    from ckpttool.steps import per_rank_values

    found = {}
    for s in ckpt.steps:
        if s.meaning in (GLOBAL_STEP, OPTIMIZER_UPDATES, SCHEDULER_STEPS, SKIPPED_UPDATES, EPOCH):
            for file, value in s.per_file or ((s.file, s.value),):
                if file:
                    found[(file, s.source)] = value
    for what, values in (per_rank_values(ckpt, ckpt.profile) if ckpt.profile else {}).items():
        found.update({(file, what): value for file, value in values.items()})
    return found


def _carried(counters: dict, rel: str) -> dict:
    return {k: v for k, v in counters.items() if not rel or rel == k[0] or rel.endswith(os.sep + k[0]) or
            k[0].endswith(os.sep + rel)}


def stale_cases(target: Target) -> list[Case]:
    """Every file of the newest checkpoint that the previous one also has (and not byte for byte the same), to be
    replaced by that copy; expected an error where it carries a counter whose value differs, or the checkpoint is
    sealed, else nothing (only checksums can tell: `only_checksums`)."""
    import filecmp

    from ckpttool.checkpoint import open_checkpoint
    from ckpttool.checksums import MANIFEST_NAME

    pair = previous(target)
    if pair is None:
        return []
    newest, older = pair
    healthy = os.path.join(target.run, target.checkpoint)
    inside = os.path.relpath(newest, healthy) if newest != healthy else ""
    ours, theirs = _counters(open_checkpoint(newest)), _counters(open_checkpoint(older))
    sealed = os.path.isfile(os.path.join(newest, MANIFEST_NAME)) or os.path.isfile(newest + ".ckpttool-manifest.json")
    found = []
    for rel in files_of(newest):
        source = os.path.join(older, rel) if rel else older
        if not os.path.isfile(source) or filecmp.cmp(source, os.path.join(newest, rel) if rel else newest,
                                                     shallow=False):
            continue
        mine, before = _carried(ours, rel), _carried(theirs, rel)
        moved = sorted(f"{label} {before[k]} -> {mine[k]}" for k in mine if k in before and before[k] != mine[k]
                       for label in [k[1]])
        if moved:
            expected, why = ERROR, "carries counters that differ: " + ", ".join(moved)
        elif sealed:
            expected, why = ERROR, "the checkpoint is sealed: its manifest tells any file from another save"
        else:
            expected, why = None, ONLY_CHECKSUMS
        found.append(Case(target, os.path.join(inside, rel) if inside else rel, STALE, expected, why, source))
    return found


ONLY_CHECKSUMS = "no counter in it differs: only checksums tell it"


def only_checksums(done: list[Case]) -> dict[str, list[str]]:
    """target -> the files whose stale copy went unreported, as only a manifest could tell them."""
    found: dict[str, list[str]] = {}
    for c in done:
        if c.mode == STALE and c.why == ONLY_CHECKSUMS and c.outcome is None:
            found.setdefault(c.target.name, []).append(c.file or os.path.basename(c.target.checkpoint))
    return found


def healthy_case(target: Target) -> Case:
    """The untouched checkpoint: it must verify for resume with no error (no false alarm); weights only (a PEFT
    adapter) it must verify clean, and a resume from it is refused as weights_only, with nothing else."""
    from ckpttool.operations.verify import verify

    case = Case(target, "", "none", None, "healthy")
    path = os.path.join(target.run, target.checkpoint)
    report = verify(path, for_resume=True, recall=False)
    refused = [p for p in errors(report.problems) if p.code != Code.WEIGHTS_ONLY]
    if any(p.code == Code.WEIGHTS_ONLY for p in report.problems):
        refused += errors(verify(path, recall=False).problems)
    case.outcome = ERROR if refused else WARNING if report.problems else None
    if refused:
        case.failure = "the healthy checkpoint is refused: " + "; ".join(f"{p.code}: {p.message[:160]}"
                                                                         for p in refused)
    return case


def sweep(selected: list[Target], modes=MODES, progress=None) -> tuple[list[Case], dict]:
    """The healthy checkpoint and every damaged copy of every target; (cases, tally)."""
    done = []
    with tempfile.TemporaryDirectory() as work:
        for target in selected:
            done.append(healthy_case(target))
            if progress:
                progress(done[-1])
            before = baseline(target, work)
            for case in cases(target, () if target.stale_only else modes) + stale_cases(target):
                done.append(run_case(case, work, before))
                if progress:
                    progress(done[-1])
    return done, tally(done, selected)


def tally(done: list[Case], selected: list[Target]) -> dict:
    stale = [c for c in done if c.mode == STALE]
    damaged = [c for c in done if c.mode not in ("none", STALE)]
    count = collections.Counter(c.outcome or ("not read" if c.why.startswith("not read") else "clean")
                                for c in damaged if not c.failure)
    return {"healthy checkpoints": len(selected),
            "healthy with warnings (or weights only)": sum(1 for c in done if c.mode == "none" and c.outcome),
            "damaged copies": len(damaged), "errors": count[ERROR], "warnings": count[WARNING],
            "not read": count["not read"], "clean (read only when present)": count["clean"],
            "stale copies": len(stale), "stale reported": sum(1 for c in stale if c.outcome),
            "stale with a differing counter": sum(1 for c in stale if c.why.startswith("carries")),
            "stale in sealed checkpoints": sum(1 for c in stale if c.why.startswith("the checkpoint is sealed")),
            "stale told only by checksums": sum(1 for c in stale if c.why == ONLY_CHECKSUMS and not c.outcome),
            "failed": sum(1 for c in done if c.failure)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", help="where the real-library runs are built (default: a temporary folder)")
    parser.add_argument("--only", action="append", default=[], help="sweep only targets whose name contains this")
    args = parser.parse_args(argv)
    from fixtures.generate import build
    from ckpttool.synthetic.runs import build_runs, build_sealed_runs

    with tempfile.TemporaryDirectory() as tmp:
        root = args.work or tmp
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(os.path.join(root, "reference"), ignore_errors=True)
        every = targets(build_runs(os.path.join(root, "runs")), build(os.path.join(root, "corpus")),
                        reference_run(os.path.join(root, "reference")), build_sealed_runs(os.path.join(root, "sealed")))
        selected = [t for t in every if not args.only or any(o in t.name for o in args.only)]
        done, counts = sweep(selected, progress=lambda c: c.failure and print(f"FAIL {c.label}: {c.failure}"))
    for key, value in counts.items():
        print(f"{key:32} {value}")
    print("\nstale files no counter tells (only a manifest catches them):")
    for name, files in sorted(only_checksums(done).items()):
        print(f"  {name}: {', '.join(files)}")
    return 1 if counts["failed"] else 0
