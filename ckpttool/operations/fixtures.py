"""`ckpttool fixtures OUT`: small healthy checkpoints of each trainer, written by its real library or copied from a
run its own code wrote (`ckpttool.synthetic.catalog`), and damaged copies of them, each listed with the problem code
`verify --for-resume` gives it, for other projects' CI."""

from __future__ import annotations

import contextlib
import os
import sys

from ckpttool.errors import UsageError


@contextlib.contextmanager
def _quiet_stdout():
    """The libraries' own prints (training logs, tips) go to stderr: stdout carries only the listing (`--json`)."""
    if sys.stdout is not None:
        sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # stdout closed: nothing to keep clean
        saved = None
    if saved is not None:
        os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # Python's prints too, wherever sys.stdout points
            yield
    finally:
        if saved is not None:
            if sys.stdout is not None:
                sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)


INCOMPLETE = ".ckpttool-fixtures-incomplete"  # in OUT until every trainer's fixtures are written


def fixtures(out: str, trainers: list[str] | None = None, damages: list[str] | None = None) -> dict:
    from ckpttool.synthetic import catalog
    from ckpttool.synthetic.damage import BIT_FLIP, KINDS

    known = {t.name: t for t in catalog.TRAINERS}
    trainers = list(dict.fromkeys(trainers or ()))
    if unknown := sorted(set(trainers) - set(known)):
        raise UsageError(f"--trainer {', '.join(unknown)}: not one ckpttool can make; choose from {', '.join(known)}")
    damages = list(dict.fromkeys(damages or ()))
    if odd := [d for d in damages if d not in KINDS and not any(
            d.startswith(k + "-") and len(d) > len(k) + 1 for k in KINDS if k != BIT_FLIP)]:
        raise UsageError(f"--damage {', '.join(odd)}: not a damage kind; give {', '.join(KINDS)}, or missing-, "
                         "truncated-, empty- or stale- with a part's name (optimizer, scheduler, model, ...)")
    if not out:
        raise UsageError("OUT is empty; name a new folder to write the fixtures into")
    out = os.path.abspath(out)
    samples = os.path.realpath(catalog.SAMPLES)
    if os.path.commonpath([os.path.realpath(out), samples]) == samples:
        raise UsageError(f"{out}: inside ckpttool's own samples ({catalog.SAMPLES}), which the fixtures are copied "
                         "from; name a folder elsewhere")
    if os.path.lexists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise UsageError(f"{out}: already exists and is not an empty folder (or is a link to nothing); name a new "
                         "one (nothing is overwritten)")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise UsageError(f"{out}: cannot be made ({e.strerror}); name a folder you can write") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise UsageError(f"{out}: not writable; name a folder you can write")
    marker = os.path.join(out, INCOMPLETE)
    with open(marker, "w", encoding="utf-8") as f:
        f.write("ckpttool fixtures did not finish writing this folder; remove it and run again\n")
    entries, skipped = [], []
    for trainer in [known[n] for n in trainers] if trainers else catalog.TRAINERS:
        reason = catalog.missing_library(trainer)
        if reason:
            skipped.append({"trainer": trainer.name, "reason": reason})
            continue
        with _quiet_stdout():
            entries += catalog.make(out, trainer, damages)
    found = {e.damage for e in entries}
    found |= {k for k in KINDS if any(d == k or d.startswith(k + "-") for d in found if d)}
    skipped += [{"damage": name, "reason": "no trainer asked has this damage, or verify finds nothing in it"}
                for name in damages if name not in found]
    os.remove(marker)
    return {"out": out, "entries": [e.to_json() for e in entries], "skipped": skipped}
