import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from ckpttool.cli import main
from tests.conftest import run_json

CONTRACT_FIELDS = {"format", "step", "tensors", "parameters", "bytes", "quantization", "problems"}


@pytest.fixture
def runner():
    return CliRunner()


@pytest.mark.parametrize("fixture", ["safetensors", "torch_training", "torch_legacy", "torch_cuda", "sharded",
                                     "accelerate", "accelerate_bin", "accelerate_auto", "diffusers", "diffusers_lora",
                                     "kohya_state", "simpletuner", "dcp", "fsdp", "family", "quanto_qint4",
                                     "torch_numpy_rng"])
def test_good_fixtures_inspect_clean(runner, corpus, fixture):
    """No problem but, for a custom training dict holding numpy RNG state, the warning that torch's default
    weights_only load refuses numpy (with the line that lets it)."""
    result, report = run_json(runner, ["inspect", "--json", corpus[fixture]])
    assert result.exit_code == 0, result.output
    assert CONTRACT_FIELDS <= set(report)
    assert [p["code"] for p in report["problems"]] == (["needs_safe_globals"] if fixture == "torch_numpy_rng" else [])
    assert report["tensors"] > 0 and report["parameters"] > 0 and report["bytes"] > 0


@pytest.mark.parametrize("fixture,code", [
    ("safetensors_truncated", "truncated"), ("safetensors_overlap", "corrupt"),
    ("safetensors_absurd_header", "corrupt"), ("torch_truncated", "truncated"), ("torch_bad_pickle", "corrupt"),
    ("sharded_missing", "missing_file"), ("family_missing_member", "missing_file"),
    ("dcp_missing_data", "missing_file"), ("diffusers_truncated_newest", "truncated"),
    ("torch_malicious", "unsafe_pickle"),
])
def test_broken_fixtures_exit_1_with_code(runner, corpus, fixture, code, no_payload):
    result, report = run_json(runner, ["inspect", "--json", corpus[fixture]])
    assert result.exit_code == 1
    assert code in [p["code"] for p in report["problems"]]
    assert all({"code", "severity", "message"} <= set(p) for p in report["problems"])
    assert "Traceback" not in result.output


def test_json_step_and_contract_values(runner, corpus):
    _, report = run_json(runner, ["inspect", "--json", corpus["kohya_state"]])
    assert report["format"] == "accelerate" and report["step"] == 3 and report["epoch"] == 1
    assert report["tensors"] == 6 and report["quantization"] is None
    _, report = run_json(runner, ["inspect", "--json", corpus["torch_step_mismatch"]])
    assert report["step"] == 10  # the training dict's own global_step wins; verify compares the others


def test_human_output_has_tables(runner, corpus):
    result = runner.invoke(main, ["inspect", corpus["kohya_state"]])
    assert result.exit_code == 0
    for text in ("kohya -state dir", "Step sources:", "train_state.json current_step", "Components:", "optimizer",
                 "Problems: none"):
        assert text in result.stdout


def test_tensor_listing_and_filter(runner, corpus):
    result, report = run_json(runner, ["inspect", "--json", "--tensors", "--filter", r"linear_1\.", corpus["torch_training"]])
    assert result.exit_code == 0
    assert {t["name"] for t in report["tensor_list"]} == {"linear_1.weight", "linear_1.bias"}
    text = runner.invoke(main, ["inspect", "--tensors", corpus["safetensors"]]).stdout
    assert "embed.weight" in text and "10x16" in text


def test_usage_errors_exit_2(runner, corpus, tmp_path):
    assert runner.invoke(main, ["inspect", str(tmp_path / "missing.pt")]).exit_code == 2
    assert runner.invoke(main, ["inspect", "--bogus", corpus["safetensors"]]).exit_code == 2
    bad_regex = runner.invoke(main, ["inspect", "--filter", "(", corpus["safetensors"]])
    assert bad_regex.exit_code == 2 and "--filter" in bad_regex.output
    (tmp_path / "empty_dir").mkdir()
    result = runner.invoke(main, ["inspect", str(tmp_path / "empty_dir")])
    assert result.exit_code == 2 and "no checkpoint layout" in result.stderr
    (tmp_path / "notes.txt").write_text("hi")
    assert runner.invoke(main, ["inspect", str(tmp_path / "notes.txt")]).exit_code == 2


def test_malicious_pickles_never_run_under_any_command(runner, corpus, no_payload):
    for fixture in ("torch_malicious", "pickle_malicious"):
        for args in (["inspect"], ["inspect", "--json"], ["inspect", "--tensors"]):
            runner.invoke(main, args + [corpus[fixture]])


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "ckpttool", *args], capture_output=True, text=True)


def test_subprocess_errors_are_one_line(corpus):
    proc = run_cli("inspect", corpus["safetensors_truncated"])
    assert proc.returncode == 1 and "Traceback" not in proc.stderr + proc.stdout
    assert "truncated" in proc.stdout


@pytest.mark.parametrize("fixture", ["safetensors", "sharded", "dcp"])
def test_header_only_inspect_does_not_import_torch(corpus, fixture):
    code = ("import sys, runpy; sys.argv = ['ckpttool', 'inspect', '--json', %r]\n"
            "try:\n    runpy.run_module('ckpttool', run_name='__main__')\nexcept SystemExit as e:\n"
            "    assert e.code == 0, e.code\nassert 'torch' not in sys.modules, 'torch was imported'\n") % corpus[fixture]
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_inspect_does_not_change_input(runner, corpus):
    path = corpus["torch_training"]
    before = (os.path.getmtime(path), open(path, "rb").read())
    runner.invoke(main, ["inspect", path])
    assert (os.path.getmtime(path), open(path, "rb").read()) == before
    assert json.loads(runner.invoke(main, ["inspect", "--json", path]).stdout)["format"] == "torch"
