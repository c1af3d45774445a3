import argparse
import os
import pickle
import zipfile

import pytest
import torch

from ckpttool.checkpoint import open_checkpoint
from ckpttool.errors import CkptError
from ckpttool.formats import torchfile
from ckpttool.formats.pickles import unpickle
from ckpttool.tensors import load_tensor
from tests.helpers import cli


def assert_tensors_match(component, expected: dict):
    got = {t.name: t for t in component.tensors}
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert got[name].dtype == str(value.dtype).removeprefix("torch.")
        assert torch.equal(load_tensor(got[name]), value), name


def test_zip_state_dict_tensors_load_exactly(corpus):
    ckpt = open_checkpoint(corpus["torch_state_dict"])
    assert (ckpt.format, ckpt.layout) == ("torch", "torch zip")
    assert_tensors_match(ckpt.model, torch.load(corpus["torch_state_dict"], weights_only=True))


def test_legacy_format(corpus):
    ckpt = open_checkpoint(corpus["torch_legacy"])
    assert ckpt.layout == "torch legacy"
    assert_tensors_match(ckpt.model, torch.load(corpus["torch_legacy"], weights_only=True))


def test_training_dict_is_split_into_components_with_steps(corpus):
    ckpt = open_checkpoint(corpus["torch_training"])
    roles = {c.name: c.role for c in ckpt.components}
    assert roles == {"model": "model", "optimizer": "optimizer", "scheduler": "scheduler"}
    sources = {s.source: (s.kind, s.value) for s in ckpt.steps}
    assert sources["training dict 'global_step'"] == ("step", 3)
    assert sources["training dict 'epoch'"] == ("epoch", 1)
    assert sources["optimizer state step"] == ("step", 3)
    assert sources["scheduler last_epoch"] == ("step", 3)
    loaded = torch.load(corpus["torch_training"], weights_only=True)
    assert_tensors_match(ckpt.model, loaded["model_state_dict"])
    opt_names = {t.name for t in ckpt.component("optimizer").tensors}
    assert "state.0.exp_avg" in opt_names and "state.0.step" in opt_names


def test_cuda_saved_file_reads_on_cpu(corpus):
    path = corpus["torch_cuda"]
    with zipfile.ZipFile(path) as z:
        assert b"cuda:0" in z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    ckpt = open_checkpoint(path)
    assert ckpt.metadata["saved_on_devices"] == ["cuda:0"]
    assert {t.location.device for t in ckpt.model.tensors} == {"cuda:0"}
    expected = torch.load(path, map_location="cpu", weights_only=True)["model"]
    assert_tensors_match(ckpt.model, expected)
    assert [s.value for s in ckpt.steps if s.source == "training dict 'step'"] == [3]


def test_tied_weights_share_one_storage(corpus):
    ckpt = open_checkpoint(corpus["torch_tied"])
    by_name = {t.name: t for t in ckpt.model.tensors}
    assert by_name["embed.weight"].storage_key == by_name["head.weight"].storage_key
    weights = torch.load(corpus["torch_tied"], weights_only=True)
    unique = {w.untyped_storage().data_ptr(): w.untyped_storage().nbytes() for w in weights.values()}
    assert ckpt.model.nbytes == sum(unique.values())


def test_views_and_fp8_bf16(tmp_path):
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    sd = {"t": base.t(), "slice": base[1:, 2:], "bf16": torch.randn(5).to(torch.bfloat16),
          "fp8": torch.randn(4, 4).to(torch.float8_e4m3fn), "scalar": torch.tensor(7, dtype=torch.int64)}
    torch.save(sd, tmp_path / "v.pt")
    ckpt = open_checkpoint(str(tmp_path / "v.pt"))
    got = {t.name: load_tensor(t) for t in ckpt.model.tensors}
    for name, value in sd.items():
        assert got[name].dtype == value.dtype
        assert torch.equal(got[name].float(), value.float()), name


