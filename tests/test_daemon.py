"""The daemon: one model shared by client processes, paging, reclamation, isolation, tokens on TCP."""

from __future__ import annotations

import json
import os
import socket
import textwrap

import pytest
import torch

import djinn_kernel as dj
from conftest import PROMPT, drain, make_engine, reference
from daemon_util import DaemonProcess, wait_until
from djinn_kernel import cli
from djinn_kernel.client import DaemonClient, connect
from djinn_kernel.daemon import Daemon, Security
from djinn_kernel.runtime import pid_alive, read_info

PAUSED_CLIENT = textwrap.dedent(
    """
    import json, sys, djinn_kernel as dj
    client = dj.connect()
    model = dj.load("tiny-llama")
    session = model.session()
    session.break_at(1)
    run = session.generate("Hello, world", 8)
    print(json.dumps({"sid": session.id, "paused": run.paused, "model": model.info}), flush=True)
    sys.stdin.readline()
    tokens = run.finish().tokens
    print(json.dumps({"tokens": tokens}), flush=True)
    """
)


@pytest.fixture(scope="module")
def daemon():
    d = DaemonProcess()
    yield d
    d.stop()


@pytest.fixture(scope="module")
def expected():
    engine = make_engine()
    tokens, logits = reference(dj.load("tiny-llama", backend=engine))
    engine.shutdown()
    return tokens, logits


def test_two_processes_share_one_model(daemon, expected):
    a, b = daemon.script(PAUSED_CLIENT), daemon.script(PAUSED_CLIENT)
    first, second = (json.loads(p.stdout.readline()) for p in (a, b))
    assert first["paused"] and second["paused"] and first["sid"] != second["sid"]
    assert first["model"]["weight_bytes"] == second["model"]["weight_bytes"] > 0
    status = daemon.client().status()
    assert len(status["models"]) == 1, "the second load reused the first copy of the weights"
    theirs = [s for s in status["sessions"] if s["id"] in (first["sid"], second["sid"])]
    assert [s["state"] for s in theirs] == ["paused", "paused"]
    assert len({s["owner"] for s in theirs}) == 2
    assert all("breakpoints" not in s and not s["mine"] for s in theirs), "no other client's content"
    for p in (a, b):
        out, err = p.communicate("\n", timeout=60)
        assert p.returncode == 0, err
        assert json.loads(out)["tokens"] == expected[0]


def test_client_death_reclaims_sessions(daemon):
    p = daemon.script(PAUSED_CLIENT)
    sid = json.loads(p.stdout.readline())["sid"]
    watcher = daemon.client()
    assert sid in [s["id"] for s in watcher.status()["sessions"]]
    p.kill()
    p.wait()
    wait_until(lambda: sid not in [s["id"] for s in watcher.status()["sessions"]], 20, "session reclaim")
    assert watcher.status()["memory"]["session_gpu_bytes"] == 0


def test_session_isolation(daemon):
    alice, bob = daemon.client("alice"), daemon.client("bob")
    model = dj.load("tiny-llama", backend=alice)
    s = model.session()
    s.break_at(2)
    run = s.generate(PROMPT, 4)
    assert run.paused
    for call in (
        lambda: bob.describe_session(s.id),
        lambda: bob.resume(s.id, "continue"),
        lambda: bob.activation(s.id),
        lambda: bob.close_session(s.id),
        lambda: bob.add_breakpoint(s.id, 0),
    ):
        with pytest.raises(dj.SessionClosedError, match="does not exist"):
            call()
    assert bob.sessions() == [] and len(alice.sessions()) == 1
    assert run.finish().state == "finished"


