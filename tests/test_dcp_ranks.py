"""DCP dirs written by several ranks under torchrun: chunked (sharded) tensors read tensor by tensor, equal to
torch's own dcp_to_torch_save bit for bit."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import cli, flip_byte

LAYOUTS = {"2 ranks, Shard(0)/Shard(1)": (2, []), "4 ranks, 2x2 mesh": (4, ["2", "2"]),
           "FSDP2, 2 ranks": (2, ["fsdp2"])}


def torchrun(ranks: int, *args) -> subprocess.CompletedProcess:
    """`ranks` processes on a free port (--standalone): a suite running beside this one cannot collide."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(ranks), *args], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def written(request, tmp_path_factory):
    ranks, args = LAYOUTS[request.param]
    out = str(tmp_path_factory.mktemp("dcp") / "ckpt")
    torchrun(ranks, "-m", "fixtures.dcp_ranks", out, *args)
    return out, torch.load(out + ".reference.pt", weights_only=True)


@pytest.fixture(scope="module")
def dtensor_dir(tmp_path_factory):
    """The 2-rank DTensor layout, for the damage tests."""
    out = str(tmp_path_factory.mktemp("dcp") / "ckpt")
    torchrun(2, "-m", "fixtures.dcp_ranks", out)
    return out


def test_every_rank_file_is_listed_and_chunked_tensors_are_readable(written):
    out, reference = written
    result, doc = cli("inspect", out, "--json")
    assert result.exit_code == 0 and doc["problems"] == []
    assert sum(f.endswith(".distcp") for f in doc["files"]) >= 2
    result, doc = cli("verify", "--finite", out, "--json")
    assert doc["ok"], doc["problems"]


def test_convert_equals_dcp_to_torch_save_bit_for_bit(written, tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out, reference = written
    dcp_to_torch_save(out, str(tmp_path / "torch.pt"))
    theirs = torch.load(tmp_path / "torch.pt", weights_only=True)["model"]
    for target in ("model.safetensors", "model.pt"):
        result, _ = cli("convert", out, str(tmp_path / target), "--component", "model")
        assert result.exit_code == 0, result.stderr
        ours = load_file(tmp_path / target) if target.endswith("safetensors") else \
            torch.load(tmp_path / target, weights_only=True)
        assert ours.keys() == theirs.keys() == reference.keys()
        for key in theirs:
            assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key]), key
            assert torch.equal(ours[key], reference[key])


def test_diff_values_against_the_full_tensors(written):
    out, _ = written
    result, doc = cli("diff", "--values", out, out + ".reference.pt", "--json")
    assert result.exit_code == 0 and doc["same"], result.stdout
    assert doc["values"] == {"equal": 4, "close": [], "different": [], "modules": None}
    by_module = cli("diff", "--values", "--by-module", out, out + ".reference.pt", "--json")[1]["values"]["modules"]
    assert by_module and all(m["rel_change"] == 0 and m["changed"] == 0 for m in by_module)


def test_step_and_non_tensor_items_are_read_and_shown(dtensor_dir):
    result, doc = cli("inspect", dtensor_dir, "--json")
    assert doc["step"] == 7 and doc["epoch"] == 1 and doc["trainer"] == "dcp_state"
    assert doc["metadata"]["objects"] == {"step": 7, "extra.note": "b'bytes'", "extra.epoch": 1}
    assert ("DCP state 'step'", "global_step") in [(s["source"], s["meaning"]) for s in doc["step_sources"]]
    result, _ = cli("inspect", dtensor_dir)
    assert "Non-tensor items" in result.stdout and "b'bytes'" in result.stdout
    result, doc = cli("verify", dtensor_dir, "--expect-step", "8", "--json")
    assert "step_mismatch" in [p["code"] for p in doc["problems"]]


