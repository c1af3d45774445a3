"""Commands that read tensor data show a progress bar (bytes, rate, ETA) on a terminal, none with --json or piped."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from ckpttool import hashing
from ckpttool.cli import main
from ckpttool.operations import manifest


@pytest.fixture
def terminal(monkeypatch):
    """As on a terminal: ckpttool's own check, and click's (which would otherwise print the label alone)."""
    import click._termui_impl

    monkeypatch.setattr(hashing, "_terminal", lambda: True)
    monkeypatch.setattr(click._termui_impl, "isatty", lambda stream: True)
    monkeypatch.setattr(hashing, "PROGRESS_MIN_BYTES", 0)


@pytest.fixture
def files(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file({"w": torch.randn(256, 256)}, a)
    save_file({"w": torch.randn(256, 256)}, b)
    manifest.write(str(a))
    return str(a), str(b), str(tmp_path / "out.safetensors")


def _commands(a, b, out):
    return [("inspect", "--stats", a), ("verify", a), ("diff", "--values", a, b), ("average", a, b, out, "--force"),
            ("convert", "--force", a, out)]


def test_bar_on_a_terminal(terminal, files):
    runner = CliRunner()
    for args in _commands(*files):
        result = runner.invoke(main, list(args))
        assert result.exit_code in (0, 1), (args, result.output)
        assert "/s" in result.stderr and " of " in result.stderr, args  # bytes done of total, rate


def test_no_bar_with_json(terminal, files):
    runner = CliRunner()
    for args in _commands(*files):
        if args[0] == "average" or args[0] == "convert":
            args = args + ("--json",)
        else:
            args = (args[0], "--json") + args[1:]
        result = runner.invoke(main, list(args))
        assert "/s" not in result.stderr, args


def test_no_bar_when_piped(monkeypatch, files):
    monkeypatch.setattr(hashing, "PROGRESS_MIN_BYTES", 0)  # CliRunner's stderr is not a terminal
    result = CliRunner().invoke(main, ["inspect", "--stats", files[0]])
    assert result.exit_code == 0 and result.stderr == ""