def test_engine_api_through_daemon(daemon, expected):
    tokens, logits = expected
    model = dj.load("tiny-llama", backend=daemon.client())
    with model.session() as s:
        s.break_at(1)
        s.break_at(3, side="input", tokens=(2, 4))
        run = s.generate(PROMPT, 8, keep_logits=True)
        stops = drain(run)
        assert len(stops) == 8 + 3
        assert run.tokens == tokens and torch.equal(run.logits, logits)
        run = s.generate(PROMPT, 8)
        with pytest.raises(dj.SessionBusyError):
            s.generate(PROMPT, 8)
        h = run.pause.activation
        run.pause.add(torch.ones(h.shape[-1]), 0.5)
        assert torch.equal(run.pause.activation, h + 0.5)
        with pytest.raises(dj.InvalidTensorError, match="NaN"):
            run.pause.replace(torch.full_like(h, float("nan")))
        run.finish()
        with pytest.raises(dj.RunFinishedError):
            run.resume()
    with pytest.raises(dj.ModelNotFoundError):
        dj.load("no-such-model", backend=daemon.client())


def test_bf16_activation_round_trips_bitwise(daemon):
    client = daemon.client()
    model = dj.load("tiny-gpt2", backend=client)
    with model.session() as s:
        s.break_at(0, tokens=0)
        run = s.generate(PROMPT, 2)
        value = (torch.randn(run.pause.shape) * 3).to(torch.float32)
        run.pause.replace(value)
        assert torch.equal(run.pause.activation, value)
        run.finish()


def test_bad_requests_at_the_edge(daemon):
    client = daemon.client()
    with pytest.raises(dj.InvalidArgumentError, match="unknown operation"):
        client.call("eval_python")
    with pytest.raises(dj.InvalidArgumentError, match="no argument"):
        client.call("status", verbose=True)
    with pytest.raises(dj.SessionClosedError):
        client.resume("1; drop", "continue")
    model = dj.load("tiny-llama", backend=client)
    with model.session() as s:
        with pytest.raises(dj.InvalidArgumentError, match="generate"):
            client.call("generate", s.id)
        with pytest.raises(dj.InvalidArgumentError, match="max_new_tokens"):
            s.generate(PROMPT, -3)
        assert s.generate(PROMPT, 2).state == "finished", "the session is still usable"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tcp_requires_token_and_server_key():
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    d = DaemonProcess("--listen", endpoint)
    try:
        with pytest.raises(dj.DaemonConnectionError, match="token"):
            connect(endpoint)
        with pytest.raises(dj.DaemonConnectionError, match="server key"):
            DaemonClient(endpoint, d.info.key())
        with pytest.raises(dj.ProtocolError, match="wrong token"):
            DaemonClient(endpoint, b"0" * 64, server_key=d.info.server_key)
        client = connect(endpoint, token=d.info.key().decode(), server_key=d.info.server_key)
        assert client.daemon["pid"] == d.info.pid and endpoint in client.daemon["endpoints"]
        client.close()
    finally:
        d.stop()


def test_paging_under_small_budget_is_exact(expected):
    tokens, logits = expected
    d = DaemonProcess("--gpu-memory", "1MiB", "--page-on-pause", "--host-memory", "64MiB")
    try:
        client = d.client()
        model = dj.load("tiny-llama", backend=client)
        a, b = model.session(), model.session()
        a.break_at(0)
        b.break_at(3)
        ra, rb = a.generate(PROMPT, 8, keep_logits=True), b.generate(PROMPT, 8, keep_logits=True)
        while ra.paused or rb.paused:
            for s, r in ((a, ra), (b, rb)):
                if r.paused:
                    mem = s.status()["memory"]
                    assert s.status()["state"] == "paged" and mem["gpu_bytes"] == 0 and mem["host_bytes"] > 0
                    r.resume()
        for r in (ra, rb):
            assert r.tokens == tokens and torch.equal(r.logits, logits)
        status = client.status()
        assert status["memory"]["page_outs"] == 16 and status["memory"]["page_ins"] == 16
        assert status["memory"]["host_pool"]["used"] == 0
    finally:
        d.stop()


