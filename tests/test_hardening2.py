"""Issue 30, beyond values: which checkpoint is newest (the step each file records, not digits a metric put in its
name), and outputs replaced so that an interruption at any moment leaves one whole output."""

import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

from helpers import cli

from ckpttool import atomic

SAMPLES = os.path.join(os.path.dirname(__file__), "data", "fp16", "lightning")


def test_lightning_files_are_ordered_by_the_step_they_record(tmp_path):
    """ModelCheckpoint(filename="{epoch}-{val_loss:.2f}"): the metric's decimals are no step."""
    shutil.copy(os.path.join(SAMPLES, "epoch=0-step=5.ckpt"), tmp_path / "epoch=0-val_loss=0.89.ckpt")
    shutil.copy(os.path.join(SAMPLES, "epoch=0-step=10.ckpt"), tmp_path / "epoch=0-val_loss=0.12.ckpt")
    result, out = cli("latest", "--for-resume", "--json", tmp_path)
    assert result.exit_code == 0 and os.path.basename(out["path"]) == "epoch=0-val_loss=0.12.ckpt"
    assert out["step"] == 10
    from ckpttool.gate import latest_valid

    assert os.path.basename(latest_valid(str(tmp_path))) == "epoch=0-val_loss=0.12.ckpt"
    _, plan = cli("prune", "--keep", "1", "--dry-run", "--json", tmp_path)
    assert [os.path.basename(r["path"]) for r in plan["delete"]] == ["epoch=0-val_loss=0.89.ckpt"]


def test_a_ckpt_not_named_like_a_save_is_no_candidate(tmp_path):
    """Exported weights, or another run's save, beside a Lightning run: never picked, never deleted."""
    shutil.copy(os.path.join(SAMPLES, "epoch=0-step=5.ckpt"), tmp_path / "epoch=0-step=5.ckpt")
    shutil.copy(os.path.join(SAMPLES, "epoch=0-step=10.ckpt"), tmp_path / "epoch=0-step=10.ckpt")
    torch.save({"state_dict": {"w": torch.ones(2)}, "global_step": 3}, tmp_path / "sd-base.ckpt")
    shutil.copy(os.path.join(SAMPLES, "epoch=0-step=10.ckpt"), tmp_path / "pretrained_base.ckpt")  # resumable
    os.utime(tmp_path / "pretrained_base.ckpt")
    _, latest = cli("latest", "--for-resume", "--json", tmp_path)
    assert os.path.basename(latest["path"]) == "epoch=0-step=10.ckpt"
    result, out = cli("prune", "--keep", "1", "--json", tmp_path)
    assert result.exit_code == 0 and [os.path.basename(r["path"]) for r in out["delete"]] == ["epoch=0-step=5.ckpt"]
    assert sorted(os.listdir(tmp_path)) == ["epoch=0-step=10.ckpt", "pretrained_base.ckpt", "sd-base.ckpt"]


def _folder(path, value):
    os.makedirs(path)
    save_file({"w": torch.full((4,), float(value))}, os.path.join(path, "model.safetensors"))
    return path


def test_publish_keeps_one_whole_output_when_interrupted_deleting_the_old(tmp_path, monkeypatch):
    dst, new = _folder(str(tmp_path / "out"), 1), _folder(str(tmp_path / "new"), 2)

    def interrupted(path):
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic, "discard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic.publish(new, dst)
    assert os.listdir(dst) == ["model.safetensors"] and not os.path.exists(new)
    aside = [e for e in os.listdir(tmp_path) if atomic.STAGING.match(e)]
    assert len(aside) == 1  # the old output, whole, under a staging name the next write or prune removes


def test_publish_puts_the_old_output_back_when_the_new_cannot_move_in(tmp_path, monkeypatch):
    dst, new = _folder(str(tmp_path / "out"), 1), _folder(str(tmp_path / "new"), 2)
    real = os.rename

    def failing(src, target):
        if src == new:
            raise OSError(28, "No space left on device")
        return real(src, target)

    monkeypatch.setattr(os, "rename", failing)
    with pytest.raises(OSError):
        atomic.publish(new, dst)
    assert sorted(os.listdir(tmp_path)) == ["new", "out"] and os.listdir(dst) == ["model.safetensors"]


def test_convert_force_replaces_a_folder_whole(tmp_path):
    src = str(tmp_path / "src.safetensors")
    save_file({"w": torch.ones(4), "b": torch.zeros(2)}, src)
    out = str(tmp_path / "out")
    assert cli("convert", src, out, "--to", "accelerate")[0].exit_code == 0
    save_file({"w": torch.full((4,), 3.0), "b": torch.zeros(2)}, src)
    assert cli("convert", src, out, "--to", "accelerate", "--force")[0].exit_code == 0
    assert cli("diff", "--values", src, out)[0].exit_code == 0
    assert not [e for e in os.listdir(tmp_path) if atomic.STAGING.match(e)]


