"""Shared by the benchmarks: timing subprocesses and writing large checkpoints without holding them in memory."""

from __future__ import annotations

import json
import statistics
import struct
import subprocess
import time


def timed(cmd, repeat, shell=False):
    """Median wall time of `cmd` over `repeat` runs, output discarded."""
    runs = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(cmd, check=False, shell=shell, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


# Runs the command from a small Python process, so the peak RSS reported is the command's own (a child forked from
# this large benchmark process would count the parent's pages until it execs).
_MEASURE = """
import resource, subprocess, sys, time
start = time.perf_counter()
subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print(time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def run_measured(cmd):
    """(wall seconds, peak RSS in MiB) of one run of `cmd`, output discarded."""
    import sys

    out = subprocess.run([sys.executable, "-c", _MEASURE, *cmd], capture_output=True, text=True, check=True).stdout
    seconds, rss_kib = out.split()
    return float(seconds), int(rss_kib) / 1024


def write_safetensors(path, total_bytes, n_tensors=64, seed=0):
    """A valid float32 safetensors file of about `total_bytes`, streamed tensor by tensor (random data)."""
    import torch

    torch.manual_seed(seed)
    per = max(1, total_bytes // n_tensors // 4)
    header, offset = {}, 0
    for i in range(n_tensors):
        header[f"layer.{i}.weight"] = {"dtype": "F32", "shape": [per], "data_offsets": [offset, offset + per * 4]}
        offset += per * 4
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for i in range(n_tensors):
            f.write(torch.randn(per).numpy().tobytes())


def measured(cmd, repeat):
    """(median wall seconds, largest peak RSS in MiB) of `repeat` runs of `cmd`, each after `sync` (so no run pays
    for the previous one's dirty pages)."""
    runs = []
    for _ in range(repeat):
        subprocess.run(["sync"], check=False)
        runs.append(run_measured(cmd))
    return statistics.median(r[0] for r in runs), max(r[1] for r in runs)
