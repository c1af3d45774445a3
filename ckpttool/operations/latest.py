"""`ckpttool latest`: the newest checkpoint under a run dir that verifies, and why newer ones were skipped."""

from __future__ import annotations

import os

from ckpttool import trainers
from ckpttool.discovery import discover
from ckpttool.errors import CkptError, UsageError
from ckpttool.model import ERROR, Code, Problem, VerifyReport, errors
from ckpttool.operations.verify import verify


def verdicts(root: str, *, for_resume=False, stop_after_valid: int | None = None):
    """Yield (candidate, verify report or None when skipped unread), newest first."""
    if not os.path.isdir(root):
        raise UsageError(f"{root}: not a directory; give the run's output dir")
    valid = 0
    for candidate in discover(root):
        if candidate.skip:
            yield candidate, None
            continue
        report = judged(candidate.path, for_resume=for_resume)
        yield candidate, report
        valid += report.ok
        if stop_after_valid is not None and valid >= stop_after_valid:
            return


def judged(path: str, *, for_resume: bool) -> VerifyReport:
    """verify's report on one candidate; a candidate so malformed that reading it fails unexpectedly is reported
    `corrupt` and skipped, never allowed to stop the scan of the rest of the run."""
    try:
        return verify(path, for_resume=for_resume)
    except (UsageError, CkptError) as e:
        reason = e.reason if isinstance(e, CkptError) else str(e)
    except (RecursionError, MemoryError, ArithmeticError, ValueError, TypeError, AttributeError, KeyError, IndexError,
            OSError) as e:
        reason = f"it cannot be read ({type(e).__name__})"
    return VerifyReport(path, None, None, problems=[Problem(Code.CORRUPT, ERROR, reason, path)])


def latest(root: str, for_resume=False) -> dict:
    """The newest checkpoint that verifies, what was skipped and why, and what the trainer's own "resume from
    latest" would have picked (with why ckpttool differs, when it does)."""
    skipped, result, run_by = [], None, None  # run_by: the report whose trainer wrote the run
    for candidate, report in verdicts(root, for_resume=for_resume, stop_after_valid=1):
        if report is not None and report.ok:
            result = {"path": candidate.path, "step": report.step, "trainer": report.trainer}
            run_by = report
            break
        if report is None:
            skipped.append({"path": candidate.path, "codes": [Code.MISSING_FILE.value], "reason": candidate.skip})
        else:
            found = errors(report.problems)
            skipped.append({"path": candidate.path, "codes": sorted({p.code.value for p in found}),
                            "reason": found[0].message, "trainer": report.trainer})
            run_by = run_by if run_by is not None and run_by.trainer else report
    result = result or {"path": None, "step": None, "trainer": run_by.trainer if run_by else None}
    result["skipped"] = skipped
    result.update(trainer_pick(root, result, skipped, _profile(run_by)))
    return result


def _profile(report: VerifyReport | None):
    """The profile that read the run's checkpoint: the report carries it, or (recalled from the verify cache, which
    keeps JSON) names it."""
    if report is None:
        return trainers.GENERIC
    return report.profile or trainers.profile_named(report.trainer, report.layout)


def trainer_pick(root: str, result: dict, skipped: list, profile) -> dict:
    """What the trainer that wrote the run would resume from on its own, and why ckpttool's choice differs."""
    if profile.latest_rule is None:
        return {}
    chosen = result["path"] or (skipped[0]["path"] if skipped else root)
    own = profile.own_latest(os.path.dirname(os.path.abspath(chosen)))
    out = {"trainer_rule": profile.latest_rule, "trainer_pick": own}
    if own is not None and not os.path.exists(own):  # a tracker naming a save that is gone
        out["differs"] = f"{profile.name} would resume from {own} ({profile.latest_rule}), which does not exist: " \
                         f"{profile.lost_pick_outcome}"
        return out
    if own is None or (result["path"] and os.path.samefile(own, result["path"])):
        return out
    bad = next((s for s in skipped if os.path.exists(s["path"]) and os.path.samefile(s["path"], own)), None)
    why = (f"it fails verification ({', '.join(bad['codes'])}: {bad['reason']})" if bad else
           "it is not a checkpoint ckpttool can verify" if result["path"] is None else
           "ckpttool orders by the step in the name and verifies, the trainer does not")
    out["differs"] = f"{profile.name} would resume from {own} ({profile.latest_rule}); {why}"
    return out
