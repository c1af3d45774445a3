"""Trainers beyond the first ones, proved on files their own libraries wrote (tests/data, with the script that made
them in fixtures/): each healthy resume point verifies clean and is what `latest --for-resume` picks, and each way
the trainer's own resume goes wrong on them is caught by code."""

import os
import shutil

import torch

from ckpttool.gate import check_resume
from fixtures import sample
from tests.helpers import cli, codes

DATA = os.path.join(os.path.dirname(__file__), "data")


def _copy_run(name: str, tmp_path) -> str:
    return shutil.copytree(sample("torchtune", name), tmp_path / name)


# --- torchtune 0.6.1 (fixtures/torchtune_samples.py): HF full fine-tune over 3 epochs, LoRA and Meta over 2 ---

def test_torchtune_newest_intermediate_epoch_verifies_clean():
    for run, folder, epochs_run in (("full", "epoch_1", 2), ("lora", "epoch_0", 1), ("meta", "epoch_0", 1)):
        path = sample("torchtune", run, folder)
        result, report = cli("inspect", "--json", path)
        assert result.exit_code == 0 and report["trainer"] == "torchtune" and report["epoch"] == epochs_run
        assert {c["role"] for c in report["components"]} >= {"model", "optimizer"}
        result, report = cli("verify", "--json", "--for-resume", path)
        assert result.exit_code == 0 and report["problems"] == [], (path, report["problems"])
        assert check_resume(path).ok


def test_torchtune_recipe_state_belongs_to_one_epoch_folder_only():
    """Every intermediate save overwrites the one recipe_state.pt and the final writes none: the final folder and
    every older one would resume with another epoch's optimizer and counters."""
    final = sample("torchtune", "full", "epoch_2")
    result, report = cli("verify", "--json", "--for-resume", final)
    assert result.exit_code == 1 and codes(report, "error") == ["step_mismatch"]
    assert "final save" in report["problems"][0]["message"] and "epoch_1" in report["problems"][0]["message"]
    result, report = cli("verify", "--json", "--for-resume", sample("torchtune", "full", "epoch_0"))
    assert result.exit_code == 1 and codes(report, "error") == ["step_mismatch"]
    assert cli("verify", "--json", final)[0].exit_code == 0  # the weights themselves are whole
    for run, pick, own in (("full", "epoch_1", "epoch_2"), ("lora", "epoch_0", "epoch_1"), ("meta", "epoch_0",
                                                                                              "epoch_1")):
        result, out = cli("latest", "--json", "--for-resume", sample("torchtune", run))
        assert result.exit_code == 0 and out["trainer"] == "torchtune" and os.path.basename(out["path"]) == pick
        assert os.path.basename(out["trainer_pick"]) == own and "step_mismatch" in out["differs"]


def test_torchtune_lost_recipe_state_adapter_or_keys_are_errors(tmp_path):
    run = _copy_run("lora", tmp_path)
    os.remove(os.path.join(run, "epoch_0", "adapter_model.pt"))
    result, report = cli("verify", "--json", "--for-resume", os.path.join(run, "epoch_0"))
    assert result.exit_code == 1 and "missing_file" in codes(report, "error")
    run = _copy_run("full", tmp_path / "a")
    recipe = os.path.join(run, "recipe_state", "recipe_state.pt")
    state = torch.load(recipe, weights_only=True)
    del state["total_epochs"], state["optimizer"]
    torch.save(state, recipe)
    result, report = cli("verify", "--json", "--for-resume", os.path.join(run, "epoch_1"))
    assert result.exit_code == 1 and set(codes(report, "error")) == {"missing_file", "missing_optimizer"}
    assert "total_epochs" in report["problems"][0]["message"]
    shutil.rmtree(os.path.join(run, "recipe_state"))
    result, report = cli("verify", "--json", "--for-resume", os.path.join(run, "epoch_1"))
    assert result.exit_code == 1 and codes(report, "error") == ["missing_file"]
    assert "recipe_checkpoint file must be provided" in report["problems"][0]["message"]
    result, out = cli("latest", "--json", "--for-resume", run)
    assert out["path"] is None


def test_torchtune_recipe_state_inside_the_folder_is_read(tmp_path):
    """Older torchtune kept recipe_state.pt inside the epoch folder."""
    run = _copy_run("meta", tmp_path)
    shutil.move(os.path.join(run, "recipe_state", "recipe_state.pt"), os.path.join(run, "epoch_0"))
    os.rmdir(os.path.join(run, "recipe_state"))
    result, report = cli("verify", "--json", "--for-resume", os.path.join(run, "epoch_0"))
    assert result.exit_code == 0 and report["problems"] == [] and report["trainer"] == "torchtune"
    result, report = cli("verify", "--json", "--for-resume", os.path.join(run, "epoch_1"))
    assert codes(report, "error") == ["missing_file"]