def _accelerate_project(tmp_path, shapes=((3, 4),), seed=0):
    """A real Accelerator with automatic checkpoint naming, models of the given Linear shapes, AdamW, LambdaLR."""
    pytest.importorskip("accelerate")
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import ProjectConfiguration

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    torch.manual_seed(seed)
    acc = Accelerator(cpu=True, project_config=ProjectConfiguration(project_dir=str(tmp_path),
                                                                    automatic_checkpoint_naming=True))
    models = [torch.nn.Linear(*shape) for shape in shapes]
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in models]
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0) for o in opts]
    prepared = acc.prepare(*models, *opts, *scheds)
    return acc, prepared[:len(models)], prepared[len(models):2 * len(models)]


def _steps(models, opts, n=1):
    for _ in range(n):
        for m, o in zip(models, opts):
            m(torch.randn(2, m.in_features)).pow(2).mean().backward()
            o.step()
            o.zero_grad()


def test_accelerate_gate_refuses_what_load_state_would_pick_over_the_newest(tmp_path):
    from ckpttool.gate import ResumeGateError
    from ckpttool.integrations.accelerate import install_resume_gate

    acc, models, opts = _accelerate_project(tmp_path)
    for _ in range(3):
        _steps(models, opts)
        acc.save_state()
    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(checkpoints / "checkpoint_0", checkpoints / "checkpoint_10_old")  # a stray copy of step 1
    assert sorted(os.listdir(checkpoints)) == ["checkpoint_0", "checkpoint_1", "checkpoint_10_old", "checkpoint_2"]
    acc, models, opts = _accelerate_project(tmp_path, seed=1)
    before = models[0].weight.detach().clone()
    install_resume_gate(acc, fallback=False)
    with pytest.raises(ResumeGateError) as e:
        acc.load_state()
    assert e.value.problems[0]["code"] == "step_mismatch" and "checkpoint_10_old" in e.value.problems[0]["message"]
    assert torch.equal(models[0].weight, before)  # nothing was loaded
    acc, models, opts = _accelerate_project(tmp_path, seed=1)
    install_resume_gate(acc, fallback=True)
    acc.load_state()  # the newest checkpoint_N that passes, by name
    from safetensors.torch import load_file

    saved = load_file(str(checkpoints / "checkpoint_2" / "model.safetensors"))
    assert torch.equal(models[0].weight.detach(), saved["weight"])


def test_accelerate_gate_compares_every_prepared_model(tmp_path):
    from ckpttool.gate import ResumeGateError
    from ckpttool.integrations.accelerate import install_resume_gate

    acc, models, opts = _accelerate_project(tmp_path, shapes=((3, 4), (4, 2)))
    _steps(models, opts)
    acc.save_state()
    acc, models, opts = _accelerate_project(tmp_path, shapes=((3, 4), (4, 5)), seed=1)  # the second one changed
    before = models[0].weight.detach().clone()
    install_resume_gate(acc)
    with pytest.raises(ResumeGateError) as e:
        acc.load_state(str(tmp_path / "checkpoints" / "checkpoint_0"))
    assert {"shape_mismatch"} <= {p["code"] for p in e.value.problems}
    assert torch.equal(models[0].weight, before)  # model 0 untouched: the gate ran before anything was loaded
    acc, models, opts = _accelerate_project(tmp_path, shapes=((3, 4), (4, 2)), seed=1)
    install_resume_gate(acc)
    acc.load_state(str(tmp_path / "checkpoints" / "checkpoint_0"))


