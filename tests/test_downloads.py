"""What people download and load: the wrong thing under a checkpoint's name (a Git LFS pointer, a saved web page, a
JSON error body, text), a Hugging Face cache download that stopped, a run folder where one checkpoint is expected, and
pickles torch 2.6+ refuses by default. Each is named for what it is, with the next step, never "corrupt" with a
number."""

import json
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from ckpttool.formats import misnamed
from tests.helpers import cli, codes

LFS = ("version https://git-lfs.github.com/spec/v1\n"
       "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\nsize 4939353552\n")


@pytest.mark.parametrize("name", ["model.safetensors", "pytorch_model.bin", "model.pt"])
def test_lfs_pointer_names_its_oid_size_and_the_fetch(tmp_path, name):
    path = tmp_path / name
    path.write_text(LFS)
    result, report = cli("verify", "--json", str(path))
    assert result.exit_code == 1 and codes(report, "error") == ["lfs_pointer"]
    message = report["problems"][0]["message"]
    assert "4d7a214614ab" in message and "4,939,353,552 bytes" in message and "git lfs pull" in message


def test_lfs_pointer_inside_a_state_dir_is_named_there(tmp_path):
    folder = tmp_path / "checkpoint-10"
    folder.mkdir()
    save_file({"w": torch.ones(2)}, folder / "model.safetensors")
    (folder / "optimizer.bin").write_text(LFS)
    torch.save({"step": 10}, folder / "scheduler.bin")
    result, report = cli("verify", "--json", str(folder))
    assert result.exit_code == 1 and "lfs_pointer" in codes(report, "error")


@pytest.mark.parametrize("body, said", [
    ("<!DOCTYPE html>\n<html><head><title>Repository Not Found</title></head><body>404</body></html>",
     "a web page titled 'Repository Not Found'"),
    ("<html>\n<body>Access denied</body></html>", "a web page (HTML)"),
    ('{"error": "Repository Not Found for url: https://huggingface.co/x/y/resolve/main/model.pt"}',
     "a JSON body (error: 'Repository Not Found for url"),
    ('{"detail": {"message": "Invalid credentials"}}', "a JSON body (detail: 'Invalid credentials')"),
    ("[1, 2, 3]", "a JSON document"),
    ("model weights are at https://example.com/ckpt.pt\n", "a text file"),
    ("", "an empty file (0 bytes)"),
])
def test_a_page_a_json_body_or_text_says_what_it_is(tmp_path, body, said):
    for name in ("model.safetensors", "model.pt"):
        path = tmp_path / name
        path.write_text(body)
        result, report = cli("verify", "--json", str(path))
        assert result.exit_code == 1 and codes(report, "error") == ["not_a_checkpoint"], report["problems"]
        assert said in report["problems"][0]["message"]


def test_real_checkpoints_are_never_taken_for_text(tmp_path):
    """Every format's first bytes are no text: a safetensors file whose header length begins with `{` (0x7b) and a
    protocol-0 pickle are still read by their readers."""
    import pickle

    path = tmp_path / "odd.safetensors"
    save_file({"w": torch.ones(2)}, path)
    assert not misnamed.detect(str(path))
    with open(tmp_path / "text.pkl", "wb") as f:
        pickle.dump({"step": 3}, f, protocol=0)
    assert not misnamed.detect(str(tmp_path / "text.pkl"))
    torch.save({"w": torch.ones(2)}, tmp_path / "zip.pt")
    assert not misnamed.detect(str(tmp_path / "zip.pt"))
    torch.save({"w": torch.ones(2)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    assert not misnamed.detect(str(tmp_path / "legacy.pt"))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2048))
def test_any_bytes_are_described_or_left_to_the_readers(data):
    """Untrusted bytes: detect never raises, and what it claims is described with one of the two codes."""
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".pt") as f:
        f.write(data)
        f.flush()
        if misnamed.detect(f.name):
            assert misnamed.describe(f.name).code in ("lfs_pointer", "not_a_checkpoint")


