"""Pickle safety against the real test corpora of picklescan and modelscan, side by side with the scanners.

Their payload files are not redistributed here: give checkouts of the two repositories (or `git archive` of their
`tests/` folders). Every file goes through every ckpttool command (inspect, verify, diff, convert, remap, manifest,
latest, on a copy), in this process, under an audit hook that records any command execution or network use; then
picklescan, modelscan and fickling (`pip install ckpttool[compare]`) scan the same file. The table goes to
`results/scanners.md`; the README quotes its summary.

    python bench_scanners.py PICKLESCAN_REPO MODELSCAN_REPO
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import sys
import tempfile

RUNS_CODE = {"os.system", "os.exec", "os.posix_spawn", "os.spawn", "subprocess.Popen", "socket.connect",
             "socket.getaddrinfo", "urllib.Request", "webbrowser.open", "ctypes.dlopen", "os.fork"}
SUFFIXES = (".pkl", ".pickle", ".pt", ".pth", ".bin", ".ckpt", ".zip", ".npy", ".7z", ".joblib", ".dill", ".h5")


class Tripwire:
    """An audit hook: any event in RUNS_CODE while armed is a payload that ran."""

    def __init__(self):
        self.armed, self.seen = False, []
        sys.addaudithook(self.hook)

    def hook(self, event, args):
        if self.armed and any(event == e or event.startswith(e + ".") for e in RUNS_CODE):
            self.seen.append(event)


def ckpttool_verdict(path: str, work: str, wire: Tripwire) -> tuple[str, list[str]]:
    """(verdict, events): 'unsafe_pickle' if any command reports it, else the problem codes seen, or 'no problem'."""
    from click.testing import CliRunner

    from ckpttool.cli import main

    folder = os.path.join(work, "in")
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    target = os.path.join(folder, os.path.basename(path))
    shutil.copy(path, target)
    commands = [["inspect", "--json", target], ["verify", "--json", target], ["diff", target, target],
                ["convert", target, os.path.join(work, "out.safetensors"), "--force"],
                ["remap", target, os.path.join(work, "out.pt"), "--add-prefix", "x.", "--force"],
                ["manifest", "--force", target], ["latest", "--json", folder]]
    outputs, codes = [], set()
    wire.armed, wire.seen = True, []
    try:
        for args in commands:
            result = CliRunner().invoke(main, args)
            outputs.append(result.stdout + result.stderr)
            if result.exception and not isinstance(result.exception, SystemExit):
                codes.add(f"crash:{type(result.exception).__name__}")
    finally:
        wire.armed = False
    text = "\n".join(outputs)
    for code in ("unsafe_pickle", "corrupt", "truncated", "no_tensors"):
        if code in text:
            codes.add(code)
    if "internal error" in text:
        codes.add("internal error")
    if "not a checkpoint file ckpttool reads" in text:
        codes.add("not read: not a checkpoint format")
    verdict = "unsafe_pickle" if "unsafe_pickle" in codes else ", ".join(sorted(codes)) or "no problem"
    return verdict, list(wire.seen)


def picklescan_verdict(path: str) -> str:
    from picklescan.scanner import scan_file_path

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            result = scan_file_path(path)
        except Exception as e:  # noqa: BLE001 - e.g. a .7z without py7zr installed
            return f"error ({type(e).__name__})"
    if result.infected_files:
        return "dangerous"
    return "scan error" if result.scan_err else "suspicious" if getattr(result, "suspicious_count", 0) else "clean"


def modelscan_verdict(path: str) -> str:
    from modelscan.modelscan import ModelScan

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            report = ModelScan().scan(path)
        except Exception as e:  # noqa: BLE001
            return f"error ({type(e).__name__})"
    summary = report["summary"]
    if summary["total_issues"]:
        worst = next(s for s in ("CRITICAL", "HIGH", "MEDIUM", "LOW") if summary["total_issues_by_severity"][s])
        return worst.lower()
    if report["errors"]:
        return "scan error"
    return "skipped" if summary["skipped"]["total_skipped"] else "clean"


def fickling_verdict(path: str) -> str:
    import fickling

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            result = fickling.scan_file(path, graceful=True)
        except Exception as e:  # noqa: BLE001 - the scanner's own failure is its verdict
            return f"error ({type(e).__name__})"
    return str(result.severity).split(".")[-1].lower()


def corpus(roots: list[str]) -> list[tuple[str, str]]:
    files = []
    for root in roots:
        for folder, _, names in os.walk(os.path.join(root, "tests")):
            for name in sorted(names):
                if name.endswith(SUFFIXES):
                    files.append((os.path.basename(os.path.normpath(root)), os.path.join(folder, name)))
    return sorted(files, key=lambda f: (f[0], f[1]))


def warm_up(work: str):
    """Every command once on a benign file before the tripwire is armed: importing torch loads native libraries."""
    import torch

    benign = os.path.join(work, "benign.pt")
    torch.save({"w": torch.zeros(2)}, benign)
    ckpttool_verdict(benign, work, Tripwire())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("repos", nargs="+", help="checkouts of picklescan and modelscan (their tests/ folders are read)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as work:
        warm_up(work)
    wire = Tripwire()
    rows, executed = [], []
    with tempfile.TemporaryDirectory() as work:
        for repo, path in corpus(args.repos):
            verdict, events = ckpttool_verdict(path, work, wire)
            if events:
                executed.append((path, events))
            rows.append((repo, os.path.relpath(path, os.path.join(args.repos[0], "..")), picklescan_verdict(path),
                         modelscan_verdict(path), fickling_verdict(path), verdict))
    flagged = [r for r in rows if r[2] == "dangerous"]
    missed = [r for r in flagged if r[5] != "unsafe_pickle"]
    lines = ["| corpus | file | picklescan | modelscan | fickling | ckpttool |", "|---|---|---|---|---|---|"]
    lines += [f"| {r[0]} | `{os.path.basename(r[1])}` | {r[2]} | {r[3]} | {r[4]} | {r[5]} |" for r in rows]
    summary = (f"{len(rows)} files; payloads run by ckpttool: {len(executed)}; picklescan calls {len(flagged)} "
               f"dangerous, ckpttool reports unsafe_pickle on {len(flagged) - len(missed)} of them and on "
               f"{sum(r[5] == 'unsafe_pickle' for r in rows)} files in all")
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "scanners.md")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        f.write(f"{summary}\n\n" + "\n".join(lines) + "\n")
    print(summary)
    for r in missed:
        print(f"  picklescan dangerous, ckpttool {r[5]}: {r[1]}")
    for path, events in executed:
        print(f"  EXECUTED {path}: {events}")
    return 1 if executed else 0


if __name__ == "__main__":
    sys.exit(main())
