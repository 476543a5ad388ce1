"""The experiment scripts' CPU smoke modes: they run end to end and their exactness checks hold on a tiny model,
so a GPU run (minutes of a scarce machine) is not where they are first found broken."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_script(script: str, out: Path, *args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "experiments")])}
    done = subprocess.run([sys.executable, str(ROOT / script), "--small", "--out", str(out), *args], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


def test_exp3_small_pauses_every_session_across_three_tiers_exactly(tmp_path):
    spill = tmp_path / "spill"
    result = run_script("experiments/exp3_whitebox/run.py", tmp_path / "exp3.json", "--spill-dir", str(spill))
    assert result["sessions_completed"] == result["sessions"] == 12
    assert all(result["paused_at_once"][tier] > 0 for tier in ("gpu", "host", "disk"))
    assert result["token_accuracy"] == 1.0 and result["steering"]["unsteered_sessions_bitwise_equal"] == 6
    assert result["concurrency"] == {"a_exact": True, "b_finished": True}
    assert result["spill_files_left"] == 0 and list(spill.iterdir()) == []
    assert result["spill_files_dropped_from_page_cache"] > 0
    assert result["bandwidth"]["threads"] == 4 and result["bandwidth"]["read_gb_s"] > 0
    assert result["page_in_inside_ms"]["disk"]["copies"]["n"] == result["resume_latency_ms"]["disk"]["n"]


def test_bench_prefill_small_feeds_whole_and_chunked_prompts_on_both_paths(tmp_path):
    result = run_script("experiments/bench_prefill.py", tmp_path / "prefill.json")
    cells = {(c["path"], c["prompt_tokens"], c["chunk"]) for c in result["memory"]}
    assert cells == {(path, n, chunk) for path in ("fast", "module") for n in (64, 256) for chunk in (None, 32)}
    for cell in result["memory"]:
        assert cell["activation_bytes_reserved"] > 0 and cell["kv_bytes"] > 0
    assert [s["chunk"] for s in result["stalls"]] == [None, 32] and all(s["b_state"] == "finished" for s in result["stalls"])


def test_bench_cluster_small_measures_throughput_on_one_and_two_engines_and_a_migration(tmp_path):
    pytest.importorskip("ray")
    result = run_script("experiments/bench_cluster.py", tmp_path / "cluster.json", "--gpus", "1,2", "--sessions", "2")
    assert result["gpus_run"] == [1, 2]
    assert all(result["aggregate_tokens_per_s"][g]["2"] > 0 for g in ("1", "2"))
    assert result["throughput_runs"]["2"]["2"]["tokens"] == 2 * result["new_tokens"]
    assert result["scaling_2gpu"] > 0 and result["scaling_4gpu"] is None
    assert result["migration"]["from"] == "gpu0" and result["migration"]["to"] == "gpu1"
    assert result["migration"]["state"] == "paused" and result["migration"]["paused_run"] == 2
    # --context 64: a 62-token prompt and one generated token, whose KV the paused run computes with its own token
    assert result["migration"]["history_tokens"] == 62 and result["migration"]["bytes"] > 0
    assert (result["migration_idle"]["from"], result["migration_idle"]["paused_run"]) == ("gpu1", None)
    assert result["migration_s"] > 0 and result["migration_floor_s"] > 0 and result["migration_ratio"] > 0
    split = result["split70b"]  # the tiny shape split 2 + 2 over the two engines
    assert result["split70b_ms_per_token"] > 0 and result["split70b_floor_ms"] is None  # no HBM on CPU engines
    assert split["split_at"] == 2 and split["host"] != split["stage"] and split["weight_bytes"] > 0
    assert split["paused_at"] == [3, 1] and split["paused_run_tokens_equal"]
    assert {"device", "gpu_count", "torch", "ray"} <= result["environment"].keys()
