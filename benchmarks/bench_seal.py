"""What sealing a save costs: Accelerate's `save_state` of a ~2 GiB state (fp32 weights and AdamW moments), then
`ckpttool.integrations.sealing.seal` of the dir it just wrote (what `install_sealing` runs after each save: the
manifest, every file hashed from the page cache), then `sync` until the save is on disk; each save into a fresh dir
after `sync`, after one warm-up save, side by side in one process.

The save returns once its bytes are in the page cache; how long that takes swings with the kernel's writeback (a
save that follows others on this machine's slow disk takes several times as long), so the seal is put beside both
the save as it returns and the save until it is on disk.

Aim (issue 32): sealing adds at most 10% to the save's time for a 2 GiB state.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gib", type=float, default=2.0, help="size of the saved state (weights + 2 moments)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--dir", default=None, help="where the saves go (default: a temporary dir)")
    args = parser.parse_args()

    import torch
    from accelerate import Accelerator

    params = int(args.gib * (1 << 30) / 12)  # fp32 weight + exp_avg + exp_avg_sq
    width = 4096
    layers = max(1, params // (width * width))
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    plain = Accelerator(cpu=True)
    plain.prepare(model, optimizer)
    from ckpttool.integrations.sealing import seal

    root = tempfile.mkdtemp(dir=args.dir)
    times = {"save_state": [], "seal, right after it": [], "save_state until on disk (+ sync)": []}
    try:
        plain.save_state(os.path.join(root, "warm-up"))
        for i in range(args.repeat):
            out = os.path.join(root, f"save{i}")
            os.sync()  # every save starts with no dirty pages of the one before
            start = time.perf_counter()
            plain.save_state(out)
            saved = time.perf_counter() - start
            start = time.perf_counter()
            seal(out)
            sealed = time.perf_counter() - start
            start = time.perf_counter()
            os.sync()
            times["save_state"].append(saved)
            times["seal, right after it"].append(sealed)
            times["save_state until on disk (+ sync)"].append(saved + time.perf_counter() - start)
            shutil.rmtree(out)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    size = sum(p.numel() for p in model.parameters()) * 12 / (1 << 30)
    median = {label: statistics.median(runs) for label, runs in times.items()}
    print(f"state: {size:.2f} GiB ({layers} x {width}x{width} fp32 weights + AdamW moments), {os.cpu_count()} cores, "
          f"median of {args.repeat}")
    for label, runs in times.items():
        print(f"  {label:36s} {median[label]:6.2f} s  (runs: {', '.join(f'{t:.2f}' for t in runs)})")
    seal_s = times["seal, right after it"]
    for label in ("save_state", "save_state until on disk (+ sync)"):
        ratios = [a / b for a, b in zip(seal_s, times[label])]
        print(f"  seal / {label}: median {100 * statistics.median(ratios):.1f}% "
              f"(runs: {', '.join(f'{100 * r:.1f}%' for r in ratios)})")
    print(f"  seal hashes at {size * (1 << 30) / median['seal, right after it'] / 1e9:.1f} GB/s")

if __name__ == "__main__":
    main()
