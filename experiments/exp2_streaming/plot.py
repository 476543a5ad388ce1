"""Plot experiment 2: seconds per decoded token for Accelerate's CPU offload, Djinn's weight streaming and the
PCIe floor (streamed bytes / pinned H2D), from one result file of run.py; the title adds how 8 sessions
decoding at once scale against one (phase 5), when the file has it.

    python experiments/exp2_streaming/plot.py experiments/results/exp2_h200.json experiments/results/exp2_h200.png
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(source: str, target: str) -> None:
    result = json.load(open(source))
    bars = {
        "Accelerate\n(CPU offload)": result.get("accelerate_decode_s_per_token"),
        "Djinn\n(weight streaming)": result["djinn_decode_s_per_token"],
        "PCIe floor\n(streamed bytes / H2D)": result["floor_s_per_token"],
    }
    bars = {name: value for name, value in bars.items() if value is not None}
    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = ax.bar(list(bars), list(bars.values()), color=["tab:red", "tab:blue", "grey"][: len(bars)])
    ax.bar_label(drawn, [f"{v:.3f} s" for v in bars.values()], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("seconds per decoded token (batch 1)")
    load = result["djinn_load"]
    batched = result.get("batched_8_sessions")
    scaling = (
        f"\n8 sessions decoding at once: {batched['speedup_8_vs_1']:.1f}x the tokens/s of one"
        if isinstance(batched, dict) and "speedup_8_vs_1" in batched else ""
    )
    ax.set_title(
        f"{result['shape']['name']} {result['shape']['dtype']} at a {result['budget_bytes'] / 2**30:.0f} GiB budget, "
        f"{result['environment']['device']}\n{load['streamed_layers']} of "
        f"{load['streamed_layers'] + load['resident_layers']} layers streamed, "
        f"{result['djinn_bytes_streamed_per_token'] / 1e9:.2f} GB/token{scaling}",
        fontsize=9,
    )
    ax.grid(True, axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(target, dpi=120)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
