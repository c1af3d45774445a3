"""`ckpttool prune`: delete old checkpoints beyond the newest N resumable ones, never the one `latest --for-resume`
picks. Valid means resumable by the trainer's own contract (verify --for-resume), not merely readable files: a run
whose newest save lacks its optimizer must keep the older ones it can still resume from. A checkpoint newer than the
newest resumable one is neither kept as valid nor deleted: it may still be being written. Nor is the one the
trainer's own "resume from latest" points to (Megatron's tracker, Composer's latest-rank0.pt, DeepSpeed's `latest`):
deleting it would leave that pointer naming nothing, and the trainer's next resume would fail or start over."""

from __future__ import annotations

import os
import shutil

from ckpttool import atomic
from ckpttool.errors import UsageError
from ckpttool.operations.latest import verdicts


def plan(root: str, keep: int, keep_every: int | None = None) -> dict:
    """What prune would keep and delete, with the reason for each."""
    if keep < 1:
        raise UsageError("--keep must be at least 1: the newest valid checkpoint is never deleted")
    if keep_every is not None and keep_every < 1:
        raise UsageError("--keep-every must be a positive step interval")
    keep_rows, delete_rows = [], []
    valid, pointed, asked = 0, {}, set()  # pointed: folder -> each trainer's own pick there
    for candidate, report in verdicts(root, for_resume=True):
        ok = report is not None and report.ok
        step = report.step if report else None
        row = {"path": candidate.path, "step": step, "files": candidate.files}
        folder = os.path.dirname(os.path.abspath(candidate.path))
        if report is not None and report.trainer and (folder, report.trainer) not in asked:
            asked.add((folder, report.trainer))
            if pick := _trainer_pick(report, folder):
                pointed.setdefault(folder, []).append(pick)
        if ok and valid < keep:
            valid += 1
            keep_rows.append({**row, "reason": "newest valid (latest --for-resume picks it)" if valid == 1
                              else f"valid, within the newest {keep}"})
        elif valid == 0:
            keep_rows.append({**row, "reason": "newer than every resumable checkpoint (may still be being written)"})
        elif pick := next((p for p in pointed.get(folder, []) if _same(p[0], candidate.path)), None):
            keep_rows.append({**row, "reason": f"{pick[1]} resumes from it on its own ({pick[2]}): deleting it "
                              "would leave that pointing at nothing"})
        elif keep_every and ok and step is not None and step % keep_every == 0:
            keep_rows.append({**row, "reason": f"milestone (step multiple of {keep_every})"})
        elif valid < keep:
            keep_rows.append({**row, "reason": f"invalid but newer than the {keep}th valid checkpoint"})
        else:
            delete_rows.append({**row, "reason": "valid, older than the kept ones" if ok else "invalid and old"})
    return {"keep": keep_rows, "delete": delete_rows, "stale_staging": atomic.stale_staging(root)}


def _trainer_pick(report, folder: str) -> tuple[str, str, str] | None:
    """(what the run's trainer would resume from on its own, its name, its rule), or None where it has no rule."""
    from ckpttool.operations.latest import _profile

    profile = _profile(report)
    own = profile.own_latest(folder) if profile.latest_rule else None
    return (own, profile.name, profile.latest_rule) if own else None


def _same(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):  # gone, or a name no path can be (a NUL a pointer file held)
        return False


def prune(root: str, keep: int, keep_every: int | None = None, *, dry_run: bool = False) -> dict:
    result = plan(root, keep, keep_every)
    result["dry_run"] = dry_run
    if not dry_run:
        for path in [p for row in result["delete"] for p in row["files"]] + result["stale_staging"]:
            try:
                if os.path.isdir(path) and not os.path.islink(path):
                    # renamed aside first: a prune stopped half way leaves each checkpoint whole or gone from the
                    # run, never half deleted in place (the staging name is removed by the next prune)
                    aside = path if atomic.STAGING.match(os.path.basename(path)) else atomic.staging_path(path)
                    os.rename(path, aside)
                    shutil.rmtree(aside)
                elif os.path.lexists(path):
                    os.unlink(path)
            except OSError as e:
                if e.errno not in atomic.WRITE_ERRNOS:
                    raise
                raise atomic.OutputError(f"{path}: cannot delete it: {atomic.WRITE_ERRNOS[e.errno]}; nothing after "
                                         "it was deleted (run prune with the owner's rights, or --dry-run to list "
                                         "what it would delete)") from None
    return result