def test_autostart_status_and_stop(monkeypatch, capsys, tmp_path_factory):
    folder = tmp_path_factory.mktemp("rt", numbered=True)
    short = f"/tmp/djs-{os.getpid()}"
    os.makedirs(short, mode=0o700, exist_ok=True)
    monkeypatch.setenv("DJINN_RUNTIME_DIR", short)
    with pytest.raises(dj.DaemonConnectionError, match="djinn serve"):
        connect(start=False)
    first = connect()
    second = connect()
    assert first.daemon["pid"] == second.daemon["pid"] == read_info(folder.__class__(short)).pid
    pid = first.daemon["pid"]
    dj.load("tiny-gpt2", backend=first).session().break_at(0)
    assert cli.main(["status"]) == 0
    out = capsys.readouterr().out
    assert f"daemon pid {pid}" in out and "tiny-gpt2" in out and "client-1" in out
    assert cli.main(["serve", "--device", "cpu"]) == 1, "a second daemon refuses to start"
    first.close()
    second.close()
    assert cli.main(["stop"]) == 0
    assert not pid_alive(pid) and read_info(folder.__class__(short)) is None


def test_migrate_through_a_one_engine_daemon_says_it_needs_ray(daemon):
    """``migrate`` is a cluster op (protocol.CLUSTER_OPS): a daemon serving one Engine refuses it by name."""
    client = daemon.client()
    with dj.load("tiny-llama", backend=client).session() as session:
        with pytest.raises(dj.InvalidArgumentError, match="migration needs a daemon started with djinn serve --ray"):
            session.migrate()
        assert session.generate("Hello", 2).finished, "the refusal left the session as it was"
    with pytest.raises(dj.InvalidArgumentError, match="splitting a model by layer needs a daemon started with djinn"):
        dj.load("tiny-llama", split_at=2, backend=client)


def test_one_client_many_threads(daemon):
    """Each thread has its own socket under one client id: concurrent calls get their own replies."""
    import threading

    client = daemon.client()
    model = dj.load("tiny-llama", backend=client)
    sessions = [model.session() for _ in range(4)]
    results: dict[int, list] = {}

    def work(s):
        s.break_at(1, tokens=2)
        run = s.generate(PROMPT, 4)
        results[s.id] = [run.pause.token_step, client.describe_session(s.id)["id"], run.finish().tokens]

    threads = [threading.Thread(target=work, args=(s,)) for s in sessions]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    first = results[sessions[0].id][2]
    assert {sid: r[:2] for sid, r in results.items()} == {s.id: [2, s.id] for s in sessions}
    assert all(r[2] == first for r in results.values())
    client.close()
    with pytest.raises(dj.DaemonConnectionError, match="closed"):
        client.status()


def test_a_closed_default_client_is_forgotten(monkeypatch):
    """``connect()`` makes its client the default backend; once that client is closed, ``load`` goes back to the
    in-process engine instead of failing on it (the fault test closes the client its ``connect()`` made)."""
    from djinn_kernel import api

    class Closed:
        closed = True

    monkeypatch.setattr(api, "_backend", Closed())
    monkeypatch.delenv("DJINN_MODE", raising=False)
    assert api.default_backend() is api.local_engine()


def test_a_dead_clients_sessions_are_all_closed_when_one_fails_and_the_reclaim_is_counted(capfd):
    class Engine:
        closed: list[int] = []

        def close_session(self, sid: int) -> None:
            if sid == 1:
                raise RuntimeError("injected failure")
            self.closed.append(sid)

    daemon = Daemon(Engine(), Security(b"k" * 64), [])
    try:
        daemon._reclaim_all([1, 2, 3])
        assert Engine.closed == [2, 3] and daemon._reclaimed == 1
        assert "reclaiming session 1 of a dead client failed: RuntimeError('injected failure')" in capfd.readouterr().err
    finally:
        daemon._pool.shutdown()
        daemon._ctx.term()
