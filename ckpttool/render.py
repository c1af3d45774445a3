"""Human-readable tables (tabulate) for the CLI's reports."""

from __future__ import annotations

import json
import os

from tabulate import tabulate as _tabulate

SHOWN_OBJECTS = 40  # non-tensor items listed in the text report


def tabulate(rows, *args, maxcolwidths=None, **kwargs) -> str:
    """tabulate's table; maxcolwidths only for rows there are (tabulate 0.9 reads the first row to apply them, and
    an empty folder given to prune or report has none)."""
    return _tabulate(rows, *args, maxcolwidths=maxcolwidths if rows else None, **kwargs)


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def problems_table(problems) -> str:
    if not problems:
        return "Problems: none"
    rows = [(p["severity"], p["code"], p.get("path") or "", p["message"]) for p in problems]
    return "Problems:\n" + tabulate(rows, headers=("severity", "code", "path", "message"), tablefmt="simple",
                                    maxcolwidths=[None, None, 40, 80])


def identity_words(identity: dict) -> str:
    """`lora (kohya convention; rank 16; alpha 8; 192 modules; family not told)`, `checkpoint (original convention;
    family flux.1; variant dev)`."""
    details = [f"{identity.get('convention') or 'unknown'} convention"]
    if identity["kind"] == "lora":
        rank, alpha = identity.get("rank"), identity.get("alpha")
        details.append("ranks " + ", ".join(map(str, rank)) if isinstance(rank, list) else f"rank {rank}")
        details.append(("alpha " + (", ".join(f"{a:g}" for a in alpha) if isinstance(alpha, list) else f"{alpha:g}"))
                       if alpha is not None else "alpha not in the file")
        details.append(f"{identity['modules']} modules")
    details.append(f"family {identity['family']}" if identity.get("family") else "family not told")
    if identity.get("variant"):
        details.append(f"variant {identity['variant']}")
    return f"{identity['kind']} ({'; '.join(details)})"


def inspect_report(r: dict) -> str:
    out = []
    summary = [("path", r["path"]), ("format", r["format"]), ("layout", r["layout"]),
               ("trainer", r.get("trainer") or "-"),
               ("step", "-" if r["step"] is None else r["step"]), ("epoch", "-" if r["epoch"] is None else r["epoch"]),
               ("model tensors", r["tensors"]), ("parameters", f"{r['parameters']:,}"),
               ("model bytes", human_bytes(r["bytes"])),
               ("files", f"{len(r['files'])} ({human_bytes(r['file_bytes'])})")]
    devices = r["metadata"].get("saved_on_devices")
    if devices:
        summary.append(("saved on", ", ".join(devices)))
    if identity := r.get("identity"):
        summary.append(("identity", identity_words(identity)))
    hub = r["metadata"].get("hf_cache")
    if hub:
        summary.append(("hf cache", f"{hub['repo_id']} at revision {hub['revision']}"))
    parts = r["metadata"].get("non_weight_parts")
    if parts:
        summary.append(("no weights", ", ".join(f"{name} ({cls})" for name, cls in parts.items())))
    out.append(tabulate(summary, tablefmt="plain"))
    if r["step_sources"]:
        rows = [(s["source"], s["value"], s["meaning_text"] + (f" ({s['note']})" if s.get("note") else ""))
                for s in r["step_sources"]]
        out.append("Step sources:\n" + tabulate(rows, headers=("source", "value", "meaning")))
    if r["components"]:
        rows = [(c["name"], c["role"], c["tensors"], f"{c['parameters']:,}", human_bytes(c["bytes"]),
                 ", ".join(_short(f) for f in c["files"])) for c in r["components"]]
        out.append("Components:\n" + tabulate(rows, headers=("component", "role", "tensors", "parameters", "bytes",
                                                             "files"), maxcolwidths=[None] * 5 + [60]))
    objects = r["metadata"].get("objects")
    if objects:  # a DCP state dict's non-tensor items
        rows = [(name, _one_line(value)) for name, value in list(objects.items())[:SHOWN_OBJECTS]]
        if len(objects) > SHOWN_OBJECTS:
            rows.append((f"... {len(objects) - SHOWN_OBJECTS} more", "(--json lists every one)"))
        out.append("Non-tensor items:\n" + tabulate(rows, headers=("item", "value"), maxcolwidths=[None, 90]))
    if r["dtypes"]:
        out.append("Model dtypes:\n" + tabulate(sorted(r["dtypes"].items()), headers=("dtype", "tensors")))
    q = r["quantization"]
    if q:
        rows = [(m["component"], m["module"], m["weights"], m["dtype"], m.get("group_size") or "", m["qtype_source"])
                for m in q["modules"]]
        out.append(f"Quantization ({q['library']}; map: {q['quantization_map'] or 'none found'}):\n" + tabulate(
            rows, headers=("component", "module", "qtype", "orig dtype", "group", "qtype from")))
    if "tensor_list" in r:
        rows = [(t["component"], t["name"], "x".join(map(str, t["shape"])) or "()", t["dtype"], t["bytes"])
                for t in r["tensor_list"]]
        out.append("Tensors:\n" + tabulate(rows, headers=("component", "name", "shape", "dtype", "bytes")))
    if "stats" in r:
        out.append(stats_table(r["stats"]))
    if "modules" in r:
        out.append(modules_table(r["modules"]))
    out.append(problems_table(r["problems"]))
    return "\n\n".join(out)


