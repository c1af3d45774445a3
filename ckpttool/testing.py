"""ckpttool's pytest plugin (entry point `pytest11`): synthetic checkpoints for a project's own resume tests.

    def test_resume_refuses_cut_optimizer(synthetic_checkpoint):
        path = synthetic_checkpoint("accelerate", damage="truncated-optimizer")
        with pytest.raises(ResumeGateError):
            check_resume(path)

A trainer's fixtures are made once per session, in pytest's tmp dir, by its real library (or copied from a run its
own code wrote, or an application's replica: `ckpttool fixtures` lists which); one whose library is not installed
skips the test that asks for it, with the reason. `expected_code(damage)` is the problem code
`ckpttool verify --for-resume` gives that damaged copy; `world_size(trainer)` the number of processes that wrote it.
"""

from __future__ import annotations

import pytest

_made: dict[str, dict] = {}  # trainer -> {damage or None: entry}, this session's (cleared as a session starts)
_asked: dict[str, str] = {}  # damage -> the trainer it was last asked of


def expected_code(damage: str, trainer: str | None = None) -> str:
    """The problem code `verify --for-resume` gives the damaged copy of `trainer`, or, without one, of the trainer
    the damage was last asked of through synthetic_checkpoint (codes differ between trainers: a bit flip is
    `corrupt` in one and `checksum_mismatch` in another)."""
    if not damage:
        raise ValueError("expected_code: name a damage (a healthy checkpoint has no code)")
    trainer = trainer or _asked.get(damage)
    entry = _made.get(trainer, {}).get(damage) if trainer else None
    if entry is None:
        raise LookupError(f"{damage}: no damaged copy made this session{' by ' + trainer if trainer else ''}; ask "
                          f"synthetic_checkpoint(TRAINER, damage={damage!r}) first")
    return entry["expected_code"]


def world_size(trainer: str) -> int:
    """How many processes wrote the trainer's fixtures (2 for Megatron's, NeMo's and DeepSpeed's, else 1): pass it
    as check_resume(path, world_size=...) to gate a resume like theirs."""
    from ckpttool.synthetic import catalog

    for known in catalog.TRAINERS:
        if known.name == trainer:
            return known.world_size
    raise ValueError(f"{trainer}: not a trainer ckpttool makes fixtures for")


@pytest.fixture(scope="session")
def synthetic_checkpoint(tmp_path_factory):
    """A factory: synthetic_checkpoint(trainer, damage=None) -> the checkpoint's path (a str)."""
    from ckpttool.operations.fixtures import _quiet_stdout
    from ckpttool.synthetic import catalog

    known = {t.name: t for t in catalog.TRAINERS}
    root = tmp_path_factory.mktemp("ckpttool-fixtures")
    _made.clear()
    _asked.clear()

    def make(trainer: str, damage: str | None = None) -> str:
        if trainer not in known:
            raise ValueError(f"{trainer}: not a trainer ckpttool makes fixtures for ({', '.join(known)})")
        if trainer not in _made:
            reason = catalog.missing_library(known[trainer])
            if reason:
                pytest.skip(f"ckpttool fixtures for {trainer}: {reason}")
            with _quiet_stdout():
                entries = catalog.make(str(root), known[trainer], None)
            _made[trainer] = {e.damage: e.to_json() for e in entries}
        entry = _made[trainer].get(damage)
        if damage and entry is not None:
            _asked[damage] = trainer
        if entry is None:
            raise ValueError(f"{trainer} has no damage {damage!r} that verify tells; it has: "
                             f"{', '.join(sorted(d for d in _made[trainer] if d))}")
        return entry["path"]

    return make
