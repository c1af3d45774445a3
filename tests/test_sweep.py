"""The damage sweep (sweep/, `make sweep`): every file of every healthy checkpoint the real libraries wrote, deleted,
cut and emptied in turn, gives the outcome its trainer's resume contract says; the healthy ones verify clean; and
every file replaced by the run's previous save's copy is reported where a counter in it differs, and always in a
sealed checkpoint (issue 32)."""

import pytest

import sweep


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return sweep.reference_run(str(tmp_path_factory.mktemp("reference") / "run"))


def test_every_damaged_copy_is_reported_as_its_trainer_resumes(runs, corpus, reference, sealed_runs):
    targets = sweep.targets(runs, corpus, reference, sealed_runs)
    done, counts = sweep.sweep(targets)
    failures = [f"{c.label}: {c.failure}" for c in done if c.failure]
    assert not failures, "\n".join(failures[:40])
    # every layout the issue names is swept, and the sweep has teeth
    names = {t.name for t in targets}
    assert {"transformers", "transformers_ddp", "transformers_peft", "accelerate_two_models", "diffusers_unet_ema",
            "diffusers_lora", "peft", "torchtitan", "lightning", "deepspeed_zero3", "deepspeed_transformers_zero2",
            "corpus_kohya_step_state", "corpus_simpletuner", "reference_trainer"} <= names
    assert counts["errors"] > 300 and counts["warnings"] > 20 and counts["not read"] > 50
    assert counts["healthy checkpoints"] == len(targets) and counts["failed"] == 0
    # stale files: those with a counter that moved are all reported (else a failure above), and so is every one of
    # a sealed save; the rest are the README's list of what only checksums tell
    assert counts["stale with a differing counter"] > 60 and counts["stale in sealed checkpoints"] >= 15
    assert {"sealed_transformers", "sealed_transformers_ddp", "sealed_accelerate", "sealed_deepspeed_zero2"} <= names
    unreported = sweep.only_checksums(done)
    assert "rng_state.pth" in unreported["transformers"] and "model.safetensors" in unreported["accelerate"]
    assert not any(name.startswith("sealed_") for name in unreported)
