"""DeepSpeed ZeRO checkpoints written by the real engine (tests/data/deepspeed, made by `python -m
fixtures.deepspeed_runs --samples DIR` with deepspeed 0.19.8 on CPU, 2 ranks): read, verified, consolidated exactly as
DeepSpeed's own zero_to_fp32 does, and every broken variant named."""

import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from fixtures import sample
from fixtures.deepspeed_runs import tiny_model
from tests.helpers import cli, flip_byte

DATA = os.path.join(os.path.dirname(__file__), "data", "deepspeed")
SAMPLES = {"zero2": 2, "zero3": 3, "zero2_bf16": 2}


def codes(report, severity="error"):
    return sorted(p["code"] for p in report["problems"] if p["severity"] == severity)


@pytest.fixture
def run(tmp_path):
    def copy(name="zero2"):
        target = tmp_path / name
        shutil.copytree(sample("deepspeed", name), target)
        return target
    return copy


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_inspect_names_the_stage_step_and_parts(name):
    _, doc = cli("inspect", "--json", sample("deepspeed", name))
    assert doc["path"] == os.path.join(sample("deepspeed", name), "global_step5")  # the tag `latest` names
    assert doc["trainer"] == "deepspeed" and doc["layout"] == f"DeepSpeed ZeRO-{SAMPLES[name]}"
    assert doc["step"] == 5 and doc["epoch"] == 0 and doc["problems"] == []
    assert {c["name"]: c["role"] for c in doc["components"]} == {"model": "model", "optimizer": "optimizer",
                                                                 "lr_scheduler": "scheduler"}
    sources = {s["source"]: (s["value"], s["meaning"]) for s in doc["step_sources"]}
    assert sources["model states global_steps"] == (5, "global_step")
    assert sources["optimizer state step"] == (5, "optimizer_updates")
    assert sources["lr_scheduler last_batch_iteration + 1"] == (5, "scheduler_steps")


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_healthy_checkpoints_verify_clean_for_resume(name):
    for path in (sample("deepspeed", name), os.path.join(sample("deepspeed", name), "global_step3")):
        result, doc = cli("verify", "--for-resume", "--finite", "--json", path)
        assert result.exit_code == 0 and doc["problems"] == [], doc["problems"]


@pytest.mark.parametrize("name", sorted(SAMPLES))
@pytest.mark.parametrize("target", ["model.safetensors", "model.pt"])
def test_convert_equals_zero_to_fp32_bit_for_bit(name, target, tmp_path):
    """The reference is what DeepSpeed's get_fp32_state_dict_from_zero_checkpoint returned for the same save."""
    reference = torch.load(os.path.join(DATA, f"{name}.reference.pt"), weights_only=True)
    out = tmp_path / target
    result, _ = cli("convert", sample("deepspeed", name), str(out), "--component", "model")
    assert result.exit_code == 0, result.stderr
    ours = load_file(out) if target.endswith("safetensors") else torch.load(out, weights_only=True)
    assert ours.keys() == reference.keys()
    for key, value in reference.items():
        assert ours[key].dtype == value.dtype and torch.equal(ours[key], value), key
    result, doc = cli("diff", "--values", "--json", sample("deepspeed", name),
                      os.path.join(DATA, f"{name}.reference.pt"))
    assert doc["same"] and doc["values"]["equal"] == len(reference)


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_gate_with_the_live_model(name):
    from ckpttool.gate import ResumeGateError, check_resume

    model = tiny_model()
    report = check_resume(sample("deepspeed", name), model=model, expected_step=5, world_size=2)  # saved by 2 ranks
    # bf16: frozen parameters are saved (and consolidated, as zero_to_fp32 does) in the engine's bf16; said, not refused
    expected = ["frozen.bias", "frozen.weight"] if "bf16" in name else []
    assert report.ok and sorted(p["key"] for p in report.problems if p["code"] == "dtype_mismatch") == expected
    assert all(p["code"] == "dtype_mismatch" for p in report.problems)
    with pytest.raises(ResumeGateError, match="step_mismatch"):
        check_resume(sample("deepspeed", name), model=model, expected_step=6, world_size=2)
    with pytest.raises(ResumeGateError, match="world_size_mismatch") as err:  # ZeRO: another world needs universal
        check_resume(sample("deepspeed", name), model=model, expected_step=5, world_size=4)
    assert "ds_to_universal" in str(err.value)


