"""Djinn in JupyterLab: the server side of the debugger sidebar (``labextension/`` is its front end).

The server extension only reads: it asks the user's local daemon for its status through the Jupyter server's
own authenticated REST API (no port of its own) and samples the GPU with NVML. It never starts a daemon and
never drives a session; pause controls go through the notebook's kernel (``djinn_kernel.comm``), so the
daemon's ownership rules stay whole. This package imports neither torch nor pynvml until a request needs them,
so the Jupyter server starts as fast with it as without.
"""

from __future__ import annotations

from typing import Any


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    return [{"module": "djinn_lab"}]


def _jupyter_labextension_paths() -> list[dict[str, str]]:
    return [{"src": "labextension", "dest": "djinn-lab"}]


def _load_jupyter_server_extension(serverapp: Any) -> None:
    from .handlers import setup_handlers

    setup_handlers(serverapp.web_app)
    serverapp.log.info("djinn_lab: sidebar status at /djinn/status")
