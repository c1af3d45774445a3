import json
import struct

import pytest
import torch
from safetensors.torch import load_file

from ckpttool.checkpoint import open_checkpoint
from ckpttool.errors import CkptError
from ckpttool.formats import safetensors
from ckpttool.tensors import load_tensor


def write_raw(path, header, body=b""):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)
    return str(path)


def test_reads_header_metadata_and_tensors(corpus):
    ckpt = open_checkpoint(corpus["safetensors"])
    assert ckpt.format == "safetensors"
    assert ckpt.metadata == {"format": "pt", "step": "3"}
    expected = load_file(corpus["safetensors"])
    tensors = {t.name: t for t in ckpt.model.tensors}
    assert set(tensors) == set(expected)
    for name, value in expected.items():
        assert tensors[name].shape == tuple(value.shape)
        assert torch.equal(load_tensor(tensors[name]), value)


@pytest.mark.parametrize("fixture,code", [
    ("safetensors_truncated", "truncated"),
    ("safetensors_overlap", "corrupt"),
    ("safetensors_absurd_header", "corrupt"),
    ("safetensors_bad_json", "corrupt"),
])
def test_broken_files_raise_their_code(corpus, fixture, code):
    with pytest.raises(CkptError) as err:
        safetensors.read(corpus[fixture])
    assert err.value.code == code
    assert err.value.path == corpus[fixture]


def test_absurd_header_is_not_read(corpus):
    with pytest.raises(CkptError, match="exceeds"):
        safetensors.read_header(corpus["safetensors_absurd_header"])


@pytest.mark.parametrize("header,body,code,match", [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, "truncated", "cut short"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8, "corrupt", "follow the last"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, "corrupt", "contiguous"),
    ({"a": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, "corrupt", "unknown dtype"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4, "corrupt", "needs 8"),
    ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, "corrupt", "invalid shape"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, b"\0" * 4, "corrupt", "invalid data_offsets"),
    ({"__metadata__": {"k": 1}}, b"", "corrupt", "strings"),
    ([1, 2], b"", "corrupt", "not a JSON object"),
])
def test_header_validation(tmp_path, header, body, code, match):
    path = write_raw(tmp_path / "x.safetensors", header, body)
    with pytest.raises(CkptError, match=match) as err:
        safetensors.read_header(path)
    assert err.value.code == code


def test_empty_and_zero_size_tensors(tmp_path):
    path = write_raw(tmp_path / "z.safetensors", {"e": {"dtype": "F16", "shape": [0, 3], "data_offsets": [0, 0]},
                                                  "b": {"dtype": "BOOL", "shape": [2], "data_offsets": [0, 2]}},
                     b"\x01\x00")
    tensors, _, _ = safetensors.read_header(path)
    assert {t.name: t.nbytes for t in tensors} == {"e": 0, "b": 2}
    assert load_tensor(tensors[0]).shape == (0, 3)


def test_shorter_than_length_prefix(tmp_path):
    (tmp_path / "s.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(CkptError) as err:
        safetensors.read_header(str(tmp_path / "s.safetensors"))
    assert err.value.code == "truncated"