@pytest.mark.parametrize("fixture,code", [("torch_truncated", "truncated"), ("torch_legacy_truncated", "truncated"),
                                          ("torch_bad_pickle", "corrupt")])
def test_broken_torch_files(corpus, fixture, code):
    with pytest.raises(CkptError) as err:
        torchfile.read(corpus[fixture])
    assert err.value.code == code


def test_missing_storage_record_is_corrupt(corpus, tmp_path):
    src = corpus["torch_state_dict"]
    dst = tmp_path / "nostorage.pt"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            if not item.filename.endswith("data/0"):
                zout.writestr(item, zin.read(item.filename))
    with pytest.raises(CkptError, match="missing") as err:
        torchfile.read(str(dst))
    assert err.value.code == "corrupt"


def test_unsafe_globals_named_and_never_run(corpus, no_payload):
    ckpt = open_checkpoint(corpus["torch_malicious"])
    problem = next(p for p in ckpt.problems if p.code == "unsafe_pickle")
    assert problem.severity == "error" and "posix.system" in problem.message
    assert ckpt.model and len(ckpt.model.tensors) == 6  # the weights are still listed
    plain = open_checkpoint(corpus["pickle_malicious"])
    assert [p.code for p in plain.problems] == ["unsafe_pickle"]


def test_argparse_namespace_is_a_warning_with_the_line_that_loads_it(corpus):
    """An inert data class is refused by torch.load(weights_only=True) but runs nothing: a warning naming the exact
    add_safe_globals line, never unsafe_pickle; and that line does let torch load the file."""
    ckpt = open_checkpoint(corpus["torch_argparse"])
    assert [(p.code, p.severity) for p in ckpt.problems] == [("needs_safe_globals", "warning")]
    line = ckpt.problems[0].message.split("`")[1]
    assert line == "import argparse; torch.serialization.add_safe_globals([argparse.Namespace])"
    with pytest.raises(pickle.UnpicklingError):
        torch.load(corpus["torch_argparse"], weights_only=True)
    with torch.serialization.safe_globals([argparse.Namespace]):
        assert torch.load(corpus["torch_argparse"], weights_only=True)["args"].lr == 0.1
    result, _ = cli("verify", corpus["torch_argparse"])
    assert result.exit_code == 0 and "add_safe_globals([argparse.Namespace])" in result.output


def test_numpy_rng_state_is_read_with_the_line_that_lets_torch_load_it(corpus):
    """numpy RNG state is plain data: read, never an error; torch's default weights_only load refuses it, so the one
    warning names its globals and the dtype classes torch checks (numpy.dtypes.UInt32DType for the key array)."""
    ckpt = open_checkpoint(corpus["torch_numpy_rng"])
    assert [p.code for p in ckpt.problems] == ["needs_safe_globals"]
    assert "numpy.dtypes.UInt32DType" in ckpt.problems[0].message
    assert "numpy._core.multiarray._reconstruct" in ckpt.pickle_globals or \
        "numpy.core.multiarray._reconstruct" in ckpt.pickle_globals


def test_safe_unpickler_builds_nothing_it_names(no_payload):
    class Boom:
        def __reduce__(self):
            return (os.system, ("exit 3",))

    obj, unpickler = unpickle(pickle.dumps({"x": [Boom(), 1]}, protocol=4))
    assert unpickler.unsafe_globals == ["posix.system"]
    assert type(obj["x"][0]).__name__ == "system" and obj["x"][1] == 1


def test_pickled_module_is_walked_like_a_state_dict(tmp_path):
    torch.save(torch.nn.Linear(3, 2), tmp_path / "m.pt")
    ckpt = open_checkpoint(str(tmp_path / "m.pt"))
    assert {t.name for t in ckpt.model.tensors} == {"weight", "bias"}
    assert any(p.code == "unsafe_pickle" and "torch.nn.modules.linear.Linear" in p.message for p in ckpt.problems)
