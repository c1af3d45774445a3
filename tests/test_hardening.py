"""Issue 29: what the tool deletes, reads, lets through and spends, under accident and attack. Each test builds its
case from scratch (tests/hostile.py) and asserts the fixed behaviour."""

import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import save_file

import hostile
from helpers import cli, codes, state_dir

from ckpttool.errors import CkptError


def names(rows):
    return sorted(os.path.basename(r["path"]) for r in rows)


def digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture(autouse=True)
def no_payload_ran():
    if os.path.exists(hostile.MARKER):
        os.remove(hostile.MARKER)
    yield
    assert not os.path.exists(hostile.MARKER), "a pickled payload was executed"


# --- data loss ---

def test_prune_never_deletes_what_latest_for_resume_picks(tmp_path):
    run = hostile.build_prune_unresumable_newest(str(tmp_path))["run"]
    _, latest = cli("latest", "--for-resume", "--json", run)
    assert os.path.basename(latest["path"]) == "checkpoint-15"
    result, out = cli("prune", "--keep", "1", "--json", run)
    assert result.exit_code == 0
    kept = {os.path.basename(r["path"]): r["reason"] for r in out["keep"]}
    assert kept["checkpoint-15"].startswith("newest valid")
    assert "may still be being written" in kept["checkpoint-20"]  # neither kept as valid nor deleted
    assert names(out["delete"]) == ["checkpoint-10", "checkpoint-5"]
    assert sorted(os.listdir(run)) == ["checkpoint-15", "checkpoint-20"]
    assert cli("latest", "--for-resume", run)[0].exit_code == 0


def test_prune_takes_only_what_a_trainer_names(tmp_path):
    built = hostile.build_prune_non_checkpoints(str(tmp_path))
    run = built["run"]
    result, out = cli("prune", "--keep", "1", "--json", run)
    assert result.exit_code == 0
    assert names(out["keep"]) == ["checkpoint-15"] and names(out["delete"]) == ["checkpoint-10", "checkpoint-5"]
    assert sorted(os.listdir(run)) == sorted(["checkpoint-15"] + built["others"])


def test_prune_does_not_follow_a_linked_checkpoints_folder(tmp_path):
    built = hostile.build_symlink_outside_prune(str(tmp_path))
    result, out = cli("prune", "--keep", "1", "--json", built["run"])
    assert result.exit_code == 0 and out["delete"] == [] and out["keep"] == []
    assert sorted(os.listdir(built["elsewhere"])) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]


def test_prune_and_latest_skip_a_fifo_named_like_a_checkpoint(tmp_path):
    run = hostile._run(str(tmp_path), (5,))
    os.mkfifo(os.path.join(run, "step_9.pt"))
    _, out = cli("latest", "--for-resume", "--json", run)
    assert os.path.basename(out["path"]) == "checkpoint-5" and out["skipped"] == []
    _, out = cli("prune", "--keep", "1", "--json", run)
    assert out["delete"] == [] and os.path.exists(os.path.join(run, "step_9.pt"))


@pytest.mark.parametrize("command", ["convert", "repair"])
def test_output_may_not_hold_the_input(tmp_path, command):
    built = hostile.build_convert_dst_holds_src(str(tmp_path))
    extra = ["--to", "accelerate"] if command == "convert" else []
    result, _ = cli(command, built["src"], built["run"], *extra, "--force")
    assert result.exit_code == 2 and "holds the input" in result.stderr
    assert sorted(os.listdir(built["run"])) == ["checkpoint-10", "checkpoint-15", "checkpoint-5"]
    inside = os.path.join(built["src"], "out")
    result, _ = cli(command, built["src"], inside, *extra)
    assert result.exit_code == 2 and "inside the input" in result.stderr and not os.path.exists(inside)


def test_output_may_not_reach_the_input_through_a_link(tmp_path):
    built = hostile.build_convert_dst_holds_src(str(tmp_path))
    before = digest(built["m"])
    result, _ = cli("convert", built["m"], built["alias_dst"], "--force")
    assert result.exit_code == 2 and "is the input" in result.stderr
    assert digest(built["m"]) == before


