"""`ckpttool repair`: damaged files give back exactly their whole tensors, bit for bit, and name the rest; layouts get
their index, `latest` or run rebuilt; SRC never changes; a healthy SRC writes nothing."""

import hashlib
import json
import os
import shutil
import struct
import zipfile

import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from ckpttool.cli import main
from ckpttool.formats.pickles import TensorRef
from ckpttool.formats.torchfile import read_raw
from ckpttool.formats.torchtree import flatten
from ckpttool.synthetic.catalog import SAMPLES as SHIPPED
from tests.helpers import cli


def tree_digest(path) -> str:
    """One digest of every file's name, mode and bytes under `path` (or of the file)."""
    h = hashlib.sha256()
    paths = [path] if os.path.isfile(path) else sorted(
        os.path.join(d, f) for d, _, files in os.walk(path) for f in files)
    for p in paths:
        h.update(os.path.relpath(p, path).encode())
        h.update(str(os.stat(p).st_mode).encode())
        with open(p, "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def bits(t: torch.Tensor) -> bytes:
    return t.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def weights():
    g = torch.Generator().manual_seed(0)
    return {"embed.weight": torch.randn(12, 8, generator=g),
            "norm.weight": torch.randn(8, generator=g).to(torch.bfloat16),
            "counts": torch.arange(10, dtype=torch.int64), "mask": torch.rand(5, generator=g) > 0.5,
            "empty": torch.zeros(0, 3), "head.weight": torch.randn(8, 12, generator=g).half(),
            "last.bias": torch.randn(33, generator=g)}


def same(a, b) -> bool:
    """Equal objects, tensors bit for bit and of one dtype."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and bits(a) == bits(b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def cut_copy(src, dst, size):
    with open(src, "rb") as f:
        data = f.read(size)
    with open(dst, "wb") as f:
        f.write(data)


# --- safetensors ---

def safetensors_cuts(path):
    """Every header boundary, and each tensor's first, middle and last byte."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    start, size = 8 + n, os.path.getsize(path)
    points = {0, 4, 7, 8, 9, 8 + n // 2, start - 1, start, size - 1}
    for name, e in header.items():
        if name != "__metadata__":
            a, b = e["data_offsets"]
            points.update({start + a, start + a + 1, start + (a + b) // 2, start + b - 1, start + b})
    return sorted(p for p in points if 0 <= p < size), header, start


def test_safetensors_cut_at_every_boundary_keeps_exactly_the_whole_tensors(tmp_path):
    original = weights()
    src = tmp_path / "model.safetensors"
    save_file(original, src, metadata={"step": "7"})
    cuts, header, start = safetensors_cuts(src)
    for cut in cuts:
        damaged, out = tmp_path / f"cut{cut}.safetensors", tmp_path / f"out{cut}.safetensors"
        cut_copy(src, damaged, cut)
        before = tree_digest(damaged)
        result, report = cli("repair", str(damaged), str(out), "--json")
        assert tree_digest(damaged) == before
        whole = {k for k, e in header.items() if k != "__metadata__" and start + e["data_offsets"][1] <= cut}
        if cut < start or not whole:
            assert result.exit_code == 1, (cut, result.output)
            assert not out.exists() and report["written"] is False
            continue
        assert result.exit_code == 0, (cut, result.output)
        got = load_file(out)
        assert set(got) == whole, cut
        for name in whole:
            assert got[name].dtype == original[name].dtype and bits(got[name]) == bits(original[name])
        (fix,) = report["fixes"]
        assert fix["action"] == "salvage" and fix["kept"] == len(whole)
        assert {item["name"] for item in fix["lost"]} == set(original) - whole
        with open(out, "rb") as f:
            assert json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))["__metadata__"] == {"step": "7"}


def test_safetensors_damaged_header_entry_costs_that_tensor_and_is_named(tmp_path):
    src = tmp_path / "model.safetensors"
    save_file(weights(), src)
    data = bytearray(src.read_bytes())
    at = data.index(b'"head.weight"') + 3
    data[at:at + 20] = b"}" * 20  # the entry and the JSON around it are broken
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(bytes(data))
    result, report = cli("repair", str(damaged), str(tmp_path / "out.safetensors"), "--json")
    assert result.exit_code == 0, result.output
    (fix,) = report["fixes"]
    assert "entries read one by one" in fix["detail"]
    assert "head.weight" not in load_file(tmp_path / "out.safetensors")
    assert any(item["name"] == "(unnamed)" for item in fix["lost"])


def test_a_manifest_drops_the_tensors_whose_bytes_changed(tmp_path):
    """safetensors carries no checksum: a flipped data byte is caught only by the manifest, tensor by tensor."""
    src = tmp_path / "model.safetensors"
    save_file(weights(), src)
    assert cli("manifest", str(src))[0].exit_code == 0
    _, header, start = safetensors_cuts(src)
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    data = bytearray(src.read_bytes())
    data[-1] ^= 0x40  # inside the last tensor in the file
    src.write_bytes(bytes(data))
    result, report = cli("repair", str(src), str(tmp_path / "out.safetensors"), "--json")
    assert result.exit_code == 0, result.output
    (fix,) = report["fixes"]
    assert fix["code"] == "checksum_mismatch"
    assert [item["name"] for item in fix["lost"]] == [last]
    assert "differ from the manifest" in fix["lost"][0]["why"]
    assert set(load_file(tmp_path / "out.safetensors")) == set(weights()) - {last}


# --- torch zip ---

def training_dict():
    w = weights()
    del w["empty"]
    return {"model": w, "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(12, 8)}},
                                      "param_groups": [{"lr": 0.1, "params": [0]}]},
            "ema": [torch.randn(4), torch.randn(6)], "global_step": 3, "tied": w["embed.weight"]}


def flat(obj, prefix=""):
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else []
    out = {}
    for k, v in items:
        out.update(flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def zip_layout(path):
    """(member name, header offset, data offset, data end) of each member."""
    with open(path, "rb") as raw:
        zf = zipfile.ZipFile(raw)
        members = []
        for info in zf.infolist():
            raw.seek(info.header_offset + 26)
            name_len, extra_len = struct.unpack("<HH", raw.read(4))
            data = info.header_offset + 30 + name_len + extra_len
            members.append((info.filename, info.header_offset, data, data + info.file_size))
    return members


def test_torch_zip_cut_at_every_boundary_keeps_exactly_the_whole_storages(tmp_path):
    original = training_dict()
    src = tmp_path / "ckpt.pt"
    torch.save(original, src)
    members = zip_layout(src)
    size = os.path.getsize(src)
    names = flat(original)
    storage_of = {}  # tensor name -> the member of its storage (by the safe reader, as torch names them)
    for name, leaf in flatten(read_raw(str(src)).obj):
        if isinstance(leaf, TensorRef):
            storage_of[name] = next(m for m in members if m[0].endswith(f"/data/{leaf.storage.key}"))
    assert set(storage_of) == set(names)
    points = {size - 1, size - 22}
    for _, header, data, end in members:
        points.update({header, header + 10, data, (data + end) // 2, end, end + 8, end + 16})
    for cut in sorted(p for p in points if 0 < p < size):
        damaged, out = tmp_path / f"cut{cut}.pt", tmp_path / f"out{cut}.pt"
        cut_copy(src, damaged, cut)
        before = tree_digest(damaged)
        result, report = cli("repair", str(damaged), str(out), "--json")
        assert tree_digest(damaged) == before
        # a storage is saved when its bytes and the descriptor with their CRC-32 (16 bytes after) are in the file
        whole = {n for n, m in storage_of.items() if m[3] + 16 <= cut}
        optimizer = {n for n in names if n.startswith("optimizer.")}
        if optimizer - whole:  # an optimizer state that lost a tensor is left out whole, never loaded half
            whole -= optimizer
        if not whole:
            assert result.exit_code == 1, (cut, result.output)
            assert not out.exists()
            continue
        assert result.exit_code == 0, (cut, result.output)
        got = flat(torch.load(out, weights_only=True))
        assert set(got) == whole, cut
        for name in whole:
            assert got[name].dtype == names[name].dtype and bits(got[name]) == bits(names[name]), (cut, name)
        (fix,) = report["fixes"]
        assert {item["name"] for item in fix["lost"]} == set(names) - whole
        saved = torch.load(out, weights_only=True)
        assert saved["global_step"] == 3 and ("optimizer" in saved) == bool(optimizer & whole)


def test_torch_zip_flipped_storage_byte_fails_its_crc_and_only_that_storage_is_lost(tmp_path):
    original = training_dict()
    src = tmp_path / "ckpt.pt"
    torch.save(original, src)
    members = zip_layout(src)
    _, _, data, end = next(m for m in members if m[0].endswith("data/1"))
    raw = bytearray(src.read_bytes())
    raw[(data + end) // 2] ^= 0x01
    src.write_bytes(bytes(raw))
    result, report = cli("repair", str(src), str(tmp_path / "out.pt"), "--json")
    assert result.exit_code == 0, result.output
    lost = report["fixes"][0]["lost"]
    assert lost and all("CRC-32" in item["why"] for item in lost)
    got = flat(torch.load(tmp_path / "out.pt", weights_only=True))
    expected = flat(original)
    assert set(got) == set(expected) - {item["name"] for item in lost}
    assert all(bits(got[n]) == bits(expected[n]) for n in got)


def test_torch_legacy_cut_keeps_the_storages_before_the_cut(tmp_path):
    original = {"a": torch.arange(6.0), "b": torch.ones(4, dtype=torch.int32), "c": torch.randn(3)}
    src = tmp_path / "legacy.pt"
    torch.save(original, src, _use_new_zipfile_serialization=False)
    size = os.path.getsize(src)
    for cut in (size - 1, size - 12, size - 13 - 8, size - 13 - 8 - 16):
        damaged, out = tmp_path / f"cut{cut}.pt", tmp_path / f"out{cut}.pt"
        cut_copy(src, damaged, cut)
        result, report = cli("repair", str(damaged), str(out), "--json")
        if result.exit_code == 1:
            assert not out.exists()
            continue
        assert result.exit_code == 0, result.output
        got = torch.load(out, weights_only=True)
        assert got and all(bits(got[k]) == bits(original[k]) for k in got)
        assert {item["name"] for item in report["fixes"][0]["lost"]} == set(original) - set(got)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.floats(0.05, 1.0), flips=st.lists(st.tuples(st.floats(0.0, 0.999), st.integers(1, 255)), max_size=4),
       kind=st.sampled_from(["pt", "safetensors"]))
def test_mutated_damage_never_gives_back_a_changed_tensor(tmp_path_factory, cut, flips, kind):
    """Cuts and flipped bytes anywhere: exit 0 or 1, never an exception; SRC unchanged; every tensor given back is
    bit for bit the original (zip members by their CRC-32, safetensors by its manifest)."""
    folder = tmp_path_factory.mktemp("mutated")
    original = weights()
    src = folder / f"ckpt.{kind}"
    if kind == "pt":
        torch.save(original, src)
    else:
        save_file(original, src)
        assert cli("manifest", str(src))[0].exit_code == 0
    data = bytearray(src.read_bytes())
    for where, mask in flips:
        data[int(where * len(data))] ^= mask
    src.write_bytes(bytes(data[: max(1, int(cut * len(data)))]))
    before = tree_digest(src)
    out = folder / f"out.{kind}"
    result, report = cli("repair", str(src), str(out), "--json")
    assert result.exit_code in (0, 1), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert tree_digest(src) == before
    if result.exit_code == 1 or not out.exists():
        assert not out.exists()
        return
    got = torch.load(out, weights_only=True) if kind == "pt" else load_file(out)
    for name, tensor in got.items():
        assert name in original and bits(tensor) == bits(original[name]) and tensor.dtype == original[name].dtype


# --- layouts ---

def test_healthy_inputs_write_nothing(corpus, tmp_path):
    for name in ("safetensors", "torch_training", "torch_legacy", "sharded", "accelerate", "diffusers", "dcp"):
        before = tree_digest(corpus[name])
        out = tmp_path / name
        result, report = cli("repair", corpus[name], str(out), "--json")
        assert result.exit_code == 0, (name, result.output)
        assert report["healthy"] and not report["written"] and not out.exists(), name
        assert tree_digest(corpus[name]) == before
    result = CliRunner().invoke(main, ["repair", corpus["safetensors"], str(tmp_path / "x.safetensors")])
    assert "nothing to repair" in result.output


def test_shards_without_their_index_verify_after_repair(corpus, tmp_path):
    src = shutil.copytree(corpus["sharded"], tmp_path / "sharded")
    (index,) = [p for p in os.listdir(src) if p.endswith(".index.json")]
    original = json.load(open(os.path.join(src, index)))
    os.unlink(os.path.join(src, index))
    before = tree_digest(src)
    result, report = cli("repair", str(src), str(tmp_path / "fixed"), "--json")
    assert result.exit_code == 0, result.output
    assert [f["action"] for f in report["fixes"]] == ["rebuild index"]
    assert report["after"]["ok"] and tree_digest(src) == before
    rebuilt = json.load(open(tmp_path / "fixed" / index))
    assert rebuilt["weight_map"] == original["weight_map"]
    assert cli("verify", str(tmp_path / "fixed"))[0].exit_code == 0


def test_a_wrong_index_is_rebuilt_and_a_missing_shard_is_not_papered_over(corpus, tmp_path):
    src = shutil.copytree(corpus["sharded"], tmp_path / "sharded")
    (index,) = [p for p in os.listdir(src) if p.endswith(".index.json")]
    doc = json.load(open(os.path.join(src, index)))
    key = sorted(doc["weight_map"])[0]
    doc["weight_map"][key] = next(s for s in sorted(set(doc["weight_map"].values())) if s != doc["weight_map"][key])
    json.dump(doc, open(os.path.join(src, index), "w"))
    assert cli("verify", str(src))[0].exit_code == 1
    result, report = cli("repair", str(src), str(tmp_path / "fixed"), "--json")
    assert result.exit_code == 0 and report["fixes"][0]["action"] == "rebuild index", result.output
    assert cli("verify", str(tmp_path / "fixed"))[0].exit_code == 0

    result, report = cli("repair", corpus["sharded_missing"], str(tmp_path / "none"), "--json")
    assert result.exit_code == 1 and not (tmp_path / "none").exists()
    assert report["fixes"][0]["code"] == "missing_file" and report["fixes"][0]["action"] == "none"


def test_state_dir_with_cut_files_is_salvaged_file_by_file(corpus, tmp_path):
    src = shutil.copytree(corpus["accelerate"], tmp_path / "state")
    model = src / "model.safetensors"
    os.truncate(model, os.path.getsize(model) * 2 // 3)
    optimizer = src / "optimizer.bin"
    members = zip_layout(corpus["accelerate"] + "/optimizer.bin")
    os.truncate(optimizer, max(m[3] for m in members) + 16)  # every member whole, the directory cut away
    before = tree_digest(src)
    result, report = cli("repair", str(src), str(tmp_path / "fixed"), "--json")
    assert result.exit_code == 0, result.output
    assert tree_digest(src) == before
    by_file = {os.path.basename(f["path"]): f for f in report["fixes"]}
    assert by_file["optimizer.bin"]["action"] == "salvage" and not by_file["optimizer.bin"]["lost"]
    assert by_file["model.safetensors"]["lost"]
    fixed_opt = torch.load(tmp_path / "fixed" / "optimizer.bin", weights_only=True)
    whole_opt = torch.load(corpus["accelerate"] + "/optimizer.bin", weights_only=True)
    assert fixed_opt["param_groups"] == whole_opt["param_groups"]
    assert all(bits(a) == bits(b) for a, b in zip(flat(fixed_opt).values(), flat(whole_opt).values()))
    for name in ("scheduler.bin", "random_states_0.pkl"):
        assert (tmp_path / "fixed" / name).read_bytes() == (src / name).read_bytes()


def test_deepspeed_latest_naming_a_broken_tag_is_rewritten(tmp_path):
    src = shutil.copytree(os.path.join(SHIPPED, "deepspeed", "zero2"), tmp_path / "ds")
    good = (src / "latest").read_text().strip()
    shutil.copytree(src / good, src / "global_step9")
    os.unlink(src / "global_step9" / "mp_rank_00_model_states.pt")
    (src / "latest").write_text("global_step9")
    result, report = cli("repair", str(src), str(tmp_path / "dry"), "--dry-run", "--json")
    assert result.exit_code == 0 and not (tmp_path / "dry").exists()
    assert report["fixes"][0]["action"] == "rewrite latest" and good in report["fixes"][0]["detail"]
    result, report = cli("repair", str(src), str(tmp_path / "fixed"), "--json")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "fixed" / "latest").read_text() == good
    assert not (tmp_path / "fixed" / "global_step9").exists()
    assert report["after"]["ok"] and (src / "latest").read_text() == "global_step9"


def test_a_run_without_its_half_written_newest_checkpoint(corpus, tmp_path):
    run_dir = os.path.dirname(corpus["diffusers_truncated_newest"])
    result, report = cli("repair", run_dir, str(tmp_path / "run"), "--json")
    assert result.exit_code == 0, result.output
    assert [os.path.basename(f["path"]) for f in report["fixes"] if f["action"] == "leave out"] == \
        [os.path.basename(corpus["diffusers_truncated_newest"])]
    assert not (tmp_path / "run" / os.path.basename(corpus["diffusers_truncated_newest"])).exists()
    assert report["after"]["ok"] and os.path.basename(report["after"]["latest"]) == "checkpoint-3"


def test_a_run_where_nothing_verifies_is_not_rewritten_and_link_shares_the_untouched_files(corpus, tmp_path):
    run_dir = tmp_path / "run"
    os.makedirs(run_dir)
    shutil.copytree(corpus["diffusers_truncated_newest"], run_dir / "checkpoint-5")
    result, report = cli("repair", str(run_dir), str(tmp_path / "out"), "--json")
    assert result.exit_code == 1 and not (tmp_path / "out").exists()
    assert [f["action"] for f in report["fixes"]] == ["none"]
    assert "repair one on its own" in report["fixes"][0]["detail"]

    src = shutil.copytree(corpus["accelerate"], tmp_path / "state")
    os.truncate(src / "model.safetensors", os.path.getsize(src / "model.safetensors") - 1)
    result, _ = cli("repair", str(src), str(tmp_path / "linked"), "--link", "--json")
    assert result.exit_code == 0, result.output
    assert os.stat(src / "scheduler.bin").st_ino == os.stat(tmp_path / "linked" / "scheduler.bin").st_ino
    assert os.stat(src / "model.safetensors").st_ino != os.stat(tmp_path / "linked" / "model.safetensors").st_ino


def test_dry_run_lists_a_fix_or_why_none_for_each_problem(corpus, tmp_path):
    result, report = cli("repair", corpus["torch_step_mismatch"], str(tmp_path / "x.pt"), "--dry-run", "--json")
    assert result.exit_code == 1 and not (tmp_path / "x.pt").exists()
    assert report["fixes"] and all(f["action"] == "none" and "no repair possible" in f["detail"]
                                   for f in report["fixes"])
    result = CliRunner().invoke(main, ["repair", corpus["safetensors_truncated"], str(tmp_path / "y.safetensors"),
                                       "--dry-run"])
    assert result.exit_code == 0 and "dry run: nothing written" in result.output
    assert not (tmp_path / "y.safetensors").exists()


def test_destination_rules(corpus, tmp_path):
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"keep me")
    result = CliRunner().invoke(main, ["repair", corpus["safetensors_truncated"], str(out)])
    assert result.exit_code == 2 and "--force" in result.output and out.read_bytes() == b"keep me"
    result = CliRunner().invoke(main, ["repair", corpus["safetensors_truncated"], str(out), "--force"])
    assert result.exit_code == 0 and load_file(out)
    src = shutil.copytree(corpus["sharded"], tmp_path / "sharded")
    os.unlink(next(src / p for p in os.listdir(src) if p.endswith(".index.json")))
    result = CliRunner().invoke(main, ["repair", str(src), str(src / "inside")])
    assert result.exit_code == 2 and not (src / "inside").exists()
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_real_transformers_checkpoint_resumes_after_its_optimizer_lost_the_zip_directory(runs, tmp_path):
    """The Trainer's own resume reads the repaired checkpoint: optimizer.pt cut just before its zip directory."""
    from ckpttool.synthetic.runs import resume_transformers

    run_dir = runs["transformers"]
    newest = sorted(os.listdir(run_dir), key=lambda d: int(d.split("-")[1]) if d.startswith("checkpoint-") else -1)[-1]
    src = shutil.copytree(os.path.join(run_dir, newest), tmp_path / newest)
    members = zip_layout(os.path.join(run_dir, newest, "optimizer.pt"))
    os.truncate(src / "optimizer.pt", max(m[3] for m in members) + 16)
    assert cli("verify", str(src))[0].exit_code == 1
    fixed = tmp_path / "fixed" / newest
    os.makedirs(fixed.parent)
    result, report = cli("repair", str(src), str(fixed), "--json")
    assert result.exit_code == 0 and report["after"]["ok"], result.output
    keys = ("global_step", "optimizer_restored", "scheduler_step")
    resumed, healthy = resume_transformers(str(fixed)), resume_transformers(os.path.join(run_dir, newest))
    assert resumed["optimizer_restored"] and {k: resumed[k] for k in keys} == {k: healthy[k] for k in keys}


def test_like_aligns_a_module_prefix_and_dequantizes_quanto_keys(corpus, tmp_path):
    """Key damage against the model to load into is repaired by remap's own alignment."""
    from fixtures.generate import TinyNet

    result, report = cli("repair", corpus["torch_module_prefix"], str(tmp_path / "plain.pt"), "--like",
                          corpus["torch_state_dict"], "--json")
    assert result.exit_code == 0, result.output
    assert [f["action"] for f in report["fixes"]] == ["remap"] and "module." in report["fixes"][0]["detail"]
    assert cli("diff", str(tmp_path / "plain.pt"), corpus["torch_state_dict"])[0].exit_code == 0

    torch.manual_seed(0)
    reference = tmp_path / "plain256.safetensors"
    save_file({k: v.contiguous() for k, v in TinyNet(width=256).state_dict().items()}, reference)
    src = shutil.copytree(os.path.dirname(corpus["quanto_qint8"]), tmp_path / "quanto")
    before = tree_digest(src)
    result, report = cli("repair", str(src), str(tmp_path / "fixed"), "--like", str(reference), "--json")
    assert result.exit_code == 0, result.output
    assert report["fixes"][0]["code"] == "quantized_keys" and report["fixes"][0]["action"] == "remap"
    assert os.listdir(tmp_path / "fixed") == ["model.safetensors"]  # the quanto map went with the quantized keys
    fixed = load_file(tmp_path / "fixed" / "model.safetensors")
    assert set(fixed) == set(load_file(reference)) and tree_digest(src) == before

    result, report = cli("repair", corpus["torch_state_dict"], str(tmp_path / "same.pt"), "--like",
                          corpus["torch_state_dict"], "--json")
    assert result.exit_code == 0 and report["healthy"] and not (tmp_path / "same.pt").exists()


def test_data_descriptors_of_both_sizes(tmp_path):
    """miniz writes 16-byte descriptors, and 24-byte (zip64) ones once the archive passes 4 GiB, even after a small
    member: each is told by its sizes agreeing with the member's length (seen on a real 4.4 GB torch.save)."""
    from ckpttool.formats.torchsalvage import _descriptor

    for form, tail in ((16, struct.pack("<LLL", 0xABCD, 40, 40)), (24, struct.pack("<LQQ", 0xABCD, 40, 40))):
        path = tmp_path / f"d{form}"
        path.write_bytes(b"x" * 40 + b"PK\x07\x08" + tail + b"PK\x03\x04")
        with open(path, "rb") as f:
            assert _descriptor(f, 40, 40) == (0xABCD, form)
            assert _descriptor(f, 40, 41) is None


def test_a_cut_malicious_pickle_gives_back_its_tensors_and_never_its_code(corpus, tmp_path, no_payload):
    """The cut hides the payload from verify (the directory is gone), not from the salvage: it is named, never run,
    and DST holds the tensors alone."""
    src = tmp_path / "cut.pt"
    members = zip_layout(corpus["torch_malicious"])
    cut_copy(corpus["torch_malicious"], src, max(m[3] for m in members if "/data/" in m[0]) + 16)
    result, report = cli("repair", str(src), str(tmp_path / "out.pt"), "--json")
    assert result.exit_code == 0, result.output
    assert "outside the allow-list (never run)" in report["fixes"][0]["detail"]
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    assert got and all(isinstance(v, torch.Tensor) for v in got.values())
    assert not os.path.exists(no_payload)


def test_real_diffusers_checkpoint_whose_pickles_lost_their_directories_resumes_after_repair(runs, tmp_path):
    """train_text_to_image's resume (load_state through the EMA load hook) reads the repaired checkpoint: its
    optimizer, scheduler and RNG files each cut just before their zip directory come back whole; with the UNet's
    weights cut too, the resume fails loudly on the lost tensors rather than loading a partial model."""
    from ckpttool.synthetic.runs import resume_unet

    run_dir = runs["diffusers_unet_ema"]
    newest = max(os.listdir(run_dir), key=lambda d: int(d.split("-")[1]))
    src = shutil.copytree(os.path.join(run_dir, newest), tmp_path / newest)
    for name in ("optimizer.bin", "scheduler.bin", "random_states_0.pkl"):
        os.truncate(src / name, max(m[3] for m in zip_layout(os.path.join(run_dir, newest, name))) + 16)
    assert cli("verify", str(src))[0].exit_code == 1
    fixed = tmp_path / "fixed" / newest
    os.makedirs(fixed.parent)
    result, report = cli("repair", str(src), str(fixed), "--json")
    assert result.exit_code == 0 and report["after"]["ok"], result.output
    assert {f["action"] for f in report["fixes"]} == {"salvage"} and report["lost"] == 0
    listing = sorted(os.path.relpath(os.path.join(d, f), src) for d, _, files in os.walk(src) for f in files)
    assert sorted(os.path.relpath(os.path.join(d, f), fixed) for d, _, files in os.walk(fixed) for f in files) == \
        listing  # scheduler.bin holds no tensor: its object, whole, is what is saved
    resume_unet(str(fixed))
    for name in ("optimizer.bin", "scheduler.bin"):
        a = torch.load(fixed / name, weights_only=True)
        b = torch.load(os.path.join(run_dir, newest, name), weights_only=True)
        assert same(a, b), name

    weights = src / "unet" / "diffusion_pytorch_model.safetensors"
    os.truncate(weights, os.path.getsize(weights) - 1)
    result, report = cli("repair", str(src), str(tmp_path / "partial"), "--json")
    assert result.exit_code == 0 and report["lost"] == 1, result.output
    with pytest.raises(Exception):  # noqa: B017 - diffusers' own error for the missing key, whatever its type
        resume_unet(str(tmp_path / "partial"))


def test_usage_errors_are_one_line_with_the_next_step(tmp_path):
    """What is no checkpoint at all, or a missing --like reference, is exit 2 with one line saying what to give."""
    empty = tmp_path / "empty"
    empty.mkdir()
    for args, expected in ((["repair", str(empty), str(tmp_path / "out")], "point repair at a checkpoint file"),
                           (["repair", str(empty), str(tmp_path / "out"), "--like", str(tmp_path / "nope.pt")],
                            "does not exist")):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2 and expected in result.output, result.output
        assert "Traceback" not in result.output and not (tmp_path / "out").exists()


def test_dst_suffix_decides_the_repaired_files_format_or_nothing_is_written(tmp_path):
    """A cut torch file repaired into `fixed.safetensors` is safetensors (the values torch.load gives of the whole
    file), a cut safetensors file into `.pt` a torch file; a DST with no suffix keeps the input's format, one whose
    suffix names another kind of file is refused before anything is written."""
    whole = {"a": torch.arange(1000.0), "b": torch.ones(7, 3)}
    torch.save(whole, tmp_path / "whole.pt")
    data = (tmp_path / "whole.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[:len(data) - 600])  # the zip directory lost, every storage whole
    result, _ = cli("repair", tmp_path / "cut.pt", tmp_path / "fixed.safetensors")
    assert result.exit_code == 0, result.output
    fixed = load_file(tmp_path / "fixed.safetensors")
    assert fixed.keys() == whole.keys() and all(torch.equal(fixed[k], whole[k]) for k in whole)
    save_file(whole, tmp_path / "whole.safetensors")
    data = (tmp_path / "whole.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:len(data) - 10])  # the last tensor cut
    result, _ = cli("repair", tmp_path / "cut.safetensors", tmp_path / "fixed.pt")
    assert result.exit_code == 0, result.output
    loaded = torch.load(tmp_path / "fixed.pt", weights_only=True)
    assert list(loaded) == ["a"] and torch.equal(loaded["a"], whole["a"])
    result, _ = cli("repair", tmp_path / "cut.pt", tmp_path / "fixed")
    assert result.exit_code == 0 and torch.equal(torch.load(tmp_path / "fixed", weights_only=True)["b"], whole["b"])
    for name in ("fixed.index.json", "fixed.json", "fixed.txt"):  # a name that says another kind of file
        result, _ = cli("repair", tmp_path / "cut.safetensors", tmp_path / name)
        assert result.exit_code == 2 and "suffix" in result.output and not os.path.lexists(tmp_path / name)
