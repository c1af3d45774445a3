"""`ckpttool fixtures OUT`: small healthy checkpoints of each trainer, written by its real library, and damaged
copies of them, each listed with the problem code `verify --for-resume` gives it, for other projects' CI."""

from __future__ import annotations

import contextlib
import os
import sys

from ckpttool.errors import UsageError


@contextlib.contextmanager
def _quiet_stdout():
    """The libraries' own prints (training logs, tips) go to stderr: stdout carries only the listing (`--json`)."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # Python's prints too, wherever sys.stdout points
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def fixtures(out: str, trainers: list[str] | None = None, damages: list[str] | None = None) -> dict:
    from ckpttool.synthetic import catalog

    known = {t.name: t for t in catalog.TRAINERS}
    unknown = sorted(set(trainers or ()) - set(known))
    if unknown:
        raise UsageError(f"--trainer {', '.join(unknown)}: not one ckpttool can make; choose from {', '.join(known)}")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise UsageError(f"{out}: already exists and is not an empty folder; name a new one (nothing is overwritten)")
    os.makedirs(out, exist_ok=True)
    entries, skipped = [], []
    for trainer in [known[n] for n in trainers] if trainers else catalog.TRAINERS:
        reason = catalog.missing_library(trainer)
        if reason:
            skipped.append({"trainer": trainer.name, "reason": reason})
            continue
        with _quiet_stdout():
            entries += catalog.make(out, trainer, damages or [])
    if damages:
        found = {e.damage for e in entries} | {e.damage.partition("-")[0] for e in entries if e.damage}
        if missing := sorted(set(damages) - found):
            skipped += [{"damage": name, "reason": "no trainer asked has this damage, or verify finds nothing in it"}
                        for name in missing]
    return {"out": out, "entries": [e.to_json() for e in entries], "skipped": skipped}
