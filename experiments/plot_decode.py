"""Plot aggregate tokens/s against concurrent sessions from a decode benchmark result (bench_decode.py).

    python experiments/plot_decode.py experiments/results/decode_h200.json experiments/results/decode_h200.png
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(source: str, target: str) -> None:
    result = json.load(open(source))
    rates = {int(n): r for n, r in result["aggregate_tokens_per_s"]["value"].items()}
    counts = sorted(rates)
    one = rates[1]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(counts, [rates[n] for n in counts], "o-", label="Djinn, one session per client thread")
    ax.plot(counts, [one * n for n in counts], ":", color="grey", label="linear in sessions (ideal)")
    for batch, rate in result["hf_static_batch_tokens_per_s"]["value"].items():
        ax.plot([int(batch)], [rate], "s", color="tab:red")
    ax.plot([], [], "s", color="tab:red", label="HF generate, static batch")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(counts, [str(n) for n in counts])
    ax.set_xlabel("sessions decoding at once")
    ax.set_ylabel("tokens/s in total")
    ax.set_title(f"7B Llama shape, bf16, {result['device']}")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(target, dpi=120)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
