"""The reference trainer end to end, as subprocesses: kills at many points, resume, refusals, torchrun. Every run
here trains beside a busy torch neighbour, as on a shared CI machine: bit-exact must not need a quiet machine."""

import filecmp
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import busy_neighbour, flip_byte

STEPS, EVERY = 12, 4
BASE = ["--max-steps", str(STEPS), "--checkpointing-steps", str(EVERY), "--batch-size", "8"]


@pytest.fixture(scope="module", autouse=True)
def neighbour():
    with busy_neighbour():
        yield


def train(out, *extra, fault=None, check=True, timeout=300, env=None):
    """One run; SOURCE_DATE_EPOCH fixes the manifests' creation time, so reruns write the same bytes everywhere."""
    env = dict(os.environ, TRAINER_FAULT=fault or "", SOURCE_DATE_EPOCH="1700000000", **(env or {}))
    proc = subprocess.run([sys.executable, "-m", "trainer", "--output-dir", str(out), *BASE, *extra],
                          capture_output=True, text=True, env=env, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def torchrun(out, *extra, fault=None, check=True):
    """Two processes on a free port (--standalone), so that a suite running beside this one cannot collide."""
    env = dict(os.environ, TRAINER_FAULT=fault or "")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "trainer", "--output-dir", str(out), *BASE, *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def final_state(out):
    d = os.path.join(out, f"checkpoint-{STEPS}")
    return (load_file(os.path.join(d, "model.safetensors")), load_file(os.path.join(d, "ema", "model.safetensors")),
            torch.load(os.path.join(d, "optimizer.bin"), weights_only=True)["state"])


def assert_same_files(a, b):
    """Every file of every checkpoint of run `a` is in run `b`, byte for byte (and no others)."""
    def files(root):
        return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, names in os.walk(root) for f in names)
    assert files(a) == files(b)
    _, mismatch, errors = filecmp.cmpfiles(a, b, files(a), shallow=False)
    assert not mismatch and not errors, f"differ: {mismatch + errors}"


def assert_bit_identical(a, b):
    (model_a, ema_a, opt_a), (model_b, ema_b, opt_b) = final_state(a), final_state(b)
    assert model_a.keys() == model_b.keys()
    assert all(torch.equal(model_a[k], model_b[k]) for k in model_a), "model weights differ"
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a), "EMA weights differ"
    for i in opt_a:
        assert all(torch.equal(opt_a[i][k], opt_b[i][k]) for k in opt_a[i]), "optimizer state differs"


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    out = tmp_path_factory.mktemp("baseline")
    proc = train(out)
    assert "training from step 0" in proc.stdout
    return out


@pytest.mark.parametrize("fault", ["after-step:6", "mid-save:8", "before-publish:8", "after-step:12"])
def test_sigkill_anywhere_then_resume_is_bit_exact(baseline, tmp_path, fault):
    killed = train(tmp_path, fault=fault, check=False)
    assert killed.returncode == -signal.SIGKILL
    if fault.startswith(("mid-save", "before-publish")):
        assert os.path.isdir(tmp_path / "checkpoint-8.tmp") and not os.path.exists(tmp_path / "checkpoint-8")
    resumed = train(tmp_path, "--resume-from-checkpoint", "latest")
    assert "resuming from" in resumed.stdout and "warning" not in resumed.stderr
    assert not [e for e in os.listdir(tmp_path) if e.endswith(".tmp")]
    assert_bit_identical(baseline, tmp_path)


def test_runs_beside_a_busy_neighbour_write_identical_checkpoints(baseline, tmp_path):
    """Six more runs, three at a time, beside the neighbour: every file of every checkpoint equals the baseline's."""
    outs = [tmp_path / f"run{i}" for i in range(6)]
    with ThreadPoolExecutor(3) as pool:
        for proc in pool.map(train, outs):
            assert "1 CPU thread(s) each (--threads)" in proc.stdout
    for out in outs:
        assert_same_files(baseline, out)


def test_thread_count_is_the_flags_not_the_environments(baseline, tmp_path):
    """OMP/MKL variables asking for 4 threads change nothing: the trainer pins its own count (MKL's weight-gradient
    product rounds differently at 3 threads or more, trainer/determinism.py)."""
    proc = train(tmp_path, env={"OMP_NUM_THREADS": "4", "MKL_NUM_THREADS": "4"})
    assert "1 CPU thread(s) each" in proc.stdout
    assert_same_files(baseline, tmp_path)
    state = json.load(open(tmp_path / "checkpoint-4" / "training_state.json"))
    assert state["determinism"] == {"threads": 1, "torch": torch.__version__, "device": "cpu"}


