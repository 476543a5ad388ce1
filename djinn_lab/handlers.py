"""``GET /djinn/status``: what the sidebar shows, read from the local daemon through the server's own auth.

The handler is a thin read: the daemon's ``status`` op (models, sessions with state and memory, clients,
device and pool totals), an NVML sample, and which open notebook each session belongs to, shaped into one
JSON view. It never starts a daemon (``connect(start=False)`` semantics) and never calls an op that changes
anything. Blocking ZeroMQ calls run on the server's thread pool, never on its event loop.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from typing import Any

from jupyter_server.base.handlers import APIHandler
from jupyter_server.utils import url_path_join
from tornado import web

from .gpu import Nvml

CLIENT_NAME = "jupyterlab sidebar"  # how this server introduces itself to the daemon
STATUS_TIMEOUT = 5.0  # seconds; a daemon busier than this is reported unreachable, the next poll tries again


class DaemonLink:
    """One read-only client of the user's local daemon, replaced when the daemon restarts (a new pid)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._client: Any = None
        self._pid: int | None = None

    def status(self) -> dict[str, Any]:
        """``{"state": "running", "pid", **status}``, or ``"absent"`` / ``"unreachable"`` with a message."""
        from djinn_kernel.client import DaemonClient
        from djinn_kernel.errors import DjinnError
        from djinn_kernel.runtime import read_info, runtime_dir

        with self._lock:
            try:
                folder = runtime_dir()
            except DjinnError as exc:
                return {"state": "unreachable", "message": str(exc)}
            info = read_info(folder)
            if info is None:
                self._drop()
                return {
                    "state": "absent",
                    "message": f"no Djinn daemon is running (looked in {folder}); `%djinn load MODEL --daemon` "
                    "in a notebook or `djinn serve` in a terminal starts one",
                }
            try:
                if self._pid != info.pid:
                    self._drop()
                    self._client = DaemonClient(info.ipc, info.key(), daemon_pid=info.pid, name=CLIENT_NAME)
                    self._pid = info.pid
                status = self._client.call("status", timeout=STATUS_TIMEOUT)
            except (DjinnError, OSError) as exc:
                self._drop()
                return {"state": "unreachable", "pid": info.pid, "message": f"{exc}; the next refresh tries again"}
            return {"state": "running", "pid": info.pid, **status}

    def _drop(self) -> None:
        if self._client is not None:
            self._client.close()
        self._client, self._pid = None, None

    def close(self) -> None:
        with self._lock:
            self._drop()


def view(daemon: dict[str, Any], gpu: dict[str, Any], notebooks: dict[str, str]) -> dict[str, Any]:
    """The sidebar's JSON: daemon state, GPU bar numbers, host pool, models, and sessions with their notebook.

    ``notebooks`` maps a daemon client's name to an open notebook's path (kernels name their client after
    their notebook); a session whose client is not an open notebook keeps ``notebook: None``.
    """
    result: dict[str, Any] = {"daemon": {k: daemon.get(k) for k in ("state", "pid", "message")}, "gpu": gpu}
    if daemon["state"] != "running":
        return {**result, "models": [], "sessions": [], "host_pool": None, "djinn_gpu_bytes": None}
    models = [{k: m[k] for k in ("id", "name", "weight_bytes", "dtype", "num_layers")} for m in daemon["models"]]
    device, memory = daemon["device"], daemon["memory"]
    weights = sum(m["weight_bytes"] for m in models)
    names = {c["label"]: c["name"] for c in daemon["clients"]}
    sessions = [
        {
            "id": s["id"],
            "model": s["model"],
            "state": s["state"],
            "gpu_bytes": s["memory"]["gpu_bytes"],
            "host_bytes": s["memory"]["host_bytes"],
            "client": names.get(s["owner"], s["owner"]),
            "notebook": notebooks.get(names.get(s["owner"], "")),
        }
        for s in daemon["sessions"]
    ]
    result["daemon"]["device"] = device.get("name", device["type"])
    return {
        **result,
        "models": models,
        "sessions": sessions,
        "host_pool": memory["host_pool"],
        # On CUDA the allocator's reserved bytes are what the daemon holds; elsewhere weights plus session state.
        "djinn_gpu_bytes": device.get("reserved", weights + memory["session_gpu_bytes"]),
    }


class StatusHandler(APIHandler):
    @web.authenticated
    async def get(self) -> None:
        link: DaemonLink = self.settings["djinn_link"]
        nvml: Nvml = self.settings["djinn_nvml"]
        loop = asyncio.get_running_loop()
        daemon, gpu = await asyncio.gather(loop.run_in_executor(None, link.status), loop.run_in_executor(None, nvml.sample))
        self.finish(json.dumps(view(daemon, gpu, await self._notebooks())))

    async def _notebooks(self) -> dict[str, str]:
        """Client name → notebook path, for each open notebook (by its path and by its file name)."""
        mapping: dict[str, str] = {}
        for s in await self.settings["session_manager"].list_sessions():
            if s.get("type") == "notebook" and s.get("path"):
                mapping[s["path"]] = mapping[os.path.basename(s["path"])] = s["path"]
        return mapping


def setup_handlers(web_app: Any) -> None:
    web_app.settings.update(djinn_link=DaemonLink(), djinn_nvml=Nvml())
    route = url_path_join(web_app.settings["base_url"], "djinn", "status")
    web_app.add_handlers(".*$", [(route, StatusHandler)])
