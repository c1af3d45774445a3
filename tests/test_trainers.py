"""Trainer profiles proved on checkpoints the real trainers wrote: each healthy one verifies clean for a resume (CLI,
latest and the gate), inspect names the trainer and the global step, and each broken variant is caught by code."""

import json
import os
import shutil

import pytest
import torch

from ckpttool.gate import ResumeGateError, check_resume
from tests.helpers import cli, codes, copy

DATA = os.path.join(os.path.dirname(__file__), "data")
FP16 = os.path.join(DATA, "fp16")

# (runs key or fp16 sample, checkpoint inside it, trainer, global step)
HEALTHY = [
    ("transformers", "checkpoint-6", "transformers", 6),
    ("transformers", "checkpoint-4", "transformers", 4),
    ("transformers_accumulation", "checkpoint-4", "transformers", 4),
    ("lightning", "epoch=0-step=4.ckpt", "lightning", 4),
    ("lightning", "last.ckpt", "lightning", 6),
    ("lightning_no_scheduler", "epoch=0-step=6.ckpt", "lightning", 6),
    ("accelerate", "checkpoint-6", "diffusers", 6),
    ("accelerate_accumulation", "checkpoint-4", "diffusers", 4),
    ("torchtitan", "step-4", "torchtitan", 4),
    ("fp16:accelerate", "checkpoint-10", "diffusers", 10),
    ("fp16:accelerate", "checkpoint-5", "diffusers", 5),
    ("fp16:transformers", "checkpoint-10", "transformers", 10),
    ("fp16:transformers", "checkpoint-5", "transformers", 5),
    ("fp16:lightning", "epoch=0-step=10.ckpt", "lightning", 10),
    ("fp16:lightning", "epoch=0-step=5.ckpt", "lightning", 5),
    ("data:transformers4_bin", "checkpoint-4", "transformers", 4),  # save_safetensors=False: pytorch_model.bin
    ("data:transformers4_bin", "checkpoint-2", "transformers", 2),
]


def run_dir(runs, key):
    """A run built this session, or a committed sample: `fp16:NAME` (tests/data/fp16/NAME), `data:NAME`."""
    if ":" not in key:
        return runs[key]
    where, name = key.split(":")
    return os.path.join(FP16 if where == "fp16" else DATA, name)


@pytest.mark.parametrize("key,name,trainer,step", HEALTHY, ids=[f"{k}/{n}" for k, n, _, _ in HEALTHY])
def test_healthy_checkpoints_verify_clean(runs, key, name, trainer, step):
    path = os.path.join(run_dir(runs, key), name)
    result, report = cli("inspect", "--json", path)
    assert result.exit_code == 0 and report["trainer"] == trainer and report["step"] == step
    assert all(s["meaning"] for s in report["step_sources"] if s["source"] != "random_states_0 step")
    result, report = cli("verify", "--json", "--for-resume", path)
    assert result.exit_code == 0 and codes(report, "error") == [], report["problems"]
    assert "step_mismatch" not in codes(report), report["problems"]  # fp16 skips are explained, not warned about
    assert check_resume(path).ok


@pytest.mark.parametrize("key", ["fp16:accelerate", "fp16:transformers", "fp16:lightning"])
def test_fp16_skips_are_explained_by_the_loss_scale(key):
    path = sorted(os.path.join(run_dir({}, key), n) for n in os.listdir(run_dir({}, key)) if "10" in n)[0]
    _, report = cli("verify", "--json", path)
    detail = next(c["detail"] for c in report["checks"] if c["check"] == "step consistency")
    made = json.load(open(os.path.join(FP16, "made_by.json")))[key.split(":")[1]]
    skips = made["skipped_updates_by_step"]["10"]
    assert f"{skips} fp16-skipped updates, matching the loss scale" in detail


