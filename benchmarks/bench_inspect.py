"""Inspect time vs checkpoint size: 10 MB and N GiB checkpoints side by side, with start-up floors.

Claim: `ckpttool inspect` reads headers only, so its time does not grow with the checkpoint, and for safetensors it
does not import torch (about one Python start-up). Baselines: `python -c pass` (the floor), `python -c "import
torch"`, and the naive way to list a .pt (`torch.load(mmap=True)` then iterate).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

from common import timed, write_safetensors


def make_safetensors(path, total_bytes):
    write_safetensors(path, total_bytes)


def make_pt(path, total_bytes, n_tensors=64):
    per = total_bytes // n_tensors // 4
    torch.save({f"layer.{i}.weight": torch.randn(per) for i in range(n_tensors)}, path)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--big-gib", type=float, default=4.0)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--dir", default=None, help="where to write the test files (default: a temp dir)")
    args = parser.parse_args()
    py = sys.executable
    small, big = 10 << 20, int(args.big_gib * (1 << 30))
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        files = {}
        for label, size in (("10 MB", small), (f"{args.big_gib:g} GiB", big)):
            files[("safetensors", label)] = p = os.path.join(tmp, f"{size}.safetensors")
            make_safetensors(p, size)
            files[(".pt", label)] = p = os.path.join(tmp, f"{size}.pt")
            make_pt(p, size)
        rows = []
        floor = timed([py, "-c", "pass"], args.repeat)
        torch_import = timed([py, "-c", "import torch"], args.repeat)
        rows.append(("python -c pass (floor)", "-", floor))
        rows.append(("python -c 'import torch'", "-", torch_import))
        for (fmt, label), path in files.items():
            ours = timed([py, "-m", "ckpttool", "inspect", "--json", path], args.repeat)
            rows.append((f"ckpttool inspect {fmt}", label, ours))
            if fmt == ".pt":
                naive = timed([py, "-c", f"import torch; sd = torch.load({path!r}, mmap=True, weights_only=True); "
                               "[(k, v.shape, v.dtype) for k, v in sd.items()]"], args.repeat)
                rows.append(("naive torch.load(mmap=True) listing", label, naive))
            else:
                naive = timed([py, "-c", f"from safetensors import safe_open\nwith safe_open({path!r}, 'pt') as f: "
                               "[(k, f.get_slice(k).get_shape()) for k in f.keys()]"], args.repeat)
                rows.append(("naive safetensors.safe_open listing", label, naive))
    print(f"median of {args.repeat} runs; ratio = time / (python -c pass)")
    print(f"{'command':40s} {'size':>9s} {'seconds':>9s} {'ratio':>7s}")
    for name, label, seconds in rows:
        print(f"{name:40s} {label:>9s} {seconds:9.3f} {seconds / floor:7.2f}")
    by = {(n, l): s for n, l, s in rows}
    big_label = f"{args.big_gib:g} GiB"
    for fmt in ("safetensors", ".pt"):
        growth = by[(f"ckpttool inspect {fmt}", big_label)] / by[(f"ckpttool inspect {fmt}", "10 MB")]
        print(f"inspect {fmt}: {big_label} / 10 MB time ratio = {growth:.2f} (1.0 = no growth with size)")


if __name__ == "__main__":
    main()
