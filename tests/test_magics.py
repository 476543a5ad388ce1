"""The %djinn magic through IPython's test shell: every subcommand, and bad arguments as short usage errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from IPython.core.error import UsageError
from IPython.testing.globalipapp import start_ipython

import djinn_kernel as dj
from djinn_kernel.magics import DjinnMagics
from notebook_cells import readme_notebook_cells


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


def test_conditional_break(ip, loaded):
    assert djinn(ip, 'break 2 --when "norm > 0" --tokens 1') == "breakpoint 1 at 2 (output) when norm > 0"
    assert "when norm > 0" in djinn(ip, "breaks")
    run = djinn(ip, "run Hello --max-new-tokens 3 --no-chat")
    assert run.paused and run.pause.token_step == 1 and run.pause.info["reason"].startswith("condition: norm > 0")
    djinn(ip, "finish")


@pytest.mark.parametrize(
    "line, message",
    [
        ("break 2 --when 'norm >> 1'", "cannot read the condition"),
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


def test_load_split_at_says_it_needs_a_cluster(ip):
    with pytest.raises(UsageError, match="splitting a model by layer needs a cluster backend"):
        djinn(ip, "load tiny-llama --split-at 2")


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


# The notebook experience: the README's cells, prompts ending in "?", streaming, interrupts, readable output ------


def test_readme_notebook_section_runs_verbatim(ip):
    cells = readme_notebook_cells()
    assert cells and "%djinn run What is the capital of France?" in cells[0]
    results = [ip.run_cell(cell) for cell in cells]
    assert [r.error_in_exec or r.error_before_exec for r in results] == [None] * len(cells)
    run = ip.user_ns["_djinn"]
    assert isinstance(run, dj.Run) and run.state == "finished" and len(run.tokens) == 32
    assert 15 in [p.layer for p in [results[1].result]] and results[1].result.token_step == 0
    from djinn_widgets import ActivationInspector, SteeringPanel

    assert isinstance(results[2].result, ActivationInspector) and isinstance(results[3].result, SteeringPanel)
    djinn(ip, "delete")


@pytest.mark.parametrize(
    "cell, prompt",
    [
        ("%djinn run Is it? --max-new-tokens 2 --no-chat", "Is it?"),
        ("%djinn run Why is the sky blue?", "Why is the sky blue?"),
        ("r = %djinn run Who are you??", "Who are you??"),
        ("if True:\n    %djinn run Why?", "Why?"),
        ('%djinn run "Quoted?"', "Quoted?"),
        ("%%djinn run --max-new-tokens 2\nA prompt\nover two lines?\n", "A prompt\nover two lines?"),
    ],
)
def test_prompts_ending_in_a_question_mark(ip, loaded, monkeypatch, cell, prompt):
    seen = []
    original = dj.Session.generate
    monkeypatch.setattr(dj.Session, "generate", lambda self, p, *a, **k: seen.append(p) or original(self, p, *a, **k))
    result = ip.run_cell(cell)
    assert result.success and seen == [prompt]


def test_help_on_the_magic_itself_still_works(ip):
    assert ip.input_transformer_manager.transform_cell("%djinn?\n") == "get_ipython().run_line_magic('pinfo', '%djinn')\n"


def test_run_streams_text_and_a_progress_line(ip, loaded, capsys):
    djinn(ip, "delete")
    run = djinn(ip, "run Hello --max-new-tokens 40 --no-chat")
    out = capsys.readouterr().out
    assert out.startswith(run.text) and f"run {run.id} · finished · 40/40 tokens" in out and "tokens/s" in out


def test_cell_magic_takes_only_run(ip, loaded):
    with pytest.raises(UsageError, match="only run"):
        ip.run_cell_magic("djinn", "break 1", "body")


def test_interrupt_cancels_with_one_line(ip, loaded, monkeypatch, capfd):
    import signal
    import threading

    from djinn_kernel import magics

    main = threading.main_thread().ident
    monkeypatch.setattr(magics.Live, "__call__", lambda self, progress: signal.pthread_kill(main, signal.SIGINT))
    djinn(ip, "delete")
    result = ip.run_cell("%djinn run Hello --max-new-tokens 240 --no-chat")
    assert isinstance(result.error_in_exec, dj.RunInterrupted)
    captured = capfd.readouterr()
    lines = [line for line in (captured.out + captured.err).splitlines() if line.strip()]
    interrupted = [line for line in lines if "interrupted" in line]
    assert len(interrupted) == 1 and "cancelled at token step" in interrupted[0]
    assert not any("Traceback" in line or "File " in line for line in lines)
    run = ip.user_ns["_djinn"]
    assert run.state == "cancelled" and run is loaded_session(ip).run
    monkeypatch.undo()
    assert djinn(ip, "run Hello --max-new-tokens 2").state == "finished", "usable at once"


def loaded_session(ip) -> dj.Session:
    return ip.magics_manager.registry["DjinnMagics"].session


def test_outputs_are_text_not_reprs(ip, loaded):
    from IPython.core.formatters import DisplayFormatter

    def shown(value) -> dict:
        return DisplayFormatter().format(value)[0]

    bp = djinn(ip, "break 2 --tokens 0")
    assert shown(bp)["text/plain"] == "breakpoint 1 at 2 (output)"
    table = shown(djinn(ip, "breaks"))
    assert "\\n" not in table["text/plain"] and "<table>" in table["text/html"] and "model.layers.2" in table["text/html"]
    run = djinn(ip, "run Hello --max-new-tokens 3 --no-chat")
    pause = shown(ip.user_ns["_djinn"])
    assert pause["text/plain"].startswith("paused at layer 2 (output), prefill") and "<b>" in pause["text/html"]
    djinn(ip, "steer scale 0.5")
    finished = shown(djinn(ip, "continue"))
    assert finished["text/plain"] == f"run {run.id} finished, 3 token(s)\n{run.text}"
    assert "steered or edited" in finished["text/html"] and finished["text/html"].count("title='steered'") == 1
    assert "<pre>" in shown(djinn(ip, "status"))["text/html"]
    djinn(ip, "delete")


def test_errors_are_phrased_for_magics(ip, loaded):
    djinn(ip, "break 1 --once")
    djinn(ip, "run Hello --max-new-tokens 2")
    with pytest.raises(dj.SessionBusyError, match=r"run\.finish\(\)"):
        loaded_session(ip).generate("again")  # the API names API calls...
    with pytest.raises(UsageError, match=r"\(%djinn finish\) or cancel it \(%djinn cancel\)"):
        djinn(ip, "run again")  # ...the magic names magics
    djinn(ip, "finish")


def test_vram_keeps_one_sampler(ip, loaded):
    first = djinn(ip, "vram")
    second = djinn(ip, "vram")
    assert not first.running and second.running
    djinn(ip, "load tiny-llama")  # a new backend or model: the old sampler must not keep plotting
    assert not second.running


def test_readme_first_cell_in_a_fresh_shell():
    """``%load_ext`` and ``%djinn run ...?`` in one cell: IPython transforms the cell before the extension exists."""
    import subprocess
    import sys

    code = (
        "from IPython.testing.globalipapp import start_ipython\n"
        "from notebook_cells import readme_notebook_cells\n"
        "ip = start_ipython()\n"
        "result = ip.run_cell(readme_notebook_cells()[0])\n"
        "assert result.success, result\n"
        "pause = ip.user_ns['_djinn']\n"
        "assert pause.layer == 15 and pause.token_step == 0, pause\n"
        "pause.run.cancel()\n"
    )
    here = Path(__file__).parent
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=here)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "not found" not in done.stdout, done.stdout


def test_conversation_continue_fork_and_rewind(ip, loaded):
    first = djinn(ip, "run Hello --max-new-tokens 3 --no-chat")
    second = djinn(ip, "run --continue , world --max-new-tokens 3 --no-chat")
    assert second.prompt_ids[0] == first.tokens[-1], "the next turn starts with the reply's pending token"
    parent = ip.magics_manager.registry["DjinnMagics"].session
    had = parent.history
    assert f"({had} tokens)" in str(djinn(ip, "fork"))
    fork = ip.magics_manager.registry["DjinnMagics"].session
    assert fork.id != parent.id and fork.history == had
    turn = len(first.prompt_ids) + len(first.tokens)  # the conversation before the second turn
    assert str(djinn(ip, f"rewind {turn}")) == f"kept {turn} of {had} tokens; %djinn run --continue goes on from there"
    again = djinn(ip, "run --continue , world --max-new-tokens 3 --no-chat")
    assert again.tokens == second.tokens, "the fork, rewound to before the second turn, replays it"
    parent.close()


def test_io_wait_and_compute(ip, monkeypatch):
    from djinn_kernel import api
    from djinn_kernel.engine import Engine

    engine = Engine(device="cpu", deterministic=True, policy="signal")
    monkeypatch.setattr(api, "_backend", engine)
    try:
        djinn(ip, "load tiny-llama")
        djinn(ip, "run Hello --max-new-tokens 3 --no-chat")
        assert "paging out in the background" in djinn(ip, "io-wait")
        assert engine.phases.wait_idle(30)
        session = ip.magics_manager.registry["DjinnMagics"].session
        host = session.status()["memory"]["host_bytes"]
        assert session.status()["state"] == "paged" and host > 0
        assert f"paged {host / 2**20:.2f} MiB back in" in djinn(ip, "compute") and session.status()["state"] == "idle"
        assert "paging out" in djinn(ip, "io-wait 5")
        djinn(ip, "compute")  # at once: before or after the background page-out, the KV is back
        assert session.status()["state"] == "idle" and session.status()["memory"]["phase"] == "compute"
        with pytest.raises(UsageError, match="invalid float value"):
            djinn(ip, "io-wait soon")
    finally:
        engine.shutdown()
