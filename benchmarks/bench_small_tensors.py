"""A checkpoint of 100,000 small tensors (an LLM optimizer state looks like this): every per-tensor cost shows.

A .pt of 100,000 float32[64] tensors, and the same tensors in safetensors. Each ckpttool command is timed side by
side with its baseline in one run (median of --repeat, page cache warm):

- inspect against `python -c pass`, the safe pickle parse alone, and a naive `torch.load(mmap=True)` listing;
- verify with a manifest against hashing the file alone (xxh3-128 of its bytes in one Python process): the first
  verify after `ckpttool manifest`, which recalls the report manifest left in the verify cache after hashing every
  byte again (ckpttool.operations.verify_cache), and a verify with the cache off (a manifest written on another
  machine), which parses;
- convert to safetensors against `torch.load` + `save_file`;
- diff --values against the safetensors copy, against loading both and comparing with `torch.equal`.

    python benchmarks/bench_small_tensors.py [--tensors 100000] [--repeat 3] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from common import timed

MAKE = """
import sys, torch
from safetensors.torch import save_file
torch.manual_seed(0)
state = {f"state.{i}.exp_avg": torch.randn(64) for i in range(int(sys.argv[3]))}
torch.save(state, sys.argv[1])
save_file(state, sys.argv[2])
"""
PARSE = """
import gc, sys, zipfile
gc.disable()  # as ckpttool does while it reads a checkpoint
from ckpttool.formats.pickles import unpickle
with zipfile.ZipFile(sys.argv[1]) as z:
    data = z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))
unpickle(data)
"""
HASH = """
import sys, xxhash
h = xxhash.xxh3_128()
with open(sys.argv[1], "rb") as f:
    while chunk := f.read(1 << 22):
        h.update(chunk)
"""
NAIVE_LIST = """
import sys, torch
state = torch.load(sys.argv[1], mmap=True, weights_only=True)
print(len([(k, v.shape, v.dtype) for k, v in state.items()]))
"""
NAIVE_CONVERT = """
import sys, torch
from safetensors.torch import save_file
save_file(torch.load(sys.argv[1], weights_only=True), sys.argv[2])
"""
NAIVE_DIFF = """
import sys, torch
from safetensors.torch import load_file
a, b = torch.load(sys.argv[1], weights_only=True), load_file(sys.argv[2])
print(sum(not torch.equal(a[k], b[k]) for k in a))
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tensors", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    py = sys.executable
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp, tempfile.TemporaryDirectory() as cache_dir:
        pt, st, out = (os.path.join(tmp, n) for n in ("opt.pt", "opt.safetensors", "out.safetensors"))
        subprocess.run([py, "-c", MAKE, pt, st, str(args.tensors)], check=True)
        # the cache is not beside the file: a name added to its folder is a change
        cached = ["env", f"CKPTTOOL_CACHE_DIR={cache_dir}"]
        subprocess.run(cached + [py, "-m", "ckpttool", "manifest", pt], check=True, stdout=subprocess.DEVNULL)
        first = subprocess.run(cached + [py, "-m", "ckpttool", "verify", "--json", pt], check=True,
                               capture_output=True, text=True)
        assert json.loads(first.stdout).get("recalled"), "the verify after manifest should recall its report"
        for f in (pt, st):
            subprocess.run(["cat", f], stdout=subprocess.DEVNULL, check=True)
        print(f"{args.tensors:,} float32[64] tensors: .pt {os.path.getsize(pt) / 1e6:.1f} MB; {os.cpu_count()} CPUs; "
              f"median of {args.repeat}")

        def t(cmd):
            return timed(cmd, args.repeat)

        hashed = t([py, "-c", HASH, pt])

        def convert():
            if os.path.exists(out):
                os.remove(out)
            return [py, "-m", "ckpttool", "convert", "--no-verify", pt, out]

        rows = [
            ("inspect", t([py, "-m", "ckpttool", "inspect", pt]),
             {"python -c pass": t([py, "-c", "pass"]), "safe pickle parse alone": t([py, "-c", PARSE, pt]),
              "naive torch.load(mmap=True) listing": t([py, "-c", NAIVE_LIST, pt])}),
            ("verify, first after manifest", t(cached + [py, "-m", "ckpttool", "verify", pt]),
             {"xxh3-128 of the file": hashed}),
            ("verify, cache off (parses)", t(["env", "CKPTTOOL_CACHE_DIR=", py, "-m", "ckpttool", "verify", pt]),
             {"xxh3-128 of the file": hashed}),
            ("convert to safetensors (--no-verify)", timed_fresh(convert, args.repeat),
             {"torch.load + save_file": t([py, "-c", NAIVE_CONVERT, pt, out])}),
            ("diff --values .pt vs safetensors", t([py, "-m", "ckpttool", "diff", "--values", pt, st]),
             {"torch.load + load_file + torch.equal": t([py, "-c", NAIVE_DIFF, pt, st])}),
        ]
        print(f"{'ckpttool':38s} {'seconds':>8s}   baseline")
        for name, ours, baselines in rows:
            print(f"{name:38s} {ours:8.2f}   " + "; ".join(f"{b} {s:.2f} s (ours {ours / s:.2f}x)"
                                                       for b, s in baselines.items()))


def timed_fresh(make_cmd, repeat):
    """Median time of a command whose output must not exist beforehand."""
    import statistics
    import time

    runs = []
    for _ in range(repeat):
        cmd = make_cmd()
        start = time.perf_counter()
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


if __name__ == "__main__":
    main()