def test_sigterm_removes_the_staging_and_says_so(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    src = tmp_path / "big.pt"
    torch.save({f"w{i}": torch.randn(256, 1024) for i in range(128)}, src)  # 128 MiB, cast tensor by tensor
    proc = subprocess.Popen([sys.executable, "-m", "ckpttool", "convert", str(src), str(tmp_path / "out.safetensors"),
                             "--dtype", "fp16"], stderr=subprocess.PIPE, text=True)
    while proc.poll() is None and not [e for e in os.listdir(tmp_path) if atomic.STAGING.match(e)]:
        time.sleep(0.01)  # until it is writing
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the conversion finished before the signal arrived")
    assert proc.returncode == 143 and "nothing was left half-written" in err and "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == ["big.pt"]


def _swap(path):
    """What a rolling save or a sync job does: a new file renamed over the old one."""
    new = path + ".new"
    shutil.copyfile(path, new)
    os.replace(new, path)


def test_accelerate_hook_refuses_files_swapped_between_check_and_load(tmp_path):
    from ckpttool.gate import ResumeGateError
    from ckpttool.integrations.accelerate import install_resume_gate

    acc, models, opts = _accelerate_project(tmp_path)
    _steps(models, opts)
    acc.save_state()
    ckpt = str(tmp_path / "checkpoints" / "checkpoint_0")
    acc, models, opts = _accelerate_project(tmp_path, seed=1)
    real = acc.load_state

    def swapped_then_loaded(input_dir=None, *args, **kwargs):
        _swap(os.path.join(ckpt, "model.safetensors"))
        return real(input_dir, *args, **kwargs)

    acc.load_state = swapped_then_loaded
    install_resume_gate(acc)
    with pytest.raises(ResumeGateError) as e:
        acc.load_state(ckpt)
    assert e.value.problems[0]["code"] == "checksum_mismatch" and "model.safetensors" in str(e.value)
    acc, models, opts = _accelerate_project(tmp_path, seed=1)
    install_resume_gate(acc)
    acc.load_state(ckpt)  # unchanged files: no alarm


def test_a_file_changed_while_the_gate_reads_it_is_refused(tmp_path, monkeypatch):
    from ckpttool import gate

    acc, models, opts = _accelerate_project(tmp_path)
    _steps(models, opts)
    acc.save_state()
    ckpt = str(tmp_path / "checkpoints" / "checkpoint_0")
    real = gate.verify_checkpoint

    def changing(path, **kwargs):
        result = real(path, **kwargs)
        _swap(os.path.join(ckpt, "optimizer.bin"))
        return result

    monkeypatch.setattr(gate, "verify_checkpoint", changing)
    with pytest.raises(gate.ResumeGateError) as e:
        gate.check_resume(ckpt)
    assert "optimizer.bin changed between the gate's check" in str(e.value)


def test_a_prune_stopped_half_way_leaves_each_checkpoint_whole_or_gone(tmp_path, monkeypatch):
    from helpers import state_dir

    from ckpttool.operations import prune

    run = tmp_path / "run"
    for step in (1, 2, 3):
        state_dir(str(run / f"checkpoint-{step}"), step)
    calls = []

    def interrupted(path, *args, **kwargs):
        calls.append(path)
        with open(os.path.join(path, "model.safetensors"), "wb"):
            pass  # a first file gone, as rmtree removes it
        raise KeyboardInterrupt

    monkeypatch.setattr(prune.shutil, "rmtree", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prune.prune(str(run), keep=1)
    assert atomic.STAGING.match(os.path.basename(calls[0]))  # what was being deleted was already out of the run
    left = sorted(e for e in os.listdir(run) if not atomic.STAGING.match(e))
    assert left in (["checkpoint-2", "checkpoint-3"], ["checkpoint-1", "checkpoint-3"])
    assert all(cli("verify", run / name)[0].exit_code == 0 for name in left)  # whole, not half deleted
    _, latest = cli("latest", "--json", run)
    assert os.path.basename(latest["path"]) == "checkpoint-3" and latest["skipped"] == []


@pytest.mark.parametrize("marker", ["training_state.json", ".guard"])
@pytest.mark.parametrize("where", ["checkpoint", "sibling"])
def test_a_fifo_named_like_a_trainers_marker_is_never_opened(tmp_path, marker, where):
    """Recognising a trainer reads small marker files (SimpleTuner's training_state.json and .guard), in the checkpoint
    and in the run's other checkpoints: a FIFO under that name would block the open for ever. It is never opened;
    in the checkpoint it is unsafe_path, in a sibling it says nothing."""
    import subprocess
    import sys

    run = tmp_path / "run"
    for step in (3, 5):
        folder = run / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        save_file({"w": torch.zeros(2)}, str(folder / "model.safetensors"))
        torch.save({}, str(folder / "optimizer.bin"))
    os.mkfifo(run / ("checkpoint-5" if where == "checkpoint" else "checkpoint-3") / marker)
    done = subprocess.run([sys.executable, "-m", "ckpttool", "verify", "--json", str(run / "checkpoint-5")],
                          capture_output=True, text=True, timeout=120, env=dict(os.environ, CKPTTOOL_CACHE_DIR=""))
    codes = {p["code"] for p in __import__("json").loads(done.stdout)["problems"]}
    assert done.returncode == (1 if where == "checkpoint" else 0)
    # a .guard, even one never opened, names SimpleTuner, whose training_state.json is then missing
    expected = {"unsafe_path"} | ({"missing_file"} if marker == ".guard" else set()) if where == "checkpoint" else set()
    assert codes == expected


@pytest.mark.parametrize("layout", ["deepspeed_latest", "shard_index"])
def test_a_fifo_where_a_reader_expects_a_small_file_is_refused_not_opened(tmp_path, layout):
    """DeepSpeed's `latest` and a shard index are read to find the rest: as a FIFO they would block the open for
    ever; each is named (unsafe_path, corrupt) and verify exits 1."""
    import json
    import subprocess
    import sys

    if layout == "deepspeed_latest":
        target = tmp_path / "ds"
        (target / "global_step3").mkdir(parents=True)
        torch.save({"module": {"w": torch.zeros(2)}, "global_steps": 3},
                   str(target / "global_step3" / "mp_rank_00_model_states.pt"))
        os.mkfifo(target / "latest")
        expected = {"unsafe_path", "missing_file"}
    else:
        target = tmp_path / "shards"
        target.mkdir()
        save_file({"w": torch.zeros(2)}, str(target / "model-00001-of-00001.safetensors"))
        os.mkfifo(target / "model.safetensors.index.json")
        expected = {"corrupt"}
    done = subprocess.run([sys.executable, "-m", "ckpttool", "verify", "--json", str(target)], capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, CKPTTOOL_CACHE_DIR=""))
    assert done.returncode == 1
    assert {p["code"] for p in json.loads(done.stdout)["problems"]} == expected