def _cache_repo(tmp_path, partial: bytes | None, link: bool):
    """A Hugging Face cache repo `org/tiny` at revision abc123def with a config, and the weights' download stopped
    after `partial` bytes (None: no partial blob); `link`: the snapshot links the weights anyway (a cache copied without
    its blob)."""
    repo = tmp_path / "hub" / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "abc123def"
    snapshot.mkdir(parents=True)
    (repo / "blobs" / "cfg0001").write_text(json.dumps({"model_type": "gpt2"}))
    os.symlink("../../blobs/cfg0001", snapshot / "config.json")
    save_file({"w": torch.ones(1000)}, tmp_path / "whole.safetensors")
    if partial is not None:
        data = (tmp_path / "whole.safetensors").read_bytes()
        (repo / "blobs" / "aaaa1111.1a2b3c4d.incomplete").write_bytes(data[:partial])
    if link:
        os.symlink("../../blobs/aaaa1111", snapshot / "model.safetensors")
    return snapshot


def test_a_cache_download_that_stopped_says_how_much_arrived_and_how_to_finish(tmp_path):
    snapshot = _cache_repo(tmp_path, 2000, link=False)  # huggingface_hub links a file once it is whole
    result, report = cli("verify", "--json", str(snapshot))
    assert result.exit_code == 1 and "incomplete_download" in codes(report, "error")
    message = next(p["message"] for p in report["problems"] if p["code"] == "incomplete_download")
    assert "2,000 of 4,072 bytes" in message and "hf download org/tiny --revision abc123def" in message
    os.symlink("../../blobs/aaaa1111", snapshot / "model.safetensors")  # a link to the blob still being written
    for path in (snapshot, snapshot / "model.safetensors"):
        result, report = cli("verify", "--json", str(path))
        assert result.exit_code == 1 and codes(report, "error") == ["incomplete_download"], report["problems"]
        assert "hf download org/tiny model.safetensors --revision abc123def" in report["problems"][0]["message"]


def test_a_link_to_nothing_without_a_partial_blob_is_missing_file(tmp_path):
    snapshot = _cache_repo(tmp_path, None, link=True)
    result, report = cli("verify", "--json", str(snapshot / "model.safetensors"))
    assert result.exit_code == 1 and codes(report, "error") == ["missing_file"]
    assert "hf download org/tiny model.safetensors" in report["problems"][0]["message"]
    os.symlink(tmp_path / "gone.pt", tmp_path / "link.pt")
    result, report = cli("inspect", "--json", str(tmp_path / "link.pt"))
    assert result.exit_code == 1 and codes(report, "error") == ["missing_file"]


def test_a_run_folder_is_answered_with_its_checkpoints_and_the_commands_for_a_run(tmp_path):
    for step in (20, 40, 60):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        save_file({"w": torch.ones(2)}, folder / "model.safetensors")
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    for command in ("inspect", "verify"):
        result, _ = cli(command, str(tmp_path))
        assert result.exit_code == 2
        assert "checkpoint-60, checkpoint-40, checkpoint-20" in result.output and "ckpttool latest" in result.output
        assert "no checkpoint layout recognised" not in result.output


# --- weights_only, understood: every global outside torch's allow-list is inert data (a warning with the lines that
# let torch load it), a class of the training code only built (a warning: its code must be importable), or code
# (unsafe_pickle, an error) ---

def _pickled_with(tmp_path, name: str, value):
    path = tmp_path / f"{name}.pt"
    torch.save({"model": {"w": torch.ones(2)}, "value": value, "global_step": 1}, path)
    return path


def _own_module():
    """A module of "the training code": importable while saving, not where ckpttool reads."""
    import sys
    import types

    module = types.ModuleType("my_training_code")
    sys.modules["my_training_code"] = module

    class Config:
        pass

    class Runner:
        def __reduce__(self):
            return (Config, ())  # REDUCE: the pickle calls what it names

    Config.__module__ = module.__name__
    Config.__qualname__ = "Config"
    module.Config = Config
    return module, Config, Runner


