"""`ckpttool convert` against the naive `torch.load(...)` + `safetensors.torch.save_file(...)`, side by side.

Claims: .pt -> safetensors is no slower than the naive way, and its peak RSS is under 40% of the naive one at 1 GiB
and flat as the checkpoint grows (tensors are streamed one at a time; bytes already in the target's layout are
copied file to file). Also measured: safetensors -> .pt and an Accelerate state dir -> safetensors.
`ckpttool convert` includes re-reading and comparing the output; the `--no-verify` row shows the conversion alone.
Every run starts after `sync`, so no run pays for the previous one's dirty pages; each figure is the median of
--repeat runs.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

from common import measured, run_measured

MAKE_PT = """
import sys, torch
n, per = 64, int(float(sys.argv[2]) * (1 << 30)) // 64 // 4
torch.save({f"layer.{i}.weight": torch.randn(per) for i in range(n)}, sys.argv[1])
"""
MAKE_ACCELERATE = """
import sys, torch
from accelerate import Accelerator
per = int(float(sys.argv[2]) * (1 << 30)) // 16 // 4
model = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(per)) for _ in range(16)])
accelerator = Accelerator(cpu=True)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
model, opt = accelerator.prepare(model, opt)
accelerator.save_state(sys.argv[1])
"""
NAIVE_PT_TO_ST = """
import sys, torch
from safetensors.torch import save_file
save_file(torch.load(sys.argv[1], weights_only=True), sys.argv[2])
"""
NAIVE_ST_TO_PT = """
import sys, torch
from safetensors.torch import load_file
torch.save(load_file(sys.argv[1]), sys.argv[2])
"""
NAIVE_ACC_TO_ST = """
import sys, shutil
shutil.copyfile(sys.argv[1] + "/model.safetensors", sys.argv[2])
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes-gib", default="1,4")
    parser.add_argument("--dir", default=None)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    py = sys.executable
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for size in args.sizes_gib.split(","):
            pt = os.path.join(tmp, f"{size}.pt")
            run_measured([py, "-c", MAKE_PT, pt, size])
            cases = [("pt -> safetensors", pt, ".safetensors", NAIVE_PT_TO_ST)]
            st = os.path.join(tmp, f"{size}-src.safetensors")
            run_measured([py, "-m", "ckpttool", "convert", "--no-verify", pt, st])
            cases.append(("safetensors -> pt", st, ".pt", NAIVE_ST_TO_PT))
            if float(size) <= 1:
                acc = os.path.join(tmp, f"{size}-acc")
                run_measured([py, "-c", MAKE_ACCELERATE, acc, size])
                cases.append(("accelerate dir -> safetensors", acc, ".safetensors", None))
            for label, src, ext, naive in cases:
                out = os.path.join(tmp, "out" + ext)
                for name, cmd in (("ckpttool convert", [py, "-m", "ckpttool", "convert", "--force", src, out]),
                                  ("ckpttool convert --no-verify",
                                   [py, "-m", "ckpttool", "convert", "--force", "--no-verify", src, out]),
                                  ("naive", [py, "-c", naive, src, out] if naive else None)):
                    if cmd is None:
                        continue
                    seconds, rss = measured(cmd, args.repeat)
                    rows.append((size, label, name, seconds, rss))
                os.remove(out)
    print(f"{'GiB':>4s} {'conversion':30s} {'command':30s} {'seconds':>8s} {'peak RSS MiB':>13s}")
    for size, label, name, seconds, rss in rows:
        print(f"{size:>4s} {label:30s} {name:30s} {seconds:8.2f} {rss:13.0f}")
    by = {(s, l, n): (sec, rss) for s, l, n, sec, rss in rows}
    for size in args.sizes_gib.split(","):
        for label in ("pt -> safetensors", "safetensors -> pt"):
            ours, fast, naive = (by[(size, label, n)] for n in ("ckpttool convert", "ckpttool convert --no-verify",
                                                                  "naive"))
            print(f"{size} GiB {label}: time ours/naive = {ours[0] / naive[0]:.2f} (without verify "
                  f"{fast[0] / naive[0]:.2f}); peak RSS ours/naive = {ours[1] / naive[1]:.0%}")


if __name__ == "__main__":
    main()
