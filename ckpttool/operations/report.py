"""`ckpttool report RUN_DIR`: every checkpoint of a run (step, trainer, verify verdict, size), which one `latest`
picks and why the newer ones were skipped, and how much each module changed between consecutive checkpoints."""

from __future__ import annotations

import html
import os

from ckpttool.errors import CkptError
from ckpttool.model import Code, errors


def _size(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(folder, name)) for folder, _, names in os.walk(path) for name in names
               if os.path.isfile(os.path.join(folder, name)))


def report(run_dir: str, for_resume: bool = False, module_depth: int = 2) -> dict:
    from ckpttool.operations.latest import verdicts

    checkpoints, picked = [], None
    for candidate, verdict in verdicts(run_dir, for_resume=for_resume):
        entry = {"path": candidate.path, "name": os.path.relpath(candidate.path, run_dir),
                 "size": _size(candidate.path)}
        if verdict is None:
            entry.update(step=None, trainer=None, ok=False, codes=[Code.MISSING_FILE.value], reason=candidate.skip)
        else:
            found = errors(verdict.problems)
            entry.update(step=verdict.step, trainer=verdict.trainer, format=verdict.format, ok=verdict.ok,
                         codes=sorted({p.code.value for p in found}), reason=found[0].message if found else None)
        if entry["ok"] and picked is None:
            picked = entry["path"]
            entry["picked"] = True
        checkpoints.append(entry)
    for entry in checkpoints:  # newest first: what `latest` passed over on its way to the pick
        entry["why"] = ("picked: the newest that verifies" if entry.get("picked") else
                        f"skipped: {', '.join(entry['codes'])}: {entry['reason']}" if not entry["ok"] else
                        "older than the pick")
    readable = sorted((c for c in checkpoints if c["ok"] and c["step"] is not None), key=lambda c: c["step"])
    changes = [_change(older, newer, module_depth) for older, newer in zip(readable, readable[1:])]
    return {"run": run_dir, "latest": picked, "checkpoints": checkpoints, "module_depth": module_depth,
            "changes": changes}


def _change(older: dict, newer: dict, depth: int) -> dict:
    """Per-module relative change from one checkpoint's model weights to the next one's: every model component (a
    pipeline's unet, vae, ...: their modules named after them), or the one model."""
    from ckpttool.blockstats import compare_pairs
    from ckpttool.checkpoint import open_checkpoint
    from ckpttool.keys import compare
    from ckpttool.operations.diff import in_model_order, module_changes

    out = {"from": older["name"], "to": newer["name"], "from_step": older["step"], "to_step": newer["step"]}
    try:
        a, b = ({c.name: c for c in open_checkpoint(e["path"]).components if c.role == "model"}
                for e in (newer, older))
    except CkptError as e:
        return {**out, "modules": [], "note": f"cannot be read: {e}"}
    names = sorted(set(a) & set(b)) if len(a) > 1 or "model" not in a else ["model"]
    if not names or any(n not in a or n not in b for n in names):
        return {**out, "modules": [], "note": "no model weights in one of them"}
    modules = []
    for name in names:
        keys = compare(a[name].tensors, b[name].tensors)
        if not keys.same_keys:
            return {**out, "modules": [], "note": f"their {name} keys or shapes differ (see `ckpttool diff`)"}
        common = in_model_order(keys, a[name].tensors, b[name].tensors)
        sums = compare_pairs([(ta, tb) for _, ta, tb in common], norms=True, label="comparing")
        prefix = "" if names == ["model"] else f"{name}/"
        modules += [dict(m, module=prefix + m["module"]) for m in module_changes([k for k, _, _ in common], sums,
                                                                                   depth)]
    return {**out, "modules": modules}


def write_html(result: dict, path: str):
    """One self-contained page: the checkpoints table, the heat chart of per-module change, its numbers."""
    from ckpttool import atomic, charts
    from ckpttool.render import human_bytes

    title = f"ckpttool report: {result['run']}"
    rows = [[c["name"], "-" if c["step"] is None else c["step"], c.get("trainer") or "-",
             "OK" if c["ok"] else "FAILED", human_bytes(c["size"]), c["why"]] for c in result["checkpoints"]]
    parts = [f"<p>latest picks: <b>{html.escape(result['latest'] or 'nothing (no checkpoint verifies)')}</b>"
             "</p>", "<h2>Checkpoints (newest first)</h2>"
             + charts.table(["checkpoint", "step", "trainer", "verify", "size", "latest"], rows)]
    changes = [c for c in result["changes"] if c["modules"]]
    if changes:
        modules = list(dict.fromkeys(m["module"] for c in changes for m in c["modules"]))
        labels = [f"{c['from_step']} → {c['to_step']}" for c in changes]
        matrix = [[next((m["rel_change"] for m in c["modules"] if m["module"] == module), None) for c in changes]
                  for module in modules]
        fig, _ = charts.run_change_chart(modules, labels, matrix, "relative change per module between checkpoints")
        parts.append("<h2>Change per module between consecutive checkpoints</h2>"
                     + charts.image(charts.png(fig), "relative change per module between checkpoints"))
        numbers = [[module] + [f"{v:.3g}" if isinstance(v, float) else str(v) for v in row]
                   for module, row in zip(modules, matrix)]
        parts.append(charts.table(["module"] + labels, numbers))
    for c in result["changes"]:
        if c.get("note"):
            parts.append(f"<p>{html.escape(c['from'])} → {html.escape(c['to'])}: "
                         f"{html.escape(c['note'])}</p>")
    atomic.write_text(path, charts.page(title, parts))