def test_repair_never_links_or_reads_a_file_outside_src(tmp_path):
    built = hostile.build_symlink_outside_repair(str(tmp_path))
    for link in (["--link"], []):
        dst = built["dst"] + "".join(link)
        result, out = cli("repair", *link, "--json", built["src"], dst)
        assert result.exit_code == 0 and out["written"]
        assert not os.path.lexists(os.path.join(dst, "notes.txt"))
        fix = next(f for f in out["fixes"] if os.path.basename(f["path"]) == "notes.txt")
        assert fix["code"] == "unsafe_path" and fix["action"] == "leave out"
        assert "a link out of the checkpoint" in fix["detail"]
    with open(built["secret"]) as f:
        assert f.read() == "TOP SECRET\n"
    assert os.stat(built["secret"]).st_nlink == 1


def test_repair_leaves_special_files_and_folder_links_out(tmp_path):
    built = hostile.build_symlink_outside_repair(str(tmp_path))
    os.mkfifo(os.path.join(built["src"], "pipe.bin"))
    os.symlink(str(tmp_path / "outside"), os.path.join(built["src"], "elsewhere"))
    result, out = cli("repair", "--link", "--json", built["src"], built["dst"])
    assert result.exit_code == 0 and out["written"] and out["after"]["ok"]
    left_out = sorted(os.path.basename(f["path"]) for f in out["fixes"] if f["code"] == "unsafe_path")
    assert left_out == ["elsewhere", "notes.txt", "pipe.bin"]
    assert all(f["action"] == "leave out" for f in out["fixes"] if f["code"] == "unsafe_path")
    assert not {"elsewhere", "notes.txt", "pipe.bin"} & set(os.listdir(built["dst"]))
    assert "model.safetensors" in os.listdir(built["dst"])


def test_repair_of_a_run_copies_no_link_out_of_it(tmp_path):
    secret = hostile._outside_secret(str(tmp_path))
    run = hostile._run(str(tmp_path), (10, 20))
    os.truncate(os.path.join(run, "checkpoint-20", "model.safetensors"), 100)  # the half-written newest: left out
    os.symlink(secret, os.path.join(run, "notes.txt"))
    result, out = cli("repair", "--link", "--json", run, tmp_path / "fixed")
    assert result.exit_code == 0 and out["written"]
    assert [os.path.basename(i["path"]) for i in out["not_copied"]] == ["notes.txt"]
    assert sorted(os.listdir(tmp_path / "fixed")) == ["checkpoint-10"]


def test_a_link_out_of_a_checkpoint_is_reported_and_not_read(tmp_path):
    built = hostile.build_symlink_outside_repair(str(tmp_path))
    os.truncate(os.path.join(built["src"], "model.safetensors"), 0)  # what is left: the link
    os.remove(os.path.join(built["src"], "model.safetensors"))
    os.symlink(built["secret"], os.path.join(built["src"], "model.safetensors"))
    _, report = cli("verify", "--json", built["src"])
    assert not report["ok"] and "unsafe_path" in codes(report, "error")
    assert all("TOP SECRET" not in p["message"] for p in report["problems"])


def test_manifest_and_verify_never_open_a_fifo(tmp_path):
    d = hostile.build_symlink_outside_fifo(str(tmp_path))["dir"]
    started = time.monotonic()
    _, report = cli("verify", "--json", d)
    assert [p["code"] for p in report["problems"] if p["severity"] == "error"] == ["unsafe_path"]
    assert "a FIFO" in report["problems"][0]["message"]
    result, _ = cli("manifest", d)
    assert result.exit_code == 1 and "unsafe_path" in result.stderr
    assert time.monotonic() - started < 60  # it returned at all: opening the FIFO blocks forever


# --- payloads and reads outside the given path ---

def test_a_payload_in_a_file_the_resume_never_reads_is_an_error(tmp_path):
    pytest.importorskip("transformers")
    built = hostile.build_payload_unread_file_transformers(str(tmp_path))
    result, report = cli("verify", "--for-resume", "--json", built["dir"])
    assert result.exit_code == 1 and codes(report, "error") == ["unsafe_pickle"]
    assert "training_args.bin imports posix.system" in report["problems"][0]["message"]
    _, latest = cli("latest", "--for-resume", "--json", built["run"])
    assert os.path.basename(latest["path"]) == "checkpoint-2"
    assert latest["skipped"][0]["codes"] == ["unsafe_pickle"]
    healthy = os.path.join(built["run"], "checkpoint-2")  # its own training_args.bin: inert classes, no alarm
    assert cli("verify", "--for-resume", healthy)[0].exit_code == 0


