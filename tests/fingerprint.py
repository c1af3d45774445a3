"""What ckpttool says of every fixture and every real-library sample, reduced to the facts a refactor must keep:
format, layout, trainer, step, components (name, role, tensor count), and the problem codes with their severities of
`inspect`, `verify` and `verify --for-resume`. Recorded once (`python -m tests.fingerprint --record`), compared by
tests/test_fingerprint.py: behaviour changes only where a commit says so (and then the record is renewed with it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

DATA = os.path.join(os.path.dirname(__file__), "data")
RECORD = os.path.join(DATA, "fingerprint.json")
SAMPLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")


def samples() -> dict[str, str]:
    """The committed real-library samples under tests/data and those `ckpttool fixtures` ships
    (ckpttool/synthetic/samples): every checkpoint folder or file that is not part of one already taken (a folder's
    own files are covered by the folder), by its path under its root."""
    from ckpttool.synthetic.catalog import SAMPLES

    found = {}
    for root in (DATA, SAMPLES):
        found.update(_samples_under(root))
    return found


def _samples_under(root: str) -> dict[str, str]:
    from ckpttool import trainers
    from ckpttool.formats import dcp, deepspeed

    found = {}
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        rel = os.path.relpath(folder, root)
        if rel != "." and (trainers.for_path(folder) is not None or dcp.detect(folder) or deepspeed.detect(folder)):
            found[rel] = folder
            dirs[:] = []  # its files belong to it
            continue
        for name in sorted(files):
            if name.endswith(SAMPLE_SUFFIXES):
                found[os.path.normpath(os.path.join(rel, name))] = os.path.join(folder, name)
    return found


def _problems(report: dict) -> list:
    return sorted({f"{p['code']}:{p['severity']}" for p in report["problems"]})


def _as_json(report) -> dict:
    """A report as the CLI's --json shows it."""
    return json.loads(json.dumps(report.to_json() if hasattr(report, "to_json") else report, default=_default))


def _default(value):
    return value.to_json() if hasattr(value, "to_json") else str(value)


def fingerprint(paths: dict[str, str]) -> dict:
    """{name: what inspect, verify and verify --for-resume say of it}, or the error a command ends in."""
    from ckpttool.errors import CkptError, UsageError
    from ckpttool.operations.inspect import inspect
    from ckpttool.operations.verify import verify

    out = {}
    for name, path in sorted(paths.items()):
        facts = {}
        try:
            r = inspect(path)
            r = _as_json(r)
            facts["inspect"] = {"format": r["format"], "layout": r["layout"], "trainer": r["trainer"],
                                "step": r["step"], "problems": _problems(r),
                                "components": sorted([c["name"], c["role"], c["tensors"]] for c in r["components"]),
                                "step_sources": [[s["source"], s["value"], s["meaning"]] for s in r["step_sources"]]}
        except (CkptError, UsageError) as e:
            facts["inspect"] = {"error": getattr(e, "code", "usage")}
        for key, for_resume in (("verify", False), ("verify_for_resume", True)):
            try:
                r = _as_json(verify(path, for_resume=for_resume, recall=False))
                facts[key] = {"ok": r["ok"], "step": r["step"], "problems": _problems(r)}
            except (CkptError, UsageError) as e:
                facts[key] = {"error": getattr(e, "code", "usage")}
        out[name] = facts
    return out


def current(corpus_root: str | None = None) -> dict:
    """The fingerprint of the fixture corpus (built in `corpus_root`, or a temporary folder) and the samples."""
    from fixtures.generate import build

    os.environ["CKPTTOOL_CACHE_DIR"] = ""
    with tempfile.TemporaryDirectory() as tmp:
        made = build(corpus_root or tmp)
        corpus = {f"corpus/{name}": path for name, path in made.items() if isinstance(path, str)}
        return fingerprint({**corpus, **{f"data/{k}": v for k, v in samples().items()}})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--record", action="store_true", help=f"write {RECORD}")
    args = p.parse_args(argv)
    doc = current()
    text = json.dumps(doc, indent=1, sort_keys=True) + "\n"
    if args.record:
        with open(RECORD, "w") as f:
            f.write(text)
        print(f"recorded {len(doc)} paths in {RECORD}")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