@pytest.mark.parametrize("key,trainer,pick", [
    ("transformers", "transformers", "checkpoint-6"), ("lightning", "lightning", "last.ckpt"),
    ("accelerate", "diffusers", "checkpoint-6"), ("torchtitan", "torchtitan", "step-4"),
    ("fp16:transformers", "transformers", "checkpoint-10"), ("fp16:lightning", "lightning", "last.ckpt"),
    ("data:transformers4_bin", "transformers", "checkpoint-4"),
])
def test_latest_for_resume_picks_what_the_trainer_would(runs, key, trainer, pick):
    result, out = cli("latest", "--json", "--for-resume", run_dir(runs, key))
    assert result.exit_code == 0 and out["trainer"] == trainer
    assert os.path.basename(out["path"]) == pick and os.path.basename(out["trainer_pick"]) == pick
    assert "differs" not in out


def test_total_limits_left_what_the_trainers_delete_to(runs):
    # transformers' save_total_limit=2 and diffusers' checkpoints_total_limit=2 over saves at 2, 4, 6
    assert sorted(os.listdir(runs["transformers"])) == ["checkpoint-4", "checkpoint-6"]
    assert sorted(os.listdir(runs["accelerate"])) == ["checkpoint-4", "checkpoint-6"]


def test_transformers_parts_and_counters(runs):
    report = cli("inspect", "--json", os.path.join(runs["transformers"], "checkpoint-6"))[1]
    assert {c["name"]: c["role"] for c in report["components"]} == {
        "model": "model", "optimizer": "optimizer", "scheduler": "scheduler", "rng_state": "rng"}
    meanings = {s["source"]: s["meaning"] for s in report["step_sources"]}
    assert meanings == {"directory name": "global_step", "trainer_state.json global_step": "global_step",
                        "optimizer state step": "optimizer_updates", "scheduler last_epoch": "scheduler_steps"}
    # tied embeddings (GPT-2's wte/lm_head): safetensors keeps one name, the model component still reads
    assert report["tensors"] > 0


def test_lightning_parts_and_counters(runs):
    report = cli("inspect", "--json", os.path.join(runs["lightning"], "epoch=0-step=4.ckpt"))[1]
    roles = {c["name"]: c["role"] for c in report["components"]}
    assert roles["model"] == "model" and roles["optimizer"] == "optimizer" and roles["scheduler"] == "scheduler"
    assert report["epoch"] == 0 and "loops" in report["metadata"] and report["metadata"]["hyper_parameters"]
    fp16 = cli("inspect", "--json", os.path.join(FP16, "lightning", "epoch=0-step=10.ckpt"))[1]
    assert {c["name"]: c["role"] for c in fp16["components"]}["MixedPrecision"] == "scaler"


def test_peft_adapter_is_weights_only(runs):
    report = cli("inspect", "--json", runs["peft"])[1]
    assert report["trainer"] == "peft" and report["tensors"] > 0
    assert codes(cli("verify", "--json", "--for-resume", runs["peft"])[1], "error") == ["weights_only"]


def test_simpletuner_316_dirs_without_guard(tmp_path):
    """SimpleTuner 3.1.6 writes training_state.json (and training_state-rank{N}.json), never a .guard."""
    from tests.helpers import state_dir

    for step in (2, 4):
        d = state_dir(str(tmp_path / f"checkpoint-{step}"), step)
        for name in ("training_state.json", "training_state-rank1.json"):
            with open(os.path.join(d, name), "w") as f:
                json.dump({"global_step": step, "epoch_step": step, "epoch": 1, "exhausted_backends": [],
                           "repeats": {}}, f)
    result, out = cli("latest", "--json", "--for-resume", tmp_path)
    assert result.exit_code == 0 and out["path"] == str(tmp_path / "checkpoint-4")
    assert out["trainer"] == "simpletuner" and out["trainer_pick"] == out["path"]


# --- broken variants, each caught with its code ---

def _swap(src_dir, dst_dir, name):
    shutil.copy2(os.path.join(src_dir, name), os.path.join(dst_dir, name))


