# Two entry points: `make demo` (set up, build a fixture run, inspect it) and `make test` (set up, run the suite).
# The venv prefers the CPU torch wheel pip finds locally (torch==2.13.0); a venv that already has torch keeps it:
# `make test VENV=/path/to/your/venv` uses yours, or set TORCH_SPEC to the torch requirement you want installed.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.ckpttool-installed

.PHONY: setup demo test bench fuzz sweep chaos clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

TRAIN := $(BIN)/python -m trainer --output-dir demo-run/train --max-steps 30 --checkpointing-steps 10 --checkpoints-total-limit 2

demo: $(STAMP)
	rm -rf demo-run
	@echo "== train with the reference trainer; the run is killed (SIGKILL) in the middle of saving step 20"
	TRAINER_FAULT=mid-save:20 $(TRAIN) || echo "(killed, exit $$?)"
	ls demo-run/train
	@echo "== inspect and verify what survived: checkpoint-10 intact, checkpoint-20.tmp never published"
	$(BIN)/ckpttool inspect demo-run/train/checkpoint-10
	$(BIN)/ckpttool verify --for-resume --require-manifest "$$($(BIN)/ckpttool latest demo-run/train)"
	@echo "== resume from the latest valid checkpoint, through ckpttool's gate"
	$(TRAIN) --resume-from-checkpoint latest
	$(BIN)/ckpttool verify --for-resume demo-run/train/checkpoint-30
	@echo "== transformers.Trainer through the gate: its newest checkpoint cut, resume_from_checkpoint=True crashes, gated_train resumes from the one before"
	$(BIN)/python examples/resume_transformers.py demo-run/hf
	@echo "== real fp16 runs (made on a GPU; 3-4 updates skipped by the GradScaler): verified clean, the skips explained"
	$(BIN)/ckpttool verify --for-resume tests/data/fp16/transformers/checkpoint-10
	$(BIN)/ckpttool inspect "tests/data/fp16/lightning/epoch=0-step=10.ckpt"
	$(BIN)/ckpttool latest --for-resume tests/data/fp16/accelerate
	@echo "== a DeepSpeed ZeRO-3 save by 2 ranks (real engine): verified, consolidated to safetensors like zero_to_fp32"
	$(BIN)/ckpttool verify --for-resume tests/data/deepspeed/zero3
	mkdir -p demo-run/work && $(BIN)/ckpttool convert tests/data/deepspeed/zero3 demo-run/work/zero3.safetensors
	$(BIN)/ckpttool diff --values demo-run/work/zero3.safetensors tests/data/deepspeed/zero3.reference.pt
	$(BIN)/python -m fixtures demo-run/fixtures > /dev/null
	@echo "== a diffusers-style checkpoint-N (Accelerate save_state with unet/ weights)"
	$(BIN)/ckpttool inspect demo-run/fixtures/diffusers/checkpoint-3
	@echo "== a diffusers pipeline folder as save_pretrained writes it: each component by its own layout"
	$(BIN)/python -m fixtures.model_folders demo-run/models > /dev/null
	$(BIN)/ckpttool inspect demo-run/models/pipeline
	@echo "== a quantized (optimum-quanto qint4) model, tensors listed"
	$(BIN)/ckpttool inspect --tensors --filter 'linear_1' demo-run/fixtures/quanto/qint4/model.safetensors
	@echo "== a truncated newest checkpoint: reported, exit 1"
	$(BIN)/ckpttool inspect demo-run/fixtures/diffusers/checkpoint-5 || echo "(exit $$?: problems found, as expected)"
	@echo "== a malicious pickle: named, never executed"
	$(BIN)/ckpttool inspect demo-run/fixtures/torch/malicious.pt || echo "(exit $$?: problems found, as expected)"
	@test ! -e demo-run/fixtures/PWNED_MARKER && echo "marker file absent: the payload never ran"
	@echo "== checksums: write a manifest, verify, flip one byte, verify again"
	mkdir -p demo-run/work && cp -r demo-run/fixtures/kohya/run-000001-state demo-run/work/
	$(BIN)/ckpttool manifest demo-run/work/run-000001-state
	$(BIN)/ckpttool verify --for-resume demo-run/work/run-000001-state
	$(BIN)/python -c "f=open('demo-run/work/run-000001-state/model.safetensors','r+b'); f.seek(-9, 2); b=f.read(1); f.seek(-9, 2); f.write(bytes([b[0]^255]))"
	$(BIN)/ckpttool verify demo-run/work/run-000001-state || echo "(exit $$?: bit rot caught)"
	@echo "== latest: the newest diffusers checkpoint is truncated, so the one before it is chosen"
	$(BIN)/ckpttool latest demo-run/fixtures/diffusers
	@echo "== repair: the bit-rotted state dir keeps every tensor the manifest vouches for; a cut training .pt gives back its model (its optimizer lost tensors, so it is left out whole); the run is rewritten without its cut newest checkpoint"
	$(BIN)/ckpttool repair demo-run/work/run-000001-state demo-run/work/run-000001-state-repaired
	$(BIN)/ckpttool repair demo-run/fixtures/torch/truncated.pt demo-run/work/truncated-repaired.pt
	$(BIN)/ckpttool repair demo-run/fixtures/diffusers demo-run/work/diffusers-repaired
	@echo "== convert the trained checkpoint's weights to safetensors (streamed, verified), then diff the contents"
	$(BIN)/ckpttool convert demo-run/train/checkpoint-30 demo-run/work/model.safetensors
	$(BIN)/ckpttool diff --values demo-run/work/model.safetensors demo-run/train/checkpoint-30
	@echo "== a DDP checkpoint ('module.' keys) and a quanto-quantized one: diff explains, remap repairs"
	$(BIN)/ckpttool diff demo-run/fixtures/torch/module_prefix.pt demo-run/fixtures/safetensors/model.safetensors
	$(BIN)/ckpttool remap demo-run/fixtures/quanto/qint8/model.safetensors demo-run/work/plain.safetensors --dequantize
	$(BIN)/ckpttool diff demo-run/fixtures/quanto/qint8/model.safetensors demo-run/work/plain.safetensors || true
	@echo "== inside the weights: statistics per tensor (quanto weights dequantized), the module tree"
	$(BIN)/ckpttool inspect --stats --filter 'linear' demo-run/fixtures/quanto/qint8/model.safetensors
	$(BIN)/ckpttool inspect --modules demo-run/fixtures/torch/tied.pt
	@echo "== average the run's last two checkpoints; a report of the whole run"
	$(BIN)/ckpttool average demo-run/train/checkpoint-20 demo-run/train/checkpoint-30 demo-run/work/averaged.safetensors
	$(BIN)/ckpttool report demo-run/train

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	cd benchmarks && for b in startup inspect verify diff convert repair views ranks trainer; do ../$(BIN)/python bench_$$b.py || exit 1; done

