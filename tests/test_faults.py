"""Faults (issue 13): client processes SIGKILLed while paused, mid-prefill and mid-decode, and the daemon SIGKILLed.

A killed client's lease runs out (1 s in the tests) and the daemon closes its sessions: every byte must come back
(the sessions' device bytes, the host pool, the spill files) after each batch of kills, and the daemon's RSS is
reported across all of them. A killed daemon must give every waiting and every new call a
``DaemonConnectionError`` within 2 s, and ``dj.connect()`` then starts a fresh one. A prefill and a decode long
enough to be caught in the middle need a bigger model than tiny-llama (a 256-position toy, prefilled in
milliseconds): a random Llama of 8 layers, width 512 and 4,096 positions is written to a folder (a 3,000-token
prefill takes ~2 s on 2 CPU cores, a decode step ~16 ms). CI kills 3 clients in each state; ``DJINN_LONG=1`` 100.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

import djinn_kernel as dj
from conftest import scaled
from daemon_util import DaemonProcess, wait_until
from djinn_kernel.runtime import pid_alive

PREFILL_PROMPT = [5] * 3000
DECODE_PROMPT = list(range(5, 21))
PAUSED_PROMPT = [5] * 200
BATCH = 9  # client processes started together (their start-ups overlap), then killed one at a time
# How far above its warmed baseline the daemon's RSS may be after a batch is reclaimed: less than one prefill's
# attention scores (4 x 3,000^2 floats, 137 MiB). Measured 2026-12-02: within 45 MiB over 8 batches; before the
# allocator fix, 200 MiB over after the first batch and 800 over after five (docs/reliability.md).
RSS_TOLERANCE = 100 << 20

FAULT_CLIENT = """
import json, sys, djinn_kernel as dj
cfg = json.loads(sys.stdin.readline())
model = dj.load(cfg["model"], backend=dj.connect(name="fault"))
sessions = [model.session() for _ in range(2 if cfg["phase"] == "paused" else 1)]
print(json.dumps([s.id for s in sessions]), flush=True)
sys.stdin.readline()
if cfg["phase"] == "paused":
    for s in sessions:
        s.break_at(1, tokens=1)
        s.generate(cfg["prompt"], 4)
        s.page_out()
    print(json.dumps([s.status()["memory"] for s in sessions]), flush=True)
else:
    print("[]", flush=True)
    sessions[0].generate(cfg["prompt"], cfg["new"])
