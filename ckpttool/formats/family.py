"""consistency_models file families: `model{step}.pt`, `ema_{rate}_{step}.pt`, `opt{step}.pt`,
`target_model{step}.pt` saved side by side. Given one member, the family at that step is read as one checkpoint."""

from __future__ import annotations

import os
import re

from ckpttool.errors import CkptError
from ckpttool.model import ERROR, Checkpoint, Code, Record, StepSource

MEMBER = re.compile(r"^(model|opt|target_model|teacher_model|ema_\d*\.?\d+_)(\d{6,})\.pt$")
ROLES = {"model": "model", "opt": "optimizer", "target_model": "target", "teacher_model": "teacher"}


def parse(name: str):
    """(kind, step) of a family member file name, or None. `kind` is model/opt/target_model/teacher_model/ema_R."""
    m = MEMBER.match(name)
    if not m:
        return None
    kind = m.group(1).rstrip("_")
    return kind, int(m.group(2))


def detect(path: str) -> bool:
    return os.path.isfile(path) and parse(os.path.basename(path)) is not None


def members(folder: str) -> dict[int, dict[str, str]]:
    """step -> {kind: path} for every family member in a folder."""
    found: dict[int, dict[str, str]] = {}
    for entry in os.listdir(folder):
        parsed = parse(entry)
        if parsed:
            found.setdefault(parsed[1], {})[parsed[0]] = os.path.join(folder, entry)
    return found


def read(path: str, *, role: str | None = None, name: str | None = None) -> Checkpoint:
    """A whole checkpoint, which names its own parts (`role` and `name` are not used)."""
    from ckpttool.formats import read_file

    folder = os.path.dirname(os.path.abspath(path))
    _, step = parse(os.path.basename(path))
    family = members(folder).get(step, {})
    kinds_anywhere = {kind for group in members(folder).values() for kind in group}
    # what the name's step means, trainers/consistency_models says
    ckpt = Checkpoint(path, "family", "consistency_models file family",
                      steps=[StepSource("file name", step, record=Record.NAME)])
    for kind in sorted(family, key=lambda k: (k != "model", k)):
        member = family[kind]
        role = "ema" if kind.startswith("ema_") else ROLES.get(kind, "extra")
        try:
            part = read_file(member, role=role, name=kind)
        except CkptError as e:
            ckpt.add_problem(e.code, ERROR, e.reason, member, component=kind)
            continue
        ckpt.absorb_problems(part)
        ckpt.steps.extend(part.steps)
        ckpt.components.extend(part.components)
        ckpt.files.append(member)
    # A member kind the run saves at other steps but not at this one was lost (or never written).
    for kind in sorted(kinds_anywhere - set(family)):
        ckpt.add_problem(Code.MISSING_FILE, ERROR, f"no {kind} file for step {step}, although the run saved "
                         f"{kind} at other steps; a loader would silently skip it",
                         os.path.join(folder, _member_name(kind, step)), component=kind)
    return ckpt


def _member_name(kind: str, step: int) -> str:
    return f"{kind}_{step:06d}.pt" if kind.startswith("ema_") else f"{kind}{step:06d}.pt"