def _copy(src, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(src, copy)
    return copy


def test_a_missing_rank_file_is_named_with_its_chunks(dtensor_dir, tmp_path):
    copy = _copy(dtensor_dir, tmp_path)
    os.remove(copy / "__1_0.distcp")
    result, doc = cli("verify", str(copy), "--json")
    assert result.exit_code == 1 and [p["code"] for p in doc["problems"]] == ["missing_file"]
    message = doc["problems"][0]["message"]
    assert "__1_0.distcp" in message and "model.layer.weight (chunk at (4, 0))" in message


def test_a_cut_short_rank_file_names_the_chunks_it_lost(dtensor_dir, tmp_path):
    copy = _copy(dtensor_dir, tmp_path)
    path = copy / "__1_0.distcp"
    os.truncate(path, os.path.getsize(path) // 3)
    result, doc = cli("verify", str(copy), "--json")
    assert result.exit_code == 1 and {p["code"] for p in doc["problems"]} == {"truncated"}
    assert any("cut short" in p["message"] and "chunk at" in p["message"] for p in doc["problems"])
    result, _ = cli("convert", str(copy), str(tmp_path / "out.safetensors"))
    assert result.exit_code == 1 and not (tmp_path / "out.safetensors").exists()


def _chunk_data(ckpt_dir, fqn="layer.weight"):
    """(file, where the chunk's tensor bytes start) of the chunk of `fqn` held by rank 1's file."""
    from ckpttool.checkpoint import open_checkpoint
    from ckpttool.formats.torchzip import stored_members

    ckpt = open_checkpoint(str(ckpt_dir))
    tensor = next(t for t in ckpt.model.tensors if t.name == fqn)
    chunk = next(c for c in tensor.chunks if c.location.file.endswith("__1_0.distcp"))
    info, offset = next((i, o) for i, o in stored_members(chunk.location.file, (chunk.location.offset,
                                                                                  chunk.location.length))
                        if "/data/" in i.filename)
    return chunk.location.file, offset, chunk.offsets


def test_a_flipped_byte_in_a_chunk_is_named_by_its_crc(dtensor_dir, tmp_path):
    copy = _copy(dtensor_dir, tmp_path)
    path, offset, chunk = _chunk_data(copy)
    flip_byte(path, offset + 3)
    result, doc = cli("verify", str(copy), "--json")
    assert result.exit_code == 1 and [p["code"] for p in doc["problems"]] == ["corrupt"]
    assert f"tensor layer.weight (chunk at {chunk}) in __1_0.distcp fails its CRC-32" in doc["problems"][0]["message"]


def test_a_flipped_byte_against_the_manifest_names_the_chunk(dtensor_dir, tmp_path):
    """A byte no CRC covers (the padding before the chunk's data): only the manifest sees it, and names the chunk."""
    copy = _copy(dtensor_dir, tmp_path)
    result, doc = cli("manifest", str(copy), "--json")
    assert result.exit_code == 0
    with open(copy / "ckpttool-manifest.json") as f:
        entries = json.load(f)["tensors"]
    assert any(e.get("chunk") == [4, 0] and e["names"] == ["layer.weight"] for e in entries)
    path, offset, chunk = _chunk_data(copy)
    flip_byte(path, offset - 1)
    result, doc = cli("verify", str(copy), "--json")
    assert result.exit_code == 1 and [p["code"] for p in doc["problems"]] == ["checksum_mismatch"]
    assert doc["problems"][0]["message"] == f"tensor layer.weight (chunk at {chunk}) in __1_0.distcp differs from " \
        "the manifest"


def test_a_non_tensor_item_that_would_run_code_is_unsafe(tmp_path):
    """dcp.load unpickles non-tensor items with weights_only=False; ckpttool reads them without running anything."""
    import torch.distributed.checkpoint as dcp

    marker = tmp_path / "ran"
    dcp.save({"model": {"w": torch.ones(2)}, "evil": _Payload(str(marker))}, checkpoint_id=str(tmp_path / "d"),
             no_dist=True)
    for command in ("inspect", "verify"):
        result, doc = cli(command, str(tmp_path / "d"), "--json")
        assert result.exit_code == 1 and [p["code"] for p in doc["problems"]] == ["unsafe_pickle"]
        assert "item 'evil' imports posix.system" in doc["problems"][0]["message"]
    result, _ = cli("convert", str(tmp_path / "d"), str(tmp_path / "out.safetensors"))  # the remedy: tensors only
    assert result.exit_code == 0 and list(load_file(tmp_path / "out.safetensors")) == ["w"]
    assert not marker.exists()


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_gate_on_an_fsdp2_checkpoint(tmp_path_factory):
    from ckpttool.gate import ResumeGateError, check_resume
    from fixtures.dcp_ranks import FSDP2_STEPS, tiny_mlp

    out = str(tmp_path_factory.mktemp("fsdp2") / "ckpt")
    torchrun(2, "-m", "fixtures.dcp_ranks", out, "fsdp2")
    model = tiny_mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    report = check_resume(out, model=model, optimizer=opt, scheduler=sched, expected_step=FSDP2_STEPS)
    assert report.ok and [p["code"] for p in report.problems] == ["missing_rng"]  # the loop saves no RNG: a warning
    with pytest.raises(ResumeGateError, match="step_mismatch"):
        check_resume(out, model=model, optimizer=opt, scheduler=sched, expected_step=FSDP2_STEPS + 1)
    wider = torch.nn.Sequential(torch.nn.Linear(8, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))
    with pytest.raises(ResumeGateError, match="shape_mismatch"):
        check_resume(out, model=wider, expected_step=FSDP2_STEPS)
    result, doc = cli("inspect", out, "--json")
    assert doc["step"] == FSDP2_STEPS
    assert {c["name"]: c["role"] for c in doc["components"]} == {"model": "model", "optimizer": "optimizer",
                                                                 "lr_scheduler": "scheduler"}


def test_chunks_that_do_not_cover_the_tensor_are_corrupt(dtensor_dir, tmp_path):
    """A .metadata that lost one chunk of a sharded tensor: named, `corrupt`, never a half-filled tensor."""
    import pickle
    import shutil

    import torch.distributed.checkpoint  # noqa: F401 - the classes our own fixture's .metadata pickles

    copy = tmp_path / "copy"
    shutil.copytree(dtensor_dir, copy)
    with open(copy / ".metadata", "rb") as f:
        meta = pickle.load(f)  # trusted: written by the fixture above
    dropped = next(i for i in meta.storage_data if i.fqn == "model.layer.weight" and any(i.offset))
    del meta.storage_data[dropped]
    with open(copy / ".metadata", "wb") as f:
        pickle.dump(meta, f)
    result, doc = cli("inspect", str(copy), "--json")
    assert result.exit_code == 1 and [p["code"] for p in doc["problems"]] == ["corrupt"]
    assert "chunks of 'model.layer.weight' do not cover" in doc["problems"][0]["message"]


def test_convert_to_sharded_safetensors_and_remap(written, tmp_path):
    """Sharded safetensors and remap read the chunked tensors too: the same values, under the new names."""
    out, reference = written
    result, _ = cli("convert", out, str(tmp_path / "sharded"), "--component", "model", "--shard-size", "200B")
    assert result.exit_code == 0, result.stderr
    shards = sorted(f for f in os.listdir(tmp_path / "sharded") if f.endswith(".safetensors"))
    assert len(shards) > 1
    merged = {k: v for f in shards for k, v in load_file(tmp_path / "sharded" / f).items()}
    assert merged.keys() == reference.keys() and all(torch.equal(merged[k], reference[k]) for k in reference)
    result, _ = cli("remap", out, str(tmp_path / "renamed.safetensors"), "--add-prefix", "module.")
    assert result.exit_code == 0, result.stderr
    renamed = load_file(tmp_path / "renamed.safetensors")
    assert renamed.keys() == {f"module.{k}" for k in reference}
    assert all(torch.equal(renamed[f"module.{k}"], v) for k, v in reference.items())


def test_gate_reads_every_layout_and_names_what_a_resume_lacks(written):
    """The DTensor layouts save weights and a step only: the gate compares the live model's keys, shapes and dtypes
    with the chunked tensors (no mismatch) and refuses the resume for the missing optimizer state alone."""
    from ckpttool.gate import ResumeGateError, check_resume

    out, reference = written
    model = torch.nn.Module()
    for key, value in reference.items():
        owner, name = key.rsplit(".", 1)
        if not hasattr(model, owner):
            setattr(model, owner, torch.nn.Module())
        setattr(getattr(model, owner), name, torch.nn.Parameter(torch.zeros_like(value)))
    if "layer.weight" in reference and reference["layer.weight"].shape == (8, 6):  # the DTensor layouts
        with pytest.raises(ResumeGateError) as refused:
            check_resume(out, model=model, expected_step=7)
        assert [p["code"] for p in refused.value.problems if p["severity"] == "error"] == ["weights_only"]
    else:  # the FSDP2 run: a full training state
        assert check_resume(out, model=model).ok
