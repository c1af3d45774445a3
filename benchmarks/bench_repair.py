"""`ckpttool repair` on a cut file larger than the memory it is allowed, beside the naive salvage, in one run.

Claim: repair's memory is bounded by the largest tensor, not by the file: each tensor's bytes are checked (CRC-32)
and copied file to file, never held whole. A .pt and a safetensors file of --size-gib, cut in the middle of a tensor
past the half, are repaired under an address-space limit (`ulimit -v`) of --cap-mib, a fraction of the file's size.
The naive salvage, what one writes by hand (read the file into memory, keep every tensor whose bytes are there,
save them), runs under the same limit and without one; its peak RSS is the file's size or more.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

from common import run_measured, write_safetensors

MAKE_PT = """
import sys, torch
from ckpttool.formats.torchwriter import Writer
path, total, n = sys.argv[1], int(float(sys.argv[2]) * (1 << 30)), 32
per = total // n // 4
writer = Writer(path, [(f"layer.{i}.weight", "float32", (per,)) for i in range(n)],
                wrap=lambda sd: {"model": sd, "global_step": 100})
torch.manual_seed(0)
for i in range(n):
    writer.write(f"layer.{i}.weight", torch.randn(per))
writer.close()
"""

# The hand-written salvage: everything into memory, the tensors whose bytes are whole kept, saved again.
NAIVE = """
import json, struct, sys, zipfile, io, pickle
src, dst = sys.argv[1], sys.argv[2]
data = open(src, "rb").read()
if src.endswith(".safetensors"):
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    header.pop("__metadata__", None)
    whole = {k: bytes(data[8 + n + e["data_offsets"][0]:8 + n + e["data_offsets"][1]]) for k, e in header.items()
             if 8 + n + e["data_offsets"][1] <= len(data)}
else:
    whole, pos = {}, 0
    while data[pos:pos + 4] == b"PK\\x03\\x04":  # local headers, each member up to the next header
        name_len, extra_len = struct.unpack("<HH", data[pos + 26:pos + 30])
        start = pos + 30 + name_len + extra_len
        nxt = data.find(b"PK\\x03\\x04", start)
        whole[data[pos + 30:pos + 30 + name_len].decode()] = data[start:nxt if nxt > 0 else len(data)]
        pos = nxt if nxt > 0 else len(data)
with open(dst, "wb") as f:
    for value in whole.values():
        f.write(value)
"""


# Runs the command with an address-space limit set in the child only (so this process is not limited).
_CAPPED = """
import resource, subprocess, sys
cap = int(sys.argv[1])
limit = lambda: resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
done = subprocess.run(sys.argv[2:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=limit)
print(done.returncode)
"""


def capped(cmd, cap_mib) -> int:
    """The exit code of `cmd` run under an address-space limit of `cap_mib` (RLIMIT_AS, as `ulimit -v`)."""
    out = subprocess.run([sys.executable, "-c", _CAPPED, str(cap_mib << 20), *cmd], capture_output=True, text=True,
                         check=True).stdout
    return int(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-gib", type=float, default=2.0)
    parser.add_argument("--cap-mib", type=int, default=512)
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    py = sys.executable
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        pt, st = os.path.join(tmp, "big.pt"), os.path.join(tmp, "big.safetensors")
        subprocess.run([py, "-c", MAKE_PT, pt, str(args.size_gib)], check=True)
        write_safetensors(st, int(args.size_gib * (1 << 30)), n_tensors=32)
        for src in (pt, st):
            size = os.path.getsize(src)
            os.truncate(src, size * 5 // 8)  # past the half, inside a tensor
            cut_mib = os.path.getsize(src) / (1 << 20)
            largest_mib = size / 32 / (1 << 20)
            ext = os.path.splitext(src)[1]
            for name, cmd in (("ckpttool repair", [py, "-m", "ckpttool", "repair", "--force", src,
                                                   os.path.join(tmp, "out" + ext)]),
                              ("naive salvage", [py, "-c", NAIVE, src, os.path.join(tmp, "naive" + ext)])):
                seconds, rss = run_measured(cmd)
                code = capped(cmd, args.cap_mib)
                rows.append((ext, cut_mib, largest_mib, name, seconds, rss, code))
                for leftover in ("out" + ext, "naive" + ext):
                    if os.path.exists(os.path.join(tmp, leftover)):
                        os.remove(os.path.join(tmp, leftover))
    print(f"address-space limit for the capped runs: {args.cap_mib} MiB (ulimit -v)")
    print(f"{'file':12s} {'cut MiB':>8s} {'largest tensor MiB':>19s} {'command':16s} {'seconds':>8s} "
          f"{'peak RSS MiB':>13s} {'exit under limit':>17s}")
    for ext, cut, largest, name, seconds, rss, code in rows:
        print(f"{ext:12s} {cut:8.0f} {largest:19.0f} {name:16s} {seconds:8.2f} {rss:13.0f} {code:17d}")
    for ext in (".pt", ".safetensors"):
        ours, naive = (next(r for r in rows if r[0] == ext and r[3] == n) for n in ("ckpttool repair",
                                                                                     "naive salvage"))
        print(f"{ext}: peak RSS ours/naive = {ours[5] / naive[5]:.0%}, ours/file = {ours[5] / ours[1]:.0%}; "
              f"under {args.cap_mib} MiB: ours exit {ours[6]}, naive exit {naive[6]}")


if __name__ == "__main__":
    main()
