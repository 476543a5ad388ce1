"""The sidebar's channel into a notebook's kernel: a comm that runs ``%djinn`` subcommands for it.

``%load_ext djinn_kernel`` opens it (target ``djinn``) when the shell is a Jupyter kernel. The JupyterLab
sidebar sends ``{"request": n, "action": ..., ...}``; the kernel answers ``{"request": n, "error": str | None,
"state": {...}}`` with the notebook's model, session, breakpoints, run and pause. Each action is the magic line a
user would type, run by this notebook's ``DjinnMagics``, so ``_djinn`` and the widgets see exactly what a typed
``%djinn continue`` gives them, and the daemon's ownership rules are unchanged: only this kernel's client
drives its sessions. Comm messages are handled on the kernel's shell thread between cells, like a cell.

Disabling a breakpoint deletes it and keeps its specification here until it is enabled again (the engine has
no enable switch yet), so a disabled breakpoint survives only as long as this kernel.
"""

from __future__ import annotations

from typing import Any

from IPython.core.error import UsageError

from .errors import DjinnError

TARGET = "djinn"
LINES = {"continue": "continue", "step": "step", "finish": "finish", "cancel": "cancel"}


class SidebarChannel:
    """Answers the sidebar's requests on ``comm`` with ``magics`` (the notebook's ``DjinnMagics``)."""

    def __init__(self, magics: Any, comm: Any) -> None:
        self.magics = magics
        self.comm = comm
        self._disabled: list[dict[str, Any]] = []
        comm.on_msg(self._on_msg)

    def _on_msg(self, msg: dict[str, Any]) -> None:
        data = msg["content"]["data"]
        try:
            self.act(data.get("action", "state"), data)
            error = None
        except (UsageError, DjinnError) as exc:
            error = str(exc)
        self.comm.send({"request": data.get("request"), "error": error, "state": self.state()})

    def act(self, action: str, data: dict[str, Any]) -> None:
        """Do one sidebar action; raises ``UsageError`` with the magic's message when it cannot be done."""
        if action == "state":
            return
        if action in LINES:
            self.magics.djinn(LINES[action])
        elif action == "break":
            self.magics.djinn(f"break {int(data['layer'])}")
        elif action in ("delete", "disable") and data.get("id") is not None:
            session = self.magics._need_session()
            spec = next((b for b in session.breakpoints if b["id"] == data["id"]), None)
            self.magics.djinn(f"delete {int(data['id'])}")
            if action == "disable" and spec is not None:
                self._disabled.append({**spec, "id": None, "enabled": False})
        elif action in ("delete", "enable"):
            spec = self._take_disabled(data.get("path"), data.get("side"))
            if action == "enable":
                tokens = None if spec["tokens"] is None else tuple(spec["tokens"])
                target = spec["layer"] if spec["layer"] is not None else spec["path"]
                self.magics._need_session().break_at(target, side=spec["side"], tokens=tokens, max_hits=spec["max_hits"])
        else:
            raise UsageError(f"the sidebar asked for {action!r}, which this kernel's Djinn does not know; reload the page")

    def _take_disabled(self, path: object, side: object) -> dict[str, Any]:
        for i, spec in enumerate(self._disabled):
            if spec["path"] == path and spec["side"] == side:
                return self._disabled.pop(i)
        raise UsageError(f"no disabled breakpoint at {path} ({side}); the sidebar's list is stale, it refreshes now")

    def state(self) -> dict[str, Any]:
        """What the sidebar shows for this notebook; ``error`` when the backend cannot be reached."""
        magics = self.magics
        if magics.session is None:
            return {"loaded": False}
        session = magics.session
        state: dict[str, Any] = {
            "loaded": True,
            "model": session.model.name,
            "session": session.id,
            "sessions": [session.id],
            "breakpoints": list(self._disabled),
            "run": None,
            "pause": None,
        }
        try:
            status = session.status()
        except DjinnError as exc:
            return {**state, "error": f"{exc} (load the model again with %djinn load MODEL)"}
        run = status["run"]
        state["breakpoints"] = status["breakpoints"] + self._disabled
        if run is not None:
            state["run"] = {
                "id": run["run_id"],
                "state": run["state"],
                "token_step": run["token_step"],
                "tokens": len(run["tokens"]),
                "text": run["text"],
            }
            pause = run["pause"]
            if pause is not None:
                keys = ("path", "layer", "side", "token_step", "shape", "dtype", "edits")
                state["pause"] = {k: pause[k] for k in keys}
        return state


def open_sidebar_channel(shell: Any) -> SidebarChannel | None:
    """Open the comm to the front end when ``shell`` is a Jupyter kernel (a terminal IPython has no sidebar).

    The channel drives the ``DjinnMagics`` instance that ``%load_ext`` registered, found in IPython's registry.
    """
    if getattr(shell, "kernel", None) is None:
        return None
    from comm import create_comm

    magics = shell.magics_manager.registry["DjinnMagics"]
    comm = create_comm(target_name=TARGET, data={"request": None, "error": None, "state": {"loaded": False}})
    return SidebarChannel(magics, comm)
