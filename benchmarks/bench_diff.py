"""`ckpttool diff --values` of two large safetensors checkpoints, equal and different, against reading both files.

Claims: both files are read once, block by block on every core; identical blocks cost a byte compare, differing ones
are measured with numpy, so the run stays near the cost of reading both files and peak memory is a few blocks per
core, not the checkpoints or even the largest tensor. The naive baseline loads
both files whole (`safetensors.torch.load_file`) and compares with torch.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

from common import run_measured, write_safetensors

NAIVE = """
import sys, torch
from safetensors.torch import load_file
a, b = load_file(sys.argv[1]), load_file(sys.argv[2])
print(sum(torch.equal(a[k], b[k]) for k in a))  # every tensor compared, as diff does
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-gib", type=float, default=2.0)
    parser.add_argument("--tensors", type=int, default=64)
    parser.add_argument("--dir", default=None)
    parser.add_argument("--repeat", type=int, default=1, help="rounds of (cat, ckpttool), medians reported; the "
                        "naive baseline runs once")
    args = parser.parse_args()
    py = sys.executable
    size = int(args.size_gib * (1 << 30))
    largest_mib = size / args.tensors / (1 << 20)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        a, same, other = (os.path.join(tmp, n) for n in ("a.safetensors", "same.safetensors", "other.safetensors"))
        write_safetensors(a, size, args.tensors, seed=0)
        shutil.copyfile(a, same)
        write_safetensors(other, size, args.tensors, seed=1)
        rows, spreads = [], {}
        for label, b in (("equal", same), ("different", other)):
            run_measured(["cat", a, b])  # warm the page cache
            reads, ours = [], []
            for _ in range(args.repeat):  # alternating, so that a slow spell of the machine hits both
                reads.append(run_measured(["cat", a, b]))
                ours.append(run_measured([py, "-m", "ckpttool", "diff", "--values", "--json", a, b]))
            rows.append((label, "cat A B > /dev/null (read both)", *_median(reads)))
            rows.append((label, "ckpttool diff --values", *_median(ours)))
            rows.append((label, "naive load_file x2 + torch.equal", *run_measured([py, "-c", NAIVE, a, b])))
            spreads[label] = sorted(o[0] / r[0] for o, r in zip(ours, reads))
    print(f"two {args.size_gib:g} GiB safetensors files, {args.tensors} tensors each (largest {largest_mib:.0f} MiB)")
    print(f"{'case':10s} {'command':36s} {'seconds':>8s} {'peak RSS MiB':>13s}")
    for label, name, seconds, rss in rows:
        print(f"{label:10s} {name:36s} {seconds:8.2f} {rss:13.0f}")
    by = {(label, name): (s, r) for label, name, s, r in rows}
    for label in ("equal", "different"):
        ours, read = by[(label, "ckpttool diff --values")], by[(label, "cat A B > /dev/null (read both)")]
        naive = by[(label, "naive load_file x2 + torch.equal")]
        print(f"{label}: ours / read-both time = {ours[0] / read[0]:.2f}x; peak RSS ours {ours[1]:.0f} MiB vs naive "
              f"{naive[1]:.0f} MiB ({ours[1] / naive[1]:.0%}); largest tensor {largest_mib:.0f} MiB")
        if args.repeat > 1:
            print(f"{label}: ours / read-both in each of {args.repeat} rounds: "
                  + " ".join(f"{r:.2f}x" for r in spreads[label]))


def _median(runs):
    """Median seconds, and the highest peak RSS, of (seconds, RSS) runs."""
    import statistics

    return statistics.median(s for s, _ in runs), max(r for _, r in runs)


if __name__ == "__main__":
    main()
