"""`ckpttool convert --to original|diffusers` of a Flux.1 transformer at its real widths (3072, heads of 128, with
--double / --single blocks; Flux.1 dev has 19 and 38, 23.8 GB in bf16) against the naive way people share: load the
whole file, rename the keys (torch.cat for q, k, v; torch.split back), save_file. Claims: peak RSS is bounded by
the largest output tensor and a source, not by the model (the naive way holds the model about twice), at a time no
worse than the naive way's. `ckpttool convert` re-reads and compares its output; `--no-verify` shows the conversion
alone. Every run after `sync`; each figure the median of --repeat runs.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

from common import measured

MAKE = """
import sys, torch
from diffusers import FluxTransformer2DModel
from safetensors.torch import save_file
with torch.device("meta"):
    model = FluxTransformer2DModel(num_layers=int(sys.argv[2]), num_single_layers=int(sys.argv[3]))
g = torch.Generator().manual_seed(0)
save_file({k: torch.randn(v.shape, generator=g, dtype=torch.bfloat16) for k, v in model.state_dict().items()},
          sys.argv[1] + "/diffusion_pytorch_model.safetensors")
model.save_config(sys.argv[1])
"""
# the renames of diffusers' own single-file reader turned around: the whole model in memory, then the file
NAIVE_TO_ORIGINAL = """
import sys, torch
from safetensors.torch import load_file, save_file
from ckpttool.conventions import flux
sd = load_file(sys.argv[1] + "/diffusion_pytorch_model.safetensors")
groups = {}
for key, value in sd.items():
    name, index = flux.key_to_original(key)
    groups.setdefault(name, {})[index] = value
out = {}
for name, parts in groups.items():
    value = torch.cat([parts[i] for i in sorted(parts)])
    if name.rpartition(".")[0] in flux.SWAPPED:
        value = torch.cat(value.chunk(2)[::-1])
    out[name] = value
save_file(out, sys.argv[2])
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--double", type=int, default=2, help="double blocks (Flux.1: 19)")
    parser.add_argument("--single", type=int, default=4, help="single blocks (Flux.1: 38)")
    parser.add_argument("--dir", default=None)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    py = sys.executable
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = os.path.join(tmp, "transformer")
        os.makedirs(folder)
        subprocess.run([py, "-c", MAKE, folder, str(args.double), str(args.single)], check=True)
        size = os.path.getsize(os.path.join(folder, "diffusion_pytorch_model.safetensors")) / (1 << 30)
        out = os.path.join(tmp, "flux1.safetensors")
        rows = []
        for name, cmd in (
                ("ckpttool convert --to original", [py, "-m", "ckpttool", "convert", "--force", folder, out, "--to",
                                                    "original"]),
                ("  the same, --no-verify", [py, "-m", "ckpttool", "convert", "--force", "--no-verify", folder, out,
                                             "--to", "original"]),
                ("naive load_file + cat + save_file", [py, "-c", NAIVE_TO_ORIGINAL, folder, out])):
            rows.append((name, *measured(cmd, args.repeat)))
        back = os.path.join(tmp, "back")
        rows.append(("ckpttool convert --to diffusers", *measured(
            [py, "-m", "ckpttool", "convert", "--force", out, back, "--to", "diffusers"], args.repeat)))
    print(f"Flux.1 transformer, {args.double} double + {args.single} single blocks, bf16, {size:.2f} GiB")
    print(f"{'command':40s} {'seconds':>8s} {'peak RSS MiB':>13s}")
    for name, seconds, rss in rows:
        print(f"{name:40s} {seconds:8.2f} {rss:13.0f}")
    ours, fast, naive = rows[0], rows[1], rows[2]
    print(f"to original: time ours/naive = {ours[1] / naive[1]:.2f} (without verify {fast[1] / naive[1]:.2f}); "
          f"peak RSS ours/naive = {ours[2] / naive[2]:.1%}")


if __name__ == "__main__":
    main()
