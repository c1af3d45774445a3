"""`ckpttool verify`: every check that applies to a checkpoint, each reported with its result."""

from __future__ import annotations

import json
import os
import re

from ckpttool import checksums, discovery, hashing, steps, trainers
from ckpttool.checkpoint import guess_format
from ckpttool.checksums import crc_problems
from ckpttool.dtypes import SCANNED_FOR_NONFINITE
from ckpttool.errors import CkptError, UsageError
from ckpttool.model import ERROR, WARNING, Checkpoint, CheckResult, Code, Problem, Status, VerifyReport, errors

PASS, FAIL, WARN, NOTE, SKIP = Status.PASS, Status.FAIL, Status.WARN, Status.NOTE, Status.SKIP


class Verification:
    """Collects (check, status, detail) rows and the problems behind them."""

    def __init__(self, path):
        self.path = path
        self.checks: list[CheckResult] = []
        self.problems: list[Problem] = []
        self.manifest: tuple[str, dict, str] | None = None  # (path, document, its digest) checked against

    def check(self, name, status, detail=""):
        self.checks.append(CheckResult(name, status, detail))

    def problem(self, code, severity, message, path=None, key=None):
        self.problems.append(Problem(code, severity, message, path, key))

    def from_problems(self, name, problems, clean_detail):
        """One check row summarising problems already found (by the reader, say)."""
        self.problems.extend(problems)
        worst = FAIL if errors(problems) else WARN if problems else PASS
        self.check(name, worst, "; ".join(f"{p.code}: {p.message}" for p in problems) or clean_detail)


# --- integrity ---

PICKLE_CODES = (Code.UNSAFE_PICKLE, Code.NEEDS_SAFE_GLOBALS)  # shown under "pickle safety", not "integrity"

def check_integrity(v: Verification, ckpt: Checkpoint, crcs_covered=False):
    """`crcs_covered`: every byte matched a manifest written after the same CRCs were checked, so they still hold."""
    reader = [p for p in ckpt.problems if p.code not in PICKLE_CODES]
    if crcs_covered:
        detail = f"{len(ckpt.files)} files readable, zip CRCs checked when the manifest was written"
    else:
        problems, checked = crc_problems(ckpt)
        reader.extend(problems)
        detail = f"{len(ckpt.files)} files readable" + (f", {checked} good" if checked else "")
    v.from_problems("integrity", reader, detail)
    unsafe = [p for p in ckpt.problems if p.code in PICKLE_CODES]
    v.from_problems("pickle safety", unsafe, "what the resume unpickles names only allow-listed globals, and no "
                    "pickle in the checkpoint names one that runs code")


# --- checksums ---

def check_manifest(v: Verification, ckpt: Checkpoint, *, require: bool) -> bool:
    """The checksums check; True when every file matched a manifest that was written after a CRC check."""
    target = checksums.manifest_path(ckpt)
    own = trainers.profile_of(ckpt).own_manifest(ckpt)  # the trainer's own (Megatron's integrity.json), as its
    if own is not None:  # loader checks it: checked whether or not ckpttool wrote one too
        name, found = own
        v.problems.extend(found)
        if found or (not os.path.exists(target) and not require):
            v.check("checksums", FAIL if errors(found) else PASS, "; ".join(f"{p.code}: {p.message}" for p in found)
                    or f"the files {name}, the trainer's own manifest, lists match it")
            if require and not os.path.exists(target):
                v.problem(Code.NO_MANIFEST, ERROR, f"no manifest at {target}; create one with `ckpttool manifest "
                          f"{ckpt.path}` right after saving", target)
            return False
    if not os.path.exists(target):
        if require:
            v.problem(Code.NO_MANIFEST, ERROR, f"no manifest at {target}; create one with `ckpttool manifest "
                      f"{ckpt.path}` right after saving", target)
            v.check("checksums", FAIL, "no manifest (required)")
        else:
            v.check("checksums", NOTE, f"no manifest; `ckpttool manifest {ckpt.path}` records checksums to catch "
                    "bit rot and partial copies")
        return False
    try:
        doc, digest = checksums.load(target)
    except CkptError as e:  # the checksums cannot be checked: a warning, or an error where they are required
        forged = e.code == Code.UNSAFE_PATH  # names files outside the checkpoint: an error, required or not
        v.problem(e.code, ERROR if require or forged else WARNING, f"{e.reason}: the checksums cannot be checked; "
                  f"verify the checkpoint, then rewrite it with `ckpttool manifest --force {ckpt.path}`", target)
        v.check("checksums", FAIL if require or forged else WARN, f"{e.code}: {e.reason}")
        return False
    v.manifest = (target, doc, digest)
    folder = os.path.dirname(target)
    before = len(v.problems)
    present = {}
    for rel, expected in doc["files"].items():
        full = os.path.join(folder, rel)
        if not os.path.isfile(full):
            v.problem(Code.MISSING_FILE, ERROR, f"{rel} is listed in the manifest but missing", full)
        elif os.path.getsize(full) < expected.get("size", 0):
            v.problem(Code.TRUNCATED, ERROR, f"{rel} is {os.path.getsize(full)} bytes, the manifest recorded "
                      f"{expected['size']}", full)
        elif os.path.getsize(full) != expected.get("size"):
            v.problem(Code.CHECKSUM_MISMATCH, ERROR, f"{rel} is {os.path.getsize(full)} bytes, the manifest recorded "
                      f"{expected.get('size')}", full)
        else:
            present[full] = expected
    piece_size = int(doc.get("piece_size", hashing.PIECE_SIZE))
    jobs = [(full, offset, length) for full in present
            for offset, length in hashing.pieces(present[full]["size"], piece_size)]
    results = hashing.run_jobs(jobs, hashing.hash_range, sum(j[2] for j in jobs), "verifying")
    bad_ranges: dict[str, list[tuple[int, int]]] = {}
    index = {full: 0 for full in present}
    for (full, offset, length), (digest, _) in zip(jobs, results):
        expected = present[full]["pieces"]
        i = index[full]
        index[full] += 1
        if i >= len(expected) or digest != expected[i]:
            bad_ranges.setdefault(full, []).append((offset, offset + length))
    for full, ranges in bad_ranges.items():
        _name_damaged_tensors(v, doc, folder, full, ranges)
    extra = [f for f in checksums.covered_files(ckpt) if os.path.relpath(f, folder) not in doc["files"]]
    for f in extra:
        v.problem(Code.CHECKSUM_MISMATCH, WARNING, f"{os.path.relpath(f, folder)} is not covered by the manifest "
                  "(added after it was written?)", f)
    failed = errors(v.problems[before:])
    if failed:
        v.check("checksums", FAIL, f"{len(failed)} mismatches")
    else:
        _checksums_passed(v, target, len(present))
    return not failed and not extra and doc.get("crcs_checked") is True


