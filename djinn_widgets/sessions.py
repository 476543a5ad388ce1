"""``SessionTable``: every session the backend reports, with where its memory is, and totals; on a cluster
(``djinn serve --ray``, ``connect_cluster``) the engine (GPU) each session is on, and a line per engine above it:
its device, whether it is alive, its resident models and its sessions.

Through a daemon, ``status()`` already reduces other clients' sessions to id, owner, model, state and memory
(plus ``"mine": False``); the table shows what it is given and never asks for more. The "where" column (the
run's pause or token count) is filled only for sessions whose status carries their run, i.e. your own.
"""

from __future__ import annotations

import html
from typing import Any

import ipywidgets as W

from djinn_kernel.errors import DjinnError

from ._render import TextFallback, html_table, mib, text_table


class SessionTable(TextFallback, W.VBox):
    """An HTML table of ``backend.status()["sessions"]`` with a Refresh button; ``refresh()`` re-reads it."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.sessions: list[dict[str, Any]] = []
        self.engines: list[dict[str, Any]] = []  # a cluster's, as its status gives them
        self.names: dict[str, str] = {}  # a daemon's client labels and the names the clients gave
        self.error: str | None = None
        self.html = W.HTML()
        self.refresh_button = W.Button(description="Refresh", icon="refresh")
        self.refresh_button.on_click(lambda _: self.refresh())
        super().__init__([self.refresh_button, self.html])
        self.refresh()

    def refresh(self) -> None:
        try:
            status = self.backend.status()
            self.sessions = list(status["sessions"])
            self.engines = list(status.get("engines", []))
            self.names = {c["label"]: c["name"] for c in status.get("clients", []) if c.get("name") not in (None, "?")}
        except DjinnError as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            self.html.value = f"<b style='color:#b00'>{html.escape(self.error)}</b>"
            return
        self.error = None
        self.html.value = "".join(
            f"<div>{html.escape(line)}</div>" for line in self.engine_lines
        ) + html_table(self.headers, self.rows, foot=self.totals)

    @property
    def engine_lines(self) -> list[str]:
        """One line per engine of a cluster (none on one engine)."""
        return [
            f"{e['name']} on {e['device']}: {'alive' if e['alive'] else 'dead'}, models "
            f"{', '.join(map(str, e['models'])) or 'none'}, {len(e['sessions'])} session(s)"
            for e in self.engines
        ]

    @property
    def headers(self) -> list[str]:
        mine = ["mine"] if any("mine" in s for s in self.sessions) else []
        engine = ["engine"] if self._clustered else []
        return ["id", "owner", "model", *engine, "state", "context", "GPU MiB", "host MiB", "paged", *mine, "where"]

    @property
    def _clustered(self) -> bool:
        return bool(self.engines) or any("engine" in s for s in self.sessions)

    @property
    def rows(self) -> list[list[Any]]:
        show_mine = any("mine" in s for s in self.sessions)
        rows = []
        for s in self.sessions:
            memory = s.get("memory", {})
            row = [
                s["id"],
                self.owner(s["owner"] or "—"),  # a cluster's lost sessions have none
                s["model"],
                *([s.get("engine", "—")] if self._clustered else []),
                s["state"],
                s.get("history_tokens", "—"),  # tokens of the conversation it keeps (own sessions only)
                mib(memory.get("gpu_bytes")),
                mib(memory.get("host_bytes")),
                memory.get("paged", "—"),
            ]
            if show_mine:
                row.append("yes" if s.get("mine") else "no")
            rows.append([*row, _where(s.get("run"))])
        return rows

    def owner(self, label: str) -> str:
        """``notebook A (client-1)``: the name its client gave, with the daemon's label that tells equal names apart."""
        name = self.names.get(label)
        return f"{name} ({label})" if name else label

    @property
    def totals(self) -> list[Any]:
        gpu = sum(s.get("memory", {}).get("gpu_bytes", 0) for s in self.sessions)
        host = sum(s.get("memory", {}).get("host_bytes", 0) for s in self.sessions)
        paged = sum(bool(s.get("memory", {}).get("paged")) for s in self.sessions)
        total = [f"{len(self.sessions)} session(s)", "", "", *([""] if self._clustered else []), "", "", mib(gpu),
                 mib(host), f"{paged} paged"]
        return total + [""] * (len(self.headers) - len(total))

    def __repr__(self) -> str:
        if self.error:
            return f"<SessionTable: {self.error}>"
        lines = "".join(f"{line}\n" for line in self.engine_lines)
        return f"<SessionTable\n{lines}{text_table(self.headers, [*self.rows, self.totals])}>"


def _where(run: dict[str, Any] | None) -> str:
    """The run's position for sessions whose status includes it; '—' for redacted or idle ones."""
    if not run:
        return "—"
    pause = run.get("pause")
    if pause:
        return f"{pause['path']} ({pause['side']}) step {pause['token_step']}"
    return f"{run['state']}, {len(run.get('tokens', []))} token(s)"