def test_optimizer_from_a_later_or_earlier_save(runs, tmp_path):
    run = copy(runs["transformers"], tmp_path)
    later, earlier = os.path.join(run, "checkpoint-6"), os.path.join(run, "checkpoint-4")
    a = copy(earlier, tmp_path, "a")
    _swap(later, a, "optimizer.pt")
    report = cli("verify", "--json", a)[1]
    assert "step_mismatch" in codes(report, "error") and "from a later save" in str(report)
    shutil.copy2(os.path.join(earlier, "optimizer.pt"), os.path.join(later, "optimizer.pt"))
    report = cli("verify", "--json", later)[1]
    assert "step_mismatch" in codes(report, "error") and "earlier save at step 4" in str(report)
    _, out = cli("latest", "--json", run)
    assert out["path"] == earlier and "step_mismatch" in out["skipped"][0]["codes"] and "differs" in out


def test_fp16_lag_the_scaler_cannot_explain(tmp_path):
    run = copy(os.path.join(FP16, "transformers"), tmp_path)
    _swap(os.path.join(run, "checkpoint-5"), os.path.join(run, "checkpoint-10"), "optimizer.pt")
    report = cli("verify", "--json", os.path.join(run, "checkpoint-10"))[1]
    assert "step_mismatch" in codes(report, "error")
    # a scaler whose growth tracker says every one of the 10 updates was applied leaves no room for 3 skips
    d = copy(os.path.join(FP16, "accelerate", "checkpoint-10"), tmp_path)
    scaler = torch.load(os.path.join(d, "scaler.pt"), weights_only=True)
    torch.save({**scaler, "_growth_tracker": 10}, os.path.join(d, "scaler.pt"))
    report = cli("verify", "--json", d)[1]
    assert "step_mismatch" in codes(report, "error") and "growth tracker" in str(report)
    # without the scaler a lag of 3 in 10 steps is only a warning: consistent with fp16 skips
    os.remove(os.path.join(d, "scaler.pt"))
    result, report = cli("verify", "--json", d)
    assert result.exit_code == 0 and codes(report, "warning") == ["step_mismatch"]
    assert "consistent with fp16 loss-scale skips" in str(report)


def test_global_step_edited_in_a_state_json(runs, tmp_path):
    d = copy(os.path.join(runs["transformers"], "checkpoint-6"), tmp_path)
    state_file = os.path.join(d, "trainer_state.json")
    state = json.load(open(state_file))
    json.dump({**state, "global_step": 8}, open(state_file, "w"))
    report = cli("verify", "--json", d)[1]
    assert "step_mismatch" in codes(report, "error") and "global-step sources disagree" in str(report)
    with pytest.raises(ResumeGateError):
        check_resume(d)


@pytest.mark.parametrize("remove,code", [("optimizer.pt", "missing_optimizer"), ("scheduler.pt", "missing_scheduler"),
                                         ("trainer_state.json", "missing_file")])
def test_transformers_missing_parts(runs, tmp_path, remove, code):
    d = copy(os.path.join(runs["transformers"], "checkpoint-6"), tmp_path)
    os.remove(os.path.join(d, remove))
    report = cli("verify", "--json", "--for-resume", d)[1]
    assert report["ok"] is False and code in codes(report, "error")


@pytest.mark.parametrize("drop,code", [("lr_schedulers", "missing_scheduler"),
                                       ("optimizer_states", "missing_optimizer"),
                                       (("optimizer_states", "lr_schedulers"), "weights_only")])
def test_lightning_missing_keys(runs, tmp_path, drop, code):
    ckpt = torch.load(os.path.join(runs["lightning"], "epoch=0-step=4.ckpt"), weights_only=False)
    for key in (drop,) if isinstance(drop, str) else drop:
        del ckpt[key]
    torch.save(ckpt, tmp_path / "x.ckpt")
    report = cli("verify", "--json", "--for-resume", tmp_path / "x.ckpt")[1]
    assert codes(report, "error") == [code]


