"""Shared rendering helpers: PNG figures without pyplot, escaped HTML tables, byte formatting, text fallback.

Figures are built with ``matplotlib.figure.Figure`` on an Agg canvas, never through ``pyplot``: pyplot keeps
global state (the current figure, the notebook's inline backend) that a widget refreshing from a background
thread must not touch, and figures made through it leak until closed.
"""

from __future__ import annotations

import html
import io
from collections.abc import Iterable, Sequence
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

MIB = 1 << 20


def new_figure(width: float, height: float) -> Figure:
    """A figure with its own Agg canvas (no pyplot, no global backend switch)."""
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def png(fig: Figure) -> bytes:
    """Render ``fig`` to PNG bytes for an ``ipywidgets.Image``."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def mib(n: int | float | None) -> str:
    return "—" if n is None else f"{n / MIB:.2f}"


def human_bytes(n: int | float | None) -> str:
    if n is None:
        return "—"
    for unit, size in (("GiB", 1 << 30), ("MiB", MIB), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def visible(token: str) -> str:
    """A token as a label: control characters escaped, leading and trailing spaces shown as ``␣``.

    Tokenizers put the word's space inside the token (``" are"``); without the mark it looks like ``"are"``.
    """
    text = repr(token)[1:-1]
    core = text.strip(" ")
    if not core:
        return "␣" * len(text)
    start = len(text) - len(text.lstrip(" "))
    end = len(text) - len(text.rstrip(" "))
    return "␣" * start + core + "␣" * end


def html_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], *, foot: Sequence[Any] | None = None) -> str:
    """An HTML table with every cell escaped: owners, model names and tokens come from other users and models."""
    cell = 'style="padding:1px 8px;text-align:left;font-family:monospace"'
    head = "".join(f"<th {cell}>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td {cell}>{html.escape(str(v))}</td>" for v in r) + "</tr>" for r in rows)
    tail = ""
    if foot is not None:
        tail = "<tfoot><tr>" + "".join(f"<td {cell}><b>{html.escape(str(v))}</b></td>" for v in foot) + "</tr></tfoot>"
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody>{tail}</table>"


def text_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """The same table as plain text, for ``__repr__`` where widgets cannot render."""
    grid = [[str(h) for h in headers]] + [[str(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in grid) for i in range(len(headers))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in grid)


class TextFallback:
    """Mixin for widgets: the ``text/plain`` of the mime bundle is the full ``repr``.

    ipywidgets puts ``repr(widget)`` into ``text/plain`` but cuts it at 110 characters, which leaves a one-line
    stub wherever the widget view cannot render (a terminal, nbconvert, a front end without the widget manager).
    """

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        bundle = super()._repr_mimebundle_(**kwargs) or {}  # type: ignore[misc]
        bundle["text/plain"] = repr(self)
        return bundle
