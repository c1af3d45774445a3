"""Views of one large storage: `inspect --stats` and `convert` read each view's own span, beside the naive read of the
whole storage per view and torch.load, in one run.

Claim: memory follows the tensor, not the storage. A plain torch.save of --views column views of one --storage-mib
matrix (each view a column, a few KiB of values spread over the whole storage) is measured through `ckpttool inspect
--stats` and `ckpttool convert` (views read in VIEW_SPAN pieces), through the same with the whole storage read per
view (VIEW_SPAN set to the storage's size, as before), and through torch.load. Peak RSS includes python and torch.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

from common import run_measured

MAKE = """
import sys, torch
rows = int(float(sys.argv[2]) * (1 << 20)) // 4 // 1000
base = torch.randn(rows, 1000)
torch.save({f"column.{i}": base[:, i] for i in range(int(sys.argv[3]))}, sys.argv[1])
"""

# A ckpttool command in-process, its VIEW_SPAN set first (the storage's size: the whole storage per view).
WITH_SPAN = """
import sys
import ckpttool.tensors as tensors
tensors.VIEW_SPAN = int(sys.argv[1])
from ckpttool.cli import main
main(sys.argv[2:])
"""

LOAD = "import sys, torch; torch.load(sys.argv[1], weights_only=True)"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--storage-mib", type=float, default=100)
    p.add_argument("--views", type=int, default=100)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "views-2core.txt"))
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "views.pt")
        os.system(f"{sys.executable} -c '{MAKE}' {src} {args.storage_mib} {args.views}")
        whole = str(int(args.storage_mib * (1 << 20)) + (1 << 20))
        rows = []
        for label, cmd in [
            ("ckpttool inspect --stats", ["-m", "ckpttool", "inspect", "--stats", src]),
            ("  whole storage per view", ["-c", WITH_SPAN, whole, "inspect", "--stats", src]),
            ("ckpttool convert", ["-m", "ckpttool", "convert", src, os.path.join(tmp, "a.safetensors")]),
            ("  whole storage per view", ["-c", WITH_SPAN, whole, "convert", src, os.path.join(tmp, "b.safetensors")]),
            ("torch.load", ["-c", LOAD, src]),
            ("python + import torch", ["-c", "import torch"]),
        ]:
            seconds, rss = run_measured([sys.executable, *cmd])
            rows.append(f"{label:28s} {seconds:8.2f} {rss:13.0f}")
    lines = [f"{args.views} column views of one {args.storage_mib:g} MiB float32 matrix (plain torch.save)",
             f"{'command':28s} {'seconds':>8s} {'peak RSS MiB':>13s}", *rows]
    print("\n".join(lines))
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