def test_latest_follows_the_tag_file_and_says_when_it_cannot(run):
    path = run("zero2")
    _, doc = cli("latest", "--json", "--for-resume", str(path))
    assert doc["path"] == str(path / "global_step5") and doc["trainer_pick"] == doc["path"] and "differs" not in doc
    os.remove(path / "global_step5" / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    _, doc = cli("latest", "--json", "--for-resume", str(path))
    assert doc["path"] == str(path / "global_step3") and doc["trainer_pick"] == str(path / "global_step5")
    assert "missing_file" in doc["differs"]


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_a_missing_rank_file_is_named_with_what_it_held(run, name, tmp_path):
    path = run(name)
    prefix = "bf16_" if "bf16" in name else ""
    os.remove(path / "global_step5" / f"{prefix}zero_pp_rank_1_mp_rank_00_optim_states.pt")
    result, doc = cli("verify", "--json", str(path))
    assert result.exit_code == 1 and codes(doc) == ["missing_file"]
    message = doc["problems"][0]["message"]
    assert message.startswith("rank 1's optimizer states are missing (2 ranks saved this checkpoint)")
    held = "its piece of every parameter" if name == "zero3" else "norm.weight, norm.bias, head.weight"
    assert held in message
    result, _ = cli("convert", str(path), str(tmp_path / "out.safetensors"))
    assert result.exit_code == 1 and not (tmp_path / "out.safetensors").exists()


def test_zero3_missing_model_states_of_a_rank(run):
    path = run("zero3")
    os.remove(path / "global_step5" / "zero_pp_rank_1_mp_rank_00_model_states.pt")
    _, doc = cli("verify", "--json", str(path))
    assert codes(doc) == ["missing_file"] and "rank 1's model states are missing" in doc["problems"][0]["message"]


def test_a_cut_short_rank_file_is_truncated(run):
    path = run("zero3") / "global_step5" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    os.truncate(path, os.path.getsize(path) - 200)
    _, doc = cli("verify", "--json", str(path.parent.parent))
    assert codes(doc) == ["truncated"] and doc["problems"][0]["path"] == str(path)


def test_a_flipped_byte_in_a_partition_names_the_parameter(run):
    path = run("zero2")
    assert cli("manifest", str(path / "global_step5"))[0].exit_code == 0
    from ckpttool.checkpoint import open_checkpoint

    tensor = next(t for t in open_checkpoint(str(path)).model.tensors if t.name == "head.weight")
    chunk = tensor.chunks[-1]
    flip_byte(chunk.location.file, chunk.location.offset)
    _, doc = cli("verify", "--json", str(path))
    mismatches = [p["message"] for p in doc["problems"] if p["code"] == "checksum_mismatch"]
    assert any(m.startswith(f"tensor head.weight, out.weight (chunk at {chunk.offsets}) in zero_pp_rank_1")
               for m in mismatches)  # tied: one stored range, both names
    assert "corrupt" in codes(doc)  # the zip member's CRC-32 says so too, manifest or not


def _edit_model_states(folder, **changes):
    """Rewrite the model states file (its pickle names only torch's own classes) with some counters changed."""
    path = os.path.join(folder, "mp_rank_00_model_states.pt")
    states = torch.load(path, weights_only=True)
    states.update(changes)
    torch.save(states, path)


def test_engine_counted_fp16_skips_explain_the_optimizer_lag(run):
    """_take_model_step: an overflow step advances global_steps and skipped_steps, not the optimizer or scheduler."""
    path = run("zero2")
    tag = path / "global_step7"
    os.rename(path / "global_step5", tag)
    _edit_model_states(tag, global_steps=7, skipped_steps=2)
    _, doc = cli("verify", "--json", "--for-resume", str(tag))
    assert doc["problems"] == [] and doc["step"] == 7
    _edit_model_states(tag, global_steps=7, skipped_steps=1)
    _, doc = cli("verify", "--json", "--for-resume", str(tag))
    assert codes(doc) == ["step_mismatch"] and "counts 1 skipped updates, not 2" in doc["problems"][0]["message"]


def test_global_steps_that_disagree_with_the_tag(run):
    path = run("zero2")
    _edit_model_states(path / "global_step5", global_steps=6)
    _, doc = cli("verify", "--json", str(path))
    assert codes(doc) == ["step_mismatch"] and "disagree" in doc["problems"][0]["message"]


def test_live_engine_if_deepspeed_is_installed(tmp_path):
    """Regenerate a sample with the real engine where DeepSpeed is installed (not a test extra: it builds from
    source), and check the consolidation against its own zero_to_fp32 again."""
    pytest.importorskip("deepspeed")
    import subprocess
    import sys

    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "fixtures.deepspeed_runs", str(out), "3"], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result, _ = cli("convert", str(out), str(tmp_path / "model.safetensors"))
    assert result.exit_code == 0, result.stderr
    ours, theirs = load_file(tmp_path / "model.safetensors"), torch.load(f"{out}.reference.pt", weights_only=True)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs)


HF = os.path.join(DATA, "transformers_zero2")


