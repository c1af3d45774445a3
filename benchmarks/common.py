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


def write_safetensors(path, total_bytes, n_tensors=64):
    """A valid float32 safetensors file of about `total_bytes`, streamed tensor by tensor (random data)."""
    import torch

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