sys.stdin.readline()  # never answered: this process is killed
"""


@pytest.fixture(scope="module")
def long_model(tmp_path_factory) -> str:
    """A random Llama with tiny-llama's tokenizer and 4,096 positions, written where the daemon can load it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from djinn_kernel import builtin

    tiny, tokenizer, _ = builtin.build_builtin("tiny-llama")
    ids = {k: getattr(tiny.config, k) for k in ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id")}
    config = LlamaConfig(
        hidden_size=512, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=4096, **ids,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("long-llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


def warm_up(daemon: DaemonProcess, model: str, watcher) -> int:
    """The daemon's RSS once it has run a prefill and a decode for a client that then left and was reclaimed:
    the baseline. Cold, the weights file is mapped but untouched; the first forward reads in its ~120 MiB."""
    client = daemon.client("warm-up")
    session = dj.load(model, backend=client).session()
    session.generate(PREFILL_PROMPT, 4)
    session.generate(DECODE_PROMPT, 50)
    client.close()  # its goodbye ends the lease: the daemon reclaims the session as it does a killed client's
    reclaimed(watcher, 1)
    return rss(daemon.info.pid)


def reclaimed(watcher, clients: int) -> None:
    """Wait until the daemon has reclaimed ``clients`` dead clients in all, each one's memory handed back to the
    OS (which happens after its sessions disappear from ``status``)."""
    wait_until(lambda: watcher.status()["reclaimed_clients"] >= clients, 60, f"the reclaim of {clients} clients")


def session_view(watcher, sid: int) -> dict | None:
    """Another client's session as the watcher sees it (state and memory only), None once it is gone."""
    return next((s for s in watcher.status()["sessions"] if s["id"] == sid), None)


PLANS = {
    "paused": {"prompt": PAUSED_PROMPT, "new": 4},
    "prefill": {"prompt": PREFILL_PROMPT, "new": 4},
    "decode": {"prompt": DECODE_PROMPT, "new": 1000},
}


def kill_in(phase: str, p, watcher, kv: int) -> list[int]:
    """Bring the client ``p`` to ``phase`` and SIGKILL it there; returns the ids of the sessions it held."""
    sids = json.loads(p.stdout.readline())
    p.stdin.write("go\n")
    p.stdin.flush()
    report = json.loads(p.stdout.readline())
    sid = sids[0]
    if phase == "paused":
        assert sum(m["host_bytes"] for m in report) > 0 and sum(m["disk_bytes"] for m in report) > 0, report
    elif phase == "prefill":
        wait_until(lambda: session_view(watcher, sid)["state"] == "running", 30, "the prefill")
    else:
        past_prefill = kv * (len(DECODE_PROMPT) + 2)
        wait_until(lambda: session_view(watcher, sid)["memory"]["gpu_bytes"] >= past_prefill, 60, "two decode steps")
    p.send_signal(signal.SIGKILL)
    p.wait()
    seen = session_view(watcher, sid)
    if phase == "prefill":  # its KV still short of the prompt's: the prefill had not ended at the kill
        assert seen["state"] == "running" and seen["memory"]["gpu_bytes"] < kv * len(PREFILL_PROMPT), seen
    if phase == "decode":
        assert seen["state"] == "running", seen
    return sids


def test_killed_clients_give_every_byte_back(long_model, tmp_path: Path):
    kills = scaled(3, 100)
    spill = tmp_path / "spill"
    # Room for a batch's orphaned runs until their leases run out (each mid-prefill one reserves ~0.4 GiB of prompt
    # activations with its KV, prefill.py); a host pool of 1.5 paused sessions, so the second of a client's two is
    # spilled.
    daemon = DaemonProcess("--gpu-memory", "2GiB", "--host-memory", "5MiB", "--spill-dir", str(spill))
    try:
        watcher = daemon.client()
        kv = dj.load(long_model, backend=watcher).info["kv_bytes_per_token"]
        baseline = watcher.status()["memory"]
        cold, rss_before = rss(daemon.info.pid), warm_up(daemon, long_model, watcher)
        phases = [phase for _ in range(kills) for phase in PLANS]
        reclaim_s: list[float] = []
        rss_after: list[int] = []
        for first in range(0, len(phases), BATCH):
            batch = [(phase, daemon.script(FAULT_CLIENT)) for phase in phases[first:first + BATCH]]
            for phase, p in batch:
                p.stdin.write(json.dumps({"model": long_model, "phase": phase, **PLANS[phase]}) + "\n")
                p.stdin.flush()
            sids = [sid for phase, p in batch for sid in kill_in(phase, p, watcher, kv)]
            killed = time.monotonic()  # the last kill of the batch; the earlier ones' leases run out meanwhile
            reclaimed(watcher, 1 + first + len(batch))  # the warm-up client and every client killed so far
            assert all(session_view(watcher, s) is None for s in sids)
            memory = watcher.status()["memory"]
            assert memory["session_gpu_bytes"] == baseline["session_gpu_bytes"] == 0
            assert memory["charged_bytes"] == baseline["charged_bytes"] == 0
            assert memory["host_pool"]["used"] == baseline["host_pool"]["used"] == 0
            wait_until(lambda: list(spill.iterdir()) == [], 10, "every spill file unlinked")
            reclaim_s.append(time.monotonic() - killed)
            rss_after.append(rss(daemon.info.pid))
            assert rss_after[-1] <= rss_before + RSS_TOLERANCE, (rss_before >> 20, rss_after[-1] >> 20)
        print(
            f"\nfaults: {kills} clients SIGKILLed in each of paused (host + disk), mid-prefill, mid-decode; every "
            f"byte back after each batch of {BATCH}, {max(reclaim_s):.2f} s at most after its last kill (lease "
            f"1 s); daemon RSS {cold >> 20} MiB cold, {rss_before >> 20} warmed, after the batches "
            f"{min(rss_after) >> 20}-{max(rss_after) >> 20} ({rss_after[-1] >> 20} after the last of "
            f"{len(rss_after)})"
        )
    finally:
        daemon.stop()


def test_a_killed_daemon_is_reported_within_2_s_and_connect_starts_a_fresh_one(long_model, monkeypatch):
    daemon = DaemonProcess()
    try:
        running, idle = daemon.client(), daemon.client()
        session = dj.load(long_model, backend=running).session()
        failure: list[tuple[BaseException, float]] = []

        def drive() -> None:
            try:
                session.generate(DECODE_PROMPT, PLANS["decode"]["new"])
            except dj.DjinnError as exc:
                failure.append((exc, time.monotonic()))

        driver = threading.Thread(target=drive)
        driver.start()
        wait_until(lambda: session_view(idle, session.id)["state"] == "running", 60, "the run")
        os.kill(daemon.info.pid, signal.SIGKILL)
        killed = time.monotonic()
        driver.join(10)
        asked = time.monotonic()
        with pytest.raises(dj.DaemonConnectionError, match="exited"):
            idle.status()
        idle_s = time.monotonic() - asked
        (error, when), = failure
        assert isinstance(error, dj.DaemonConnectionError) and "exited while" in str(error)
        assert when - killed < 2 and idle_s < 2, (when - killed, idle_s)
        with pytest.raises(dj.DaemonConnectionError):
            session.status()  # the session died with the daemon, and says so
        monkeypatch.setenv("DJINN_RUNTIME_DIR", str(daemon.folder))
        fresh = dj.connect()
        assert fresh.daemon["pid"] != daemon.info.pid and fresh.sessions() == []
        fresh.shutdown()
        fresh.close()
        wait_until(lambda: not pid_alive(fresh.daemon["pid"]), 30, "the fresh daemon's exit")
        print(f"\ndaemon SIGKILL: the running generate failed after {when - killed:.2f} s, an idle client's next "
              f"call after {idle_s:.2f} s")
    finally:
        daemon.stop()