def inspect_table(reports: list[dict]) -> str:
    """Several checkpoints, a row each."""
    rows = [(r["path"], r["format"], r.get("trainer") or "-", "-" if r["step"] is None else r["step"], r["tensors"],
             f"{r['parameters']:,}", human_bytes(r["bytes"]), _codes(r["problems"])) for r in reports]
    return tabulate(rows, headers=("path", "format", "trainer", "step", "tensors", "parameters", "model bytes",
                                   "problems"), maxcolwidths=[60] + [None] * 6 + [40])


def inspect_reports(reports: list[dict]) -> str:
    """Several checkpoints, each in full (with --tensors, --stats or --modules)."""
    return "\n\n".join(inspect_report(r) for r in reports)


def verify_table(reports: list[dict]) -> str:
    rows = [(r["path"], "OK" if r["ok"] else "FAILED", "-" if r["step"] is None else r["step"],
             r.get("trainer") or "-", _codes(r["problems"])) for r in reports]
    failed = sum(1 for r in reports if not r["ok"])
    return tabulate(rows, headers=("path", "result", "step", "trainer", "problems"),
                    maxcolwidths=[70, None, None, None, 50]) + \
        f"\n\n{len(reports) - failed} of {len(reports)} verified" + (f", {failed} FAILED" if failed else "")


def _codes(problems: list[dict]) -> str:
    """Problem codes with their severity, each once: 'truncated (error), missing_rng (warning)'."""
    return ", ".join(dict.fromkeys(f"{p['code']} ({p['severity']})" for p in problems)) or "none"


