"""`ckpttool latest`: the newest checkpoint under a run dir that verifies, and why newer ones were skipped."""

from __future__ import annotations

import os

from ckpttool.discovery import discover
from ckpttool.errors import UsageError
from ckpttool.operations.verify import verify


def verdicts(root: str, for_resume=False, stop_after_valid: int | None = None):
    """Yield (candidate, verify report or None when skipped unread), newest first."""
    if not os.path.isdir(root):
        raise UsageError(f"{root}: not a directory; give the run's output dir")
    valid = 0
    for candidate in discover(root):
        if candidate.skip:
            yield candidate, None
            continue
        report = verify(candidate.path, for_resume=for_resume)
        yield candidate, report
        valid += report["ok"]
        if stop_after_valid is not None and valid >= stop_after_valid:
            return


def latest(root: str, for_resume=False) -> dict:
    skipped = []
    for candidate, report in verdicts(root, for_resume, stop_after_valid=1):
        if report is not None and report["ok"]:
            return {"path": candidate.path, "step": report["step"], "skipped": skipped}
        if report is None:
            skipped.append({"path": candidate.path, "codes": ["missing_file"], "reason": candidate.skip})
        else:
            errors = [p for p in report["problems"] if p["severity"] == "error"]
            skipped.append({"path": candidate.path, "codes": sorted({p["code"] for p in errors}),
                            "reason": errors[0]["message"]})
    return {"path": None, "step": None, "skipped": skipped}