def test_truncated_newest_transformers_checkpoint(runs, tmp_path):
    run = copy(runs["transformers"], tmp_path)
    newest = os.path.join(run, "checkpoint-6", "model.safetensors")
    with open(newest, "r+b") as f:
        f.truncate(os.path.getsize(newest) // 2)
    _, out = cli("latest", "--json", "--for-resume", run)
    assert out["path"] == os.path.join(run, "checkpoint-4") and out["skipped"][0]["codes"] == ["truncated"]
    assert out["trainer_pick"] == os.path.join(run, "checkpoint-6") and "truncated" in out["differs"]


def test_transformers_save_cut_short_after_the_weights(runs, tmp_path):
    """Killed right after save_model: config.json and the weights, nothing else. Still read as transformers, so the
    missing trainer_state.json (written last) marks it unfinished, and `latest` falls back."""
    run = copy(runs["transformers"], tmp_path)
    newest = os.path.join(run, "checkpoint-6")
    for name in os.listdir(newest):
        if name not in ("config.json", "model.safetensors"):
            os.remove(os.path.join(newest, name))
    report = cli("verify", "--json", newest)[1]
    assert report["trainer"] == "transformers" and codes(report, "error") == ["missing_file"]
    _, out = cli("latest", "--json", run)
    assert out["path"] == os.path.join(run, "checkpoint-4") and out["trainer_pick"] == newest


def test_accelerate_scheduler_steps_once_per_process(tmp_path):
    """Without split_batches a prepared scheduler steps num_processes times per update (accelerate/scheduler.py):
    with one RNG file per process that is expected; with one process it is a warning, never an error."""
    from tests.helpers import state_dir

    d = state_dir(str(tmp_path / "checkpoint-3"), 3)
    sched = torch.load(os.path.join(d, "scheduler.bin"), weights_only=True)
    torch.save({**sched, "last_epoch": 6, "_step_count": 7}, os.path.join(d, "scheduler.bin"))
    result, report = cli("verify", "--json", d)
    assert result.exit_code == 0 and codes(report, "warning") == ["step_mismatch"] and "2x" in str(report)
    shutil.copy2(os.path.join(d, "random_states_0.pkl"), os.path.join(d, "random_states_1.pkl"))
    result, report = cli("verify", "--json", d)
    assert result.exit_code == 0 and codes(report) == [], report["problems"]


def test_scaler_with_a_non_default_init_scale_warns(tmp_path):
    d = copy(os.path.join(FP16, "accelerate", "checkpoint-10"), tmp_path)
    path = os.path.join(d, "scaler.pt")
    scaler = torch.load(path, weights_only=True)
    torch.save({**scaler, "scale": 2.0 ** 20}, path)  # 3 skips from init_scale 2**23: plausible, not provable
    result, report = cli("verify", "--json", d)
    assert result.exit_code == 0 and codes(report, "warning") == ["step_mismatch"]
    assert "only if init_scale was not the default" in str(report)


def test_long_run_scale_grown_past_the_default_still_explains_skips():
    """10,100 steps: the scale grew to 131072 (growths every 2000 clean updates, each undone by an overflow but one):
    skips = growths - 1 <= 4, so a lag of 4 is explained; a lag of 6 is not, though the tracker allows it."""
    from ckpttool.model import GLOBAL_STEP, OPTIMIZER_UPDATES, Checkpoint, Component, Record, StepSource
    from ckpttool.steps import judge
    from ckpttool.trainers import GENERIC

    def checkpoint(updates):
        scaler = Component("scaler", "scaler", tree={"scale": 131072.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                                                      "growth_interval": 2000, "_growth_tracker": 100})
        return Checkpoint("x", "torch", "t", components=[scaler], steps=[
            StepSource("state", 10100, GLOBAL_STEP, record=Record.STATE_FILE, key="global_step"),
            StepSource("optimizer", updates, OPTIMIZER_UPDATES, record=Record.OPTIMIZER, key="step")])

    problems, notes = judge(checkpoint(10096), GENERIC)
    assert problems == [] and "4 fp16-skipped updates" in notes[0]
    problems, _ = judge(checkpoint(10094), GENERIC)
    assert [(p.code, p.severity) for p in problems] == [("step_mismatch", "warning")]


def test_gate_with_the_live_objects_a_real_trainer_resumes_into(runs, tmp_path):
    """transformers.Trainer's own optimizer (decay / no-decay groups) and scheduler on a fresh tied GPT-2: the gate
    passes the healthy checkpoints, warning only that lm_head.weight is tied to the saved wte (safetensors drops it)."""
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    model = GPT2LMHeadModel(GPT2Config(vocab_size=10, n_positions=8, n_embd=16, n_layer=1, n_head=2))
    trainer = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path),
                                                          use_cpu=True, report_to=[], max_steps=6))
    trainer.create_optimizer_and_scheduler(num_training_steps=6)
    for path in (os.path.join(runs["transformers"], "checkpoint-6"), os.path.join(FP16, "transformers", "checkpoint-10"),
                 os.path.join(DATA, "transformers4_bin", "checkpoint-4")):
        report = check_resume(path, model=model, optimizer=trainer.optimizer, scheduler=trainer.lr_scheduler)
        assert report.ok and all(p["severity"] == "warning" for p in report.problems)
        assert all("tied" in p["message"] for p in report.problems if p["code"] == "key_mismatch")
    with pytest.raises(ResumeGateError) as err:  # a plain single-group optimizer is not what the Trainer saved
        check_resume(os.path.join(runs["transformers"], "checkpoint-6"), model=model,
                     optimizer=torch.optim.AdamW(model.parameters()))
    assert {p["code"] for p in err.value.problems} == {"optimizer_mismatch"}


