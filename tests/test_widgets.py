"""Widgets over a real paused run of the tiny model: the data they show is the data the public API returns."""

from __future__ import annotations

import html
import signal
import subprocess
import sys
import threading
import types

import ipywidgets as W
import pynvml
import pytest
import torch
from IPython.core.formatters import DisplayFormatter
from traitlets import TraitError

import djinn_kernel as dj
from conftest import PROMPT
from djinn_widgets import ActivationInspector, SessionTable, SteeringPanel, VramMonitor

PNG = b"\x89PNG"
STEPS = 6


@pytest.fixture
def paused(llama: dj.Model):
    """A run paused at the output of layer 2 during the prefill."""
    with llama.session() as s:
        s.break_at(2, tokens=0)
        run = s.generate(PROMPT, STEPS)
        assert run.paused
        yield run


def unsteered_text(model: dj.Model, prompt_ids: list[int], steps: int = STEPS) -> str:
    with model.session() as s:
        return s.generate(prompt_ids, steps).text


def plain_text(widget: W.Widget) -> str:
    """What a front end without the widget manager shows: IPython's text/plain for the object."""
    data, _ = DisplayFormatter().format(widget)
    return data["text/plain"]


# ActivationInspector ----------------------------------------------------------------------------------------


def test_inspector_shows_the_pause_data(paused):
    pause = paused.pause
    insp = ActivationInspector(pause, k=4, top_dims=16)
    assert insp.labels == list(PROMPT)  # tiny-llama's tokenizer is character level
    assert torch.equal(insp.norms, pause.activation[0].norm(dim=-1))
    assert len(insp.dims) == 16 and insp.values.shape == (len(PROMPT), 16)
    variance = pause.activation[0].var(dim=0, unbiased=False)
    assert set(insp.dims.tolist()) == set(variance.topk(16).indices.tolist())
    assert insp.position == len(PROMPT) - 1 and insp.position_control.value == len(PROMPT) - 1
    assert insp.lens == pause.logit_lens(4)
    assert bytes(insp.plot.value).startswith(PNG)
    assert "model.layers.2" in insp.header.value and "prefill" in insp.header.value
    assert html.escape(insp.lens[0]["token"]) in insp.lens_table.value


def test_inspector_default_dims_capped_by_hidden_size(paused):
    insp = ActivationInspector(paused.pause)
    assert len(insp.dims) == min(64, paused.session.model.hidden_size)
    assert len(set(insp.dims.tolist())) == len(insp.dims)


def test_inspector_position_control_changes_lens(paused):
    insp = ActivationInspector(paused.pause)
    last = insp.lens
    insp.position_control.value = 0
    assert insp.position == 0
    assert insp.lens == paused.pause.logit_lens(5, 0)
    assert insp.lens != last


def test_inspector_refresh_after_edit(paused):
    pause = paused.pause
    insp = ActivationInspector(pause)
    before = insp.norms.clone()
    pause.scale(2.0)
    insp.refresh()
    assert torch.allclose(insp.norms, 2 * before)
    assert "1 edit(s)" in insp.header.value


def test_inspector_decode_step_labels_the_fed_token(llama):
    with llama.session() as s:
        s.break_at(1, tokens=2)
        run = s.generate(PROMPT, STEPS)
        assert run.pause.token_step == 2
        insp = ActivationInspector(run.pause)
        assert insp.labels == llama.token_strings([run.tokens[1]])
        assert insp.norms.shape == (1,) and "decode step 2" in insp.header.value
        assert insp.lens == run.pause.logit_lens(5)


def test_inspector_without_lens_and_after_the_pause(llama):
    with llama.session() as s:
        s.break_at("model.layers.1.mlp.down_proj", side="input", once=True)
        run = s.generate(PROMPT, 2)
        insp = ActivationInspector(run.pause)
        assert insp.lens == [] and "no logit lens" in insp.lens_table.value
        assert bytes(insp.plot.value).startswith(PNG)
        run.finish()
        insp.refresh()  # the pause is over: shown, not raised
        assert "pause is over" in insp.error and "pause is over" in insp.header.value


def test_inspector_repr(paused):
    insp = ActivationInspector(paused.pause)
    text = repr(insp)
    assert "[1, 12, 64]" in text and "norms over 12 token(s)" in text and repr(insp.lens[0]["token"]) in text
    assert plain_text(insp) == text and len(text) > 110  # not cut the way ipywidgets cuts it


# SteeringPanel --------------------------------------------------------------------------------------------------