# 100,000 seeded mutations of real checkpoint files through inspect, verify and the salvage readers (README: Fuzzing)
fuzz: $(STAMP)
	$(BIN)/python -m fuzz --count 100000 --seed 1

# Every file of every healthy real-library checkpoint deleted, cut and emptied in turn (README: The resume contract)
sweep: $(STAMP)
	$(BIN)/python -m sweep

# Every crash point of the reference trainer's saves, every kill mode, 1 and 2 ranks (README: Crash consistency)
CHAOS_TRAIN := $(BIN)/python -m trainer --output-dir {out} --max-steps 30 --checkpointing-steps 10
CHAOS := $(BIN)/ckpt-chaos run --resume-cmd "$(CHAOS_TRAIN) --resume-from-checkpoint latest" \
	--result-file '{out}/checkpoint-30/model.safetensors' --checkpoint-glob '{out}/checkpoint-*' \
	--step-regex 'resumed at step (\d+)' --modes before,torn,term --grace 20 \
	--fail-on HARD_FAIL,SILENT_DIVERGENCE,LOST_WORK,CONTROL_FAIL
chaos: $(STAMP)
	rm -rf benchmarks/results/chaos.md demo-run/chaos-1 demo-run/chaos-2
	$(CHAOS) --work demo-run/chaos-1 --max-points 400 --jobs 2 --summary benchmarks/results/chaos.md -- $(CHAOS_TRAIN)
	$(CHAOS) --work demo-run/chaos-2 --ranks 2 --max-points 45 --jobs 1 --summary benchmarks/results/chaos.md -- $(CHAOS_TRAIN)

clean:
	rm -rf $(VENV) demo-run .pytest_cache