def _one_line(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 200 else text[:197] + "..."


def _short(path: str) -> str:
    return os.path.basename(path.rstrip("/")) or path


def modules_table(modules: list[dict]) -> str:
    """The module tree, indented by depth, with its marks."""
    many = len({m["component"] for m in modules}) > 1
    rows = []
    for m in modules:
        marks = []
        if m["quantized"]:
            marks.append(f"quantized {m['quantized']}")
        elif m["quantized_modules"]:
            marks.append(f"{m['quantized_modules']} quantized modules")
        marks += [f"tied: {t}" for t in m["tied"]]
        if m["missing_in_ema"]:
            marks.append(f"{m['missing_in_ema']} tensors missing in EMA")
        name = "· " * (m["depth"] - 1) + m["module"].rpartition(".")[2]  # tabulate strips leading spaces
        dtypes = ", ".join(f"{d} x{n}" for d, n in m["dtypes"].items())
        rows.append(((m["component"],) if many else ()) + (
            name, f"{m['parameters']:,}", human_bytes(m["bytes"]), dtypes, "; ".join(marks)))
    if not rows:
        return "Modules: none (no model tensors)"
    headers = (("component",) if many else ()) + ("module", "parameters", "bytes", "dtypes", "")
    return "Modules:\n" + tabulate(rows, headers=headers, disable_numparse=True,
                                   maxcolwidths=[None] * (len(headers) - 1) + [60])


def stats_table(stats: list[dict]) -> str:
    many = len({s["component"] for s in stats}) > 1

    def num(value):
        return value if isinstance(value, str) else f"{value:.4g}"

    rows = [((s["component"],) if many else ()) + (
        s["name"] + (f" (dequantized {s['dequantized']})" if s.get("dequantized") else ""), s["dtype"],
        "x".join(map(str, s["shape"])) or "()", num(s["min"]), num(s["max"]), num(s["mean"]), num(s["std"]),
        num(s["l2"]), s["nan"], s["inf"], s["zeros"]) for s in stats]
    headers = (("component",) if many else ()) + ("name", "dtype", "shape", "min", "max", "mean", "std", "L2", "NaN",
                                                  "Inf", "zeros")
    return "Statistics:\n" + tabulate(rows, headers=headers, disable_numparse=True) if rows else \
        "Statistics: no tensor matches"


def run_report(r: dict) -> str:
    rows = [(c["name"], "-" if c["step"] is None else c["step"], c.get("trainer") or "-",
             "OK" if c["ok"] else "FAILED", human_bytes(c["size"]), c["why"]) for c in r["checkpoints"]]
    out = [tabulate(rows, headers=("checkpoint", "step", "trainer", "verify", "size", "latest"),
                    maxcolwidths=[40, None, None, None, None, 70])]
    for c in r["changes"]:
        if c["modules"]:
            top = sorted((m for m in c["modules"] if isinstance(m["rel_change"], float)),
                         key=lambda m: -m["rel_change"])[:3]
            out.append(f"{c['from_step']} -> {c['to_step']}: most changed " + ", ".join(
                f"{m['module']} {m['rel_change']:.3g}" for m in top))
        else:
            out.append(f"{c['from_step']} -> {c['to_step']}: {c.get('note')}")
    out.append(f"latest picks: {r['latest'] or 'nothing (no checkpoint verifies)'}")
    return "\n\n".join(out)


def verify_report(r: dict) -> str:
    rows = [(c["check"], c["status"].upper(), c["detail"]) for c in r["checks"]]
    head = f"{r['path']} ({r['format']}{', ' + r['layout'] if r.get('layout') else ''}" \
           f"{', written by ' + r['trainer'] if r.get('trainer') else ''}; step " \
           f"{'-' if r['step'] is None else r['step']})"
    table = tabulate(rows, headers=("check", "result", "detail"), maxcolwidths=[None, None, 90])
    verdict = "OK: verified" if r["ok"] else "FAILED"
    if r.get("recalled"):
        verdict += (" (recalled: every byte, hashed again, matches the manifest, and its folders hold the same "
                    "names as when this report was made)")
    return "\n\n".join([head, table, problems_table(r["problems"]), verdict])


def prune_report(r: dict) -> str:
    rows = [("keep", k["step"], k["path"], k["reason"]) for k in r["keep"]]
    rows += [("would delete" if r["dry_run"] else "deleted", d["step"], d["path"], d["reason"]) for d in r["delete"]]
    rows += [("would delete" if r["dry_run"] else "deleted", None, path, "staging left by a killed ckpttool run")
             for path in r["stale_staging"]]
    if not rows:
        return "no checkpoint found: nothing kept, nothing deleted"
    return tabulate(rows, headers=("action", "step", "path", "reason"), maxcolwidths=[None, None, 70, 50])


def diff_report(r: dict) -> str:
    if "components" in r:  # two pipelines: each component's own report, then which differ
        out = [f"A: {r['a']}\nB: {r['b']}"]
        out += [f"== component {c['component']}\n" + diff_report(c).split("\n\n", 1)[1] for c in r["components"]]
        for side, names in (("A", r["only_a_components"]), ("B", r["only_b_components"])):
            if names:
                out.append(f"Components only in {side}: {', '.join(names)}")
        out.append(f"SAME: every component matches ({r['compared']} tensors)" if r["same"] else
                   "DIFFERENT: " + ", ".join(r["different_components"] + [f"{n} (only in A)" for n in
                                                                         r["only_a_components"]] +
                                            [f"{n} (only in B)" for n in r["only_b_components"]]))
        return "\n\n".join(out)
    out = [f"A: {r['a']}\nB: {r['b']}\ncomponent: {r['component']}"]
    if r.get("apart"):
        out.append(f"Not for each other: {r['apart']}")
    if r["normalization"]:
        out.append("Key normalization applied:\n" + "\n".join(f"  - {rule}" for rule in r["normalization"]))
    if r["quantized_keys"]:
        rows = [(q["module"], q["qtype"], "A" if q["quantized_side"] == "a" else "B") for q in r["quantized_keys"]]
        out.append("Quantized on one side only (optimum-quanto):\n" + tabulate(rows, headers=("module", "qtype",
                                                                                               "quantized in")))
    for title, keys in (("Only in A", r["only_a"]), ("Only in B", r["only_b"])):
        if keys:
            shown = keys[:20] + ([f"... {len(keys) - 20} more"] if len(keys) > 20 else [])
            out.append(f"{title} ({len(keys)}):\n" + "\n".join(f"  {k}" for k in shown))
    for title, rows in (("Shape mismatches", r["shape_mismatches"]), ("Dtype mismatches", r["dtype_mismatches"])):
        if rows:
            out.append(f"{title}:\n" + tabulate([(m["key"], m["a"], m["b"]) for m in rows], headers=("key", "A", "B")))
    v = r["values"]
    if v is not None:
        lines = [f"Values: {v['equal']} equal, {len(v['close'])} within tolerance, {len(v['different'])} different"]
        rows = [(d["key"], f"{d['max_abs']:.3g}", f"{d['rel_l2']:.3g}", f"{d['cosine']:.6f}")
                for d in (v["different"] + v["close"])[:30]]
        if rows:
            lines.append(tabulate(rows, headers=("key", "max abs diff", "rel L2", "cosine")))
        out.append("\n".join(lines))
        if v.get("modules"):
            rows = [(m["module"], m["tensors"], m["changed"], m["rel_change"] if isinstance(m["rel_change"], str)
                     else f"{m['rel_change']:.3g}") for m in v["modules"]]
            out.append("Change per module (|A - B| / |B|):\n" + tabulate(
                rows, headers=("module", "tensors", "changed", "relative change"), disable_numparse=True))
    if r["same"]:
        out.append(f"SAME: {r['compared']} tensors match" + (" (after normalization)" if r["normalization"] else ""))
    else:
        out.append("DIFFERENT" + (f"\nFix: {r['fix']}" if r["fix"] else ""))
    return "\n\n".join(out)


LOST_SHOWN = 20  # lost tensors named per file in the text report; --json names them all


def repair_report(r: dict) -> str:
    if r["healthy"]:
        return f"{r['src']}: nothing to repair (it verifies); nothing written"
    rows = [(f["action"], f["code"] or "", _short(f["path"]), f["detail"]) for f in r["fixes"]]
    lines = [tabulate(rows, headers=["fix", "problem", "path", "what"], maxcolwidths=[None, None, 40, 70])]
    for f in r["fixes"]:
        if f["action"] == "salvage" and f["lost"]:
            lines.append(f"lost from {f['path']}:")
            by_reason: dict[str, list] = {}  # tensors lost for one reason (an optimizer left out whole) on one line
            for item in f["lost"]:
                by_reason.setdefault(item["why"], []).append(item["name"])
            for why, names in list(by_reason.items())[:LOST_SHOWN]:
                more = f" and {len(names) - 3} more" if len(names) > 3 else ""
                lines.append(f"  {', '.join(names[:3])}{more}: {why}")
            if len(by_reason) > LOST_SHOWN:
                lines.append(f"  ... and {len(by_reason) - LOST_SHOWN} more reasons (--json lists every tensor)")
    for item in r.get("not_copied", []):
        lines.append(f"not copied: {item['path']}: {item['why']}")
    if not r["saves_something"]:
        lines.append("nothing can be saved; nothing written")
    elif r["dry_run"]:
        lines.append(f"dry run: nothing written; without --dry-run this writes {r['dst']}")
    else:
        after = r["after"]
        if "latest" in after:
            verdict = f"latest picks {after['latest']}" if after["ok"] else "still no checkpoint in it verifies"
        elif not after["ok"]:
            verdict = f"it still has problems ({_codes(after['problems'])}: `ckpttool verify {r['dst']}` says which)"
        elif r["lost"]:
            verdict = "it verifies as files; what was lost is not in it (a strict load or a resume that needs it " \
                "fails there, loudly)"
        else:
            verdict = "it verifies"
        salvaged = [f for f in r["fixes"] if f["action"] == "salvage"]
        tensors = f" ({r['kept']} tensors kept, {r['lost']} lost)" if salvaged else ""
        applied = sum(f["action"] != "none" for f in r["fixes"])
        lines.append(f"wrote {r['dst']}: {applied} fix{'es' if applied != 1 else ''} applied{tensors}; {verdict}")
    return "\n".join(lines)