def _checksums_passed(v: Verification, target: str, files: int):
    v.check("checksums", PASS, f"{files} files match {os.path.basename(target)}")


def _name_damaged_tensors(v, doc, folder, full, ranges):
    rel = os.path.relpath(full, folder)
    suspects = [e for e in doc.get("tensors", []) if e.get("file") == rel and
                any(e["offset"] < end and e["offset"] + e["length"] > start for start, end in ranges)]
    digests = checksums.hash_tensors(suspects, folder)
    damaged = [e for e, d in zip(suspects, digests) if d != e.get(hashing.ALGORITHM)]
    for e in damaged:
        chunk = f" (chunk at {tuple(e['chunk'])})" if e.get("chunk") else ""
        v.problem(Code.CHECKSUM_MISMATCH, ERROR, f"tensor {', '.join(e['names'])}{chunk} in {rel} differs from the "
                  "manifest", full, key=e["names"][0])
    if not damaged:
        v.problem(Code.CHECKSUM_MISMATCH, ERROR, f"{rel} differs from the manifest outside tensor data (header, pickle "
                  "or metadata bytes)", full)


# --- steps ---

def check_steps(v: Verification, ckpt: Checkpoint, expect_step=None, config=None):
    """Counters compared by what they mean to the trainer that wrote them (ckpttool/steps.py), then the step a
    config or --expect-step names."""
    before = len(v.problems)
    profile = trainers.profile_of(ckpt)
    found, notes = steps.judge(ckpt, profile, profile.run_saves(ckpt.path))
    v.problems.extend(found)
    step = steps.global_step(ckpt)
    outside = [("--expect-step", expect_step, "step")]
    if config:
        outside += [(f"config {config['file']} global_step", config.get("global_step"), "step"),
                    (f"config {config['file']} epoch", config.get("epoch"), "epoch")]
    for label, value, kind in outside:
        have = step if kind == "step" else steps.epoch(ckpt)
        if value is None:
            continue
        if have is None:
            v.problem(Code.STEP_MISMATCH, ERROR, f"{label} expects {kind} {value} but the checkpoint states no {kind}")
        elif have != value:
            v.problem(Code.STEP_MISMATCH, ERROR, f"{label} is {value} but the checkpoint is at {kind} {have} (off by "
                      f"{value - have:+d}): resuming would {'skip' if value > have else 'repeat'} "
                      f"{abs(value - have)} {kind}s of the schedule")
    found = v.problems[before:]
    compared = [s for s in ckpt.steps if s.meaning in (steps.GLOBAL_STEP, steps.OPTIMIZER_UPDATES,
                                                       steps.SCHEDULER_STEPS, steps.EPOCH, steps.EMA_UPDATES)]
    sources = ", ".join(f"{s.source}={s.value}" for s in compared) or "none"
    detail = "; ".join([p.message for p in found] + notes) or f"consistent ({sources})"
    v.check("step consistency", FAIL if errors(found) else WARN if found else
            PASS if compared else SKIP, detail)


