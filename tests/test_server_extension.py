"""The sidebar's REST handler in a real Jupyter server: authentication, no daemon, a daemon, a restarted one."""

from __future__ import annotations

import os
import tempfile
import urllib.error
from pathlib import Path

import pytest

from daemon_util import wait_until
from djinn_kernel.client import DaemonClient, start_local_daemon
from djinn_kernel.runtime import pid_alive
from lab_util import JupyterServer

import djinn_kernel as dj


@pytest.fixture(scope="module")
def runtime() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="djt-", dir="/tmp"))
    os.chmod(folder, 0o700)
    return folder


@pytest.fixture(scope="module")
def server(runtime, tmp_path_factory):
    server = JupyterServer(tmp_path_factory.mktemp("server"), runtime)
    yield server
    server.stop()


def _start_daemon(runtime: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("DJINN_RUNTIME_DIR", str(runtime))  # the daemon publishes itself where the server looks
    return start_local_daemon(runtime, ["--device", "cpu", "--client-lease", "1"], timeout=60)


def _stop_daemon(info) -> None:
    os.kill(info.pid, 15)
    wait_until(lambda: not pid_alive(info.pid), 30, "daemon exit")


@pytest.mark.parametrize("token", [None, "wrong-token"])
def test_status_requires_authentication(server, token):
    with pytest.raises(urllib.error.HTTPError) as caught:
        server.get("/djinn/status", token=token)
    assert caught.value.code == 403


def test_no_daemon_is_a_state_not_an_error(server, runtime):
    status = server.get("/djinn/status")
    assert status["daemon"]["state"] == "absent"
    assert str(runtime) in status["daemon"]["message"] and "djinn serve" in status["daemon"]["message"]
    assert status["sessions"] == [] and status["models"] == []
    assert not (runtime / "daemon.json").exists(), "the status handler must never start a daemon"
    # This machine has no NVIDIA driver: NVML's reason is passed on instead of an error.
    assert status["gpu"]["available"] is False and "no GPU" in status["gpu"]["reason"]


def test_running_daemon_models_sessions_and_restart(server, runtime, monkeypatch):
    info = _start_daemon(runtime, monkeypatch)
    try:
        client = DaemonClient(info.ipc, info.key(), daemon_pid=info.pid, name="other.ipynb")
        model = dj.load("tiny-llama", backend=client)
        session = model.session()
        status = server.get("/djinn/status")
        assert status["daemon"]["state"] == "running" and status["daemon"]["pid"] == info.pid
        assert [(m["name"], m["weight_bytes"]) for m in status["models"]] == [(model.name, model.info["weight_bytes"])]
        [row] = status["sessions"]
        assert row["id"] == session.id and row["state"] == "idle" and row["client"] == "other.ipynb"
        assert row["notebook"] is None  # no notebook of that name is open in this server
        assert status["djinn_gpu_bytes"] >= model.info["weight_bytes"]
        assert status["host_pool"]["used"] == 0
        client.close()
    finally:
        _stop_daemon(info)
    assert server.get("/djinn/status")["daemon"]["state"] == "absent"
    restarted = _start_daemon(runtime, monkeypatch)
    try:
        status = server.get("/djinn/status")
        assert status["daemon"] == {**status["daemon"], "state": "running", "pid": restarted.pid}
        assert status["sessions"] == [] and status["models"] == []
    finally:
        _stop_daemon(restarted)