def test_torchtune_epoch_manifest_covers_its_own_files_and_tells_a_flip(tmp_path):
    """The recipe state beside epoch_N is read with it, but belongs to no one epoch: a manifest sealed inside
    epoch_1 lists its own files and tensors only (a `../` entry would be refused as a path out, and the whole
    manifest with it), so a flipped byte in the weights is a checksum mismatch."""
    import json

    from tests.helpers import flip_byte

    run = _copy_run("full", tmp_path)
    folder = os.path.join(run, "epoch_1")
    assert cli("manifest", folder)[0].exit_code == 0
    with open(os.path.join(folder, "ckpttool-manifest.json"), encoding="utf-8") as f:
        doc = json.load(f)
    assert doc["tensors"] and all(not t["file"].startswith("..") for t in doc["tensors"])
    assert all(not name.startswith("..") for name in doc["files"])
    result, report = cli("verify", "--json", "--for-resume", folder)
    assert result.exit_code == 0 and report["problems"] == []
    weights = os.path.join(folder, "model-00001-of-00001.safetensors")
    flip_byte(weights, os.path.getsize(weights) // 2)
    result, report = cli("verify", "--json", "--for-resume", folder)
    assert result.exit_code == 1 and codes(report, "error") == ["checksum_mismatch"]


# --- Megatron torch_dist (megatron-core 0.16.1 on 2 ranks, tensor-parallel 2: fixtures/megatron_sample.py) ---

MEGATRON = sample("megatron", "torch_dist_tp2")


def _megatron_copy(tmp_path) -> str:
    return shutil.copytree(MEGATRON, tmp_path / "run")


def test_megatron_torch_dist_verifies_clean_and_latest_follows_the_tracker():
    path = os.path.join(MEGATRON, "iter_0000010")
    result, report = cli("inspect", "--json", path)
    assert result.exit_code == 0 and report["trainer"] == "megatron" and report["step"] == 10
    assert {c["name"]: c["role"] for c in report["components"]} == {"model": "model", "optimizer": "optimizer"}
    result, report = cli("verify", "--json", "--for-resume", path)
    assert result.exit_code == 0 and codes(report, "error") == [], report["problems"]
    assert codes(report) == ["needs_safe_globals"]  # common.pt's args Namespace: the add_safe_globals line
    assert check_resume(path).ok
    result, out = cli("latest", "--json", "--for-resume", MEGATRON)
    assert os.path.basename(out["path"]) == "iter_0000010" and os.path.basename(out["trainer_pick"]) == "iter_0000010"


def test_megatron_convert_assembles_the_tensor_parallel_shards(tmp_path):
    """Each TP rank saved its slice as a chunk of one global tensor: convert writes the whole tensors, the values
    torch.distributed.checkpoint.load gives."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file
    from torch.distributed.checkpoint import FileSystemReader

    path = os.path.join(MEGATRON, "iter_0000010")
    out = tmp_path / "model.safetensors"
    assert cli("convert", "--component", "model", path, out)[0].exit_code == 0
    written = load_file(out)
    meta = FileSystemReader(path).read_metadata().state_dict_metadata
    assert set(written) == {k for k in meta if k.startswith(("embedding.", "decoder.", "output_layer."))
                            and "_extra_state/" not in k}  # the TE extra states are bytes items
    expected = {k: torch.empty(meta[k].size, dtype=meta[k].properties.dtype) for k in written}
    dcp.load(expected, checkpoint_id=path, no_dist=True)
    assert all(torch.equal(expected[k], written[k]) for k in written)
    assert len(meta["embedding.word_embeddings.weight"].chunks) == 2  # it was split


def test_megatron_tracker_behind_bad_or_files_lost(tmp_path):
    run = _megatron_copy(tmp_path)
    tracker = os.path.join(run, "latest_checkpointed_iteration.txt")
    with open(tracker, "w") as f:
        f.write("5")  # the job died after iter 10's files, before rank 0 wrote the tracker
    result, report = cli("verify", "--json", "--for-resume", os.path.join(run, "iter_0000010"))
    assert result.exit_code == 0 and "step_mismatch" in codes(report, "warning")
    result, out = cli("latest", "--json", "--for-resume", run)
    assert os.path.basename(out["trainer_pick"]) == "iter_0000005" and "iter_0000005" in out["differs"]
    with open(tracker, "w") as f:
        f.write("iter 10\n")  # read_metadata: "Invalid metadata file" and sys.exit() with status 0
    result, report = cli("verify", "--json", "--for-resume", os.path.join(run, "iter_0000010"))
    assert result.exit_code == 1 and codes(report, "error") == ["corrupt"]
    with open(tracker, "w") as f:
        f.write("10")
    for lost, code in (("metadata.json", "missing_file"), ("common.pt", "missing_file"),
                       ("__1_0.distcp", "missing_file")):
        os.remove(os.path.join(run, "iter_0000010", lost))
        result, report = cli("verify", "--json", "--for-resume", os.path.join(run, "iter_0000010"))
        assert result.exit_code == 1 and code in codes(report, "error"), (lost, report["problems"])
    result, out = cli("latest", "--json", "--for-resume", run)
    assert os.path.basename(out["path"]) == "iter_0000005" and "fails verification" in out["differs"]


def test_megatron_core019_common_state_and_integrity_manifest(tmp_path):
    """megatron-core 0.19.0 (fixtures/megatron_sample.py, VERIFY_INTEGRITY=1) writes no common.pt: the common state
    is the `common_state` DCP item, read for its iteration; --verify-integrity writes integrity.json, sha256 of every
    top-level file, which verify checks as verify_integrity_manifest does: a rank's data file from the previous save,
    which no counter shows, is checksum_mismatch."""
    run = os.path.join(DATA, "megatron", "torch_dist_core019")
    for save in ("iter_0000005", "iter_0000010"):
        result, report = cli("verify", "--json", "--for-resume", os.path.join(run, save))
        assert result.exit_code == 0 and report["problems"] == [], (save, report["problems"])
        assert report["step"] == int(save[5:]) and report["trainer"] == "megatron"
        checks = {c["check"]: c for c in report["checks"]}
        assert checks["checksums"]["status"] == "pass" and "integrity.json" in checks["checksums"]["detail"]
    result, report = cli("inspect", "--json", os.path.join(run, "iter_0000010"))
    assert any(s["source"] == "the common_state item iteration" for s in report["step_sources"])
    result, out = cli("latest", "--json", "--for-resume", run)
    assert os.path.basename(out["path"]) == "iter_0000010" and "differs" not in out
    copy = shutil.copytree(run, tmp_path / "run")
    shutil.copyfile(os.path.join(copy, "iter_0000005", "__1_0.distcp"), os.path.join(copy, "iter_0000010",
                                                                                      "__1_0.distcp"))
    for flags in ((), ("--for-resume",)):
        result, report = cli("verify", "--json", *flags, os.path.join(copy, "iter_0000010"))
        assert result.exit_code == 1 and codes(report, "error") == ["checksum_mismatch"]
        assert "__1_0.distcp" in report["problems"][0]["message"]
    result, out = cli("latest", "--json", "--for-resume", copy)
    assert os.path.basename(out["path"]) == "iter_0000005" and "fails verification" in out["differs"]
    result, _ = cli("manifest", os.path.join(copy, "iter_0000010"))  # a manifest would bless the stale file
    assert result.exit_code == 1 and "integrity.json" in result.output
    sealed = os.path.join(copy, "iter_0000005")
    assert cli("manifest", sealed)[0].exit_code == 0
    with open(os.path.join(sealed, "metadata.json"), "a") as f:
        f.write(" ")  # after ckpttool's manifest too: integrity.json is still checked, and --require-manifest
    for flags in ((), ("--require-manifest",)):
        result, report = cli("verify", "--json", *flags, sealed)
        assert result.exit_code == 1 and "checksum_mismatch" in codes(report, "error")


# --- musubi-tuner: kohya's state dirs, without train_state.json (replica from the corpus's Accelerate save_state) ---

def test_musubi_state_dirs_warn_that_the_resume_restarts_the_step(corpus, tmp_path):
    """musubi-tuner's save hook writes no train_state.json and its loop starts at step 0 after --resume: a run
    whose state dirs all lack it is musubi's, whose resume works but restarts the count (a warning, not damage);
    a kohya state dir that lost the file its siblings have stays an error."""
    run = shutil.copytree(os.path.dirname(corpus["kohya_step_state"]), tmp_path / "run")
    state = os.path.join(run, os.path.basename(corpus["kohya_step_state"]))
    os.remove(os.path.join(state, "train_state.json"))
    result, report = cli("verify", "--json", "--for-resume", state)
    assert result.exit_code == 1 and report["trainer"] == "kohya" and "missing_file" in codes(report, "error")
    for entry in os.listdir(run):
        if os.path.isfile(os.path.join(run, entry, "train_state.json")):
            os.remove(os.path.join(run, entry, "train_state.json"))
    result, report = cli("verify", "--json", "--for-resume", state)
    assert result.exit_code == 0 and report["trainer"] == "musubi-tuner" and report["step"] == 3
    assert codes(report, "error") == [] and "step_mismatch" in codes(report, "warning")
    assert "starts global_step" in next(p["message"] for p in report["problems"] if p["code"] == "step_mismatch")
    os.remove(os.path.join(state, "optimizer.bin"))
    result, report = cli("verify", "--json", "--for-resume", state)
    assert result.exit_code == 1 and "missing_optimizer" in codes(report, "error")


def test_attack_pass_tracker_counters_and_dot_paths(tmp_path, monkeypatch):
    """First attack pass on issue 33: a tracker naming a save that is gone, or none at all; counters that are no
    counts; a checkpoint given as `.`."""
    run = _megatron_copy(tmp_path)
    tracker = os.path.join(run, "latest_checkpointed_iteration.txt")
    with open(tracker, "w") as f:
        f.write("20")
    result, out = cli("latest", "--json", "--for-resume", run)
    assert result.exit_code == 0 and os.path.basename(out["path"]) == "iter_0000010" and "does not exist" in \
        out["differs"]
    result, report = cli("verify", "--json", "--for-resume", os.path.join(run, "iter_0000010"))
    assert result.exit_code == 0 and "missing_file" in codes(report, "warning")
    os.remove(tracker)
    result, report = cli("verify", "--json", "--for-resume", os.path.join(run, "iter_0000010"))
    assert "starts from random" in next(p["message"] for p in report["problems"] if p["code"] == "missing_file")
    common = os.path.join(run, "iter_0000010", "common.pt")
    for value, code in (("10", "corrupt"), (10 ** 30, "corrupt"), (True, "step_mismatch")):
        state = torch.load(os.path.join(MEGATRON, "iter_0000010", "common.pt"), weights_only=False)
        state["iteration"] = value
        torch.save(state, common)
        result, report = cli("verify", "--json", "--for-resume", os.path.join(run, "iter_0000010"))
        assert result.exit_code == 1 and code in codes(report, "error"), (value, report["problems"])
    tune = _copy_run("full", tmp_path)
    recipe = os.path.join(tune, "recipe_state", "recipe_state.pt")
    for value, good in (("2", None), (2.0, None), (True, "epoch_0")):
        state = torch.load(sample("torchtune", "full", "recipe_state", "recipe_state.pt"), weights_only=True)
        state["epochs_run"] = value
        torch.save(state, recipe)
        for folder in ("epoch_0", "epoch_1", "epoch_2"):
            result, _ = cli("verify", "--json", "--for-resume", os.path.join(tune, folder))
            assert result.exit_code == (0 if folder == good else 1), (value, folder)
    monkeypatch.chdir(os.path.join(MEGATRON, "iter_0000010"))
    result, report = cli("verify", "--json", "--for-resume", ".")
    assert result.exit_code == 0 and report["trainer"] == "megatron"
    monkeypatch.chdir(sample("torchtune", "full", "epoch_1"))
    result, report = cli("verify", "--json", "--for-resume", ".")
    assert result.exit_code == 0 and report["trainer"] == "torchtune"


# --- Composer (mosaicml 0.32.1, fixtures/composer_samples.py): DecoupledAdamW + warmup, saves at batches 4 and 6 ---



def _composer_copy(tmp_path) -> str:
    return shutil.copytree(sample("composer", "run"), tmp_path / "run", symlinks=True)


def test_composer_save_verifies_clean_and_latest_follows_the_link(tmp_path):
    path = sample("composer", "run", "ep0-ba6-rank0.pt")
    result, report = cli("inspect", "--json", path)
    assert result.exit_code == 0 and report["trainer"] == "composer" and report["step"] == 6
    assert {(c["name"], c["role"]) for c in report["components"]} >= {
        ("model", "model"), ("optimizer", "optimizer"), ("scheduler", "scheduler"), ("rng", "rng")}
    result, report = cli("verify", "--json", "--for-resume", path)
    assert result.exit_code == 0 and report["problems"] == [], report["problems"]  # timedelta: Composer allows it
    assert check_resume(path).ok
    result, out = cli("latest", "--json", "--for-resume", sample("composer", "run"))
    assert result.exit_code == 0 and out["trainer"] == "composer" and out["path"].endswith("ep0-ba6-rank0.pt")
    assert out["trainer_pick"].endswith("ep0-ba6-rank0.pt") and "differs" not in out
    out_file = tmp_path / "model.safetensors"
    assert cli("convert", path, str(out_file))[0].exit_code == 0
    from safetensors.torch import load_file

    saved = torch.load(path, weights_only=False)["state"]["model"]
    converted = load_file(out_file)
    assert converted.keys() == saved.keys() and all(torch.equal(converted[k], saved[k]) for k in saved)


def test_composer_weights_only_counters_rng_and_link(tmp_path):
    result, report = cli("verify", "--json", "--for-resume", sample("composer", "weights_only",
                                                                             "ep0-ba2-rank0.pt"))
    assert result.exit_code == 1 and codes(report, "error") == ["weights_only"]
    run = _composer_copy(tmp_path)
    path = os.path.join(run, "ep0-ba6-rank0.pt")
    saved = torch.load(path, weights_only=False)
    saved["state"]["timestamp"]["Timestamp"]["batch"] = 9
    del saved["rng"]
    torch.save(saved, path)
    result, report = cli("verify", "--json", "--for-resume", path)
    assert result.exit_code == 1 and codes(report, "error") == ["step_mismatch"]
    assert codes(report, "warning") == ["missing_rng"]
    os.remove(path)  # latest-rank0.pt now names nothing: autoresume starts over without a word
    result, out = cli("latest", "--json", "--for-resume", run)
    assert result.exit_code == 0 and out["path"].endswith("ep0-ba4-rank0.pt")
    assert "starts from batch 0" in out["differs"]
    os.remove(os.path.join(run, "latest-rank0.pt"))
    result, out = cli("latest", "--json", "--for-resume", run)
    assert out["trainer_pick"].endswith("latest-rank0.pt") and "starts from batch 0" in out["differs"]
    with open(os.path.join(run, "latest-rank0.pt.symlink"), "w") as f:
        f.write("tiny/checkpoints/ep0-ba4-rank0.pt")  # an object store's pointer (file_helpers.create_symlink_file)
    result, out = cli("latest", "--json", "--for-resume", run)
    assert out["trainer_pick"].endswith("ep0-ba4-rank0.pt") and "differs" not in out


def test_prune_never_deletes_what_the_trainer_resumes_from_on_its_own(tmp_path):
    run = _composer_copy(tmp_path)
    link = os.path.join(run, "latest-rank0.pt")
    os.remove(link)
    os.symlink("ep0-ba4-rank0.pt", link)  # pointed back by hand
    result, out = cli("prune", "--json", "--keep", "1", run)
    assert result.exit_code == 0 and out["delete"] == []
    assert any(row["path"].endswith("ep0-ba4-rank0.pt") and "composer resumes from it" in row["reason"]
               for row in out["keep"])
    assert os.path.isfile(os.path.join(run, "ep0-ba4-rank0.pt"))


# Composer sharded (the same script, two ranks on gloo, FSDP2 with state_dict_type="sharded"): ep0-ba2/ and ep0-ba4/
# DCP dirs, latest-rank0.pt linking the newest

def test_composer_sharded_saves_verify_clean_and_latest_follows_the_link(tmp_path):
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    run = sample("composer", "sharded")
    path = os.path.join(run, "ep0-ba4")
    result, report = cli("inspect", "--json", path)
    assert result.exit_code == 0 and report["trainer"] == "composer" and report["step"] == 4
    assert {(c["name"], c["role"]) for c in report["components"]} >= {
        ("model", "model"), ("optimizer", "optimizer"), ("scheduler", "scheduler"), ("rng", "rng")}
    meanings = {s["source"]: s["meaning"] for s in report["step_sources"]}
    assert meanings["state.timestamp batch"] == "global_step" and meanings["optimizer state step"] == \
        "optimizer_updates" and "state.timestamp.Timestamp.iteration" not in str(meanings)  # iteration: no step
    for save in ("ep0-ba2", "ep0-ba4"):
        result, report = cli("verify", "--json", "--for-resume", os.path.join(run, save))
        assert result.exit_code == 0 and report["problems"] == [], (save, report["problems"])
    assert check_resume(path).ok
    result, out = cli("latest", "--json", "--for-resume", run)
    assert result.exit_code == 0 and out["path"].endswith("ep0-ba4") and out["trainer_pick"].endswith("ep0-ba4")
    assert "differs" not in out
    assert cli("convert", path, str(tmp_path / "model.safetensors"))[0].exit_code == 0
    dcp_to_torch_save(path, tmp_path / "full.pt")  # torch's own reading of the shards
    full = torch.load(tmp_path / "full.pt", weights_only=False)["state"]
    converted = load_file(tmp_path / "model.safetensors")
    assert converted.keys() == full["model"].keys() and all(torch.equal(converted[k], full["model"][k])
                                                           for k in full["model"])
    assert cli("convert", path, str(tmp_path / "whole.pt"))[0].exit_code == 0  # every part, in Composer's shape
    whole = torch.load(tmp_path / "whole.pt", weights_only=False)
    saved, written = full["optimizers"]["DecoupledAdamW"], whole["optimizer"]
    assert written["param_groups"][0]["lr"] == saved["param_groups"][0]["lr"]
    assert all(torch.equal(written["state"][p][k], saved["state"][p][k]) for p in saved["state"]
               for k in saved["state"][p])


def _resaved_sharded(tmp_path, edit) -> str:
    """ep0-ba4 loaded whole, edited, and saved again as one DCP dir under its own name (beside a copy of ep0-ba2)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save, torch_save_to_dcp

    run = shutil.copytree(sample("composer", "sharded"), tmp_path / "run", symlinks=True)
    path = os.path.join(run, "ep0-ba4")
    dcp_to_torch_save(path, tmp_path / "full.pt")
    full = torch.load(tmp_path / "full.pt", weights_only=False)
    edit(full)
    torch.save(full, tmp_path / "full.pt")
    shutil.rmtree(path)
    torch_save_to_dcp(tmp_path / "full.pt", path)
    return path


def test_composer_sharded_lost_rank_file_unfinished_save_and_stale_counters(tmp_path):
    run = shutil.copytree(sample("composer", "sharded"), tmp_path / "lost", symlinks=True)
    os.remove(os.path.join(run, "ep0-ba4", "__1_0.distcp"))  # every rank's file: rank 1's shards are gone
    result, report = cli("verify", "--json", "--for-resume", os.path.join(run, "ep0-ba4"))
    assert result.exit_code == 1 and codes(report, "error") == ["missing_file"]
    assert "__1_0.distcp" in report["problems"][0]["message"]
    os.remove(os.path.join(run, "ep0-ba4", ".metadata"))  # the save was cut before rank 0 wrote its .metadata
    result, report = cli("verify", "--json", "--for-resume", os.path.join(run, "ep0-ba4"))
    assert result.exit_code == 1 and codes(report, "error") == ["missing_file"] and report["trainer"] == "composer"
    result, out = cli("latest", "--json", "--for-resume", run)
    assert out["path"].endswith("ep0-ba2") and out["skipped"][0]["path"].endswith("ep0-ba4")
    assert out["trainer_pick"].endswith("ep0-ba4") and "fails verification" in out["differs"]

    def behind(full):
        full["state"]["timestamp"]["Timestamp"]["batch"] = 2  # a timestamp from the earlier save
    result, report = cli("verify", "--json", "--for-resume", _resaved_sharded(tmp_path / "a", behind))
    assert result.exit_code == 1 and "step_mismatch" in codes(report, "error")

    def swapped(full):  # two parameters' moments exchanged
        state = full["state"]["optimizers"]["DecoupledAdamW"]["state"]
        state["l1.bias"]["exp_avg"], state["l2.bias"]["exp_avg"] = state["l2.bias"]["exp_avg"], \
            state["l1.bias"]["exp_avg"]
    result, report = cli("verify", "--json", "--for-resume", _resaved_sharded(tmp_path / "c", swapped))
    assert result.exit_code == 1 and codes(report, "error") == ["optimizer_mismatch"]
    assert "exp_avg of l1.bias is [2], the parameter [16]" in report["problems"][0]["message"]

    def lost_parameter(full):
        del full["state"]["model"]["l2.bias"]
    result, report = cli("verify", "--json", "--for-resume", _resaved_sharded(tmp_path / "d", lost_parameter))
    assert result.exit_code == 1 and codes(report, "error") == ["optimizer_mismatch"]

    def many_items(full):  # an optimizer with thousands of non-tensor per-parameter items, listed before the timestamp
        state = full["state"]["optimizers"]["DecoupledAdamW"]["state"]
        for name in list(state):
            state[name].update({f"note{i}": i for i in range(600)})
    result, report = cli("verify", "--json", "--for-resume", _resaved_sharded(tmp_path / "e", many_items))
    assert result.exit_code == 0 and report["problems"] == [] and report["step"] == 4

    def weights_only(full):  # save_weights_only=True: the model, integrations and metadata
        full["state"] = {k: full["state"][k] for k in ("model", "metadata")}
        del full["rng"]
    result, report = cli("verify", "--json", "--for-resume", _resaved_sharded(tmp_path / "b", weights_only))
    assert result.exit_code == 1 and codes(report, "error") == ["weights_only"] and report["trainer"] == "composer"


# --- ai-toolkit (fixtures/aitoolkit_samples.py, mirroring BaseSDTrainProcess.save at 27a03a9): LoRA "mylora" saved
# at steps 2 and 4 and at the end (6), one optimizer.pt overwritten at each; a run stopped after step 4; a diffusers
# save ---



def test_aitoolkit_only_the_newest_save_has_its_own_optimizer():
    run = sample("aitoolkit", "run", "mylora")
    result, report = cli("verify", "--json", "--for-resume", os.path.join(run, "mylora.safetensors"))
    assert result.exit_code == 0 and report["trainer"] == "ai-toolkit" and report["step"] == 6
    assert report["problems"] == []
    for name in ("mylora_000000002.safetensors", "mylora_000000004.safetensors"):
        result, report = cli("verify", "--json", "--for-resume", os.path.join(run, name))
        assert result.exit_code == 1 and codes(report, "error") == ["step_mismatch"]
        assert "mylora.safetensors's (step 6)" in report["problems"][0]["message"]
        assert cli("verify", "--json", os.path.join(run, name))[0].exit_code == 0  # the weights are whole
    result, out = cli("latest", "--json", "--for-resume", run)
    assert result.exit_code == 0 and out["path"].endswith("mylora.safetensors") and out["trainer"] == "ai-toolkit"
    result, _ = cli("verify", "--for-resume", run)  # the job folder is no checkpoint: say what to run instead
    assert result.exit_code == 2 and "ckpttool latest --for-resume" in result.output
    result, out = cli("latest", "--json", "--for-resume", sample("aitoolkit", "run"))  # the training folder above it
    assert result.exit_code == 0 and out["path"].endswith(os.path.join("mylora", "mylora.safetensors"))
    result, out = cli("latest", "--json", "--for-resume", sample("aitoolkit", "midrun", "mylora"))
    assert result.exit_code == 0 and out["path"].endswith("mylora_000000004.safetensors") and out["step"] == 4
    folder = sample("aitoolkit", "diffusers_save", "mylora", "mylora_000000004")
    result, report = cli("verify", "--json", "--for-resume", folder)
    assert result.exit_code == 0 and report["trainer"] == "ai-toolkit" and report["step"] == 4, report["problems"]
    assert check_resume(folder).ok


def test_aitoolkit_lost_step_lost_or_stale_optimizer(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    run = shutil.copytree(sample("aitoolkit", "midrun", "mylora"), tmp_path / "mylora")
    newest = os.path.join(run, "mylora_000000004.safetensors")
    optimizer = os.path.join(run, "optimizer.pt")
    state = torch.load(optimizer, weights_only=True)
    for per_param in state["state"].values():
        per_param["step"] = torch.tensor(3.0)  # step 2's optimizer: its own save at step 4 failed
    torch.save(state, optimizer)
    result, report = cli("verify", "--json", "--for-resume", newest)
    assert result.exit_code == 1 and codes(report, "error") == ["step_mismatch"]
    assert "fewer than the 5" in report["problems"][0]["message"]
    os.remove(optimizer)
    result, report = cli("verify", "--json", "--for-resume", newest)
    assert result.exit_code == 1 and codes(report, "error") == ["missing_optimizer"]
    with safe_open(newest, "pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    del metadata["training_info"]
    save_file(tensors, newest, metadata)
    result, report = cli("verify", "--json", "--for-resume", newest)
    assert "step_mismatch" in codes(report, "error") and "starts at step 0" in " ".join(
        p["message"] for p in report["problems"])


# --- OneTrainer (fixtures/onetrainer_samples.py, mirroring GenericTrainer.__backup at 23df383): LoRA backups at
# global steps 4, 8 and 10 (gradient accumulation 2), without and with EMA ---



def test_onetrainer_backups_verify_clean_and_latest_is_the_newest():
    for workspace in ("workspace", "workspace_ema"):
        backup = sample("onetrainer", workspace, "backup")
        for entry in sorted(os.listdir(backup)):
            result, report = cli("verify", "--json", "--for-resume", os.path.join(backup, entry))
            assert result.exit_code == 0 and report["trainer"] == "onetrainer", report["problems"]
            assert report["problems"] == [], (entry, report["problems"])
        result, out = cli("latest", "--json", "--for-resume", backup)
        assert result.exit_code == 0 and out["path"].endswith("-backup-10-2-0") and "differs" not in out
    result, report = cli("inspect", "--json", sample("onetrainer", "workspace_ema", "backup",
                                                           "2026-01-03_03-05-25-backup-8-1-3"))
    assert {c["role"] for c in report["components"]} == {"model", "optimizer", "ema"} and report["step"] == 4


def test_onetrainer_lost_parts_and_a_backup_named_for_another_step(tmp_path):
    backup = shutil.copytree(sample("onetrainer", "workspace_ema", "backup"), tmp_path / "backup")
    newest = os.path.join(backup, "2026-01-03_03-05-45-backup-10-2-0")
    for part, code in (("ema/ema.pt", "missing_file"), ("optimizer/optimizer.pt", "missing_optimizer"),
                       ("lora/lora.safetensors", "missing_file"), ("meta.json", "missing_file")):
        os.remove(os.path.join(newest, part))
        result, report = cli("verify", "--json", "--for-resume", newest)
        assert result.exit_code == 1 and code in codes(report, "error"), (part, report["problems"])
    result, out = cli("latest", "--json", "--for-resume", backup)
    assert out["path"].endswith("-backup-8-1-3") and out["trainer_pick"].endswith("-backup-10-2-0")
    assert "fails verification" in out["differs"]
    moved = os.path.join(backup, "2026-01-03_03-06-00-backup-12-2-0")
    os.rename(os.path.join(backup, "2026-01-03_03-05-25-backup-8-1-3"), moved)
    result, report = cli("verify", "--json", "--for-resume", moved)
    assert result.exit_code == 1 and codes(report, "error") == ["step_mismatch"]


# --- Megatron legacy (--ckpt-format torch, fixtures/megatron_sample.py with CKPT_FORMAT=torch): 2 ranks, TP=2 ---

LEGACY = os.path.join(DATA, "megatron", "legacy_tp2")


def test_megatron_legacy_rank_files_verify_and_the_gate_holds_the_parallel_layout(tmp_path):
    from ckpttool.gate import ResumeGateError

    path = os.path.join(LEGACY, "iter_0000010")
    result, report = cli("verify", "--json", "--for-resume", path)
    assert result.exit_code == 0 and report["trainer"] == "megatron" and report["step"] == 10
    assert codes(report, "error") == [] and set(codes(report, "warning")) == {"needs_safe_globals"}
    result, out = cli("latest", "--json", "--for-resume", LEGACY)
    assert result.exit_code == 0 and out["path"].endswith("iter_0000010") and "differs" not in out
    assert check_resume(path, parallel={"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 1}).ok
    try:
        check_resume(path, parallel={"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1})
        raise AssertionError("a legacy save resumed with another tensor-parallel size passed the gate")
    except ResumeGateError as e:
        assert [p["code"] for p in e.problems] == ["world_size_mismatch"]
    for wrong in ([("tensor_model_parallel_size", 1)], {"tensor_model_parallel_size": "1"}):
        try:  # a caller's mistake is a TypeError, never blamed on the checkpoint
            check_resume(path, parallel=wrong)
            raise AssertionError(f"parallel={wrong!r} was taken")
        except TypeError as e:
            assert "parallel=" in str(e)
    # a torch_dist save is resharded on load: another tensor-parallel size is no problem
    assert check_resume(os.path.join(MEGATRON, "iter_0000010"),
                        parallel={"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1}).ok


def test_megatron_legacy_lost_or_stale_rank_file(tmp_path):
    run = shutil.copytree(LEGACY, tmp_path / "run")
    newest = os.path.join(run, "iter_0000010")
    shutil.copy(os.path.join(run, "iter_0000005", "mp_rank_01", "model_optim_rng.pt"),
                os.path.join(newest, "mp_rank_01", "model_optim_rng.pt"))  # another iteration's file
    result, report = cli("verify", "--json", "--for-resume", newest)
    assert result.exit_code == 1 and "step_mismatch" in codes(report, "error")
    os.remove(os.path.join(newest, "mp_rank_01", "model_optim_rng.pt"))
    result, report = cli("verify", "--json", "--for-resume", newest)
    assert result.exit_code == 1 and "missing_file" in codes(report, "error")
    assert any("mp_rank_01/model_optim_rng.pt is missing" in p["message"] for p in report["problems"])
    result, out = cli("latest", "--json", "--for-resume", run)
    assert out["path"].endswith("iter_0000005") and "fails verification" in out["differs"]
    with open(os.path.join(run, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("5" * (2 << 20))  # no tracker is that long: read as unreadable, never whole
    result, report = cli("verify", "--json", "--for-resume", os.path.join(run, "iter_0000005"))
    assert result.exit_code == 0 and "missing_file" in codes(report, "warning")


def test_torchtune_async_dcp_epochs_each_hold_their_own_state(tmp_path):
    """enable_async_checkpointing: dist_epoch_N DCP dirs with the counters as items (each its own resume point); the
    final epoch_2 of the HF checkpointer holds no recipe state."""
    run = sample("torchtune", "dcp")
    for folder, epochs_run in (("dist_epoch_0", 1), ("dist_epoch_1", 2)):
        assert cli("inspect", "--json", os.path.join(run, folder))[1]["epoch"] == epochs_run
        result, report = cli("verify", "--json", "--for-resume", os.path.join(run, folder))
        assert result.exit_code == 0 and report["trainer"] == "torchtune" and report["problems"] == []
    result, out = cli("latest", "--json", "--for-resume", run)
    assert result.exit_code == 0 and out["path"].endswith("dist_epoch_1") and out["trainer_pick"].endswith(
        "dist_epoch_1")
    moved = shutil.copytree(os.path.join(run, "dist_epoch_1"), tmp_path / "dist_epoch_3")
    result, report = cli("verify", "--json", "--for-resume", str(moved))
    assert result.exit_code == 1 and codes(report, "error") == ["step_mismatch"]


# --- NeMo 2 (fixtures/nemo_sample.py: NeMo 8cfedd7's own Trainer, MegatronStrategy, ModelCheckpoint on CPU, TP=2):
# top-k saves at steps 2 and 4 and the -last of step 4; a second run killed inside its step-4 save ---

NEMO_LAST = "default--val_loss=2.1200-epoch=0-consumed_samples=32.0-last"


def test_nemo_saves_verify_and_latest_is_autoresumes_pick():
    run = sample("nemo", "checkpoints")
    for entry in sorted(os.listdir(run)):
        result, report = cli("verify", "--json", "--for-resume", os.path.join(run, entry))
        assert result.exit_code == 0 and report["trainer"] == "nemo", (entry, report["problems"])
        assert codes(report, "error") == []  # context/<uuid> is cloudpickled: a warning, never loaded by the resume
    result, report = cli("inspect", "--json", os.path.join(run, NEMO_LAST))
    assert report["step"] == 4 and {c["role"] for c in report["components"]} >= {"model", "optimizer", "scheduler"}
    result, out = cli("latest", "--json", "--for-resume", run)
    assert result.exit_code == 0 and out["path"].endswith(NEMO_LAST) and out["trainer_pick"].endswith(NEMO_LAST)
    assert check_resume(os.path.join(run, NEMO_LAST)).ok


def test_nemo_unfinished_save_and_a_last_dir_without_weights(tmp_path):
    run = sample("nemo", "unfinished", "checkpoints")
    partial = os.path.join(run, "default--val_loss=2.1200-epoch=0-consumed_samples=32.0")
    result, report = cli("verify", "--json", "--for-resume", partial)
    assert result.exit_code == 1 and "missing_file" in codes(report, "error")
    assert any("-unfinished is beside it" in p["message"] for p in report["problems"])
    assert any("metadata.json" in p["message"] for p in report["problems"])
    result, out = cli("latest", "--json", "--for-resume", run)
    assert out["path"].endswith("consumed_samples=16.0-last") or out["path"].endswith("consumed_samples=16.0")
    assert out["trainer_pick"].endswith("consumed_samples=16.0-last")
    # NVIDIA-NeMo #14837: a -last dir of context/ only (its weights went to a .ckpt file) is what AutoResume takes
    copy = shutil.copytree(sample("nemo", "checkpoints"), tmp_path / "checkpoints")
    newer = os.path.join(copy, "default--val_loss=2.0000-epoch=0-consumed_samples=48.0-last")
    shutil.copytree(os.path.join(copy, NEMO_LAST, "context"), os.path.join(newer, "context"))
    result, report = cli("verify", "--json", "--for-resume", newer)
    assert result.exit_code == 1 and "no weights/" in report["problems"][0]["message"]
    result, out = cli("latest", "--json", "--for-resume", str(copy))
    assert out["path"].endswith(NEMO_LAST) and out["trainer_pick"] == newer and "fails verification" in out["differs"]


def test_megatron_non_persistent_save_is_its_own_pick_when_newer(tmp_path):
    """--non-persistent-ckpt-type global: <save>/non_persistent/ has its own tracker, and _load_base_checkpoint
    resumes from it when its iteration is at least the persistent tracker's."""
    run = shutil.copytree(MEGATRON, tmp_path / "run")
    os.makedirs(os.path.join(run, "non_persistent"))
    shutil.copytree(os.path.join(run, "iter_0000010"), os.path.join(run, "non_persistent", "iter_0000010"))
    with open(os.path.join(run, "non_persistent", "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("10")
    with open(os.path.join(run, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("5")
    shutil.rmtree(os.path.join(run, "iter_0000010"))
    result, out = cli("latest", "--json", "--for-resume", run)
    assert out["path"] == out["trainer_pick"] and out["path"].endswith(os.path.join("non_persistent", "iter_0000010"))


def test_attack_pass_on_the_new_trainers(tmp_path):
    """The second attack pass of issue 33, one case per finding that was a crash, a hang or a false pass."""
    from safetensors.torch import save_file

    def verdict(path):
        result, report = cli("verify", "--json", "--for-resume", str(path))
        assert result.exit_code in (0, 1) and report is not None, result.output
        return report

    # Megatron legacy: args sizes drive no unbounded loop; another rank's file missing a part; a long tracker
    run = shutil.copytree(LEGACY, tmp_path / "legacy")
    rank1 = os.path.join(run, "iter_0000010", "mp_rank_01", "model_optim_rng.pt")
    state = torch.load(rank1, weights_only=False)
    del state["optimizer"]
    torch.save(state, rank1)
    assert "missing_optimizer" in codes(verdict(os.path.join(run, "iter_0000010")), "error")
    state["args"].tensor_model_parallel_size = state["args"].pipeline_model_parallel_size = 65535
    torch.save(state, os.path.join(run, "iter_0000005", "mp_rank_00", "model_optim_rng.pt"))
    assert "missing_file" in codes(verdict(os.path.join(run, "iter_0000005")), "error")
    with open(os.path.join(run, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("9" * 5000)
    assert "corrupt" in codes(verdict(os.path.join(run, "iter_0000010")), "error")
    # Composer: a model that holds no weights, a timestamp that is no count
    composer = _composer_copy(tmp_path)
    path = os.path.join(composer, "ep0-ba6-rank0.pt")
    saved = torch.load(path, weights_only=False)
    saved["state"]["model"], saved["state"]["timestamp"] = {}, "garbage"
    torch.save(saved, path)
    assert {"missing_file", "corrupt"} <= set(codes(verdict(path), "error"))
    # ai-toolkit: a plain file named like a save is never a candidate (prune never deletes it); the final save alone
    # is found; a newer save cut short does not take the optimizer; an optimizer.pt link is never followed
    plain = tmp_path / "plain"
    plain.mkdir()
    save_file({"w": torch.zeros(4)}, str(plain / "model_000000001.safetensors"))
    shutil.copytree(os.path.join(DATA, "transformers4_bin", "checkpoint-2"), plain / "backup" / "checkpoint-2")
    shutil.copytree(os.path.join(DATA, "transformers4_bin", "checkpoint-4"), plain / "checkpoint-4")
    assert cli("prune", "--json", "--keep", "1", str(plain))[0].exit_code == 0  # a user's backup/ is not OneTrainer's
    assert (plain / "model_000000001.safetensors").exists() and (plain / "backup" / "checkpoint-2").exists()
    final = shutil.copytree(sample("aitoolkit", "run", "mylora"), tmp_path / "final")
    for name in ("mylora_000000002.safetensors", "mylora_000000004.safetensors"):
        os.remove(os.path.join(final, name))
    assert cli("latest", "--json", "--for-resume", str(final))[1]["path"].endswith("mylora.safetensors")
    midrun = shutil.copytree(sample("aitoolkit", "midrun", "mylora"), tmp_path / "midrun")
    with open(os.path.join(midrun, "mylora_000000004.safetensors"), "rb") as f:
        head = f.read(500)
    with open(os.path.join(midrun, "mylora_000000006.safetensors"), "wb") as f:
        f.write(head)
    assert cli("latest", "--json", "--for-resume", str(midrun))[1]["path"].endswith("mylora_000000004.safetensors")
    os.remove(os.path.join(midrun, "optimizer.pt"))
    os.symlink("/etc/passwd", os.path.join(midrun, "optimizer.pt"))
    assert "unsafe_path" in codes(verdict(os.path.join(midrun, "mylora_000000004.safetensors")), "error")
    # OneTrainer: a counter that is no count; a link to nothing inside a backup; a dir only named like a backup
    backup = shutil.copytree(sample("onetrainer", "workspace", "backup"), tmp_path / "backup")
    newest = os.path.join(backup, "2026-01-02_03-05-45-backup-10-2-0")
    with open(os.path.join(newest, "meta.json"), "w") as f:
        f.write('{"train_progress": {"epoch": 2, "epoch_step": 0, "epoch_sample": 0, "global_step": true}}')
    assert "corrupt" in codes(verdict(newest), "error")
    os.remove(os.path.join(newest, "optimizer", "optimizer.pt"))
    os.symlink("nowhere.pt", os.path.join(newest, "optimizer", "optimizer.pt"))
    assert codes(verdict(newest), "error")
    # another backup's optimizer in a backup cut before its onetrainer_config/: the workspace's config says the
    # accumulation it is held to
    workspace = shutil.copytree(sample("onetrainer", "workspace"), tmp_path / "workspace")
    cut = os.path.join(workspace, "backup", "2026-01-02_03-05-45-backup-10-2-0")
    shutil.copy(os.path.join(workspace, "backup", "2026-01-02_03-04-45-backup-4-0-4", "optimizer", "optimizer.pt"),
                os.path.join(cut, "optimizer", "optimizer.pt"))
    for backup in os.listdir(os.path.join(workspace, "backup")):
        shutil.rmtree(os.path.join(workspace, "backup", backup, "onetrainer_config"))
    assert "step_mismatch" in codes(verdict(cut), "error")
    other = shutil.copytree(os.path.join(DATA, "cuda", "accelerate_fp16"),
                            tmp_path / "2024-01-01_00-00-00-backup-1-0-1")
    assert verdict(other)["trainer"] != "onetrainer"


def test_convert_to_dcp_of_objects_kept_as_records_is_a_clear_refusal(tmp_path):
    """A Megatron legacy rank file's numpy RNG state is kept as a record of how it was built: DCP pickles items
    afresh and cannot write it, so the conversion is refused (exit 2) and nothing is written; a .pt takes it."""
    rank = os.path.join(LEGACY, "iter_0000010", "mp_rank_00", "model_optim_rng.pt")
    result, _ = cli("convert", rank, str(tmp_path / "out_dcp"), "--to", "dcp")
    assert result.exit_code == 2 and "convert to a .pt" in result.output and not (tmp_path / "out_dcp").exists()
    assert cli("convert", rank, str(tmp_path / "out.pt"))[0].exit_code == 0