def test_a_payload_in_rng_state_is_an_error_not_a_warning(tmp_path):
    d = hostile.build_payload_unread_file_accelerate(str(tmp_path))["dir"]
    _, report = cli("verify", "--for-resume", "--json", d)
    assert not report["ok"] and "unsafe_pickle" in codes(report, "error")


def test_convert_never_writes_a_payload_back(tmp_path):
    built = hostile.build_convert_carries_payload(str(tmp_path))
    result, _ = cli("convert", built["src"], built["dst"])
    assert result.exit_code == 1 and "posix.system" in result.stderr and "unsafe_pickle" in result.stderr
    assert not os.path.exists(built["dst"])


def test_sets_and_numpy_state_are_carried_only_when_inert(tmp_path):
    import numpy as np

    src = str(tmp_path / "ok.pt")
    torch.save({"model": {"w": torch.ones(2)}, "tags": {1, 2, "a"}, "rng": np.random.get_state()}, src)
    assert cli("convert", src, tmp_path / "ok-out.pt")[0].exit_code == 0
    assert hostile.pickle_globals(str(tmp_path / "ok-out.pt"))  # it wrote something, and only allowed globals:
    assert not any("posix" in g or "system" in g for g in hostile.pickle_globals(str(tmp_path / "ok-out.pt")))


def test_repickler_refuses_a_global_outside_the_allow_list():
    import io

    from ckpttool.formats.pickles import GlobalRef, RepicklingPickler

    with pytest.raises(CkptError) as e:
        RepicklingPickler(io.BytesIO(), protocol=2).dump([GlobalRef("posix.system")])
    assert e.value.code == "unsafe_pickle"


@pytest.mark.parametrize("entry", ["../outside/secret.txt", "/etc/hostname"])
def test_a_manifest_naming_files_outside_is_not_followed(tmp_path, entry):
    built = hostile.build_manifest_outside(str(tmp_path))
    with open(built["manifest"]) as f:
        doc = json.load(f)
    doc["files"] = {k: v for k, v in doc["files"].items() if not k.startswith(("..", "/")) or k == entry}
    with open(built["manifest"], "w") as f:
        json.dump(doc, f)
    result, report = cli("verify", "--json", built["dir"])
    assert result.exit_code == 1 and codes(report, "error") == ["unsafe_path"]  # forged: an error, required or not
    assert "points outside the checkpoint" in report["problems"][0]["message"]
    assert all(str(os.path.getsize(hostile._outside_secret(str(tmp_path)))) + " bytes" not in p["message"]
               for p in report["problems"])


@pytest.mark.parametrize("piece_size", [1, 0, "64", 2 ** 60])
def test_a_manifest_piece_size_out_of_bounds_is_refused(tmp_path, piece_size):
    built = hostile.build_manifest_outside(str(tmp_path), piece_size=piece_size)
    _, report = cli("verify", "--require-manifest", "--json", built["dir"])
    assert not report["ok"] and any("piece_size" in p["message"] for p in report["problems"])


def test_a_manifest_of_the_wrong_shape_is_corrupt_not_a_crash(tmp_path):
    built = hostile.build_malformed_candidate_manifest(str(tmp_path))
    result, report = cli("verify", "--require-manifest", "--json", built["candidate"])
    assert result.exit_code == 1 and "corrupt" in codes(report, "error")
    _, out = cli("latest", "--for-resume", "--json", built["run"])
    assert os.path.basename(out["path"]) == "checkpoint-20"  # a damaged manifest warns unless one is required


def test_dcp_relative_path_outside_the_dir_is_corrupt(tmp_path):
    built = hostile.build_dcp_outside(str(tmp_path))
    assert built["changed"] == ["w"]
    for args in (["inspect", "--json"], ["inspect", "--stats", "--json"], ["verify", "--json"]):
        result, report = cli(*args, built["dir"])
        assert result.exit_code == 1 and "corrupt" in codes(report)
        assert any("outside the checkpoint dir" in p["message"] for p in report["problems"])
        assert report.get("tensors", 0) == 0