def test_preview_leaves_no_edit(paused):
    panel = SteeringPanel(paused)
    panel.op.value, panel.coefficient.value = "scale", -4.0  # a positive scale is invisible through the final norm
    panel.preview()
    assert paused.pause.info["edits"] == 0 and paused.paused
    assert panel.before == paused.pause.logit_lens(5)
    assert [r["token_id"] for r in panel.after] != [r["token_id"] for r in panel.before]
    assert html.escape(panel.after[0]["token"]) in panel.lens_table.value
    assert "not applied" in panel.status.value


def test_preview_keeps_earlier_edits(paused):
    pause = paused.pause
    pause.scale(3.0)
    edited = pause.activation.clone()
    SteeringPanel(paused, vector=torch.ones(64)).preview()
    assert torch.equal(paused.pause.activation, edited)


def test_add_and_ablate_need_a_vector(paused):
    panel = SteeringPanel(paused)
    assert tuple(panel.op.options) == ("scale",) == panel.enabled_ops
    with pytest.raises(TraitError):
        panel.op.value = "add"
    with_vector = SteeringPanel(paused, vector=torch.ones(64))
    assert tuple(with_vector.op.options) == ("scale", "add", "ablate")
    with_vector.op.value = "ablate"
    assert with_vector.coefficient.disabled


def test_add_vector_changes_lens(paused):
    panel = SteeringPanel(paused, vector=torch.randn(64, generator=torch.Generator().manual_seed(0)))
    panel.op.value, panel.coefficient.value = "add", 10.0
    panel.preview()
    assert paused.pause.info["edits"] == 0
    assert panel.after != panel.before


def test_bad_vector_is_reported_not_raised(paused):
    panel = SteeringPanel(paused, vector=torch.ones(7))
    panel.op.value = "add"
    panel.preview()
    assert "InvalidTensorError" in panel.status.value and "(7,)" in panel.status.value
    assert paused.paused and paused.pause.info["edits"] == 0
    panel.apply_and_resume()
    assert "InvalidTensorError" in panel.status.value and paused.paused
    assert not panel.apply_button.disabled


def test_apply_and_resume_compares_with_unsteered(paused, llama):
    panel = SteeringPanel(paused)
    panel.coefficient.value = 10.0
    panel.apply_and_resume()
    assert paused.state == "finished" and len(paused.tokens) == STEPS
    assert panel.steered_text == paused.text
    assert panel.original_text == unsteered_text(llama, paused.prompt_ids)
    assert panel.original_text != panel.steered_text  # scaling the residual stream by 10 changes this model's output
    assert html.escape(panel.original_text) in panel.comparison.value
    assert html.escape(panel.steered_text) in panel.comparison.value
    assert panel.preview_button.disabled and panel.apply_button.disabled
    panel.preview()  # the run is over: a message, not an exception
    assert "NotPausedError" in panel.status.value


def test_an_interrupt_while_applying_cancels_the_run_and_says_so(llama, monkeypatch):
    with llama.session() as s:
        s.break_at(2, tokens=0)
        run = s.generate(PROMPT, 240)  # long enough that the interrupt lands while it runs
        panel = SteeringPanel(run)
        streamed = panel._stream_steered

        def interrupt_once(progress) -> None:
            streamed(progress)
            if not interrupted:
                interrupted.append(progress.tokens)
                signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

        interrupted: list[int] = []
        monkeypatch.setattr(panel, "_stream_steered", interrupt_once)
        panel.apply_and_resume()  # the button's callback: the interrupt is reported, not raised into the kernel
        assert run.state == "cancelled" and len(run.tokens) < 240 and interrupted
        assert "RunInterrupted" in panel.status.value and "cancelled at token step" in panel.status.value
        assert not panel.rerun_button.disabled and panel.apply_button.description == "Apply & resume"
        panel.rerun()
        assert panel.run.paused and panel.run is s.run, "the session is usable at once"


def test_steering_repr(paused):
    panel = SteeringPanel(paused)
    panel.coefficient.value = -4.0
    panel.preview()
    text = repr(panel)
    assert "lens before" in text and "lens after" in text and "scale(-4)" in text
    assert plain_text(panel) == text


# VramMonitor ----------------------------------------------------------------------------------------------------


def _no_nvml(*_: object) -> None:
    raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)


@pytest.fixture
def no_gpu(monkeypatch):
    """NVML behaves as on a machine without the NVIDIA driver (as this CI machine does anyway)."""
    monkeypatch.setattr(pynvml, "nvmlInit", _no_nvml)


