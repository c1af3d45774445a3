"""Start-up: a command imports what it needs and nothing more (the timings are in benchmarks/bench_startup.py; no
timed asserts here). Each command runs in a fresh interpreter that reports the modules it ended with."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from tests.helpers import cli

PROBE = """
import json, sys
sys.argv = ["ckpttool"] + json.loads(sys.argv[1])
from ckpttool.cli import main
try:
    main()
except SystemExit:
    pass
with open({out!r}, "w") as f:
    json.dump(sorted(sys.modules), f)
"""
READERS = ["ckpttool.formats.deepspeed", "ckpttool.formats.dcp", "ckpttool.formats.pretrained",
           "ckpttool.formats.torchfile", "ckpttool.formats.pickles"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    save_file({"w": torch.zeros(4, 4)}, folder / "tiny.safetensors")
    torch.save({"w": torch.zeros(4, 4)}, folder / "tiny.pt")
    return folder


def imported(tmp_path, *args) -> set[str]:
    out = tmp_path / "modules.json"
    subprocess.run([sys.executable, "-c", PROBE.format(out=str(out)), json.dumps([str(a) for a in args])],
                   check=True, capture_output=True, env={"CKPTTOOL_CACHE_DIR": "", "PATH": "/usr/bin:/bin"})
    return set(json.loads(out.read_text()))


@pytest.mark.parametrize("args,absent", [
    (["--help"], ["torch", "numpy", "tabulate", "ckpttool.formats", "ckpttool.trainers"]),
    (["inspect", "tiny.safetensors"], ["torch", "numpy", "ckpttool.trainers.deepspeed", "ckpttool.trainers.contract"]
     + READERS),
    (["inspect", "--json", "tiny.safetensors"], ["torch", "numpy", "tabulate"] + READERS),
    (["inspect", "tiny.pt"], ["torch", "numpy", "ckpttool.formats.deepspeed", "ckpttool.formats.dcp",
                              "ckpttool.formats.pretrained", "ckpttool.trainers.deepspeed",
                              "ckpttool.trainers.contract", "ckpttool.formats.statedir"]),
    (["verify", "tiny.safetensors"], ["torch", "numpy", "ckpttool.trainers.deepspeed"] + READERS),
    (["verify", "tiny.pt"], ["torch", "numpy", "ckpttool.formats.deepspeed", "ckpttool.formats.dcp",
                             "ckpttool.trainers.contract"]),
])
def test_a_command_imports_only_what_it_needs(tiny, tmp_path, args, absent):
    modules = imported(tmp_path, *[tiny / a if a.startswith("tiny") else a for a in args])
    assert "ckpttool.cli" in modules
    assert sorted(m for m in absent if m in modules) == []


def test_several_paths_in_one_call(tiny, corpus):
    result, _ = cli("inspect", tiny / "tiny.pt", tiny / "tiny.safetensors", corpus["diffusers_truncated_newest"])
    assert result.exit_code == 1 and "tiny.safetensors" in result.output and "truncated (error)" in result.output
    result = cli("inspect", "--json", tiny / "tiny.pt", tiny / "tiny.safetensors")[0]
    assert [r["format"] for r in json.loads(result.output)] == ["torch", "safetensors"]
    result, _ = cli("verify", tiny / "tiny.pt", corpus["diffusers_truncated_newest"])
    assert result.exit_code == 1 and "1 of 2 verified, 1 FAILED" in result.output
    result = cli("verify", "--json", tiny / "tiny.pt", tiny / "tiny.safetensors")[0]
    assert result.exit_code == 0 and [r["ok"] for r in json.loads(result.output)] == [True, True]
