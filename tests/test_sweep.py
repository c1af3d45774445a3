"""The damage sweep (sweep/, `make sweep`): every file of every healthy checkpoint the real libraries wrote, deleted,
cut and emptied in turn, gives the outcome its trainer's resume contract says; the healthy ones verify clean."""

import pytest

import sweep


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return sweep.reference_run(str(tmp_path_factory.mktemp("reference") / "run"))


def test_every_damaged_copy_is_reported_as_its_trainer_resumes(runs, corpus, reference):
    targets = sweep.targets(runs, corpus, reference)
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
