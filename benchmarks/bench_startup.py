"""Start-up: each command on tiny files of every layout, against `python -c pass`, in alternating pairs.

A script or a CI loop calls ckpttool once per checkpoint, so on small files the interpreter start and the imports are
the whole cost. Each command runs once to warm the bytecode cache (PYTHONDONTWRITEBYTECODE is dropped for the runs,
as it is unset on a user's machine), then `--repeat` times, each run right after a `python -c pass` (so a noisy
neighbour hits both alike); the table gives the medians and their ratio.

    python benchmarks/bench_startup.py [--repeat 10]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def tiny_files(folder: str) -> dict[str, str]:
    """A tiny file (or dir) of each layout: safetensors, torch zip, a training dict, an Accelerate dir, a DCP dir."""
    import warnings

    import torch
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file

    warnings.filterwarnings("ignore")  # dcp.save without a process group says so

    model = {"w": torch.zeros(4, 4), "b": torch.zeros(4)}
    made = {"safetensors": os.path.join(folder, "tiny.safetensors"), "pt": os.path.join(folder, "tiny.pt"),
            "training dict": os.path.join(folder, "train.pt"), "accelerate dir": os.path.join(folder, "state"),
            "dcp dir": os.path.join(folder, "dcp")}
    save_file(model, made["safetensors"])
    torch.save(model, made["pt"])
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(4))], lr=0.1)
    torch.save({"model": model, "optimizer": opt.state_dict(), "global_step": 3}, made["training dict"])
    os.makedirs(made["accelerate dir"])
    save_file(model, os.path.join(made["accelerate dir"], "model.safetensors"))
    torch.save(opt.state_dict(), os.path.join(made["accelerate dir"], "optimizer.bin"))
    dcp.save({"model": model}, checkpoint_id=made["dcp dir"], no_dist=True)
    return made


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT,
                   env=dict(env, CKPTTOOL_CACHE_DIR=""))
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()
    py = sys.executable
    with tempfile.TemporaryDirectory() as folder:
        files = tiny_files(folder)
        commands = [("--help", ["--help"])]
        commands += [(f"inspect {kind}", ["inspect", path]) for kind, path in files.items()]
        commands += [(f"verify {kind}", ["verify", path]) for kind, path in files.items()]
        commands += [("inspect, 5 files in one call", ["inspect", *files.values()])]
        print(f"medians of {args.repeat} runs, each right after a `python -c pass`")
        print(f"{'command':34} {'ckpttool':>9} {'python':>8} {'ratio':>6}")
        for label, argv in commands:
            ours, base = [], []
            timed([py, "-m", "ckpttool", *argv])  # writes the bytecode cache
            for _ in range(args.repeat):
                base.append(timed([py, "-c", "pass"]))
                ours.append(timed([py, "-m", "ckpttool", *argv]))
            o, b = statistics.median(ours), statistics.median(base)
            print(f"{label:34} {o:8.3f}s {b:7.3f}s {o / b:5.2f}x")


if __name__ == "__main__":
    main()