def test_deepspeed_latest_naming_the_parent_is_not_followed(tmp_path):
    built = hostile.build_deepspeed_latest_dotdot(str(tmp_path))
    result, report = cli("inspect", "--json", built["dir"])
    assert result.exit_code == 1 and "corrupt" in codes(report) and report["tensors"] == 0
    assert cli("manifest", built["dir"])[0].exit_code == 1
    assert sorted(os.listdir(built["parent"])) == ["save", "secret.txt"]


def test_a_shard_index_naming_files_outside_is_corrupt(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    save_file({"a": torch.ones(2)}, str(tmp_path / "outside.safetensors"))
    save_file({"b": torch.ones(2)}, str(folder / "model-00001-of-00001.safetensors"))
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"a": "../outside.safetensors", "b": "model-00001-of-00001.safetensors"}}))
    result, report = cli("inspect", "--json", folder)
    assert result.exit_code == 1 and "corrupt" in codes(report) and report["tensors"] == 1


@pytest.mark.parametrize("nan_first", [True, False])
def test_duplicate_zip_members_are_corrupt(tmp_path, nan_first):
    x = hostile.build_duplicate_zip_members(str(tmp_path), nan_first=nan_first)["file"]
    result, report = cli("verify", "--finite", "--json", x)
    assert result.exit_code == 1 and codes(report) == ["corrupt"]
    assert "two members named" in report["problems"][0]["message"]
    assert cli("convert", x, tmp_path / "out.safetensors")[0].exit_code == 1
    assert not os.path.exists(tmp_path / "out.safetensors")


# --- a few hundred bytes, bounded cost ---

def _limited(args, seconds=60, memory=2 << 30):
    """Run the CLI in a child process under an address-space limit; (exit code, elapsed seconds)."""
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "ckpttool", *map(str, args)], capture_output=True, text=True,
                          timeout=seconds, preexec_fn=limit)
    assert "Traceback" not in done.stderr and "internal error" not in done.stderr, done.stderr
    return done.returncode, time.monotonic() - started


def test_shared_references_are_walked_once(tmp_path):
    run = hostile.build_shared_refs_list(str(tmp_path))["run"]
    code, _ = _limited(["latest", "--for-resume", run])
    assert code == 0
    x = hostile.build_shared_refs_dict(str(tmp_path))["file"]
    code, _ = _limited(["verify", x])
    assert code == 0
    code, _ = _limited(["inspect", "--json", x])
    assert code == 0
    code, _ = _limited(["convert", x, tmp_path / "shared.pt"])
    assert code in (0, 1)


@pytest.mark.parametrize("build, code, message", [
    (lambda tmp: hostile.build_deflated_pickle(tmp, size=256 << 20), "corrupt", "would inflate"),  # not inflated
    (hostile.build_extra_member_bombs, "unsafe_pickle", "too long to scan"),  # 4 members cost one opcode budget
])
def test_compression_bombs_are_refused_within_a_memory_bound(tmp_path, build, code, message):
    x = build(str(tmp_path))["file"]
    assert os.path.getsize(x) < 1 << 20
    assert _limited(["verify", x], memory=1 << 30)[0] == 1
    _, report = cli("verify", "--json", x)
    assert codes(report) == [code] and message in report["problems"][0]["message"]


def test_yaml_aliases_are_resolved_once(tmp_path):
    built = hostile.build_yaml_anchors(str(tmp_path))
    assert built["bytes"] < 500
    code, _ = _limited(["verify", "--config", built["config"], built["dir"]])
    assert code == 0


def test_one_malformed_candidate_never_stops_the_scan(tmp_path):
    built = hostile.build_malformed_candidate_deep_json(str(tmp_path))
    result, out = cli("latest", "--for-resume", "--json", built["run"])
    assert result.exit_code == 0 and os.path.basename(out["path"]) == "checkpoint-10"
    assert out["skipped"][0]["codes"] == ["corrupt"]
    result, out = cli("prune", "--keep", "1", "--json", built["run"])
    assert result.exit_code == 0