def test_inert_data_is_a_warning_with_both_lines_naming_every_class(tmp_path):
    import argparse
    import datetime
    import pathlib

    path = _pickled_with(tmp_path, "inert", [argparse.Namespace(lr=0.1), datetime.datetime(2026, 1, 2),
                                             pathlib.PureWindowsPath("C:/runs")])
    result, report = cli("verify", "--json", str(path))
    assert result.exit_code == 0 and codes(report) == ["needs_safe_globals"]
    message = report["problems"][0]["message"]
    names = "argparse.Namespace, datetime.datetime, pathlib.PureWindowsPath"
    assert f"torch.serialization.add_safe_globals([{names}])" in message
    assert f"with torch.serialization.safe_globals([{names}]):" in message


def test_classes_of_the_training_code_are_a_warning_and_calls_an_error(tmp_path):
    import sys

    module, config, runner = _own_module()
    try:
        built = _pickled_with(tmp_path, "built", config())
        called = _pickled_with(tmp_path, "called", runner())
    finally:
        del sys.modules["my_training_code"]
    result, report = cli("verify", "--json", str(built))
    assert result.exit_code == 0 and [(p["code"], p["severity"]) for p in report["problems"]] == [
        ("unsafe_pickle", "warning")]
    assert "my_training_code.Config" in report["problems"][0]["message"] and "importable" in \
        report["problems"][0]["message"]
    result, report = cli("verify", "--json", str(called))  # REDUCE calls it: code, whatever its module
    assert result.exit_code == 1 and codes(report, "error") == ["unsafe_pickle"]


def test_an_installed_class_outside_the_lists_stays_an_error(tmp_path):
    """Only a module that is not importable here counts as the training code's own: a class of an installed package
    that no list knows to be inert stays unsafe_pickle."""
    import string

    path = _pickled_with(tmp_path, "template", string.Template("$step"))
    result, report = cli("verify", "--json", str(path))
    assert result.exit_code == 1 and codes(report, "error") == ["unsafe_pickle"]


def test_the_line_needs_safe_globals_gives_makes_torch_load_the_file(tmp_path):
    """The message's own line, run as it stands (in a fresh interpreter: add_safe_globals is process-wide), lets
    torch.load(weights_only=True) load the file, which it refuses without it: a Namespace with paths and datetimes,
    and numpy RNG state and scalars (whose dtype classes torch checks though no GLOBAL names them)."""
    import argparse
    import datetime
    import pathlib
    import re
    import subprocess
    import sys

    import numpy as np

    files = [_pickled_with(tmp_path, "args", argparse.Namespace(out=pathlib.PosixPath("/runs"),
                                                                 started=datetime.datetime(2026, 1, 2))),
             _pickled_with(tmp_path, "numpy", {"rng": np.random.RandomState(0).get_state(), "lr": np.float64(0.1)})]
    for path in files:
        result, report = cli("verify", "--json", str(path))
        assert result.exit_code == 0 and codes(report) == ["needs_safe_globals"], report["problems"]
        line = re.search(r"`(import [^`]*)`", report["problems"][0]["message"]).group(1)
        load = f"import torch; torch.load({str(path)!r}, weights_only=True)"
        refused = subprocess.run([sys.executable, "-c", load], capture_output=True, text=True)
        assert refused.returncode != 0 and "weights_only" in refused.stderr.lower()
        loaded = subprocess.run([sys.executable, "-c", f"import torch; {line}; {load}"], capture_output=True,
                                text=True)
        assert loaded.returncode == 0, loaded.stderr[-600:]


def _sg(module: str, name: str) -> bytes:
    """STACK_GLOBAL of module.name, its two strings pushed first (protocol 4)."""
    return b"".join(b"\x8c" + bytes([len(s)]) + s.encode() for s in (module, name)) + b"\x93"


