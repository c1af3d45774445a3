"""Small builders shared by tests: copies of fixtures to damage, and runs of real checkpoints."""

import contextlib
import json
import os
import shutil
import subprocess
import sys

import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from ckpttool.cli import main
from fixtures.generate import _trained


def copy(src, dst_dir, name=None):
    dst = os.path.join(dst_dir, name or os.path.basename(os.path.normpath(src)))
    (shutil.copytree if os.path.isdir(src) else shutil.copy2)(src, dst)
    return dst


def flip_byte(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def cli(*args):
    """Run the CLI; returns (result, parsed JSON stdout or None)."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    out = result.stdout.strip()
    return result, (json.loads(out) if out.startswith("{") else None)


def codes(report, severity=None):
    return sorted({p["code"] for p in report["problems"] if severity is None or p["severity"] == severity})


def state_dir(path, steps, rng=True):
    """An Accelerate-layout checkpoint after `steps` real optimizer steps (model, optimizer, scheduler, RNG)."""
    model, opt, sched = _trained(steps)
    os.makedirs(path)
    save_file(model.state_dict(), os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    torch.save(opt.state_dict(), os.path.join(path, "optimizer.bin"))
    torch.save(sched.state_dict(), os.path.join(path, "scheduler.bin"))
    if rng:
        torch.save({"step": 0, "torch_manual_seed": torch.get_rng_state()}, os.path.join(path, "random_states_0.pkl"))
    return path


# What a shared CI machine may run beside the suite (the neighbour of ../shared/tools/fresh-check --busy).
NEIGHBOUR = """
import time, torch
x = torch.randn(256, 256)
while True:
    x @ x
    time.sleep(0.05)
"""


@contextlib.contextmanager
def busy_neighbour():
    """A torch process doing small matrix products beside the block: results must not depend on a quiet machine."""
    proc = subprocess.Popen([sys.executable, "-c", NEIGHBOUR], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()