def test_the_gate_raises_only_resume_gate_error(tmp_path, monkeypatch):
    from ckpttool import gate

    built = hostile.build_malformed_candidate_deep_json(str(tmp_path))
    assert os.path.basename(gate.latest_valid(built["run"])) == "checkpoint-10"
    with pytest.raises(gate.ResumeGateError) as e:
        gate.check_resume(built["candidate"])
    assert e.value.problems[0]["code"] == "corrupt"

    def explode(*args, **kwargs):
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(gate, "verify_checkpoint", explode)
    with pytest.raises(gate.ResumeGateError) as e:
        gate.check_resume(os.path.join(built["run"], "checkpoint-10"))
    assert e.value.problems[0]["code"] == "corrupt" and "RecursionError" in e.value.problems[0]["message"]
    assert gate.latest_valid(built["run"]) is None


def test_names_reach_the_terminal_escaped(tmp_path):
    x = hostile.build_control_chars(str(tmp_path))["file"]
    for args in (["inspect", "--tensors"], ["verify"], ["inspect", "--stats"]):
        done = subprocess.run([sys.executable, "-m", "ckpttool", *args, x], capture_output=True)
        assert b"\x1b" not in done.stdout + done.stderr and b"\x07" not in done.stdout + done.stderr
        assert not any(line.strip() == b"OK: verified" and b"\\n" in line for line in done.stdout.splitlines())
    done = subprocess.run([sys.executable, "-m", "ckpttool", "inspect", "--tensors", x], capture_output=True)
    assert b"w\\x1b[2J\\x1b]0;TITLE\\x07\\nOK: verified" in done.stdout
    done = subprocess.run([sys.executable, "-m", "ckpttool", "inspect", "--json", "--tensors", x], capture_output=True)
    assert json.loads(done.stdout)["path"] == x  # JSON escapes them itself


# --- the gate compares what it is given (real Accelerate) ---

@pytest.mark.parametrize("variant,code", [("steplr_scheduler", "scheduler_mismatch"),
                                          ("optimizer_3_of_4", "optimizer_mismatch"),
                                          ("swapped_moments", "optimizer_mismatch"),
                                          ("numpy_lr", "needs_safe_globals")])
def test_the_gate_refuses_what_accelerate_then_fails_on(tmp_path, variant, code):
    pytest.importorskip("accelerate")
    from ckpttool.gate import ResumeGateError, check_resume

    d = hostile.build_gate_live_mismatch(str(tmp_path), variant)["dir"]
    acc, model, opt, sched = hostile._live(seed=1)
    with pytest.raises(ResumeGateError) as e:
        check_resume(d, model=model, optimizer=opt, scheduler=sched)
    assert code in {p["code"] for p in e.value.problems}
    with pytest.raises(Exception):  # what the gate spared the run: the load or the first step fails
        acc.load_state(d)
        hostile._step(model, opt, sched)
    if variant in ("swapped_moments", "numpy_lr"):  # visible from the checkpoint alone
        _, report = cli("verify", "--for-resume", "--json", d)
        assert code in codes(report, "error")
    if variant == "optimizer_3_of_4":  # from the checkpoint and the live model: a warning
        acc, model, opt, sched = hostile._live(seed=1)
        report = check_resume(d, model=model)
        assert "optimizer_mismatch" in {p["code"] for p in report.problems}


def test_the_gate_passes_a_healthy_accelerate_save(tmp_path):
    pytest.importorskip("accelerate")
    from ckpttool.gate import check_resume

    d = hostile.build_gate_live_mismatch(str(tmp_path), "healthy")["dir"]
    acc, model, opt, sched = hostile._live(seed=1)
    report = check_resume(d, model=model, optimizer=opt, scheduler=sched)
    assert report.ok and not [p for p in report.problems if p["code"] in ("needs_safe_globals", "optimizer_mismatch",
                                                                          "scheduler_mismatch")]
    acc.load_state(d)
    hostile._step(model, opt, sched)


