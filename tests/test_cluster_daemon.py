"""`djinn serve --ray`: a real daemon process serving a local Ray cluster of two CPU engines (standing in for
GPUs), used through the ordinary client API: placement over the engines, an exact migration, per-engine status."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

import pytest
import torch

import djinn_kernel as dj
from daemon_util import DaemonProcess
from djinn_kernel import cli
from djinn_kernel.edits import Scale
from djinn_kernel.runtime import read_info


def test_serve_ray_refuses_what_it_cannot_do_yet_and_says_how_to_get_ray(monkeypatch, capsys, tmp_path):
    """Checked before Ray or any engine starts (an empty runtime folder: no daemon is found running)."""
    monkeypatch.setenv("DJINN_RUNTIME_DIR", str(tmp_path))
    assert cli.main(["serve", "--engines", "2"]) == 2
    assert "--engines is an option of --ray" in capsys.readouterr().err
    assert cli.main(["serve", "--ray", "--spill-memory", "1GiB"]) == 2
    assert "--spill-memory needs --spill-dir" in capsys.readouterr().err
    assert cli.main(["serve", "--ray", "--page-on-pause", "--policy", "signal"]) == 2
    assert "--page-on-pause is a mode of the lru policy" in capsys.readouterr().err
    assert cli.main(["serve", "--ray", "--engines", "0"]) == 2
    assert "--engines must be at least 1" in capsys.readouterr().err
    assert cli.main(["serve", "--ray", "--rebalance", "-1"]) == 2
    assert "--rebalance must be 0 (never) or a number of seconds" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "ray", None)  # Ray not installed
    assert cli.main(["serve", "--ray", "--device", "cpu", "--engines", "2"]) == 2
    assert "pip install 'djinn-kernel[ray]'" in capsys.readouterr().err
    assert read_info(tmp_path) is None


@pytest.fixture(scope="module")
def daemon():
    pytest.importorskip("ray")
    # --gpu-memory: room for one session per engine (4096 positions of tiny-llama's KV, 1 KiB each, counted
    # per session), so the second session is placed on the other engine. --device cpu: CPU engines, also where
    # the test suite runs on a GPU (the last --device wins).
    # --spill-dir, --host-reserve, --page-on-pause: serve's memory options reach every engine (a folder each).
    spill = tempfile.mkdtemp(prefix="djt-spill-", dir="/tmp")
    d = DaemonProcess("--ray", "--engines", "2", "--device", "cpu", "--gpu-memory", "6MiB", "--spill-dir", spill,
                      "--spill-memory", "256MiB", "--host-reserve", "1MiB", "--page-on-pause")
    d.spill = spill
    yield d
    d.stop()
    shutil.rmtree(spill, ignore_errors=True)


def engines_of(status: dict) -> dict[int, str]:
    return {sid: e["name"] for e in status["engines"] for sid in e["sessions"]}


def test_a_ray_daemon_places_sessions_on_two_engines_and_migrates_one_exactly(daemon, monkeypatch, capsys):
    client = daemon.client()
    assert client.daemon["device"] == "ray (2 engines)"
    model = dj.load("tiny-llama", backend=client)
    moved, other = model.session(), model.session()
    moved.generate("Hello, world", 4)
    other.generate("Hello", 3)
    where = engines_of(client.status())
    assert where[moved.id] != where[other.id], "the second session did not fit the first engine"

    twin = moved.fork()  # stays on moved's engine: what moved must give after its move
    expected = twin.generate(" and then", 5, fresh=False, keep_logits=True)
    info = moved.migrate(engine=where[other.id])
    assert (info["id"], info["from"], info["to"]) == (moved.id, where[moved.id], where[other.id])
    after = moved.generate(" and then", 5, fresh=False, keep_logits=True)
    assert after.tokens == expected.tokens and torch.equal(after.logits, expected.logits)

    status = client.status()
    assert [(e["name"], e["alive"]) for e in status["engines"]] == [("gpu0", True), ("gpu1", True)]
    assert [(e["memory"]["spill"]["folder"], e["memory"]["spill"]["capacity"]) for e in status["engines"]] == [
        (os.path.join(daemon.spill, name), 256 << 20) for name in ("gpu0", "gpu1")]
    now = engines_of(status)
    assert now[moved.id] == now[other.id] == where[other.id] and now[twin.id] == where[moved.id]
    assert {s["id"] for s in status["sessions"] if s["mine"]} == {moved.id, other.id, twin.id}
    monkeypatch.setenv("DJINN_RUNTIME_DIR", str(daemon.folder))
    assert cli.main(["status"]) == 0  # `djinn status`: the engines, each with its memory
    out = capsys.readouterr().out
    assert "on a Ray cluster: 2 engines, 2 alive" in out and "engine gpu1 on cpu" in out and "session budget" in out
    for session in (moved, other, twin):
        session.close()


def test_a_model_split_over_the_two_engines_runs_as_the_whole_model(daemon):
    """``split_at``: the first layers on one engine actor, the rest and the session on the other; pauses at a
    layer of each side with edits there give the whole model's activations, tokens and logits, bitwise."""
    client = daemon.client()
    whole = dj.load("tiny-llama", backend=client)
    split = dj.load("tiny-llama", split_at=2, backend=client)
    assert split.info["id"] == "tiny-llama:split2" and split.info["split"]["host"] != split.info["split"]["stage"]
    sessions = [whole.session(), split.session()]
    first = [s.generate("Hello, world", 5, keep_logits=True) for s in sessions]
    assert first[0].tokens == first[1].tokens and torch.equal(first[0].logits, first[1].logits)
    for s in sessions:
        s.break_at(1, tokens=1)  # a layer of the stage engine
        s.break_at(3, tokens=0)  # a layer of the host engine
    runs = [s.generate(" and then", 4, fresh=False, keep_logits=True) for s in sessions]
    seen = []
    while runs[0].state == "paused":
        assert runs[1].state == "paused" and runs[0].pause.info == runs[1].pause.info
        assert torch.equal(runs[0].pause.activation, runs[1].pause.activation)
        seen.append(runs[0].pause.layer)
        for run in runs:
            run.pause.apply(Scale(1.5))
            run.resume()
    assert seen == [3, 1] and runs[1].state == "finished"
    assert runs[0].tokens == runs[1].tokens and torch.equal(runs[0].logits, runs[1].logits)
    status = client.status()
    host = next(e for e in status["engines"] if e["name"] == split.info["split"]["host"])
    stage = next(e for e in status["engines"] if e["name"] == split.info["split"]["stage"])
    assert sessions[1].id in host["sessions"] and "tiny-llama:layers0-1" in stage["models"]
    with pytest.raises(dj.InvalidArgumentError, match="a model split across engines, whose sessions cannot be moved"):
        sessions[1].migrate(engine=split.info["split"]["stage"])
    for s in sessions:
        s.delete()
    twin = sessions[1].fork()  # its half on the stage is forked too
    after = [s.generate(" so", 3, fresh=False, keep_logits=True) for s in (*sessions, twin)]
    assert all(r.tokens == after[0].tokens and torch.equal(r.logits, after[0].logits) for r in after)
    for session in (*sessions, twin):
        session.close()