# --- training config (Z-Image style) ---

CONFIG_KEYS = ("resume_from_checkpoint", "global_step", "epoch")


def read_training_config(path: str) -> dict:
    """resume_from_checkpoint / global_step / epoch from a trainer config (JSON, TOML, else YAML, each read by its own
    parser; the first of each key at any depth), with $VARS expanded and relative paths taken from the config's
    folder."""
    if not os.path.isfile(path):
        raise UsageError(f"{path}: config file not found")
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    values = {}
    if path.endswith(".json"):
        try:
            values = _find_keys(json.loads(text))
        except (ValueError, RecursionError) as e:
            raise UsageError(f"{path}: not valid JSON ({e})") from None
    elif path.endswith(".toml"):
        import tomllib
        try:
            values = _find_keys(tomllib.loads(text))
        except tomllib.TOMLDecodeError as e:
            raise UsageError(f"{path}: not valid TOML ({e})") from None
    else:  # YAML, read by a YAML parser: flow mappings, nesting, anchors and quoting as the trainers' own loaders
        import yaml

        try:
            values = _find_keys(yaml.safe_load(text))
        except RecursionError:
            raise UsageError(f"{path}: nests too deeply to read as YAML; check the config's syntax") from None
        except yaml.YAMLError as e:
            where = getattr(e, "problem_mark", None)
            at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
            raise UsageError(f"{path}: not valid YAML{at} ({getattr(e, 'problem', None) or e}); check the "
                             "config's syntax") from None
    config = {"file": path}
    resume = values.get("resume_from_checkpoint")
    if isinstance(resume, str) and resume and resume.lower() not in ("none", "null", "false", "latest"):
        expanded = os.path.expandvars(os.path.expanduser(resume))
        unset = re.findall(r"\$\{?(\w+)", expanded)
        if unset:
            raise UsageError(f"{path}: resume_from_checkpoint uses ${unset[0]}, which is not set in the environment")
        config["resume_from_checkpoint"] = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(path)),
                                                                         expanded))
    for key in ("global_step", "epoch"):
        value = values.get(key)
        if value is None:
            continue
        if isinstance(value, float) and value.is_integer():  # YAML and TOML read `epoch: 2.0` as a float
            value = int(value)
        try:
            config[key] = int(str(value))
        except ValueError:
            raise UsageError(f"{path}: {key} is {value!r}, not an integer") from None
    return config


def _find_keys(doc) -> dict:
    """The first value of each CONFIG_KEYS key at any depth; each node looked at once (YAML anchors make one object
    reachable along many paths: nine nested aliases of nine items are 9^9 paths to a walk that does not remember)."""
    found, seen = {}, set()
    stack = [doc]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, dict):
            for k, val in node.items():
                if k in CONFIG_KEYS and k not in found and not isinstance(val, (dict, list)):
                    found[k] = val
                stack.append(val)
        elif isinstance(node, list):
            stack.extend(node)
    return found


# --- resume completeness ---

def check_resume(v: Verification, ckpt: Checkpoint):
    """What a resume would silently lose, as the trainer that wrote it saves state (ckpttool/trainers/)."""
    found = trainers.resume_problems(ckpt)
    v.problems.extend(found)
    v.check("resume completeness", FAIL if errors(found) else WARN if found else PASS,
            "; ".join(f"{p.code}: {p.message}" for p in found) or
            "everything this trainer saves for a resume is present")


# --- finite scan ---

def check_finite(v: Verification, ckpt: Checkpoint):
    import torch

    from ckpttool import distributed
    from ckpttool.tensors import load_tensor

    def finite(tensors) -> list[bool]:
        out = []
        for t in tensors:
            value = load_tensor(t)
            out.append(not value.numel() or bool(torch.isfinite(value.to(torch.float32) if value.element_size() == 1
                                                                else value).all()))
        return out

    floats = [(f"{comp.name}/{t.name}", t) for comp in ckpt.components for t in comp.tensors
              if t.dtype in SCANNED_FOR_NONFINITE and t.readable]
    tensors = [t for _, t in floats]
    results = (distributed.run_shared(tensors, [t.nbytes for t in tensors], finite) if distributed.active()
               else finite(tensors))
    bad = [name for (name, _), ok in zip(floats, results) if not ok]
    scanned = len(floats)
    if bad:
        v.problem(Code.NONFINITE, ERROR, f"NaN or Inf in {len(bad)} tensors: {', '.join(bad[:10])}"
                  + (" ..." if len(bad) > 10 else ""), ckpt.path, key=bad[0])
    v.check("finite values", FAIL if bad else PASS, f"{len(bad)} of {scanned} float tensors have NaN/Inf" if bad
            else f"{scanned} float tensors finite")