def test_resume_on_another_thread_count_names_both(baseline, tmp_path):
    shutil.copytree(baseline / "checkpoint-8", tmp_path / "checkpoint-8")
    resumed = train(tmp_path, "--threads", "2", "--resume-from-checkpoint", "latest")
    assert "resumed at step 8" in resumed.stdout
    assert (f"[trainer] warning: {tmp_path / 'checkpoint-8'} was saved under other conditions, so this run will not "
            "match one that never stopped, bit for bit: threads: 1 when saved, 2 now (resume with --threads 1 to "
            "match)") in resumed.stderr
    again = train(tmp_path, "--threads", "2", "--max-steps", "16", "--resume-from-checkpoint", "latest")
    assert "resumed at step 12" in again.stdout and "warning" not in again.stderr
    refused = train(tmp_path / "zero", "--threads", "0", check=False)
    assert refused.returncode == 2 and "argument --threads: must be at least 1, not 0" in refused.stderr


def test_corrupt_newest_falls_back(baseline, tmp_path):
    train(tmp_path, fault="after-step:9", check=False)
    flip_byte(tmp_path / "checkpoint-8" / "model.safetensors", 200)
    resumed = train(tmp_path, "--resume-from-checkpoint", "latest")
    assert f"skipping {tmp_path / 'checkpoint-8'}: checksum_mismatch" in resumed.stdout
    assert f"resuming from {tmp_path / 'checkpoint-4'}" in resumed.stdout
    assert_bit_identical(baseline, tmp_path)


def test_weights_only_and_step_mismatch_refused(baseline, tmp_path):
    weights = baseline / "checkpoint-4" / "model.safetensors"
    refused = train(tmp_path / "a", "--resume-from-checkpoint", str(weights), check=False)
    assert refused.returncode != 0
    assert "[weights_only]" in refused.stderr and str(baseline / "checkpoint-4") in refused.stderr
    bad = shutil.copytree(baseline / "checkpoint-4", tmp_path / "checkpoint-4")
    state = json.load(open(bad / "training_state.json"))
    json.dump(dict(state, global_step=5), open(bad / "training_state.json", "w"))  # same length, other bytes
    refused = train(tmp_path / "b", "--resume-from-checkpoint", str(bad), check=False)
    assert refused.returncode != 0 and "[step_mismatch]" in refused.stderr
    assert "[checksum_mismatch]" in refused.stderr  # the manifest saw the edit too


def test_total_limit_keeps_newest(tmp_path):
    train(tmp_path, "--checkpoints-total-limit", "2")
    assert sorted(e for e in os.listdir(tmp_path)) == ["checkpoint-12", "checkpoint-8"]


def test_async_save_matches_and_is_crash_safe(baseline, tmp_path):
    train(tmp_path / "a", "--async-save")
    assert_bit_identical(baseline, tmp_path / "a")
    killed = train(tmp_path / "b", "--async-save", fault="mid-save:8", check=False)
    assert killed.returncode == -signal.SIGKILL and not os.path.exists(tmp_path / "b" / "checkpoint-8")
    train(tmp_path / "b", "--async-save", "--resume-from-checkpoint", "latest")
    assert_bit_identical(baseline, tmp_path / "b")


def test_sigterm_saves_and_exits_zero(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "trainer", "--output-dir", str(tmp_path), "--max-steps",
                             "1000000", "--checkpointing-steps", "1000000"], stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if "training from step" in line:
            break
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    rest = proc.stdout.read()
    assert proc.wait(timeout=60) == 0
    assert "SIGTERM: saved step" in rest
    saved = [e for e in os.listdir(tmp_path) if e.startswith("checkpoint-")]
    assert len(saved) == 1 and not saved[0].endswith(".tmp")
    from ckpttool.operations.verify import verify
    assert verify(str(tmp_path / saved[0]), for_resume=True, require_manifest=True).ok


