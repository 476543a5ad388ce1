"""Plots of an experiment 3 result (run.py): paused sessions by tier against the baseline, and resume latency
per tier against its floor.

    python experiments/exp3_whitebox/plot.py experiments/results/exp3_h200.json experiments/results/exp3_h200.png
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(source: str, target: str) -> None:
    r = json.load(open(source))
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.bar(["PyTorch hook\n(KV on GPU)"], [r["baseline_max_paused_sessions"]], color="tab:grey")
    bottom = 0
    for tier, color in (("gpu", "tab:blue"), ("host", "tab:orange"), ("disk", "tab:red")):
        count = r["paused_at_once"][tier]
        left.bar(["Djinn"], [count], bottom=bottom, color=color, label=f"{tier}: {count}")
        bottom += count
    left.set_ylabel("sessions paused at once")
    left.set_title(f"13B shape, {r['prompt_tokens']}-token contexts ({r['session_kv_bytes'] / 1e9:.2f} GB KV each)",
                   fontsize=9)
    left.legend(fontsize=8)
    tiers = [t for t in ("host", "disk") if r["floor_ms"].get(t)]
    xs = range(len(tiers))
    right.bar([x - 0.2 for x in xs], [r["resume_latency_ms"][t]["p50"] for t in tiers], 0.4, label="resume p50")
    right.bar([x + 0.2 for x in xs], [r["floor_ms"][t]["p50"] for t in tiers], 0.4, color="tab:grey",
              label="floor: bytes / measured bandwidth")
    right.set_xticks(list(xs), tiers)
    right.set_yscale("log")
    right.set_ylabel("ms")
    right.set_title(f"resume from each tier ({r['environment']['device']})", fontsize=9)
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(target, dpi=120)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
