"""The reference trainer run N times beside busy torch neighbours: are its checkpoints bit-identical?

Each run trains the same seeded job into its own folder; the script hashes every file of every checkpoint and
prints, per checkpoint, how many different versions the runs wrote (1 is the claim: bit-identical whatever the
load). Neighbours are processes doing small torch matrix products in a loop, as a shared CI machine may run (the
neighbour of ../shared/tools/fresh-check --busy). First it shows the kernel the trainer pins its thread count for:
the in_proj weight-gradient product, whose last bits depend on the thread count (trainer/determinism.py).

    python benchmarks/bench_determinism.py --runs 8 --busy 1
    python benchmarks/bench_determinism.py --runs 8 --busy 2 --jobs 2 -- --threads 2
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import hashlib
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from tests.helpers import busy_neighbour  # noqa: E402


def kernel_by_threads(batch: int = 8) -> dict[int, float]:
    """{threads: largest difference from 1 thread} of the product the in_proj weight gradient is, on this CPU."""
    import torch

    from trainer.model import DIM, Denoiser

    hidden = Denoiser().in_proj.out_features
    gen = torch.Generator().manual_seed(0)
    grad_out, inputs = torch.randn(batch, hidden, generator=gen), torch.randn(batch, DIM + 1, generator=gen)
    results = {}
    for threads in range(1, 2 * os.cpu_count() + 1):
        torch.set_num_threads(threads)
        results[threads] = grad_out.t() @ inputs
    return {t: (r - results[1]).abs().max().item() for t, r in results.items()}


def run_trainer(out: str, steps: int, every: int, extra: list[str]) -> dict[str, str]:
    """One run; {path of each checkpoint file: digest}. SOURCE_DATE_EPOCH fixes the manifests' creation time."""
    cmd = [sys.executable, "-m", "trainer", "--output-dir", out, "--max-steps", str(steps),
           "--checkpointing-steps", str(every), "--batch-size", "8", *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, SOURCE_DATE_EPOCH="1700000000"))
    if proc.returncode != 0:
        raise SystemExit(f"trainer failed ({proc.returncode}): {proc.stderr[-2000:]}")
    digests = {}
    for folder, _, files in sorted(os.walk(out)):
        for name in sorted(files):
            with open(os.path.join(folder, name), "rb") as f:
                digests[os.path.relpath(os.path.join(folder, name), out)] = hashlib.sha256(f.read()).hexdigest()[:12]
    return digests


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--jobs", type=int, default=1, help="trainer runs at a time")
    parser.add_argument("--busy", type=int, default=1, help="neighbour processes doing torch matrix products")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--every", type=int, default=4)
    parser.add_argument("extra", nargs="*", help="more trainer flags, after --")
    args = parser.parse_args()
    print("in_proj weight-gradient product, largest difference from 1 thread, by thread count: "
          + ", ".join(f"{t}: {d:.3g}" for t, d in kernel_by_threads().items()))
    with contextlib.ExitStack() as neighbours, tempfile.TemporaryDirectory() as work, \
            ThreadPoolExecutor(args.jobs) as pool:
        for _ in range(args.busy):
            neighbours.enter_context(busy_neighbour())
        outs = [os.path.join(work, f"run{i}") for i in range(args.runs)]
        results = list(pool.map(lambda out: run_trainer(out, args.steps, args.every, args.extra), outs))
    print(f"{args.runs} trainer runs, {args.jobs} at a time, beside {args.busy} busy neighbour(s); trainer flags: "
          f"{' '.join(args.extra) or '(defaults)'}")
    worst = 1
    for key in results[0]:
        versions = collections.Counter(r.get(key) for r in results)
        worst = max(worst, len(versions))
        if len(versions) > 1 or key.endswith(("model.safetensors", "optimizer.bin")):
            print(f"  {key:45} {len(versions)} version(s)  "
                  + "  ".join(f"{h}x{n}" for h, n in versions.most_common()))
    print(f"{len(results[0])} files per run: " + ("bit-identical in every run" if worst == 1 else
                                                   f"NOT bit-identical: up to {worst} versions of one file"))
    return 0 if worst == 1 else 1


if __name__ == "__main__":
    sys.exit(main())
