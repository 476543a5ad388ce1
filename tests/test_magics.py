"""The %djinn magic through IPython's test shell: every subcommand, and bad arguments as short usage errors."""

from __future__ import annotations

import pytest
import torch
from IPython.core.error import UsageError
from IPython.testing.globalipapp import start_ipython

import djinn_kernel as dj
from djinn_kernel.magics import DjinnMagics


@pytest.fixture(scope="module")
def ip():
    shell = start_ipython()
    shell.run_line_magic("load_ext", "djinn_kernel")
    return shell


def djinn(ip, line: str):
    return ip.run_line_magic("djinn", line)


@pytest.fixture
def loaded(ip):
    model = djinn(ip, "load tiny-llama")
    assert isinstance(model, dj.Model) and model.name == "tiny-llama"
    return model


def test_break_run_inspect_continue_finish(ip, loaded):
    assert djinn(ip, "break 2 --tokens 0-1") == "breakpoint 1 at 2 (output)"
    assert "model.layers.2 (output)  tokens=[0, 1]" in djinn(ip, "breaks")
    run = djinn(ip, "run Hello, world --max-new-tokens 4 --no-chat")
    assert run.paused and ip.user_ns["_djinn"].layer == 2 and ip.user_ns["_djinn"].token_step == 0
    before = ip.user_ns["_djinn"].activation
    djinn(ip, "steer scale 0.5")
    assert torch.equal(ip.user_ns["_djinn"].activation, before * 0.5)
    djinn(ip, "steer reset")
    assert djinn(ip, "continue").pause.token_step == 1
    assert djinn(ip, "step").pause.layer == 3
    finished = djinn(ip, "finish")
    assert finished.state == "finished" and ip.user_ns["_djinn"] is finished and len(finished.tokens) == 4
    assert djinn(ip, "delete") == "deleted breakpoint(s) [1]" and djinn(ip, "breaks") == "no breakpoints"


def test_a_paused_run_survives_across_cells(ip, loaded):
    ip.run_cell("%djinn break 1 --once")
    ip.run_cell("%djinn run Hi --max-new-tokens 3")
    ip.run_cell("shape = tuple(_djinn.activation.shape)")
    assert ip.user_ns["shape"][-1] == loaded.hidden_size
    ip.run_cell("%djinn finish")
    assert ip.user_ns["_djinn"].state == "finished"


def test_steer_with_notebook_vectors(ip, loaded):
    ip.user_ns["v"] = torch.ones(loaded.hidden_size)
    djinn(ip, "break 0 --once")
    djinn(ip, "run Hello --max-new-tokens 2")
    h = ip.user_ns["_djinn"].activation
    djinn(ip, "steer add v --alpha 2")
    assert torch.equal(ip.user_ns["_djinn"].activation, h + 2)
    djinn(ip, "steer ablate v")
    djinn(ip, "finish")
    assert "layer 1 += 3.0 * v" in djinn(ip, "steer add v --alpha 3 --layer 1")
    assert djinn(ip, "steer clear") == "removed steering [1]"


def test_status_sessions_vram_inspect(ip, loaded):
    assert "in-process engine" in djinn(ip, "status") and "tiny-llama" in djinn(ip, "status")
    from djinn_widgets import ActivationInspector, SessionTable, VramMonitor

    assert isinstance(djinn(ip, "sessions"), SessionTable)
    monitor = djinn(ip, "vram")
    assert isinstance(monitor, VramMonitor)
    monitor.stop()
    djinn(ip, "break 2 --once")
    djinn(ip, "run Hello --max-new-tokens 2")
    inspector = djinn(ip, "inspect -k 3")
    assert isinstance(inspector, ActivationInspector) and len(inspector.lens) == 3
    djinn(ip, "finish")


@pytest.mark.parametrize(
    "line, message",
    [
        ("break 99", "layer 99 does not exist"),
        ("break model.layerz.1", "did you mean"),
        ("break 1 --tokens x", "tokens"),
        ("run", "required: prompt"),
        ("run hi --max-new-tokens many", "invalid int"),
        ("frobnicate", "invalid choice"),
        ("steer scale lots", "scale needs a number"),
        ("steer add missing_var", "no notebook variable"),
        ("steer add", "need a notebook variable"),
        ("help nope", "no subcommand"),
        ("run 'unclosed", "cannot parse"),
        ("delete 42", "no breakpoint 42"),
    ],
)
def test_bad_arguments_are_short_usage_errors(ip, loaded, line, message):
    djinn(ip, "break 0 --once")
    djinn(ip, "run Hello --max-new-tokens 2")
    with pytest.raises(UsageError, match=message):
        djinn(ip, line)
    djinn(ip, "finish")


def test_commands_that_need_state(ip):
    magics = DjinnMagics(ip)
    for line, message in [("break 1", "no model loaded"), ("continue", "no run yet"), ("inspect", "no run yet")]:
        with pytest.raises(UsageError, match=message):
            magics.djinn(line)
    djinn(ip, "load tiny-gpt2")
    djinn(ip, "run Hello --max-new-tokens 1")
    with pytest.raises(UsageError, match="not paused"):
        djinn(ip, "continue")


def test_help(ip):
    assert "SUBCOMMAND" in djinn(ip, "") and "steer" in djinn(ip, "help")
    assert "--tokens" in djinn(ip, "help break")
    for word in ("load", "break", "continue", "inspect", "steer", "vram", "_djinn"):
        assert word in DjinnMagics.djinn.__doc__


def test_cancel(ip, loaded):
    djinn(ip, "break 1")
    djinn(ip, "run Hello --max-new-tokens 3")
    assert djinn(ip, "cancel").state == "cancelled"
    assert djinn(ip, "run Hello --max-new-tokens 3").paused, "the session is usable after a cancel"
    djinn(ip, "finish")


def test_load_in_the_daemon(ip, monkeypatch):
    import os
    import tempfile

    from djinn_kernel import api, cli
    from djinn_kernel.client import DaemonClient

    folder = tempfile.mkdtemp(prefix="djm-", dir="/tmp")
    os.chmod(folder, 0o700)
    monkeypatch.setenv("DJINN_RUNTIME_DIR", folder)
    monkeypatch.setattr(api, "_backend", None)
    try:
        model = djinn(ip, "load tiny-llama --daemon")
        assert isinstance(model._backend, DaemonClient)
        djinn(ip, "break 2 --once")
        run = djinn(ip, "run Hello --max-new-tokens 2")
        assert run.paused and ip.user_ns["_djinn"].shape[-1] == model.hidden_size
        assert "daemon pid" in djinn(ip, "status")
        djinn(ip, "finish")
    finally:
        assert cli.main(["stop"]) == 0


def test_run_and_continue_print_nothing_to_stderr(ip, loaded, capfd):
    """What a notebook user sees under a cell: no library warning from Djinn's forwards, on any supported release."""
    djinn(ip, "break 1 --once")
    djinn(ip, "run Hello --max-new-tokens 3 --no-chat")
    djinn(ip, "continue")
    assert capfd.readouterr().err == ""
    djinn(ip, "delete")