def test_quantized_run_resumes_into_plain_run_after_remap(tmp_path):
    train(tmp_path, "--quantize", "qint8", "--max-steps", "8")
    ckpt = tmp_path / "checkpoint-8"
    refused = train(tmp_path, "--freeze", "linear_1", "--resume-from-checkpoint", str(ckpt), check=False)
    assert refused.returncode != 0 and "[quantized_keys] linear_1 is qint8-quantized" in refused.stderr
    fix = f"ckpttool remap {ckpt} {ckpt}-dequantized --dequantize"
    assert fix in refused.stderr
    from tests.helpers import cli
    assert cli("remap", ckpt, f"{ckpt}-dequantized", "--dequantize")[0].exit_code == 0
    resumed = train(tmp_path, "--freeze", "linear_1", "--resume-from-checkpoint", f"{ckpt}-dequantized")
    assert "resumed at step 8" in resumed.stdout and os.path.exists(tmp_path / f"checkpoint-{STEPS}")


def test_torchrun_two_processes_save_and_resume_bit_exact(tmp_path):
    """Sync baseline; the other run saves in the background, is killed mid-save and resumed: bit-identical."""
    torchrun(tmp_path / "base")
    files = os.listdir(tmp_path / "base" / f"checkpoint-{STEPS}")
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= set(files)
    killed = torchrun(tmp_path / "run", "--async-save", fault="mid-save:8", check=False)
    assert killed.returncode != 0 and not os.path.exists(tmp_path / "run" / "checkpoint-8")
    resumed = torchrun(tmp_path / "run", "--async-save", "--resume-from-checkpoint", "latest")
    assert "resuming from" in resumed.stdout
    assert_bit_identical(tmp_path / "base", tmp_path / "run")
    # one rank's RNG file gone: every rank refuses, nobody hangs
    os.remove(tmp_path / "run" / f"checkpoint-{STEPS}" / "random_states_1.pkl")
    refused = torchrun(tmp_path / "run", "--resume-from-checkpoint", str(tmp_path / "run" / f"checkpoint-{STEPS}"),
                       check=False)
    assert refused.returncode != 0 and "resume refused" in refused.stderr


def test_real_accelerator_loads_trainer_checkpoints(baseline):
    from accelerate import Accelerator

    from trainer.model import Denoiser, lr_lambda
    accelerator = Accelerator(cpu=True)
    model = Denoiser()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(5, STEPS))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    accelerator.load_state(str(baseline / "checkpoint-8"))
    saved = load_file(baseline / "checkpoint-8" / "model.safetensors")
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    assert scheduler.scheduler.last_epoch == 8
    rng = torch.load(baseline / "checkpoint-8" / "random_states_0.pkl", weights_only=False)
    assert torch.equal(torch.get_rng_state(), rng["torch_manual_seed"])  # Accelerate restored our RNG file


CHAOS_TRAIN = [sys.executable, "-m", "trainer", "--output-dir", "{out}", "--max-steps", "8", "--checkpointing-steps",
               "4", "--batch-size", "8"]


def chaos(tmp_path, *options):
    """A bounded ckpt-chaos sweep (the full one is `make chaos`): kill the trainer at file events of its saves in
    every mode, resume from latest, and require every crash point to PASS: the same final weights, bit for bit,
    resumed from the newest complete checkpoint."""
    resume = " ".join(CHAOS_TRAIN + ["--resume-from-checkpoint", "latest"])
    cmd = [sys.executable, "-m", "ckpt_chaos", "run", "--work", str(tmp_path / "chaos"), "--resume-cmd", resume,
           "--result-file", "{out}/checkpoint-8/model.safetensors", "--checkpoint-glob", "{out}/checkpoint-*",
           "--step-regex", r"resumed at step (\d+)", "--modes", "before,torn,term", "--grace", "20",
           "--fail-on", "HARD_FAIL,SILENT_DIVERGENCE,LOST_WORK,CONTROL_FAIL", *options, "--", *CHAOS_TRAIN]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith(("#", "no crash"))]
    assert rows and all(" PASS" in row and "DRIFT" not in row for row in rows), "\n".join(rows)
    return rows


def test_ckpt_chaos_every_mode_single_process(tmp_path):
    assert len(chaos(tmp_path, "--max-points", "9", "--jobs", "2")) == 10


def test_ckpt_chaos_two_ranks(tmp_path):
    assert len(chaos(tmp_path, "--ranks", "2", "--max-points", "3", "--jobs", "1")) == 4