def test_a_state_dir_is_otherwise_unchanged_by_every_check(tmp_path):
    d = state_dir(str(tmp_path / "checkpoint-3"), 3)
    before = {f: digest(os.path.join(d, f)) for f in os.listdir(d)}
    for args in (["verify", "--for-resume"], ["inspect"], ["latest", "--for-resume"]):
        cli(*args, d if args[0] != "latest" else tmp_path)
    assert {f: digest(os.path.join(d, f)) for f in os.listdir(d)} == before


# --- the second attack pass ---

def _state_dir_with(tmp_path, name, data):
    d = state_dir(str(tmp_path / "checkpoint-5"), 5)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)
    return d


def test_a_refused_call_does_not_hide_a_later_payload(tmp_path):
    d = _state_dir_with(tmp_path, "extra.pkl", hostile.payload_after_a_refused_call())
    result, report = cli("verify", "--for-resume", "--json", d)
    assert result.exit_code == 1 and codes(report, "error") == ["unsafe_pickle"]
    assert "posix.system" in report["problems"][0]["message"]


@pytest.mark.parametrize("module,name", [("pydoc", "locate"), ("torch.fx.graph_module", "reduce_graph_module"),
                                         ("_posixsubprocess", "fork_exec"), ("builtins", "getattr"),
                                         ("torch.storage", "_load_from_bytes"), ("importlib", "import_module")])
def test_code_running_globals_in_an_unread_file_are_errors(tmp_path, module, name):
    d = _state_dir_with(tmp_path, "extra.bin", hostile.global_call(module, name))
    _, report = cli("verify", "--for-resume", "--json", d)
    assert codes(report, "error") == ["unsafe_pickle"] and f"{module}.{name}" in report["problems"][0]["message"]


def test_a_global_named_by_computed_strings_is_an_error(tmp_path):
    d = _state_dir_with(tmp_path, "extra.pkl", hostile.computed_global_call())
    _, report = cli("verify", "--json", d)
    assert codes(report, "error") == ["unsafe_pickle"] and "computed strings" in report["problems"][0]["message"]


def test_an_unknown_global_in_an_unread_file_is_a_warning(tmp_path):
    d = _state_dir_with(tmp_path, "extra.pkl", hostile.global_call("mytools.config", "Settings"))
    result, report = cli("verify", "--for-resume", "--json", d)
    assert result.exit_code == 0 and codes(report, "warning") == ["unsafe_pickle"]
    assert "does not know to be inert" in report["problems"][0]["message"]
    assert "names only allow-listed" not in json.dumps(report["checks"])  # the pass line makes no such claim then


def test_the_gate_passes_healthy_adafactor_state(tmp_path):
    pytest.importorskip("accelerate")
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    from ckpttool.gate import check_resume

    def live():
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        torch.manual_seed(0)
        model = hostile.Four()
        opt = torch.optim.Adafactor(model.parameters(), lr=1e-2)  # row and column factors: smaller than the weight
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        acc = Accelerator(cpu=True)
        return (acc, *acc.prepare(model, opt, sched))

    acc, model, opt, sched = live()
    hostile._step(model, opt, sched)
    d = str(tmp_path / "checkpoint-1")
    acc.save_state(d)
    acc, model, opt, sched = live()
    assert check_resume(d, model=model, optimizer=opt, scheduler=sched).ok
    acc.load_state(d)


def test_lightning_refuses_what_its_weights_only_load_refuses(tmp_path):
    import numpy as np

    sample = os.path.join(os.path.dirname(__file__), "data", "fp16", "lightning", "epoch=0-step=10.ckpt")
    assert cli("verify", "--for-resume", sample)[0].exit_code == 0
    ckpt = torch.load(sample, weights_only=True, map_location="cpu")  # the committed sample (saved on a GPU)
    ckpt.setdefault("hyper_parameters", {})["lr"] = np.float64(0.01)
    bad = str(tmp_path / "epoch=0-step=10.ckpt")
    torch.save(ckpt, bad)
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(bad, map_location="cpu")  # as Lightning's cloud_io._load: weights_only=None, True in torch >= 2.6
    result, report = cli("verify", "--for-resume", "--json", bad)
    assert result.exit_code == 1 and "needs_safe_globals" in codes(report, "error")
    problem = next(p for p in report["problems"] if p["code"] == "needs_safe_globals")
    assert "add_safe_globals" in problem["message"] and "numpy" in problem["message"]


