"""diff --plot and report --html: the files are produced from fixtures, name every module and checkpoint, need only the
plot extra, and the report page opens in a real headless browser."""

from __future__ import annotations

import builtins
import json
import os
import shutil
import subprocess

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from ckpttool import charts
from ckpttool.cli import main
from ckpttool.operations.diff import diff
from ckpttool.operations.report import report


@pytest.fixture
def changed(tmp_path, corpus):
    """The corpus model as a .pt (which keeps the model's key order; safetensors sorts its keys), and a copy whose
    linear_1 moved a little and whose head moved a lot."""
    from fixtures.generate import TinyNet

    state = {k: v.detach().clone() for k, v in TinyNet().state_dict().items()}
    moved = {k: v + (0.001 if k.startswith("linear_1") else 0.5 if k.startswith("head") else 0) * torch.ones_like(v)
             for k, v in state.items()}
    a, b = str(tmp_path / "a.pt"), str(tmp_path / "b.safetensors")
    torch.save(state, a)
    save_file(moved, b)
    return a, b


def test_diff_plot_png_names_every_module(tmp_path, changed):
    a, b = changed
    out = tmp_path / "change.png"
    result = CliRunner().invoke(main, ["diff", "--values", "--plot", str(out), a, b])
    assert result.exit_code == 1 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    modules = diff(a, b, values=True, module_depth=2).values["modules"]
    assert diff(a, b, values=True).values["modules"] is None  # only asked for: it measures equal tensors too
    text = CliRunner().invoke(main, ["diff", "--values", "--by-module", a, b]).stdout
    assert "Change per module" in text and "linear_2" in text
    assert [m["module"] for m in modules] == ["embed", "linear_1", "linear_2", "head"]  # model order
    by = {m["module"]: m for m in modules}
    assert by["head"]["rel_change"] > by["linear_1"]["rel_change"] > 0 == by["embed"]["rel_change"]
    assert by["linear_2"]["changed"] == 0 and by["linear_1"]["changed"] == 2 and by["head"]["changed"] == 1
    _, labels = charts.module_change_chart(modules, "t")
    assert labels == [m["module"] for m in modules]


def test_diff_plot_html_is_self_contained(tmp_path, changed):
    a, b = changed
    out = tmp_path / "change.html"
    assert CliRunner().invoke(main, ["diff", "--values", "--plot", str(out), a, b]).exit_code == 1
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>") and "data:image/png;base64," in page
    assert "<script" not in page and "http" not in page.replace("http-equiv", "")
    for module in ("embed", "linear_1", "linear_2", "head"):
        assert f"<td>{module}</td>" in page
    assert "head.weight" in page  # the changed tensors' table


def test_missing_matplotlib_names_the_extra(tmp_path, changed, monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    out = tmp_path / "change.png"
    result = CliRunner().invoke(main, ["diff", "--values", "--plot", str(out), *changed])
    assert result.exit_code == 2 and "ckpttool[plot]" in result.output and not out.exists()


def test_plot_needs_values_and_a_known_suffix(tmp_path, changed):
    runner = CliRunner()
    assert runner.invoke(main, ["diff", "--plot", str(tmp_path / "x.png"), *changed]).exit_code == 2
    bad = runner.invoke(main, ["diff", "--values", "--plot", str(tmp_path / "x.jpg"), *changed])
    assert bad.exit_code == 2 and ".png" in bad.output


@pytest.fixture
def run_with_broken_newest(tmp_path, runs):
    """A transformers.Trainer run whose newest checkpoint was cut short."""
    run = tmp_path / "run"
    shutil.copytree(runs["transformers"], run)
    newest = max((p for p in run.iterdir() if p.name.startswith("checkpoint-")), key=lambda p: int(p.name[11:]))
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return str(run), newest.name


def test_report_names_every_checkpoint_the_pick_and_why(tmp_path, runs):
    result = report(runs["lightning"])
    names = {c["name"] for c in result["checkpoints"]}
    assert names == {n for n in os.listdir(runs["lightning"]) if n.endswith(".ckpt")}
    assert result["latest"].endswith("last.ckpt") and [c["name"] for c in result["checkpoints"] if c.get("picked")]
    assert all(c["step"] is not None and c["size"] > 0 and c["trainer"] == "lightning" for c in result["checkpoints"])
    changes = [c for c in result["changes"] if c["from_step"] != c["to_step"]]
    assert changes and all(m["rel_change"] > 0 for c in changes for m in c["modules"])
    out = tmp_path / "run.html"
    assert CliRunner().invoke(main, ["report", "--html", str(out), runs["lightning"]]).exit_code == 0
    page = out.read_text()
    for name in names:
        assert f"<td>{name}</td>" in page
    assert "data:image/png;base64," in page and "<script" not in page


def test_report_says_why_a_broken_newest_is_skipped(tmp_path, run_with_broken_newest):
    run, broken = run_with_broken_newest
    result = json.loads(CliRunner().invoke(main, ["report", "--json", run]).stdout)
    entry = next(c for c in result["checkpoints"] if c["name"] == broken)
    assert not entry["ok"] and entry["codes"] == ["truncated"] and entry["why"].startswith("skipped: truncated")
    assert result["latest"] and not result["latest"].endswith(broken)
    text = CliRunner().invoke(main, ["report", run]).stdout
    assert broken in text and "skipped: truncated" in text


def test_report_page_opens_in_a_headless_browser(tmp_path, runs):
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no Chromium here (apt-get install chromium)")
    run, broken = str(tmp_path / "lightning"), "last.ckpt"  # a Lightning run whose last.ckpt was cut short
    shutil.copytree(runs["lightning"], run)
    last = os.path.join(run, broken)
    with open(last, "r+b") as f:
        f.truncate(os.path.getsize(last) // 2)
    out = tmp_path / "run.html"
    assert CliRunner().invoke(main, ["report", "--html", str(out), run]).exit_code == 0
    shot = tmp_path / "shot.png"
    done = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
                           f"--screenshot={shot}", "--window-size=1100,1200", out.as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and shot.read_bytes()[:4] == b"\x89PNG"
    assert "Uncaught" not in done.stderr and "Failed to load resource" not in done.stderr
    dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", out.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    for checkpoint in report(run)["checkpoints"]:
        assert checkpoint["name"] in dom
    assert broken in dom and "skipped: truncated" in dom and "<img" in dom