def test_gate_lightning_with_live_module_and_optimizer(runs):
    from fixtures.generate import TinyNet

    module = torch.nn.Module()
    module.net = TinyNet(16)  # the LightningModule of ckpttool.synthetic.runs holds its network as `net`
    opt = torch.optim.AdamW(module.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    for path in (os.path.join(runs["lightning"], "last.ckpt"), os.path.join(FP16, "lightning", "epoch=0-step=10.ckpt")):
        assert check_resume(path, model=module, optimizer=opt, scheduler=sched).ok


def test_lightning_truncated_last_ckpt(runs, tmp_path):
    run = copy(runs["lightning"], tmp_path)
    last = os.path.join(run, "last.ckpt")
    with open(last, "r+b") as f:
        f.truncate(os.path.getsize(last) // 2)
    _, out = cli("latest", "--json", "--for-resume", run)
    assert out["path"] == os.path.join(run, "epoch=0-step=6.ckpt") and out["trainer"] == "lightning"
    assert out["trainer_pick"] == last and "truncated" in out["differs"]


def test_torchtitan_step_without_lr_scheduler(tmp_path):
    import warnings

    import torch.distributed.checkpoint as dcp

    from fixtures.generate import _trained

    model, opt, _ = _trained(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": model.state_dict(), "optimizer": opt.state_dict()},
                 checkpoint_id=str(tmp_path / "step-2"), no_dist=True)
    report = cli("verify", "--json", "--for-resume", tmp_path / "step-2")[1]
    assert report["trainer"] == "torchtitan" and codes(report, "error") == ["missing_scheduler"]


def test_consistency_models_optimizer_behind_its_step_is_a_warning(tmp_path):
    """cm advances its step only on applied updates; a younger optimizer means progdist re-created it or a resume
    started it fresh (opt file missing): said, not refused. Ahead of the step is still an error."""
    from fixtures.generate import _trained

    model, _, _ = _trained(5)
    torch.save(model.state_dict(), tmp_path / "model000005.pt")
    torch.save(_trained(3)[1].state_dict(), tmp_path / "opt000005.pt")
    result, report = cli("verify", "--json", "--for-resume", tmp_path / "model000005.pt")
    assert result.exit_code == 0 and report["trainer"] == "consistency_models"
    assert codes(report, "warning") == ["step_mismatch"] and "progressive distillation" in str(report)
    torch.save(_trained(7)[1].state_dict(), tmp_path / "opt000005.pt")
    assert "step_mismatch" in codes(cli("verify", "--json", tmp_path / "model000005.pt")[1], "error")


def test_torchtitan_train_state_is_read_as_torchtitan_saves_it(runs):
    """TrainState.state_dict: the step as an int32 tensor (read from its bytes, without torch), the loss lists as
    torch.save'd BytesIO buffers (opened in turn); the optimizer's and scheduler's counters agree with it."""
    report = cli("inspect", "--json", os.path.join(runs["torchtitan"], "step-4"))[1]
    sources = {s["source"]: (s["value"], s["meaning"]) for s in report["step_sources"]}
    assert sources == {"directory name": (4, "global_step"), "DCP state 'train_state.step'": (4, "global_step"),
                       "optimizer state step": (4, "optimizer_updates"),
                       "lr_scheduler.last_epoch": (4, "scheduler_steps")}
    objects = report["metadata"]["objects"]
    assert objects["train_state.log_steps"] == [1, 2, 3, 4] and objects["train_state.global_avg_losses"] == [0.5] * 4
    assert report["problems"] == []


def test_file_roles_built_from_names_match_those_names_only():
    """A role is matched from the start of an entry and anchored at its end: every name of a pattern() must be
    anchored, or `pytorch_model.bin.bak` or `adapter_model.safetensors.part` would be read as weights."""
    from ckpttool.formats.statedir import StateDirFiles
    from ckpttool.trainers import path_profiles

    names = {"model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json",
             "adapter_model.safetensors", "adapter_model.bin"}
    strays = {f"{n}{tail}" for n in names for tail in (".bak", ".part", "~")}
    for profile in path_profiles(("transformers.Transformers", "peft.Peft")):
        files = profile.state_dir_files()
        assert isinstance(files, StateDirFiles)
        matched = {entry for entry in names | strays for r in files.roles if r.pattern.match(entry)}
        assert matched and not matched & strays, (profile.name, matched & strays)


def test_a_checkpoint_that_lost_its_trainers_marker_is_judged_as_its_run(corpus, tmp_path):
    """A SimpleTuner checkpoint whose training_state.json (the file that marks it SimpleTuner's) is lost looks like
    a plain Accelerate save by its own files; the run's other checkpoint says SimpleTuner wrote it, so the loss is
    the damage it is (SimpleTuner restarts its step and epoch counts) and `latest` passes over it."""
    import shutil

    from ckpttool.checkpoint import open_checkpoint
    from ckpttool.operations.latest import latest
    from ckpttool.operations.verify import verify

    run = tmp_path / "run"
    shutil.copytree(os.path.dirname(corpus["simpletuner"]), run)
    shutil.rmtree(run / "checkpoint-6-tmp")
    lost = run / "checkpoint-5"
    shutil.copytree(run / "checkpoint-3", lost)
    for marker in ("training_state.json", ".guard"):
        (lost / marker).unlink()
    ckpt = open_checkpoint(str(lost))
    assert ckpt.trainer == "simpletuner"
    report = verify(str(lost), for_resume=True, recall=False)
    missing = " ".join(p.message for p in report.problems if p.code == "missing_file")
    assert not report.ok and "training_state.json" in missing
    assert os.path.basename(latest(str(run), for_resume=True)["path"]) == "checkpoint-3"
    alone = tmp_path / "alone" / "checkpoint-5"  # no run around it to say otherwise: an Accelerate save, as before
    shutil.copytree(lost, alone)
    assert open_checkpoint(str(alone)).trainer != "simpletuner"