def test_transformers_under_deepspeed_verifies_clean():
    """transformers.Trainer with DeepSpeed saves no optimizer.pt or scheduler.pt: the engine's global_stepN/ holds
    them (and here DeepSpeed's WarmupLR). Reading that dir is what keeps the gate from refusing a healthy run."""
    for step in (3, 6):
        path = os.path.join(HF, f"checkpoint-{step}")
        result, doc = cli("verify", "--for-resume", "--json", path)
        assert result.exit_code == 0 and doc["problems"] == [] and doc["trainer"] == "transformers", doc["problems"]
        _, doc = cli("inspect", "--json", path)
        roles = {c["name"]: c["role"] for c in doc["components"]}
        assert roles["optimizer"] == "optimizer" and roles["lr_scheduler"] == "scheduler"
        assert roles["deepspeed_fp32_master"] == "extra"
        sources = {s["source"]: (s["value"], s["meaning"]) for s in doc["step_sources"]}
        assert sources["model states global_steps"] == (step, "global_step")
        assert sources["trainer_state.json global_step"] == (step, "global_step")
    _, doc = cli("latest", "--json", "--for-resume", HF)
    assert doc["path"] == os.path.join(HF, "checkpoint-6")


def test_transformers_under_deepspeed_gate_with_the_live_model():
    from transformers import GPT2Config, GPT2LMHeadModel

    from ckpttool.gate import check_resume

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=32, n_positions=16))
    report = check_resume(os.path.join(HF, "checkpoint-6"), model=model, expected_step=6, world_size=2)
    assert report.ok, report.problems


def test_transformers_under_deepspeed_with_the_engine_state_of_another_save(tmp_path):
    path = tmp_path / "checkpoint-6"
    shutil.copytree(os.path.join(HF, "checkpoint-6"), path)
    shutil.rmtree(path / "global_step6")
    shutil.copytree(os.path.join(HF, "checkpoint-3", "global_step3"), path / "global_step3")
    _, doc = cli("verify", "--json", "--for-resume", str(path))
    assert set(codes(doc)) == {"step_mismatch", "corrupt"}  # and `latest` still names global_step6
    assert any(p["code"] == "corrupt" and "`latest`" not in p["message"] and "global_step6" in p["message"]
               for p in doc["problems"])
    (path / "latest").write_text("global_step3")
    _, doc = cli("verify", "--json", "--for-resume", str(path))
    assert set(codes(doc)) == {"step_mismatch"}
    assert any("model states global_steps=3" in p["message"] for p in doc["problems"])
    os.remove(path / "global_step3" / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    _, doc = cli("verify", "--json", str(path))
    assert "missing_file" in codes(doc)


FP16 = {"fp16_zero2": 16, "fp16_transformers/checkpoint-8": 8, "fp16_transformers/checkpoint-16": 16}


@pytest.mark.parametrize("name", sorted(FP16))
def test_real_fp16_runs_with_skipped_steps_verify_clean(name):
    """Made on a GPU (fixtures/deepspeed_fp16.sh, one H100): fp16 from a loss scale of 2**24, so the engine skipped
    7 to 9 overflowing steps. The optimizer and scheduler lag the global step by exactly skipped_steps: explained,
    never refused. The files were saved from cuda:0 and are read on a CPU."""
    path = os.path.join(DATA, name)
    result, doc = cli("verify", "--for-resume", "--finite", "--json", path)
    assert result.exit_code == 0 and doc["problems"] == [] and doc["step"] == FP16[name], doc["problems"]
    consistency = next(c for c in doc["checks"] if c["check"] == "step consistency")
    _, inspected = cli("inspect", "--json", path)
    sources = {s["source"]: s["value"] for s in inspected["step_sources"]}
    skipped = sources["model states skipped_steps"]
    assert skipped > 0 and sources["optimizer state step"] == FP16[name] - skipped
    assert consistency["detail"] == f"{skipped} fp16-skipped updates, as model states skipped_steps counts them"
    assert "cuda:0" in inspected["metadata"]["saved_on_devices"]


def test_real_fp16_run_consolidates_like_zero_to_fp32(tmp_path):
    reference = torch.load(os.path.join(DATA, "fp16_zero2.reference.pt"), weights_only=True)
    result, _ = cli("convert", os.path.join(DATA, "fp16_zero2"), str(tmp_path / "model.safetensors"))
    assert result.exit_code == 0, result.stderr
    ours = load_file(tmp_path / "model.safetensors")
    assert ours.keys() == reference.keys() and all(torch.equal(ours[k], reference[k]) for k in reference)
    from ckpttool.gate import check_resume

    assert check_resume(os.path.join(DATA, "fp16_zero2"), model=tiny_model(), expected_step=16).ok
