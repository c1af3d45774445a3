"""How many threads diff --values's block statistics should use (ckpttool.blockstats.MAX_THREADS).

Two different safetensors files are compared in-process (`blockstats.compare_pairs`, no start-up) with each thread
count in turn, round after round so that a slow spell of the machine hits every count, next to `cat` of both files.

    python benchmarks/bench_threads.py [--size-gib 2] [--threads 16,8,4] [--repeat 5] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time

from common import write_safetensors

from ckpttool import blockstats
from ckpttool.checkpoint import open_checkpoint


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gib", type=float, default=2.0)
    parser.add_argument("--threads", default="16,8,4")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    counts = [int(n) for n in args.threads.split(",")]
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        a, b = os.path.join(tmp, "a.safetensors"), os.path.join(tmp, "b.safetensors")
        write_safetensors(a, int(args.size_gib * (1 << 30)), seed=0)
        write_safetensors(b, int(args.size_gib * (1 << 30)), seed=1)
        pairs = list(zip(open_checkpoint(a).components[0].tensors, open_checkpoint(b).components[0].tensors))
        subprocess.run(["cat", a, b], stdout=subprocess.DEVNULL, check=True)  # page cache warm
        times: dict[str, list[float]] = {}
        for _ in range(args.repeat):
            start = time.perf_counter()
            subprocess.run(["cat", a, b], stdout=subprocess.DEVNULL, check=True)
            times.setdefault("cat both files", []).append(time.perf_counter() - start)
            for n in counts:
                blockstats.MAX_THREADS = n
                blockstats.workers = lambda n=n: n
                start = time.perf_counter()
                blockstats.compare_pairs(pairs)
                times.setdefault(f"compare_pairs, {n} threads", []).append(time.perf_counter() - start)
    print(f"two different {args.size_gib:g} GiB files, {os.cpu_count()} CPUs, {args.repeat} rounds; seconds, sorted")
    for name, runs in times.items():
        print(f"{name:28s} median {statistics.median(runs):.3f}   " + " ".join(f"{r:.3f}" for r in sorted(runs)))


if __name__ == "__main__":
    main()
