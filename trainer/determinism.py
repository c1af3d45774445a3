"""What a bit-exact resume needs besides the checkpoint: every kernel rounding the same way as the first time.

On the CPU the kernel that does not is MKL's sgemm for the weight gradients of a Linear layer (for `in_proj`,
[64, batch] x [batch, 33]): it splits the batch dimension across threads, so its last bits depend on how many threads
it runs on (1 and 2 agree on the 2-core machine the tests ran on, 3 and more differ from them). torch leaves MKL free
to pick fewer threads than asked unless `torch.set_num_threads` is called, and Adam turns one ulp in a gradient into
a difference of the size of the learning rate, so a run on a busy machine could write other weights than the same
run on a quiet one. The trainer therefore fixes the thread count at start (`--threads`, 1 by default: the same on
every machine), which also turns MKL's own choice off, asks torch for deterministic algorithms, records the
conditions in each checkpoint and names any that a resume changes.
"""

from __future__ import annotations

import os

import torch

DEFAULT_THREADS = 1


def pin(threads: int, device: torch.device):
    """Fix this process's intra-op thread count and ask for deterministic kernels, before any tensor work."""
    if device.type == "cuda":  # cuBLAS is deterministic only with a fixed workspace (torch's reproducibility notes)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)


def conditions(threads: int, device: torch.device) -> dict:
    """What a bit-exact resume must share with the run that saved: recorded in training_state.json."""
    kind = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return {"threads": threads, "torch": torch.__version__, "device": kind}


def resume_warning(path: str, saved: dict | None, live: dict) -> str | None:
    """One line naming each recorded condition this resume changes (threads: 2 when saved, 1 now), or None: also
    for a checkpoint from before the trainer recorded them."""
    changed = [name for name in live if saved and name in saved and saved[name] != live[name]]
    if not changed:
        return None
    what = "; ".join(f"{name}: {saved[name]} when saved, {live[name]} now" for name in changed)
    hint = f" (resume with --threads {saved['threads']} to match)" if "threads" in changed else ""
    return (f"{path} was saved under other conditions, so this run will not match one that never stopped, bit for "
            f"bit: {what}{hint}")
