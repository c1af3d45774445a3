#!/usr/bin/env bash
# The full ckpt-chaos sweeps of the reference trainer on a 16-core machine (the device tool's, no GPU used), every
# crash point in every mode, one process and two ranks; the tables land in $OUT. Run from the repository root with
# the ckpt-chaos wheel in .whl/ (no network there): bash benchmarks/chaos_device.sh [1] [2] (which sweeps; both by
# default; each fits one 10-minute call)
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/ckpt_chaos-*.whl
export PYTHONPATH=/tmp/site:$PWD CUDA_VISIBLE_DEVICES=
train="python3 -m trainer --output-dir {out} --max-steps 30 --checkpointing-steps 10 --device cpu"
sweep() {
  python3 -m ckpt_chaos run --resume-cmd "$train --resume-from-checkpoint latest" \
    --result-file '{out}/checkpoint-30/model.safetensors' --checkpoint-glob '{out}/checkpoint-*' \
    --step-regex 'resumed at step (\d+)' --modes before,torn,term --grace 20 --max-points 400 \
    --fail-on HARD_FAIL,SILENT_DIVERGENCE,LOST_WORK,CONTROL_FAIL "$@" -- $train
}
for which in "${@:-1 2}"; do
  for n in $which; do
    if [ "$n" = 1 ]; then sweep --work /tmp/chaos-1 --jobs 12 --summary "$OUT/chaos-16-cores-1-process.md" | tail -n 3
    else sweep --work /tmp/chaos-2 --ranks 2 --jobs 7 --summary "$OUT/chaos-16-cores-2-ranks.md" | tail -n 3; fi
  done
done
nproc; python3 -c "import torch; print(torch.__version__, torch.get_num_threads())"
