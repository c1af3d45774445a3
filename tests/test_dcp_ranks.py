"""DCP dirs written by several ranks under torchrun: chunked (sharded) tensors read tensor by tensor, equal to
torch's own dcp_to_torch_save bit for bit."""

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import cli

LAYOUTS = {"2 ranks, Shard(0)/Shard(1)": (2, []), "4 ranks, 2x2 mesh": (4, ["2", "2"])}


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def written(request, tmp_path_factory):
    ranks, mesh = LAYOUTS[request.param]
    out = str(tmp_path_factory.mktemp("dcp") / "ckpt")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
                           "--master_port", str(29400 + 7 * ranks), "-m", "fixtures.dcp_ranks", out, *mesh],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return out, torch.load(out + ".reference.pt", weights_only=True)


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
        result, _ = cli("convert", out, str(tmp_path / target))
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
    assert doc["values"] == {"equal": 4, "close": [], "different": []}


def test_a_missing_rank_file_is_named(written, tmp_path):
    import shutil

    out, _ = written
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    os.remove(copy / "__1_0.distcp")
    result, doc = cli("verify", str(copy), "--json")
    assert not doc["ok"] and "missing_file" in [p["code"] for p in doc["problems"]]
    assert any("__1_0.distcp" in p["message"] for p in doc["problems"])


def test_chunks_that_do_not_cover_the_tensor_are_corrupt(written, tmp_path):
    """A .metadata that lost one chunk of a sharded tensor: named, `corrupt`, never a half-filled tensor."""
    import pickle
    import shutil

    import torch.distributed.checkpoint  # noqa: F401 - the classes our own fixture's .metadata pickles

    out, _ = written
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    with open(copy / ".metadata", "rb") as f:
        meta = pickle.load(f)  # trusted: written by the fixture above
    dropped = next(i for i in meta.storage_data if i.fqn == "model.layer.weight" and any(i.offset))
    del meta.storage_data[dropped]
    with open(copy / ".metadata", "wb") as f:
        pickle.dump(meta, f)
    result, doc = cli("inspect", str(copy), "--json")
    assert result.exit_code == 1 and [p["code"] for p in doc["problems"]] == ["corrupt"]
    assert "chunks of 'model.layer.weight' do not cover" in doc["problems"][0]["message"]