def _runs(path, marker) -> bool:
    """Whether pickle.load of the file (as torch.load(weights_only=False) does first) writes `marker`: the payload is
    real, run in a fresh interpreter whose __main__ holds a class Cfg."""
    import subprocess
    import sys

    code = (f"import pickle, os\nclass Cfg: pass\ntry:\n    pickle.load(open({str(path)!r}, 'rb'))\nexcept Exception:"
            "\n    pass\n")
    subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    return os.path.exists(marker)


@pytest.mark.parametrize("kind", ["dotted_exec", "setstate_by_build", "package_attribute_path"])
def test_a_class_only_built_cannot_smuggle_a_call(tmp_path, kind):
    """Attack pass on the three kinds: a name reaching past its module (`__main__` then `__builtins__.exec`, a package
    then `os.system`), or a BUILD that sets `__setstate__` so the next BUILD calls it, runs code with no REDUCE: it
    stays unsafe_pickle, an error."""
    marker = tmp_path / "ran"
    code = f"open({str(marker)!r}, 'w').write('x')"
    call = b"\x8c" + bytes([len(code)]) + code.encode() + b"b"  # a second BUILD: its state goes to __setstate__
    if kind == "dotted_exec":
        body = _sg("__main__", "Cfg") + b")\x81N}\x8c\x0c__setstate__" + _sg("__main__", "__builtins__.exec") + \
            b"s\x86b" + call
    elif kind == "setstate_by_build":
        body = _sg("__main__", "Cfg") + b")\x81N}\x8c\x0c__setstate__" + _sg("builtins", "exec") + b"s\x86b" + call
    else:
        body = _sg("mytrainer_not_installed", "os.system") + b"\x8c\x04true\x85R"
    path = tmp_path / "payload.pt"
    path.write_bytes(b"\x80\x04" + body + b".")
    if kind != "package_attribute_path":
        assert _runs(path, marker)
    result, report = cli("verify", "--json", str(path))
    assert result.exit_code == 1 and "unsafe_pickle" in codes(report, "error"), report["problems"]


def test_pickles_the_resume_never_loads_are_scanned_in_every_protocol(tmp_path):
    """An extra file in a state dir, as protocol 0 (no PROTO opcode to start it) or naming os through another module
    (`pathlib` then `os.system`), is an unsafe_pickle error; so is a protocol-0 pickle named as a checkpoint (never
    taken for text)."""
    from tests.helpers import state_dir

    run = tmp_path / "checkpoint-2"
    state_dir(str(run), 2)
    (run / "config.pkl").write_bytes(b"cos\nsystem\n(S'true'\ntR.")
    result, report = cli("verify", "--json", "--for-resume", str(run))
    assert result.exit_code == 1 and "unsafe_pickle" in codes(report, "error")
    (run / "config.pkl").write_bytes(b"\x80\x04" + _sg("pathlib", "os.system") + b"\x8c\x04true\x85R.")
    result, report = cli("verify", "--json", "--for-resume", str(run))
    assert result.exit_code == 1 and "unsafe_pickle" in codes(report, "error")
    (tmp_path / "p0.pt").write_bytes(b"cos\nsystem\n(S'true'\ntR." + b" " * 2000)
    result, report = cli("verify", "--json", str(tmp_path / "p0.pt"))
    assert result.exit_code == 1 and codes(report, "error") == ["unsafe_pickle"]


def test_a_dcp_item_too_large_to_unpickle_is_still_scanned(tmp_path):
    import torch.distributed.checkpoint as dcp

    class Payload:
        def __reduce__(self):
            return (os.system, ("true",))

    dcp.save({"model": {"w": torch.ones(2)}, "extra": [Payload(), "A" * (2 << 20)]},
             checkpoint_id=str(tmp_path / "big"), no_dist=True)
    result, report = cli("verify", "--json", str(tmp_path / "big"))
    assert result.exit_code == 1 and "unsafe_pickle" in codes(report, "error")
