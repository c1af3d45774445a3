"""transformers.Trainer resuming through ckpttool's gate, shown end to end on a tiny GPT-2 (CPU, seconds):

    python examples/resume_transformers.py OUT

1. trains 6 steps, saving checkpoint-2, -4 and -6 into OUT;
2. cuts OUT/checkpoint-6/model.safetensors in half, as a job killed while copying it leaves it;
3. `trainer.train(resume_from_checkpoint=True)` takes the highest-numbered checkpoint and fails inside loading;
4. `gated_train(trainer, resume_from_checkpoint=True)` skips checkpoint-6 (logged, with its problem code) and
   resumes from checkpoint-4 to step 8.
"""

from __future__ import annotations

import logging
import os
import sys

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from ckpttool.integrations.transformers import gated_train  # noqa: E402
from ckpttool.synthetic.runs import _batches, _quiet  # noqa: E402


def trainer(out: str, max_steps: int):
    _quiet()
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=10, n_positions=8, n_embd=16, n_layer=1, n_head=2))
    data = [{"input_ids": ids, "labels": ids} for ids in torch.cat(_batches(16))]
    args = TrainingArguments(output_dir=out, max_steps=max_steps, save_steps=2, learning_rate=1e-3, report_to=[],
                             per_device_train_batch_size=4, use_cpu=True, disable_tqdm=True, log_level="error",
                             logging_strategy="no")
    return Trainer(model=model, args=args, train_dataset=data)


def main(out: str) -> int:
    logging.basicConfig(format="[%(name)s] %(message)s")
    logging.getLogger("ckpttool.gate").setLevel(logging.INFO)
    trainer(out, 6).train()
    weights = os.path.join(out, "checkpoint-6", "model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    print(f"== cut {weights} in half")
    try:
        trainer(out, 8).train(resume_from_checkpoint=True)
        print("== transformers resumed?!")
    except Exception as e:  # noqa: BLE001 - whatever the Trainer raises deep inside loading
        print(f"== trainer.train(resume_from_checkpoint=True) fails: {type(e).__name__}: {str(e)[:120]}")
    resumed = trainer(out, 8)
    gated_train(resumed, resume_from_checkpoint=True)
    print(f"== gated_train(trainer, resume_from_checkpoint=True) resumed and trained to step "
          f"{resumed.state.global_step}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
