"""``PatchHeatmap``: the causal-tracing figure of an activation-patching sweep (``djinn_kernel.patching``).

Layers down, the corrupted prompt's tokens across; each cell is the share of the clean answer that patching
that one activation from the clean run brings back (1: all of it, 0: none), from the grid's own numbers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import ipywidgets as W

from ._render import TextFallback, new_figure, png, text_table, visible

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from djinn_kernel.patching import PatchGrid


class PatchHeatmap(TextFallback, W.VBox):
    """The grid as a heatmap with token labels; ``figure`` keeps the rendered figure (tests, export)."""

    def __init__(self, grid: PatchGrid) -> None:
        self.grid = grid
        self.share = grid.recovered()
        self.figure: Figure = self._draw()
        header = W.HTML(
            f"<b>activation patching</b>: clean {grid.clean:.3f}, corrupted {grid.corrupted:.3f}; "
            f"{len(grid.layers)} layers × {len(grid.positions)} positions"
        )
        image = W.Image(value=png(self.figure), format="png", layout=W.Layout(max_width="100%", height="auto"))
        super().__init__([header, image])

    def _draw(self) -> Figure:
        g = self.grid
        fig = new_figure(1.2 + 0.45 * len(g.positions), 1.0 + 0.3 * len(g.layers))
        ax = fig.add_subplot()
        shown = ax.imshow(self.share.numpy(), cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
        ax.set_xticks(range(len(g.positions)), [visible(t) for t in g.tokens], rotation=90)
        ax.set_yticks(range(len(g.layers)), [str(layer) for layer in g.layers])
        ax.set_xlabel("patched position (corrupted prompt's token)")
        ax.set_ylabel("layer")
        fig.colorbar(shown, ax=ax, label="share of the clean answer restored")
        return fig

    def __repr__(self) -> str:
        g = self.grid
        rows = [[layer, *(f"{v:.2f}" for v in self.share[i].tolist())] for i, layer in enumerate(g.layers)]
        head = f"PatchHeatmap: clean {g.clean:.3f}, corrupted {g.corrupted:.3f}; share of the clean answer restored"
        return head + "\n" + text_table(["layer", *(visible(t) for t in g.tokens)], rows)
