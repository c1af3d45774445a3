"""`ckpttool average` of 2, 4 and 8 checkpoints against the naive way (load every file, stack, mean).

Claim: ckpttool's peak memory stays flat as inputs are added (it holds one float64 accumulator and one input tensor at
a time), while the naive way holds every input. Peak RSS of the command itself; one run each.

    python benchmarks/bench_average.py [--size-mib 256] [--tensors 32] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

from common import run_measured, write_safetensors

NAIVE = """
import sys, torch
from safetensors.torch import load_file, save_file
states = [load_file(p) for p in sys.argv[2:]]
save_file({k: torch.stack([s[k].double() for s in states]).mean(0).float() for k in states[0]}, sys.argv[1])
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--tensors", type=int, default=32)
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    py = sys.executable
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        inputs = []
        for seed in range(8):
            inputs.append(os.path.join(tmp, f"in{seed}.safetensors"))
            write_safetensors(inputs[-1], args.size_mib << 20, args.tensors, seed=seed)
        out = os.path.join(tmp, "out.safetensors")
        for count in (2, 4, 8):
            for name, cmd in (("ckpttool average", [py, "-m", "ckpttool", "average", "--force", *inputs[:count], out]),
                              ("naive load all + stack + mean", [py, "-c", NAIVE, out, *inputs[:count]])):
                seconds, rss = run_measured(cmd)
                rows.append((count, name, seconds, rss))
    print(f"{args.size_mib} MiB float32 checkpoints, {args.tensors} tensors each "
          f"(largest {args.size_mib / args.tensors:.0f} MiB); {os.cpu_count()} CPUs")
    print(f"{'inputs':>6s} {'command':32s} {'seconds':>8s} {'peak RSS MiB':>13s}")
    for count, name, seconds, rss in rows:
        print(f"{count:6d} {name:32s} {seconds:8.2f} {rss:13.0f}")
    ours = [r for r in rows if r[1] == "ckpttool average"]
    print(f"ckpttool peak RSS at 8 inputs / at 2 inputs = {ours[-1][3] / ours[0][3]:.2f}x")


if __name__ == "__main__":
    main()
