"""The sidebar's kernel channel: each action runs the notebook's own %djinn, and the state it reports back."""

from __future__ import annotations

from typing import Any

import pytest
from IPython.core.interactiveshell import InteractiveShell

from djinn_kernel.comm import SidebarChannel, open_sidebar_channel


class FakeComm:
    """Stands in for the ipykernel comm: records what the kernel sends and delivers the sidebar's messages."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.handler: Any = None

    def on_msg(self, handler: Any) -> None:
        self.handler = handler

    def send(self, data: dict[str, Any]) -> None:
        self.sent.append(data)

    def ask(self, action: str, **args: Any) -> dict[str, Any]:
        self.handler({"content": {"data": {"request": len(self.sent) + 1, "action": action, **args}}})
        reply = self.sent[-1]
        assert reply["request"] == len(self.sent)
        return reply


@pytest.fixture(scope="module")
def ip():
    # A shell of its own: IPython's global test shell can be started once per process, by test_magics.
    shell = InteractiveShell()
    shell.run_line_magic("load_ext", "djinn_kernel")
    return shell


@pytest.fixture
def comm(ip) -> FakeComm:
    fake = FakeComm()
    SidebarChannel(ip.magics_manager.registry["DjinnMagics"], fake)
    return fake


def test_terminal_ipython_opens_no_channel(ip):
    assert open_sidebar_channel(ip) is None  # no kernel, no front end to talk to


def test_state_before_and_after_load(ip, comm):
    ip.magics_manager.registry["DjinnMagics"].session = None
    assert comm.ask("state") == {"request": 1, "error": None, "state": {"loaded": False}}
    ip.run_line_magic("djinn", "load tiny-llama")
    state = comm.ask("state")["state"]
    assert state["loaded"] and state["model"] == "tiny-llama" and state["breakpoints"] == [] and state["run"] is None


def test_break_pause_continue_updates_djinn(ip, comm):
    ip.run_line_magic("djinn", "load tiny-llama")
    assert comm.ask("break", layer=1)["error"] is None
    ip.run_line_magic("djinn", "run Hello --max-new-tokens 3 --no-chat")
    state = comm.ask("state")["state"]
    assert state["run"]["state"] == "paused"
    assert state["pause"] == {**state["pause"], "layer": 1, "side": "output", "token_step": 0, "edits": 0}
    state = comm.ask("continue")["state"]
    assert state["pause"]["token_step"] == 1 and ip.user_ns["_djinn"].token_step == 1
    state = comm.ask("finish")["state"]
    assert state["run"]["state"] == "finished" and state["run"]["tokens"] == 3
    assert ip.user_ns["_djinn"].finished
    reply = comm.ask("continue")
    assert "not paused" in reply["error"] and reply["state"]["run"]["state"] == "finished"


def test_disable_keeps_the_breakpoint_until_enabled(ip, comm):
    ip.run_line_magic("djinn", "load tiny-llama")
    ip.run_line_magic("djinn", "break 2 --tokens 0-1")
    [bp] = comm.ask("state")["state"]["breakpoints"]
    [disabled] = comm.ask("disable", id=bp["id"], path=bp["path"], side=bp["side"])["state"]["breakpoints"]
    assert disabled == {**bp, "id": None, "enabled": False}
    assert ip.magics_manager.registry["DjinnMagics"].session.breakpoints == []
    [enabled] = comm.ask("enable", id=None, path=bp["path"], side=bp["side"])["state"]["breakpoints"]
    assert (enabled["path"], enabled["tokens"], enabled["enabled"]) == (bp["path"], [0, 1], True)
    assert comm.ask("delete", id=enabled["id"], path=bp["path"], side=bp["side"])["state"]["breakpoints"] == []
    assert "does not know" in comm.ask("explode")["error"]
