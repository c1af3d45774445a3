"""Pictures of what changed where: charts drawn with matplotlib (the optional extra `ckpttool[plot]`), and the
self-contained HTML pages they go in (the image inline, the tables made from the same data `--json` carries).

A PNG is the chart alone; an HTML page is the chart with its tables, one file that opens anywhere, offline.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os

from ckpttool import atomic
from ckpttool.errors import UsageError

PLOT_EXTRA = "pip install 'ckpttool[plot]'"
MAX_LABEL = 48  # characters of a module name on an axis before it is shortened from the left


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UsageError(f"charts need matplotlib, which is not installed here; install the plot extra: "
                         f"{PLOT_EXTRA}") from None
    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def _label(name: str) -> str:
    return name if len(name) <= MAX_LABEL else "…" + name[-(MAX_LABEL - 1):]


def module_change_chart(modules: list[dict], title: str):
    """Horizontal bars of each module's relative change (log scale), modules top to bottom in model order; an
    unchanged module has no bar and says so. Returns (figure, the module labels drawn)."""
    plt = _pyplot()
    labels = [_label(m["module"]) for m in modules]
    values = [m["rel_change"] if isinstance(m["rel_change"], float) and m["rel_change"] > 0 else math.nan
              for m in modules]
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.28 * max(len(modules), 1)))
    positions = range(len(modules))
    ax.barh(positions, [v if v == v else 0 for v in values], color="#3b6ea8")
    for y, value, module in zip(positions, values, modules):
        if value != value:
            ax.text(0.01, y, "unchanged" if module["rel_change"] == 0 else str(module["rel_change"]),
                    va="center", fontsize=8, color="#666", transform=ax.get_yaxis_transform())
    finite = [v for v in values if v == v]
    if finite:
        ax.set_xscale("log")
        ax.set_xlim(min(finite) / 3, max(finite) * 3)
    ax.set_yticks(list(positions), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("relative change |A - B| / |B| (log scale)")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", which="both", alpha=0.3)
    fig.tight_layout()
    return fig, labels


def run_change_chart(modules: list[str], steps: list[str], matrix: list[list], title: str):
    """A heat chart: modules down (model order), consecutive checkpoint pairs across, colour the log10 of the
    relative change. Returns (figure, the module labels drawn)."""
    plt = _pyplot()
    labels = [_label(m) for m in modules]
    cells = [[math.log10(v) if isinstance(v, float) and v > 0 else math.nan for v in row] for row in matrix]
    fig, ax = plt.subplots(figsize=(2.5 + 0.9 * max(len(steps), 1), 1.5 + 0.28 * max(len(modules), 1)))
    image = ax.imshow(cells or [[math.nan]], aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xticks(range(len(steps)), steps, fontsize=8, rotation=30, ha="right")
    ax.set_xlabel("checkpoint pair (older → newer)")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, label="log10 relative change")
    fig.tight_layout()
    return fig, labels


def png(fig) -> bytes:
    plt = _pyplot()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def table(headers: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def page(title: str, parts: list[str]) -> str:
    """One self-contained HTML page: inline style, images as data URLs, no script, nothing fetched."""
    style = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}"
             "table{border-collapse:collapse;margin:1em 0;font-size:13px}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}th{background:#f3f3f3}"
             ".ok{color:#16733a}.fail{color:#b3261e}img{max-width:100%}h2{margin-top:1.6em}")
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>\n" + "\n".join(parts)
            + "\n</body></html>\n")


def image(data: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def check(path: str, suffixes=(".png", ".html", ".htm")):
    """Before any work: the output's suffix is one this writes, and matplotlib is there."""
    if os.path.splitext(path)[1].lower() not in suffixes:
        raise UsageError(f"{path}: write the chart as {' or '.join(suffixes[:2])}")
    if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise UsageError(f"{os.path.dirname(os.path.abspath(path))}: output folder does not exist")
    _pyplot()


def write(path: str, fig, title: str, tables: list[str]):
    """The chart as a PNG, or as an HTML page with its tables, by the path's suffix."""
    check(path)
    data = png(fig)
    if path.lower().endswith(".png"):
        atomic.write_bytes(path, data)
    else:
        atomic.write_text(path, page(title, [image(data, title)] + tables))
