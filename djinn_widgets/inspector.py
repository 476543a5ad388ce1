"""``ActivationInspector``: what the paused activation looks like and what it would predict.

Everything shown comes from the public ``Pause`` handle (``activation``, ``logit_lens``) and the model's
``token_strings``; the widget computes only display statistics (norms, the most variable dims).
"""

from __future__ import annotations

import html
import math
from typing import TYPE_CHECKING, Any

import ipywidgets as W
import torch
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from djinn_kernel.errors import DjinnError

from ._handles import as_pause
from ._render import TextFallback, html_table, new_figure, png, visible

LENS_POSITIONS = 128  # positions whose lens is computed up front, so the dropdown works after the run moves on
ROW_BASE, ROW_INCHES = 1.3, 0.1  # figure height: a 37-token prompt is ~5 inches (500 px), not a screen and a half
OUTLIER = 10.0  # rows whose norm exceeds this many medians (attention sinks such as BOS) are left out of scales

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from djinn_kernel.api import Pause, Run


class ActivationInspector(TextFallback, W.VBox):
    """Header, tokens × top-variance dims heatmap, per-token L2 norms, a logit-lens table and, where the pause
    feeds a Llama-family layer, that layer's attention weights per head for one pause.

    Rows of the activation are the tokens that forward processed: every prompt token at the prefill (token
    step 0), and only the token fed in at a decode step (the last generated one), so ``labels`` follow that.
    ``refresh()`` re-reads the run's current pause: after edits, or after the run stopped somewhere else.
    """

    def __init__(self, pause: Pause | Run, k: int = 5, top_dims: int = 64) -> None:
        self.pause = as_pause(pause)
        self.figure: Figure | None = None  # the last rendered figure, kept for its axes (tests, export)
        self.k = k
        self.top_dims = top_dims
        self.error: str | None = None
        self.labels: list[str] = []
        self.norms = torch.empty(0)
        self.dims = torch.empty(0, dtype=torch.long)
        self.values = torch.empty(0, 0)  # [tokens, len(dims)], the heatmap's data
        self.position = -1
        self._quiet = False
        self.lens: list[dict[str, Any]] = []
        self._lenses: dict[int, list[dict[str, Any]]] = {}
        self.header = W.HTML()
        # One figure for heatmap and norms: rows line up, and it scales down with the notebook's width.
        self.plot = W.Image(format="png", layout=W.Layout(max_width="100%", height="auto"))
        self.position_control = W.Dropdown(description="position")
        self.lens_table = W.HTML()
        # The SAE attached at this module, if any (session.attach_sae): top features of the chosen position.
        self.features: list[list[dict[str, Any]]] = []
        self.features_table = W.HTML()
        # Attention weights of the layer this activation feeds (Pause.attention), per head or their mean.
        self.weights: torch.Tensor | None = None  # [heads, tokens, keys]
        self.attention_figure: Figure | None = None
        self.head_control = W.Dropdown(description="head")
        self.attention_note = W.HTML()
        self.attention_plot = W.Image(format="png", layout=W.Layout(max_width="100%", height="auto"))
        super().__init__(
            [
                self.header,
                self.plot,
                W.HBox(
                    [self.position_control, self.lens_table, self.features_table],
                    layout=W.Layout(flex_flow="row wrap"),
                ),
                W.HBox([self.head_control, self.attention_note]),
                self.attention_plot,
            ]
        )
        self.position_control.observe(self._on_position, names="value")
        self.head_control.observe(self._on_head, names="value")
        self.refresh()

    # data -------------------------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Recompute everything from the run's current pause; a DjinnError is shown, not raised."""
        current = self.pause.run.pause
        if current is not None:
            self.pause = current
        try:
            activation = self.pause.activation
            rows = activation.reshape(-1, activation.shape[-1]) if activation.dim() > 1 else activation[None]
            self.labels = self._labels(rows.shape[0])
        except DjinnError as exc:
            self._show_error(exc)
            return
        self.error = None
        self.norms = rows.norm(dim=-1)
        self.dims = self._top_dims(rows.float())
        self.values = rows.float()[:, self.dims]
        last = len(self.labels) - 1
        self._lenses = {}
        for position in range(max(0, last + 1 - LENS_POSITIONS), last + 1):
            try:
                self._lenses[position] = self.pause.logit_lens(self.k, position)
            except DjinnError:
                break  # no lens at this pause (not a residual stream); _update_lens explains why
        self._quiet = True  # options= moves the value to 0 first; that is not the user choosing a position
        try:
            self.position_control.options = [(f"{i}: {visible(t)}", i) for i, t in enumerate(self.labels)]
            self.position_control.value = last
        finally:
            self._quiet = False
        try:
            self.features = self.pause.features(self.k)
        except DjinnError:
            self.features = []  # no SAE attached here: nothing to show
        self._update_lens(last)
        self._render()
        self._read_attention()

    def _labels(self, n: int) -> list[str]:
        """Token strings of the ``n`` rows: the last ``n`` of prompt + tokens generated before this step."""
        run = self.pause.run
        ids = (run.prompt_ids + run.tokens[: self.pause.token_step])[-n:]
        labels = run.session.model.token_strings(ids)
        return [f"#{i}" for i in range(n - len(labels))] + labels

    def _typical(self) -> torch.Tensor:
        """Which rows are typical: an outlier (a BOS token with a norm of 25,000 among 150s) would flatten
        every scale and decide the "most varying" dims alone."""
        norms = self.norms.float()
        if len(norms) < 3:
            return torch.ones_like(norms, dtype=torch.bool)
        return norms <= OUTLIER * norms.median()

    def _top_dims(self, rows: torch.Tensor) -> torch.Tensor:
        """Hidden dims with the largest variance across typical tokens (largest magnitude for one token)."""
        typical = rows[self._typical()]
        score = typical.var(dim=0, unbiased=False) if typical.shape[0] > 1 else typical[0].abs()
        return score.topk(min(self.top_dims, rows.shape[1])).indices

    def _update_features(self, position: int) -> None:
        if not self.features:
            self.features_table.value = ""
            return
        self.features_table.value = html_table(
            ["SAE feature", "activation"],
            [(r["feature"], f"{r['activation']:.3f}") for r in self.features[position]],
        )

    def _update_lens(self, position: int) -> None:
        self.position = position
        self._update_features(position)
        try:
            cached = self._lenses.get(position)
            self.lens = cached if cached is not None else self.pause.logit_lens(self.k, position)
        except DjinnError as exc:
            self.lens = []
            self.lens_table.value = f"<i>no logit lens here: {_esc(exc)}</i>"
            return
        self.lens_table.value = html_table(
            ["#", "token", "id", "prob", "logit"],
            [
                (i + 1, visible(r["token"]), r["token_id"], f"{r['prob']:.4f}", f"{r['logit']:.3f}")
                for i, r in enumerate(self.lens)
            ],
        )

    def _on_position(self, change: dict[str, Any]) -> None:
        if not self._quiet and change["new"] is not None and self.error is None:
            self._update_lens(change["new"])

    def _read_attention(self) -> None:
        """The weights of the layer this activation feeds; where there are none, say why and hide the plot."""
        try:
            self.weights = self.pause.attention()
        except DjinnError as exc:
            self.weights = None
            self.attention_note.value = f"<i>no attention weights here: {_esc(exc)}</i>"
            self.head_control.layout.display = self.attention_plot.layout.display = "none"
            return
        self.head_control.layout.display = self.attention_plot.layout.display = None
        self._quiet = True
        try:
            self.head_control.options = [("mean", -1)] + [(str(h), h) for h in range(self.weights.shape[0])]
            self.head_control.value = -1
        finally:
            self._quiet = False
        self._render_attention(-1)

    def _on_head(self, change: dict[str, Any]) -> None:
        if not self._quiet and change["new"] is not None and self.weights is not None:
            self._render_attention(change["new"])

    def _render_attention(self, head: int) -> None:
        weights = self.weights.float()
        shown = weights.mean(0) if head < 0 else weights[head]
        layer = self.pause.layer if self.pause.side == "input" else self.pause.layer + 1
        which = "mean over heads" if head < 0 else f"head {head}"
        self.attention_note.value = f"attention of layer {layer} ({which}) for this step's tokens"
        rows, keys = shown.shape
        fig = new_figure(8.0, ROW_BASE + ROW_INCHES * min(rows, 40))
        ax = fig.add_subplot()
        image = ax.imshow(shown.numpy(), aspect="auto", cmap="viridis", interpolation="nearest", vmin=0)
        key_labels = [visible(t) for t in self._labels(keys)]
        every_key, every_row = math.ceil(keys / 40), math.ceil(rows / 40)
        ax.set_xticks(range(0, keys, every_key), key_labels[::every_key], rotation=90, fontsize=6)
        ax.set_yticks(range(0, rows, every_row), [visible(t) for t in self.labels][::every_row], fontsize=7)
        ax.set_xlabel("attended token", fontsize=8)
        fig.colorbar(image, ax=ax, shrink=0.8)
        self.attention_figure = fig
        self.attention_plot.value = png(fig)

    def _show_error(self, exc: DjinnError) -> None:
        self.error = str(exc)
        self.header.value = f"<b style='color:#b00'>{_esc(exc)}</b>"

    # view ---------------------------------------------------------------------------------------------------
    def _where(self) -> str:
        p = self.pause
        where = f"layer {p.layer}" if p.layer is not None else p.path
        step = "prefill" if p.token_step == 0 else f"decode step {p.token_step}"
        return f"{where} ({p.side}) · {p.path} · {step} · {list(p.shape)} {p.dtype} · {p.info['edits']} edit(s)"

    def _render(self) -> None:
        self.header.value = f"<b>{_esc(self._where())}</b>"
        ticks = [visible(t) for t in self.labels]
        n = len(ticks)
        every = math.ceil(n / 40)  # at most ~40 labels, so long prompts stay legible
        fig = new_figure(8.0, ROW_BASE + ROW_INCHES * min(n, 40))
        heat, bars = fig.subplots(1, 2, sharey=True, width_ratios=[4, 1])

        typical = self.values[self._typical()]
        limit = float(typical.abs().flatten().quantile(0.99)) if typical.numel() else 1.0
        image = heat.imshow(
            self.values.numpy(), aspect="auto", cmap="RdBu_r", interpolation="nearest", vmin=-limit, vmax=limit
        )
        heat.set_yticks(range(0, n, every), ticks[::every], fontsize=7)
        step = max(1, len(self.dims) // 16)
        heat.set_xticks(range(0, len(self.dims), step), [str(int(d)) for d in self.dims[::step]], fontsize=6)
        ranked = "variance across tokens" if n > 1 else "magnitude"
        heat.set_xlabel(f"hidden dim (top {len(self.dims)} by {ranked})", fontsize=8)
        fig.colorbar(image, ax=heat, extend="both", location="bottom", shrink=0.5, aspect=40, pad=0.01)

        norms = self.norms.float()
        bars.barh(range(n), norms.numpy(), color="#4c72b0")
        bars.set_ylim(n - 0.5, -0.5)
        if n > 1 and float(norms.max()) > OUTLIER * float(norms.median()):
            bars.set_xscale("log")
            # Labels at 1, 2 and 5 of each decade: a norm range of 150 to 25,000 otherwise shows only 10^3, 10^4.
            bars.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            bars.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:,.0f}" if x >= 1 else f"{x:g}"))
            bars.xaxis.set_minor_formatter(NullFormatter())
            bars.tick_params(axis="x", labelsize=6)
            bars.set_xlabel("L2 norm (log)")
        else:
            bars.set_xlabel("L2 norm")
        self.figure = fig
        self.plot.value = png(fig)

    def __repr__(self) -> str:
        if not self.labels:
            return f"<ActivationInspector: {self.error or 'no data'}>"
        lens = ", ".join(f"'{visible(r['token'])}' {r['prob']:.3f}" for r in self.lens) or "n/a"
        n = self.norms.float()
        return (
            f"<ActivationInspector {self._where()}\n"
            f"  norms over {len(n)} token(s): min {n.min():.3f} mean {n.mean():.3f} max {n.max():.3f}\n"
            f"  logit lens top-{self.k} at position {self.position} "
            f"('{visible(self.labels[self.position])}'): {lens}"
            + (f"\n  error: {self.error}" if self.error else "")
            + ">"
        )


def _esc(value: object) -> str:
    return html.escape(str(value))