@pytest.fixture
def fake_gpu(monkeypatch):
    calls = {"init": 0, "shutdown": 0}
    monkeypatch.setattr(pynvml, "nvmlInit", lambda: calls.__setitem__("init", calls["init"] + 1))
    monkeypatch.setattr(pynvml, "nvmlShutdown", lambda: calls.__setitem__("shutdown", calls["shutdown"] + 1))
    monkeypatch.setattr(pynvml, "nvmlDeviceGetHandleByIndex", lambda i: f"gpu{i}")
    monkeypatch.setattr(pynvml, "nvmlDeviceGetName", lambda h: "Fake H100")
    memory = types.SimpleNamespace(total=80 << 30, used=3 << 30, free=77 << 30)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetMemoryInfo", lambda h: memory)
    return calls


def test_vram_without_gpu(no_gpu, engine, paused):
    mon = VramMonitor(engine)
    assert mon.samples == [] and not mon.running  # nothing sampled or started by the constructor
    sample = mon.refresh()
    assert mon.gpu is None and "no GPU" in mon.device_label.value and "Not Found" in mon.nvml_error
    status = engine.status()
    mine = next(s for s in status["sessions"] if s["id"] == paused.session.id)
    assert mon.samples == [sample] and sample.gpu_used is None
    assert sample.sessions[paused.session.id] == (mine["memory"]["gpu_bytes"], mine["memory"]["host_bytes"])
    assert sample.session_gpu_bytes == status["memory"]["session_gpu_bytes"] > 0
    assert sample.host_pool_used == status["memory"]["host_pool"]["used"]
    assert bytes(mon.plot.value).startswith(PNG)
    assert f"<td style=\"padding:1px 8px;text-align:left;font-family:monospace\">{paused.session.id}</td>" in (
        mon.sessions_html.value
    )


def test_vram_with_gpu(fake_gpu, engine):
    mon = VramMonitor(engine)
    mon.refresh()
    mon.refresh()
    assert fake_gpu["init"] == 1  # NVML initialised once, lazily
    assert mon.gpu == {"name": "Fake H100", "used": 3 << 30, "total": 80 << 30}
    assert mon.samples[-1].gpu_total == 80 << 30 and "Fake H100: 3.0 GiB / 80.0 GiB" in mon.device_label.value
    mon.close()
    assert fake_gpu["shutdown"] == 1


def test_vram_history_is_bounded(no_gpu, engine):
    mon = VramMonitor(engine, history=2)
    for _ in range(3):
        mon.refresh()
    assert len(mon.samples) == 2 and mon.samples[0].time <= mon.samples[1].time


def test_vram_live_thread_starts_and_stops(no_gpu, engine):
    mon = VramMonitor(engine, interval=0.001)
    mon.start()
    thread = mon._thread
    mon.start()  # already running: no second thread
    assert mon._thread is thread and thread.daemon
    assert mon.wait_for_samples(3, timeout=30)
    mon.stop()
    assert not thread.is_alive() and not mon.running


def test_vram_backend_error_is_shown(no_gpu):
    class Gone:
        def status(self):
            raise dj.DaemonConnectionError("the daemon went away")

    mon = VramMonitor(Gone())
    assert mon.refresh() is None and mon.samples == []
    assert "went away" in mon.device_label.value


def test_vram_repr(no_gpu, engine, paused):
    mon = VramMonitor(engine)
    assert "not sampled yet" in repr(mon)
    mon.refresh()
    text = repr(mon)
    assert text.startswith("<VramMonitor no GPU") and "GPU MiB" in text and "paused" in text
    assert plain_text(mon) == text


