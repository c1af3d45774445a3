"""Checkpoints written by many ranks: convert and verify, side by side with the baselines, in one run.

1. Convert a DCP dir written by 4 ranks under torchrun (every tensor sharded along dim 0, as FSDP2 writes it) to one
   safetensors file: `ckpttool convert` (which also re-reads and compares its output; `--no-verify` does not)
   against torch's own route, `dcp_to_torch_save` then `torch.load` + `save_file`. Claim: ckpttool's peak memory
   stays at a few tensors while the baseline holds the whole model, in comparable time; the outputs are equal.
2. `ckpttool verify --require-manifest` of the same dir in 1 process and under torchrun with 2 and 4 processes
   (gloo). On one machine every process shares the same cores and disk, so no speed-up is expected there (one
   process already hashes on every core); the figure shows what the launch costs. Across nodes each adds its cores
   and its read bandwidth (see the README).

    python benchmarks/bench_ranks.py [--size-gib 2] [--repeat 3] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

from common import run_measured, timed

TENSORS = 16
WRITER = """
import sys, torch, torch.distributed as dist, torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor
dist.init_process_group("gloo")
mesh = init_device_mesh("cpu", (dist.get_world_size(),))
rows = int(sys.argv[2]) // {tensors} // 4 // 1024
torch.manual_seed(0)
state = {{f"layer.{{i}}.weight": distribute_tensor(torch.randn(rows, 1024), mesh, [Shard(0)])
         for i in range({tensors})}}
dcp.save({{"model": state, "step": 1}}, checkpoint_id=sys.argv[1])
dist.barrier()
dist.destroy_process_group()
""".format(tensors=TENSORS)
NAIVE = """
import sys, torch
from safetensors.torch import save_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
dcp_to_torch_save(sys.argv[1], sys.argv[2])
save_file(torch.load(sys.argv[2], weights_only=True)["model"], sys.argv[3])
"""
CHECK = """
import sys
from safetensors import safe_open
with safe_open(sys.argv[1], "pt") as a, safe_open(sys.argv[2], "pt") as b:
    assert sorted(a.keys()) == sorted(b.keys())
    assert all(a.get_tensor(k).equal(b.get_tensor(k)) for k in a.keys())
"""


def torchrun(n: int, *args) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port", "29461",
            *args]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gib", type=float, default=2.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    args = parser.parse_args()
    py = sys.executable
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        ckpt = os.path.join(tmp, "dcp")
        size = int(args.size_gib * (1 << 30))
        writer = os.path.join(tmp, "write_dcp.py")  # torchrun runs a script or a module, not -c
        with open(writer, "w") as f:
            f.write(WRITER)
        subprocess.run(torchrun(4, writer, ckpt, str(size)), check=True, env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        on_disk = sum(os.path.getsize(os.path.join(ckpt, f)) for f in os.listdir(ckpt))
        for f in os.listdir(ckpt):  # page cache warm for everyone
            subprocess.run(["cat", os.path.join(ckpt, f)], stdout=subprocess.DEVNULL, check=True)
        print(f"DCP dir written by 4 ranks: {TENSORS} tensors sharded along dim 0, {on_disk / (1 << 30):.2f} GiB; "
              f"{os.cpu_count()} CPUs; page cache warm")
        print(f"\n1. convert to one safetensors file (median of {args.repeat} runs; peak RSS of the last)")
        ours_out, naive_out, naive_pt = (os.path.join(tmp, n) for n in ("ours.safetensors", "naive.safetensors",
                                                                         "naive.pt"))
        rows = {}
        for name, cmd, outputs in (
                ("ckpttool convert", [py, "-m", "ckpttool", "convert", ckpt, ours_out], [ours_out]),
                ("ckpttool convert --no-verify", [py, "-m", "ckpttool", "convert", "--no-verify", ckpt, ours_out],
                 [ours_out]),
                ("dcp_to_torch_save + load + save_file", [py, "-c", NAIVE, ckpt, naive_pt, naive_out],
                 [naive_pt, naive_out])):
            runs = []
            for _ in range(args.repeat):
                for out in outputs:
                    if os.path.exists(out):
                        os.remove(out)
                runs.append(run_measured(cmd))
            rows[name] = (sorted(r[0] for r in runs)[len(runs) // 2], runs[-1][1])
        subprocess.run([py, "-c", CHECK, ours_out, naive_out], check=True)
        ours_s, ours_rss = rows["ckpttool convert"]
        print(f"{'command':40s} {'seconds':>8s} {'peak RSS':>10s}")
        for name, (seconds, rss) in rows.items():
            print(f"{name:40s} {seconds:8.2f} {rss:8.0f} MiB")
        naive_s, naive_rss = rows["dcp_to_torch_save + load + save_file"]
        print(f"ckpttool / baseline: time {ours_s / naive_s:.2f}x, peak RSS {ours_rss / naive_rss:.2f}x "
              "(outputs equal); convert re-reads and compares its output, --no-verify does not")

        print(f"\n2. verify --require-manifest (median of {args.repeat} runs)")
        subprocess.run([py, "-m", "ckpttool", "manifest", ckpt], check=True, stdout=subprocess.DEVNULL)
        times = {1: timed([py, "-m", "ckpttool", "verify", "--require-manifest", ckpt], args.repeat)}
        for n in (2, 4):
            times[n] = timed(torchrun(n, "-m", "ckpttool", "verify", "--require-manifest", ckpt), args.repeat)
        print(f"{'processes':>9s} {'seconds':>8s} {'vs 1':>6s}")
        for n, seconds in times.items():
            print(f"{n:9d} {seconds:8.2f} {seconds / times[1]:5.2f}x")
        print(f"cat of the same files: {timed(['sh', '-c', f'cat {ckpt}/*.distcp'], args.repeat):.2f} s")


if __name__ == "__main__":
    main()
