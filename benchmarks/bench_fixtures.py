"""What `ckpttool fixtures` costs: the default set (every trainer it can make here, healthy) and the set with every
damage kind, against the baseline of writing the same healthy runs alone (each trainer's library called as the
command calls it, without listing, damaging or verifying anything); wall seconds, peak RSS and bytes written, median
of `--repeat` runs, each into a fresh folder. Then every listed entry is verified again (`verify --for-resume`) and
compared with its listed code.

`--python` runs it all with another interpreter (a fresh venv's, with `pip install '.[fixtures]'`): the figures are
then those of an install, not of this repository's editable one.

Aim (issue 36): the whole default set on 2 cores in under a minute and a few MB.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from benchmarks.common import run_measured  # noqa: E402

KINDS = ("missing", "truncated", "empty", "stale", "bit-flip")
WRITE_ALONE = """
import os, sys
from ckpttool.operations.fixtures import _quiet_stdout
from ckpttool.synthetic import catalog
with _quiet_stdout():
    for t in catalog.TRAINERS:
        if not catalog.missing_library(t):
            t.write(os.path.join(sys.argv[1], t.name, "healthy"))
"""
CHECK = """
import json, sys
from ckpttool.model import ERROR
from ckpttool.operations.verify import verify
listing, wrong = json.load(open(sys.argv[1])), []
for e in listing["entries"]:
    codes = [str(p.code) for p in verify(e["path"], for_resume=True, recall=False).problems if p.severity == ERROR]
    if (e["expected_code"] is None and codes) or (e["expected_code"] is not None and e["expected_code"] not in codes):
        wrong.append((e["trainer"], e["damage"], e["expected_code"], codes))
print(json.dumps(wrong))
"""


def _size(folder: str) -> int:
    return sum(os.lstat(os.path.join(d, f)).st_size for d, _, files in os.walk(folder) for f in files)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--python", default=sys.executable, help="the interpreter (and its install) to measure")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where the outputs go (default: a temporary dir)")
    args = parser.parse_args()

    root = tempfile.mkdtemp(dir=args.dir)
    os.chdir(root)  # `-m ckpttool` from here imports the interpreter's own install, never this repository's tree
    version = subprocess.run([args.python, "-c", "import torch, ckpttool; print(ckpttool.__file__, torch.__version__)"],
                             capture_output=True, text=True).stdout.strip()
    damage = [a for kind in KINDS for a in ("--damage", kind)]
    cases = {"the runs written alone (baseline)": [args.python, "-c", WRITE_ALONE],
             "ckpttool fixtures (default set)": [args.python, "-m", "ckpttool", "fixtures"],
             "ckpttool fixtures --damage (every kind)": [args.python, "-m", "ckpttool", "fixtures", *damage]}
    results = {}
    try:
        for name, cmd in cases.items():
            runs = []
            for i in range(args.repeat):
                out = os.path.join(root, f"{len(results)}-{i}")
                runs.append((*run_measured([*cmd, out]), _size(out)))
                if i < args.repeat - 1:
                    shutil.rmtree(out)
            results[name] = runs
        listing = {}
        for name, cmd in list(cases.items())[1:]:
            out = os.path.join(root, f"listed-{len(listing)}")
            doc = json.loads(subprocess.run([*cmd, out, "--json"], capture_output=True, text=True, check=True).stdout)
            path = os.path.join(root, f"listing-{len(listing)}.json")
            with open(path, "w", encoding="utf-8") as f:
                json.dump(doc, f)
            wrong = json.loads(subprocess.run([args.python, "-c", CHECK, path], capture_output=True, text=True,
                                              check=True).stdout)
            listing[name] = (doc, wrong)
    finally:
        os.chdir(os.path.dirname(root))
        shutil.rmtree(root, ignore_errors=True)

    print(f"{os.cpu_count()} cores, median of {args.repeat}; {version}")
    base = statistics.median(r[0] for r in results["the runs written alone (baseline)"])
    for name, runs in results.items():
        seconds = statistics.median(r[0] for r in runs)
        print(f"  {name:42s} {seconds:6.1f} s ({seconds / base:.2f}x)  peak {max(r[1] for r in runs):5.0f} MiB  "
              f"{statistics.median(r[2] for r in runs) / 1e6:5.1f} MB  (runs: "
              f"{', '.join(f'{r[0]:.1f}' for r in runs)})")
    for name, (doc, wrong) in listing.items():
        trainers = {e["trainer"] for e in doc["entries"]}
        made = {e["made"] for e in doc["entries"]}
        print(f"  {name}: {len(doc['entries'])} entries of {len(trainers)} trainers ({', '.join(sorted(made))}), "
              f"{len(doc['skipped'])} skipped; verified again: {len(wrong)} not as listed {wrong[:3]}")


if __name__ == "__main__":
    main()