def test_import_starts_nothing():
    code = (
        "import threading, torch, pynvml\n"
        "calls = []\n"
        "pynvml.nvmlInit = lambda *a: calls.append(a)\n"
        "import djinn_widgets, djinn_widgets.vram\n"
        "djinn_widgets.VramMonitor(object())\n"
        "assert not calls, 'NVML initialised'\n"
        "assert threading.active_count() == 1, threading.enumerate()\n"
        "assert not torch.cuda.is_initialized()\n"
        "assert 'pynvml' not in vars(djinn_widgets.vram)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# SessionTable ----------------------------------------------------------------------------------------------------


def test_session_table_lists_sessions(engine, paused):
    table = SessionTable(engine)
    sid = paused.session.id
    row = next(r for r in table.rows if r[0] == sid)
    assert row[3] == "paused" and row[-1] == "model.layers.2 (output) step 0"
    assert f">{sid}<" in table.html.value and ">paused<" in table.html.value
    assert f"{len(table.sessions)} session(s)" in table.html.value
    paused.finish()
    table.refresh()
    assert ">idle<" in table.html.value and ">finished, 6 token(s)<" in table.html.value


class FakeDaemon:
    """A daemon client's status: my session in full, another client's reduced to what the daemon lets through."""

    def status(self):
        return {
            "sessions": [
                {
                    "id": 1,
                    "owner": "client-1",
                    "model": "tiny-llama",
                    "state": "idle",
                    "history_tokens": 12,
                    "breakpoints": [],
                    "steering": [],
                    "run": None,
                    "memory": {"gpu_bytes": 3 << 20, "host_bytes": 0, "paged": False},
                    "mine": True,
                },
                {
                    "id": 2,
                    "owner": "<b>client-2</b>",
                    "model": "smollm2-135m",
                    "state": "paused",
                    "memory": {"gpu_bytes": 0, "host_bytes": 5 << 20, "paged": True},
                    "mine": False,
                },
            ]
        }


def test_session_table_redacted_rows():
    table = SessionTable(FakeDaemon())
    assert table.headers[-2:] == ["mine", "where"]
    assert table.rows == [
        [1, "client-1", "tiny-llama", "idle", 12, "3.00", "0.00", False, "yes", "—"],
        [2, "<b>client-2</b>", "smollm2-135m", "paused", "—", "0.00", "5.00", True, "no", "—"],
    ]
    assert table.totals[:8] == ["2 session(s)", "", "", "", "", "3.00", "5.00", "1 paged"]
    assert "&lt;b&gt;client-2&lt;/b&gt;" in table.html.value and "<b>client-2" not in table.html.value
    text = repr(table)
    assert "client-2" in text and "smollm2-135m" in text and "2 session(s)" in text
    assert plain_text(table) == text


class FakeCluster:
    """A cluster's status as ClusterBackend gives it: engines, and sessions with their engine (one lost)."""

    def status(self):
        engine = {"node": "n1", "memory": None, "error": None}
        return {
            "engines": [
                {**engine, "name": "gpu0", "device": "cuda", "alive": True, "models": ["tiny-llama"], "sessions": [1]},
                {**engine, "name": "gpu1", "device": "cuda", "alive": False, "models": [], "sessions": []},
            ],
            "sessions": [
                {"id": 1, "owner": "local", "model": "tiny-llama", "state": "idle", "engine": "gpu0",
                 "memory": {"gpu_bytes": 1 << 20, "host_bytes": 0, "paged": False}},
                {"id": 2, "owner": None, "model": None, "state": "lost", "memory": {}, "error": "gpu1 died"},
            ],
        }


def test_session_table_on_a_cluster_shows_each_sessions_engine_and_the_engines():
    table = SessionTable(FakeCluster())
    assert table.headers[:5] == ["id", "owner", "model", "engine", "state"]
    assert [row[:5] for row in table.rows] == [[1, "local", "tiny-llama", "gpu0", "idle"], [2, "—", None, "—", "lost"]]
    assert len(table.totals) == len(table.headers) and table.totals[6] == "1.00"
    assert table.engine_lines == ["gpu0 on cuda: alive, models tiny-llama, 1 session(s)",
                                  "gpu1 on cuda: dead, models none, 0 session(s)"]
    assert "gpu1 on cuda: dead" in table.html.value and "gpu1 on cuda: dead" in repr(table)


def test_dj_status_is_the_backends_status():
    import djinn_kernel as dj

    assert dj.status(FakeCluster()) == FakeCluster().status()


def test_lens_for_every_position_survives_the_run_moving_on():
    import djinn_kernel as dj
    from djinn_kernel.engine import Engine
    from djinn_widgets import ActivationInspector

    engine = Engine(device="cpu")
    model = dj.load("tiny-llama", backend=engine)
    with model.session() as s:
        s.break_at(2, tokens=0)
        run = s.generate("Hello, world", 3)
        insp = ActivationInspector(run.pause, k=3)
        expected = run.pause.logit_lens(3, 4)
        run.finish()
        insp.position_control.value = 4
        assert insp.lens == expected and "no logit lens" not in insp.lens_table.value
    engine.shutdown()


def test_visible_marks_spaces():
    from djinn_widgets._render import visible

    assert [visible(t) for t in (" are", "ol", " ", "a\\n", "  x ")] == ["␣are", "ol", "␣", "a\\\\n", "␣␣x␣"]


# One object model with the magics, and the polish found in JupyterLab ------------------------------------------


def test_widgets_take_a_pause_a_run_or_djinn(paused):
    for given in (paused, paused.pause):
        assert SteeringPanel(given).run is paused
        assert ActivationInspector(given).pause is paused.pause
    paused.finish()
    with pytest.raises(dj.NotPausedError, match="not paused"):
        ActivationInspector(paused)
    with pytest.raises(TypeError, match="Pause or Run"):
        SteeringPanel("run")


def png_size(data: bytes) -> tuple[int, int]:
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_inspector_height_for_a_37_token_prompt(llama):
    with llama.session() as s:
        s.break_at(2, tokens=0)
        run = s.generate("x" * 37, 1, chat=False)
        insp = ActivationInspector(run)
        width, height = png_size(bytes(insp.plot.value))
        assert len(insp.labels) == 37 and height <= 520 and width <= 800
        run.finish()


def test_inspector_log_norms_label_more_than_the_decades(paused):
    insp = ActivationInspector(paused.pause)
    insp.norms = 150.0 + torch.arange(float(len(insp.labels)))
    insp.norms[0] = 25_000.0  # a BOS-like outlier: the norm axis goes log, 150 to 25,000
    insp._render()
    bars = insp.figure.axes[1]
    assert bars.get_xscale() == "log"
    labels = [t.get_text() for t in bars.get_xticklabels() if t.get_text()]
    lo, hi = bars.get_xlim()
    assert len([t for t in bars.get_xticks() if lo <= t <= hi]) >= 4 and len(labels) >= 4


def test_inspector_axis_title_on_a_decode_step(llama):
    with llama.session() as s:
        s.break_at(1, tokens=2)
        run = s.generate(PROMPT, STEPS)
        insp = ActivationInspector(run.pause)
        assert insp.figure.axes[0].get_xlabel() == f"hidden dim (top {len(insp.dims)} by magnitude)"
        run.finish()


def test_slider_is_wide_and_fine(paused):
    slider = SteeringPanel(paused).coefficient
    px = int(slider.layout.width.removesuffix("px"))
    assert px / (slider.max - slider.min) >= 20 and slider.step <= 0.05 and not slider.continuous_update


def test_apply_shows_busy_then_streams_and_the_panel_can_be_reused(paused):
    panel = SteeringPanel(paused)
    panel.coefficient.value = 10.0
    states: list[tuple[bool, str]] = []
    panel.apply_button.observe(lambda c: states.append((c["new"], panel.apply_button.description)), names="disabled")
    statuses: list[str] = []
    panel.status.observe(lambda c: statuses.append(c["new"]), names="value")
    panel.apply_and_resume()
    assert states[0] == (True, "Running…") and panel.apply_button.description == "Apply & resume"
    assert any("applying scale(10)" in s for s in statuses) and any("tokens" in s for s in statuses)
    assert paused.state == "finished" and not panel.rerun_button.disabled and panel.apply_button.disabled
    panel.rerun()
    assert panel.run is not paused and panel.run.paused and not panel.apply_button.disabled
    panel.coefficient.value = -1.0
    panel.apply_and_resume()
    assert panel.run.state == "finished" and "scale(-1)" in panel.comparison.value


def test_lens_tokens_are_escaped_once():
    from djinn_widgets.steering import _entry

    assert _entry({"token": "\n", "prob": 0.5}) == "'\\n' 0.500"


def test_panel_follows_a_run_started_elsewhere(paused):
    panel = SteeringPanel(paused)
    paused.finish()
    newer = paused.session.generate(PROMPT, STEPS)
    panel.preview()
    assert panel.run is newer and "not applied" in panel.status.value
    newer.finish()


def test_vram_one_sample_plots_a_point_from_zero(no_gpu, engine):
    mon = VramMonitor(engine, interval=1.0)
    mon.refresh()
    ax = mon.figure.axes[0]
    assert ax.get_xlim() == (-10.0, 0.0) and ax.get_ylim()[0] == 0
    assert all(line.get_marker() == "o" for line in ax.get_lines())
    assert [t.get_text() for t in ax.get_legend().get_texts()][0] == "sessions (on cpu)"


def test_vram_sampler_stops_on_close_and_when_replaced(no_gpu, engine):
    first = VramMonitor(engine, interval=0.001, autostart=True)
    assert first.wait_for_samples(1, timeout=30) and first.running
    second = VramMonitor(engine, interval=0.001, autostart=True)
    assert not first.running and second.running
    second.close()
    assert not second.running and VramMonitor._live is None


def test_session_owners_by_client_name():
    class Named(FakeDaemon):
        def status(self):
            return {**super().status(), "clients": [{"label": "client-1", "name": "notebook A", "sessions": 1}]}

    table = SessionTable(Named())
    assert [r[1] for r in table.rows] == ["notebook A (client-1)", "<b>client-2</b>"]