def test_prune_and_report_of_a_folder_without_checkpoints(tmp_path):
    for args in (["prune", "--keep", "1"], ["prune", "--dry-run", "--keep", "1"], ["report"]):
        result, _ = cli(*args, tmp_path)
        assert result.exit_code == 0 and "internal error" not in result.output


@pytest.mark.parametrize("kind", ["list", "dict", "tuple"])
def test_a_pickle_nested_too_deep_is_corrupt(tmp_path, kind):
    obj = {"w": torch.ones(2)}
    for _ in range(400):  # deeper than ckpttool walks (200), within what torch.save's recursion can write
        obj = [obj] if kind == "list" else {"x": obj} if kind == "dict" else (obj,)
    x = str(tmp_path / "deep.pt")
    torch.save(obj, x)
    for args in (["verify"], ["inspect", "--stats"], ["convert", x.replace(".pt", ".safetensors")]):
        code, _ = _limited([args[0], *args[1:-1], x, args[-1]] if args[0] == "convert" else [*args, x])
        assert code == 1
    _, report = cli("verify", "--json", x)
    assert codes(report) == ["corrupt"] and "nests deeper" in report["problems"][0]["message"]


def test_a_dcp_item_with_a_negative_offset_is_corrupt(tmp_path):
    d = hostile.build_dcp_bad_range(str(tmp_path))["dir"]
    result, report = cli("verify", "--json", d)
    assert result.exit_code == 1 and "corrupt" in codes(report, "error")
    assert any("byte range -100" in p["message"] for p in report["problems"])


def test_paths_the_user_gave_are_escaped_too(tmp_path):
    run = tmp_path / "run\x1b]0;TITLE\x07"
    run.mkdir()
    done = subprocess.run([sys.executable, "-m", "ckpttool", "latest", str(run)], capture_output=True)
    assert done.returncode == 1 and b"\x1b" not in done.stderr and b"\\x1b]0;TITLE\\x07" in done.stderr


def test_an_rng_file_of_the_other_numpy_spelling_is_refused_as_transformers_would(tmp_path):
    import zipfile

    import numpy as np
    from transformers.trainer_pt_utils import safe_globals

    d = os.path.join(str(tmp_path), "checkpoint-2")
    shutil.copytree(os.path.join(os.path.dirname(__file__), "data", "transformers4_bin", "checkpoint-2"), d)
    rng = os.path.join(d, "rng_state.pth")
    ours, other = ("numpy._core", "numpy.core") if int(np.__version__.split(".")[0]) >= 2 else \
        ("numpy.core", "numpy._core")
    with zipfile.ZipFile(rng) as z:
        members = [(i.filename, z.read(i)) for i in z.infolist()]
    with zipfile.ZipFile(rng, "w", zipfile.ZIP_STORED) as z:
        for name, data in members:
            z.writestr(name, data.replace(f"{ours}.multiarray".encode(), f"{other}.multiarray".encode())
                       if name.endswith("data.pkl") else data)
    with safe_globals(), pytest.raises(Exception, match="Weights only load failed"):
        torch.load(rng, weights_only=True)  # transformers' _load_rng_state
    result, report = cli("verify", "--for-resume", "--json", d)
    assert result.exit_code == 1 and codes(report, "error") == ["needs_safe_globals"]
    assert f"{other}.multiarray._reconstruct" in report["problems"][0]["message"]


def test_the_weights_only_list_is_torchs_own():
    """TORCH_WEIGHTS_ONLY names exactly what torch.load(weights_only=True) accepts with torch alone imported, and
    DTENSOR_GLOBALS what torch.distributed.tensor adds (as accelerate, transformers and lightning import it): asked
    of a fresh process, where no test has added safe globals."""
    from ckpttool.formats.pickles import DTENSOR_GLOBALS, TORCH_WEIGHTS_ONLY

    probe = ("import json, torch, torch.distributed.tensor, torch._weights_only_unpickler as u; "
             "print(json.dumps(sorted(set(u._get_allowed_globals()) | set(u._get_user_allowed_globals()))))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert TORCH_WEIGHTS_ONLY | DTENSOR_GLOBALS == set(json.loads(done.stdout))
