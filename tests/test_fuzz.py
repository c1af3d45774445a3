"""Mutated real files must only ever raise the toolkit's own error type."""

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckpttool.errors import CkptError
from ckpttool.formats import safetensors, torchfile
from ckpttool.formats.pickles import unpickle

FUZZ = settings(max_examples=int(__import__("os").environ.get("FUZZ_EXAMPLES", "150")), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def mutate(data: bytes, edits) -> bytes:
    out = bytearray(data)
    for pos, value in edits:
        if out:
            out[pos % len(out)] = value
    return bytes(out)


def read_or_ckpterror(fn, path):
    try:
        fn(path)
    except CkptError:
        pass


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=8),
       cut=st.integers(0, 10**6))
def test_safetensors_header_parser(corpus, tmp_path, edits, cut):
    data = open(corpus["safetensors"], "rb").read()
    (n,) = struct.unpack("<Q", data[:8])
    # aim the edits at the header, where the parser works
    header_edits = [(pos % (n + 8), value) for pos, value in edits]
    mutated = mutate(data, header_edits)
    mutated = mutated[: len(mutated) - (cut % 64)] if cut % 3 == 0 else mutated
    path = tmp_path / "m.safetensors"
    path.write_bytes(mutated)
    read_or_ckpterror(safetensors.read, str(path))


@FUZZ
@given(header=st.dictionaries(st.text(max_size=8), st.recursive(
    st.none() | st.booleans() | st.integers(-2, 2**40) | st.text(max_size=6),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.sampled_from(
        ["dtype", "shape", "data_offsets", "x"]), children, max_size=3), max_leaves=8), max_size=4),
       body=st.binary(max_size=64))
def test_safetensors_structured_headers(tmp_path, header, body):
    import json
    raw = json.dumps(header).encode()
    path = tmp_path / "h.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)
    read_or_ckpterror(safetensors.read, str(path))


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=6))
def test_pickle_reader_on_mutated_data_pkl(corpus, edits):
    import zipfile
    with zipfile.ZipFile(corpus["torch_training"]) as z:
        data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    try:
        unpickle(mutate(data, edits))
    except CkptError:
        pass


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=6),
       which=st.sampled_from(["torch_training", "torch_legacy", "torch_cuda", "pickle_malicious"]))
def test_torch_reader_on_mutated_files(corpus, tmp_path, no_payload, edits, which):
    data = open(corpus[which], "rb").read()
    path = tmp_path / "m.pt"
    path.write_bytes(mutate(data, edits))
    read_or_ckpterror(torchfile.read, str(path))


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=6))
def test_dcp_metadata_reader_on_mutated_files(corpus, tmp_path_factory, edits):
    import os
    import shutil

    from ckpttool.formats import dcp
    folder = tmp_path_factory.mktemp("dcp")
    shutil.rmtree(folder)
    shutil.copytree(corpus["dcp"], folder)
    meta = os.path.join(folder, ".metadata")
    data = open(meta, "rb").read()
    open(meta, "wb").write(mutate(data, edits))
    read_or_ckpterror(dcp.read, str(folder))


@FUZZ
@given(doc=st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                        lambda c: st.lists(c, max_size=3) | st.dictionaries(st.sampled_from(
                            ["weight_map", "metadata", "total_size", "a.weight"]), c, max_size=3), max_leaves=10))
def test_sharded_index_reader(tmp_path_factory, doc):
    import json

    from ckpttool.formats import sharded
    folder = tmp_path_factory.mktemp("idx")
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps(doc))
    read_or_ckpterror(sharded.read, str(index))


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                                         max_size=4), max_leaves=12)
STATE_KEYS = st.sampled_from(["global_step", "epoch", "current_step", "current_epoch", "epoch_step", "repeats"])


@FUZZ
@given(files=st.dictionaries(st.sampled_from(["trainer_state.json", "training_state.json", "train_state.json",
                                              "training_state-rank1.json"]),
                             st.dictionaries(STATE_KEYS, JSON_VALUES, max_size=4) | JSON_VALUES, min_size=1,
                             max_size=3),
       loops=JSON_VALUES)
def test_trainer_state_files_and_lightning_loops(corpus, tmp_path_factory, files, loops):
    """The trainer profiles read state JSON files and Lightning's `loops` from untrusted files: whatever they hold,
    inspect and verify report, never raise."""
    import json
    import shutil

    import torch

    from ckpttool.operations.inspect import inspect
    from ckpttool.operations.verify import verify

    folder = tmp_path_factory.mktemp("state") / "checkpoint-3"
    shutil.copytree(corpus["accelerate"], folder)
    for name, doc in files.items():
        (folder / name).write_text(json.dumps(doc))
    for run in (inspect, lambda p: verify(p, for_resume=True)):
        run(str(folder))
    ckpt = folder.parent / "x.ckpt"
    torch.save({"pytorch-lightning_version": "2.6", "global_step": 3, "state_dict": {"w": torch.ones(1)},
                "loops": loops, "optimizer_states": [], "lr_schedulers": []}, ckpt)
    for run in (inspect, lambda p: verify(p, for_resume=True)):
        run(str(ckpt))


def _read_all(path):
    """Open a checkpoint and load every tensor it lists, as convert and verify --finite would."""
    from ckpttool.checkpoint import open_checkpoint
    from ckpttool.tensors import load_tensor

    for comp in open_checkpoint(path).components:
        for t in comp.tensors:
            if t.readable:
                load_tensor(t)


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=6),
       cut=st.integers(0, 10**6))
def test_dcp_data_files_with_items_and_pieces(corpus, tmp_path_factory, edits, cut):
    """Damaged .distcp bytes: non-tensor items are unpickled safely, tensor pieces read from their own archives."""
    import os
    import shutil

    folder = tmp_path_factory.mktemp("dcp")
    shutil.rmtree(folder)
    shutil.copytree(corpus["dcp"], folder)
    data_file = os.path.join(folder, "__0_0.distcp")
    data = mutate(open(data_file, "rb").read(), edits)
    open(data_file, "wb").write(data[: max(1, cut % (len(data) + 1))] if cut % 3 == 0 else data)
    read_or_ckpterror(_read_all, str(folder))


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=6),
       which=st.sampled_from([f"zero_pp_rank_{rank}_mp_rank_00_{kind}_states.pt" for rank in (0, 1)
                              for kind in ("model", "optim")]))
def test_deepspeed_rank_files(tmp_path_factory, edits, which):
    """Damaged DeepSpeed rank files: the consolidation never reads outside a partition or trusts a bad count."""
    import os
    import shutil

    folder = tmp_path_factory.mktemp("ds")
    shutil.rmtree(folder)
    shutil.copytree(os.path.join(os.path.dirname(__file__), "data", "deepspeed", "zero3", "global_step5"), folder)
    target = os.path.join(folder, which)
    open(target, "wb").write(mutate(open(target, "rb").read(), edits))
    read_or_ckpterror(_read_all, str(folder))
