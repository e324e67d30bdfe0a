"""Figures and a self-contained HTML report (images embedded, no external files).

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> html = Report("demo").add_text("Hello").add_table([{"a": 1, "b": 0.5}]).render()
    >>> "<table>" in html and "Hello" in html
    True
"""

from __future__ import annotations

import base64
import csv
import html
import io
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from branchnet.fileio import atomic_write_text

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:1100px;
color:#222;padding:0 1em}
h1{font-size:1.6em}h2{font-size:1.25em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}
td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
pre{background:#f7f7f7;padding:.8em;overflow-x:auto;font-size:.85em}
figure{display:inline-block;margin:.5em 1em .5em 0;vertical-align:top}
figcaption{font-size:.85em;color:#555}img{max-width:100%}
.muted{color:#777;font-size:.85em}
"""


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1e4 else f"{v:.4g}"
    return html.escape(str(v))


def figure_png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


class Report:
    """An HTML report built section by section."""

    def __init__(self, title: str):
        self.title = title
        self.parts: list[str] = []

    def add_heading(self, text: str) -> Report:
        self.parts.append(f"<h2>{html.escape(text)}</h2>")
        return self

    def add_text(self, text: str, muted: bool = False) -> Report:
        cls = ' class="muted"' if muted else ""
        self.parts.append(f"<p{cls}>{html.escape(text)}</p>")
        return self

    def add_pre(self, text: str) -> Report:
        self.parts.append(f"<pre>{html.escape(text)}</pre>")
        return self

    def add_table(self, rows: list[dict[str, Any]], columns: list[str] | None = None) -> Report:
        if not rows:
            return self
        columns = columns or list(dict.fromkeys(k for r in rows for k in r))
        head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
        body = "".join(
            "<tr>" + "".join(f"<td>{_fmt(r.get(c))}</td>" for c in columns) + "</tr>" for r in rows
        )
        self.parts.append(f"<table><tr>{head}</tr>{body}</table>")
        return self

    def add_figure(self, fig: Figure | bytes | Path, caption: str = "") -> Report:
        if isinstance(fig, Figure):
            data = figure_png(fig)
        elif isinstance(fig, Path):
            data = fig.read_bytes()
        else:
            data = fig
        b64 = base64.b64encode(data).decode()
        self.parts.append(
            f'<figure><img src="data:image/png;base64,{b64}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        )
        return self

    def render(self) -> str:
        body = "\n".join(self.parts)
        return (f"<!doctype html><html><head><meta charset='utf-8'><title>"
                f"{html.escape(self.title)}</title><style>{_STYLE}</style></head><body>"
                f"<h1>{html.escape(self.title)}</h1>\n{body}\n</body></html>")

    def write(self, path: str | Path) -> Path:
        return atomic_write_text(path, self.render())


def plot_time_curve(history: list[dict[str, float]], seconds: list[float],
                    title: str = "") -> Figure:
    """Accuracy against training minutes, one point per epoch: the ``monitor`` split (the test
    split of a ``monitor_test`` run) and the training batches (augmented, in training mode).

    >>> fig = plot_time_curve([{"train_acc": 0.5, "monitor_acc": 0.6}], [60.0])
    >>> len(fig.axes)
    1
    """
    if len(history) != len(seconds):
        raise ValueError(f"history has {len(history)} epochs but seconds {len(seconds)}")
    fig = Figure(figsize=(5.5, 3.6))
    ax = fig.add_subplot(1, 1, 1)
    minutes = [s / 60 for s in seconds]
    for key, label in (("monitor_acc", "test"), ("train_acc", "training batches")):
        points = [(m, r[key]) for m, r in zip(minutes, history, strict=True) if key in r]
        if points:
            ax.plot(*zip(*points, strict=True), marker=".", label=label)
    ax.set(xlabel="training minutes", ylabel="accuracy", title=title or "accuracy over time")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_training_curves(histories: dict[str, Path]) -> Figure:
    """Validation loss and accuracy per epoch, one line per model, from ``metrics.csv`` files."""
    fig = Figure(figsize=(9, 3.2))
    ax_loss, ax_acc = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for name, path in histories.items():
        if not Path(path).is_file():
            continue
        with open(path) as f:
            rows = list(csv.DictReader(f))
        key = "val" if rows and rows[0].get("val_loss") else "train"
        ep = [int(float(r["epoch"])) for r in rows]
        ax_loss.plot(ep, [float(r[f"{key}_loss"]) for r in rows], label=name)
        ax_acc.plot(ep, [float(r[f"{key}_acc"]) for r in rows], label=name)
    ax_loss.set(xlabel="epoch", ylabel="validation loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="validation accuracy", title="accuracy")
    ax_acc.legend(fontsize=7)
    fig.tight_layout()
    return fig
