"""Streaming and interrupts through the public handles, in-process and (DJINN_TEST_BACKEND=daemon) over the wire.

An interrupt is delivered as Jupyter delivers one: a real SIGINT to the main thread (which wakes a blocking wait,
unlike ``_thread.interrupt_main``), sent at the first progress report or once the run has tokens.
"""

from __future__ import annotations

import signal
import threading
import time

import pytest

import djinn_kernel as dj
from conftest import PROMPT

MAIN = threading.main_thread().ident
LONG = 240  # tokens: the tiny models have 256 positions, and a run this long outlasts several polls


def test_progress_reports_tokens_as_they_come(llama_session):
    reports: list[dj.Progress] = []
    run = llama_session.generate(PROMPT, LONG, on_progress=reports.append)
    assert run.state == "finished" and reports[-1].done and reports[-1].tokens == len(run.tokens)
    assert "".join(r.new_text for r in reports) == run.text
    assert [r.tokens for r in reports] == sorted(r.tokens for r in reports)
    assert any(not r.done and 0 < r.tokens < len(run.tokens) for r in reports), "no report before the end"
    assert reports[-1].line().startswith(f"run {run.id} · finished · {len(run.tokens)}/{LONG} tokens")
    with llama_session.model.session() as plain:
        assert plain.generate(PROMPT, LONG).tokens == run.tokens  # streaming changes nothing in the output


def test_stream_yields_text_then_the_run_is_the_sessions(llama_session):
    pieces = list(llama_session.stream(PROMPT, 16))
    assert "".join(pieces) == llama_session.run.text and llama_session.run.state == "finished"


def test_stream_stops_at_a_pause_and_resumes_streaming(llama_session):
    llama_session.break_at(1, tokens=3)
    assert list(llama_session.stream(PROMPT, 8)) and llama_session.run.paused
    run = llama_session.run
    assert run.pause.token_step == 3 and run.pause.paused
    rest = list(run.stream("finish"))
    assert run.state == "finished" and run.text.endswith("".join(rest))


def _interrupt_at_first_report(reports: list[dj.Progress]):
    def callback(report: dj.Progress) -> None:
        if not reports:
            reports.append(report)
            signal.pthread_kill(MAIN, signal.SIGINT)

    return callback


def test_interrupt_cancels_the_run_and_the_session_is_usable(llama_session):
    reports: list[dj.Progress] = []
    with pytest.raises(dj.RunInterrupted, match="interrupted: run .* cancelled at token step") as caught:
        llama_session.generate(PROMPT, LONG, on_progress=_interrupt_at_first_report(reports))
    run = caught.value.run
    assert run is llama_session.run and run.state == "cancelled" and len(run.tokens) < LONG
    assert isinstance(caught.value, KeyboardInterrupt)  # scripts and "Run all" still stop
    assert llama_session.generate(PROMPT, 4).state == "finished", "the session is usable at once"


def test_interrupt_while_resuming(llama_session):
    llama_session.break_at(0, tokens=0)
    run = llama_session.generate(PROMPT, LONG)
    assert run.paused
    start = time.monotonic()
    with pytest.raises(dj.RunInterrupted):
        run.finish(on_progress=_interrupt_at_first_report([]))
    assert run.state == "cancelled" and time.monotonic() - start < 2.0
    assert llama_session.generate(PROMPT, 2).paused


def test_interrupt_without_streaming(llama_session):
    """No progress callback: the call waits on the caller's thread; an interrupt there cancels the run too."""
    backend, sid = llama_session._backend, llama_session.id

    def interrupt_once_generating() -> None:
        while True:  # polls the run's own state: no fixed sleep decides the timing
            snapshot = backend.run_snapshot(sid)
            if snapshot is not None and snapshot["state"] == "running" and snapshot["tokens"]:
                signal.pthread_kill(MAIN, signal.SIGINT)
                return

    watcher = threading.Thread(target=interrupt_once_generating, daemon=True)
    watcher.start()
    with pytest.raises(dj.RunInterrupted):
        llama_session.generate(PROMPT, LONG)
    watcher.join()
    assert llama_session.run.state == "cancelled" and len(llama_session.run.tokens) < LONG
    assert llama_session.generate(PROMPT, 2).state == "finished"


def test_leaving_a_stream_early_cancels(llama_session):
    for _ in llama_session.stream(PROMPT, LONG):
        break
    assert llama_session.run.state == "cancelled"
    assert llama_session.generate(PROMPT, 2).state == "finished"