def verify(path: str | None = None, *, require_manifest=False, config_file=None, expect_step=None,
           for_resume=False, finite=False, recall=True) -> VerifyReport:
    """The verify report for `path` (see the README for every check). A clean report, remembered by an earlier
    verify or by `manifest`, is recalled rather than recomputed while the folders hold the same names and every byte
    still matches the manifest (verify_cache); `recall=False` when the caller has just asked the cache itself."""
    from ckpttool.operations import verify_cache

    options = {"require_manifest": require_manifest, "expect_step": expect_step, "for_resume": for_resume,
               "finite": finite}
    if recall and (recalled := verify_cache.recall(path, config_file, **options)):
        return recalled
    before = verify_cache.listings(path) if verify_cache.cache_dir() and path and os.path.exists(path) else None
    report, ckpt, v = _verify(path, config_file=config_file, **options)
    verify_cache.remember(report, ckpt, v.manifest, path, before, config_file, **options)
    return report


def report_while_matching(path: str, ckpt: Checkpoint, target: str, doc: dict, for_resume: bool) -> VerifyReport:
    """The report a verify of `path` (no --config, --expect-step or --finite) gives while every byte matches the
    manifest `doc` that was just written for `ckpt` at `target`, after its CRCs were checked: the same checks as
    _verify, with the checksums already known to pass."""
    sums = Verification(path)
    _checksums_passed(sums, target, len(doc["files"]))
    return _checks(Verification(path), ckpt, sums, crcs_covered=True, for_resume=for_resume)


def verify_checkpoint(path: str | None = None, *, require_manifest=False, config_file=None, expect_step=None,
                      for_resume=False, finite=False) -> tuple[VerifyReport, Checkpoint | None]:
    """The report and the checkpoint it read (None when unreadable), for callers that go on to use it."""
    report, ckpt, _ = _verify(path, require_manifest=require_manifest, config_file=config_file,
                              expect_step=expect_step, for_resume=for_resume, finite=finite)
    return report, ckpt


def _verify(path, *, require_manifest, config_file, expect_step, for_resume, finite):
    config = read_training_config(config_file) if config_file else None
    if path is None:
        if not config or "resume_from_checkpoint" not in config:
            raise UsageError("give a checkpoint PATH, or a --config whose resume_from_checkpoint names one")
        path = config["resume_from_checkpoint"]
    if not os.path.exists(path) and not os.path.islink(path):  # a link to nothing: open_checkpoint says why
        raise UsageError(f"{path}: no such file or directory")
    v = Verification(path)
    if config and "resume_from_checkpoint" in config and \
            os.path.realpath(config["resume_from_checkpoint"]) != os.path.realpath(path):
        v.problem(Code.STEP_MISMATCH, WARNING, f"config {config_file} resumes from {config['resume_from_checkpoint']}, "
                  f"not {path}")
    try:
        ckpt = discovery.open_checkpoint_or_run(path)
    except CkptError as e:
        # Unreadable: say why, and let a manifest still tell which bytes changed.
        v.problem(e.code, ERROR, e.reason, e.path or path)
        v.check("integrity", FAIL, f"{e.code}: {e.reason}")
        check_manifest(v, Checkpoint(path, guess_format(path), "unreadable", files=[path]), require=require_manifest)
        return _report(v, guess_format(path), None), None, v
    sums = Verification(path)  # first: bytes that match a CRC-checked manifest need no CRC pass of their own
    covered = check_manifest(sums, ckpt, require=require_manifest)
    report = _checks(v, ckpt, sums, crcs_covered=covered, expect_step=expect_step, config=config,
                     for_resume=for_resume, finite=finite)
    return report, ckpt, v


def _checks(v: Verification, ckpt: Checkpoint, sums: Verification, *, crcs_covered: bool, expect_step=None,
            config=None, for_resume: bool, finite: bool = False) -> VerifyReport:
    """Every check after the checksums (already made into `sums`), in report order."""
    check_integrity(v, ckpt, crcs_covered=crcs_covered)
    v.checks.extend(sums.checks)
    v.problems.extend(sums.problems)
    v.manifest = sums.manifest
    check_steps(v, ckpt, expect_step, config)
    if for_resume:
        check_resume(v, ckpt)
    if finite:
        check_finite(v, ckpt)
    report = _report(v, ckpt.format, steps.global_step(ckpt), ckpt.layout, ckpt.trainer)
    report.profile = ckpt.profile
    return report


def _report(v: Verification, fmt, step, layout=None, trainer=None) -> VerifyReport:
    return VerifyReport(v.path, step, fmt, layout, trainer, v.checks, v.problems)

