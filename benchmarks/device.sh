#!/bin/sh
# The speed figures on a 16-core machine (the device machine: 16 CPU cores, local disk, no network). Its Python 3.12
# has torch, numpy and safetensors; click, tabulate and xxhash are carried as wheels in .whl/ (`pip download click
# tabulate xxhash --python-version 3.12 --only-binary=:all: --no-deps -d .whl`). Usage, from the repository root:
#   sh benchmarks/device.sh small|diff|threads|convert|verify|seal   (one per call: each fits the 10-minute limit)
# Each benchmark's output goes to $OUT/<name>.txt.
set -e
python -m pip install -q --no-index --no-deps .whl/click-*.whl .whl/tabulate-*.whl .whl/xxhash-*cp312*.whl
export PYTHONPATH="$PWD"
work=$(mktemp -d /tmp/ckpttool-bench.XXXXXX)
trap 'rm -rf "$work"' EXIT
nproc
case "$1" in
  small) python benchmarks/bench_small_tensors.py --dir "$work" | tee "$OUT/small_tensors.txt" ;;
  diff) python benchmarks/bench_diff.py --size-gib 2 --repeat 5 --dir "$work" | tee "$OUT/diff.txt" ;;
  convert) python benchmarks/bench_convert.py --sizes-gib 4 --dir "$work" | tee "$OUT/convert.txt" ;;
  threads) python benchmarks/bench_threads.py --threads 16,12,8,6,4 --dir "$work" | tee "$OUT/threads.txt" ;;
  verify) python benchmarks/bench_verify.py --sizes-gib 16 --repeat 3 --dir "$work" | tee "$OUT/verify.txt" ;;
  seal) python benchmarks/bench_seal.py --gib 2 --repeat 5 --dir "$work" | tee "$OUT/seal.txt" ;;
  *) echo "usage: sh benchmarks/device.sh small|diff|threads|convert|verify|seal" >&2; exit 2 ;;
esac
