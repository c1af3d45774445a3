"""What applications' save hooks add to Accelerate's own save_state, written as they write it: the replicas of
`ckpttool fixtures` and the suite's fixture corpus (fixtures/generate.py) both complete their state dirs here."""

from __future__ import annotations

import json
import os


def kohya_state(state_dir: str, step: int, epoch: int = 1):
    """sd-scripts' train_network.py save hook: train_state.json beside Accelerate's files."""
    with open(os.path.join(state_dir, "train_state.json"), "w", encoding="utf-8") as f:
        json.dump({"current_epoch": epoch, "current_step": step}, f)


def simpletuner_state(state_dir: str, step: int, guard: bool = True):
    """SimpleTuner's save hooks: training_state.json, then the `.guard` file written last (absent: the save never
    finished)."""
    with open(os.path.join(state_dir, "training_state.json"), "w", encoding="utf-8") as f:
        json.dump({"global_step": step, "epoch_step": step, "epoch": 1, "exhausted_backends": []}, f)
    if guard:
        with open(os.path.join(state_dir, ".guard"), "w", encoding="utf-8") as f:
            f.write("complete")
