"""``VramMonitor``: device memory from NVML, and where each Djinn session's bytes are (GPU or host pool).

NVML is initialised on the first ``refresh()``, never at import, and only ``pynvml.NVMLError`` is caught: no
driver (``NVMLError_LibraryNotFound``) or no device means the "no GPU" state, anything else is a bug to see.
Session and pool bytes come from ``backend.status()``: an ``Engine`` or a daemon client, which answer alike.
The NVML line describes this machine; with a remote daemon the daemon's own device line (from its status)
is the one that matters, so both are shown when they differ.
"""

from __future__ import annotations

import html
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import ipywidgets as W

from djinn_kernel.errors import DjinnError

from ._render import TextFallback, html_table, human_bytes, mib, new_figure, png, text_table


@dataclass(frozen=True)
class Sample:
    """One reading. ``sessions`` maps session id to ``(gpu_bytes, host_bytes)``."""

    time: float
    gpu_used: int | None
    gpu_total: int | None
    session_gpu_bytes: int
    host_pool_used: int
    sessions: dict[int, tuple[int, int]] = field(default_factory=dict)


class VramMonitor(TextFallback, W.VBox):
    """Device line, per-session bytes and a timeline; ``refresh()`` samples once, ``start()`` keeps sampling.

    The live loop is a daemon thread waiting on an Event, so ``stop()`` ends it at once, not after a sleep.
    One monitor samples at a time: ``start()`` stops the one started before (a notebook re-running its
    ``%djinn vram`` cell, or pointing at a new backend, must not leave the old sampler plotting), and
    ``close()`` stops it. ``samples`` holds the last ``history`` readings.
    """

    _live: VramMonitor | None = None  # the monitor whose sampler runs
    _live_lock = threading.Lock()

    def __init__(
        self,
        backend: Any,
        interval: float = 1.0,
        history: int = 120,
        *,
        gpu_index: int = 0,
        autostart: bool = False,
    ) -> None:
        self.backend = backend
        self.interval = interval
        self.history = history
        self.gpu_index = gpu_index
        self.samples: list[Sample] = []
        self.gpu: dict[str, Any] | None = None  # {"name", "used", "total"} from NVML, None without a GPU
        self.nvml_error: str | None = None
        self.error: str | None = None
        self.status: dict[str, Any] = {}
        self._nvml: Any = None  # the pynvml module once initialised
        self._handle: Any = None
        self._nvml_tried = False
        self._refreshing = threading.Lock()  # one sample at a time: the live loop and a manual refresh()
        self._lock = threading.Lock()
        self._sampled = threading.Condition(self._lock)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.device_label = W.HTML()
        self.sessions_html = W.HTML()
        self.plot = W.Image(format="png")
        self.figure: Any = None  # the last rendered figure, kept for its axes
        super().__init__([self.device_label, self.plot, self.sessions_html])
        if autostart:
            self.start()

    # sampling ---------------------------------------------------------------------------------------------
    def refresh(self) -> Sample | None:
        """Take one sample and redraw; a DjinnError from the backend is shown and returns None."""
        with self._refreshing:
            return self._refresh()

    def _refresh(self) -> Sample | None:
        self.gpu = self._read_nvml()
        try:
            status = self.backend.status()
        except DjinnError as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            self._render_device()
            return None
        self.error = None
        memory = status["memory"]
        sample = Sample(
            time=time.time(),
            gpu_used=None if self.gpu is None else self.gpu["used"],
            gpu_total=None if self.gpu is None else self.gpu["total"],
            session_gpu_bytes=int(memory["session_gpu_bytes"]),
            host_pool_used=int(memory["host_pool"]["used"]),
            sessions={s["id"]: (s["memory"]["gpu_bytes"], s["memory"]["host_bytes"]) for s in status["sessions"]},
        )
        with self._sampled:
            self.status = status
            self.samples.append(sample)
            del self.samples[: -self.history]
            self._sampled.notify_all()
        self._render_device()
        self._render_sessions()
        self._render_plot()
        return sample

    def wait_for_samples(self, count: int, timeout: float | None = None) -> bool:
        """Block until ``samples`` holds at least ``count`` readings (for tests and scripts, not the UI)."""
        with self._sampled:
            return self._sampled.wait_for(lambda: len(self.samples) >= count, timeout)

    def _read_nvml(self) -> dict[str, Any] | None:
        if not self._nvml_tried:
            self._nvml_tried = True
            self._init_nvml()
        if self._nvml is None:
            return None
        try:
            info = self._nvml.nvmlDeviceGetMemoryInfo(self._handle)
            name = self._nvml.nvmlDeviceGetName(self._handle)
        except self._nvml.NVMLError as exc:
            self.nvml_error = str(exc)
            return None
        return {"name": name.decode() if isinstance(name, bytes) else name, "used": info.used, "total": info.total}

    def _init_nvml(self) -> None:
        try:
            import pynvml
        except ImportError:
            self.nvml_error = "nvidia-ml-py is not installed"
            return
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            self.nvml_error = str(exc)
            return
        try:
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(self.gpu_index)
        except pynvml.NVMLError as exc:
            self.nvml_error = str(exc)
            pynvml.nvmlShutdown()
            return
        self._nvml = pynvml

    # live loop -----------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Refresh every ``interval`` seconds on a daemon thread until ``stop()`` (no-op when running)."""
        if self.running:
            return
        with VramMonitor._live_lock:
            previous, VramMonitor._live = VramMonitor._live, self
        if previous is not None and previous is not self:
            previous.stop()
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="djinn-vram-monitor", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 5.0) -> None:
        """End the live loop and wait for its thread."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        with VramMonitor._live_lock:
            if VramMonitor._live is self:
                VramMonitor._live = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.refresh()
            self._stop.wait(self.interval)

    def close(self) -> None:
        """Stop the loop, release NVML, and close the widget."""
        self.stop()
        if self._nvml is not None:
            self._nvml.nvmlShutdown()
            self._nvml = None
        super().close()

    # view ---------------------------------------------------------------------------------------------------
    def sessions_label(self) -> str:
        """What the sessions' "device" bytes are on: the GPU, or the CPU where the backend has no GPU."""
        device = self.status.get("device", {}).get("type", "cuda")
        return "sessions on GPU" if device == "cuda" else f"sessions (on {device})"

    def device_line(self) -> str:
        if not self._nvml_tried:
            return "not sampled yet: call refresh() or start()"
        if self.gpu is not None:
            g = self.gpu
            line = f"{g['name']}: {human_bytes(g['used'])} / {human_bytes(g['total'])} used (NVML)"
        else:
            line = f"no GPU ({self.nvml_error})" if self.nvml_error else "no GPU"
        device = self.status.get("device", {})
        if device.get("type") == "cuda" and "total" in device:
            used = device["total"] - device.get("free", 0)
            line += f" · backend {device.get('name', 'cuda')}: {human_bytes(used)} / {human_bytes(device['total'])}"
        elif device:
            line += f" · backend on {device.get('type')}"
        if self.error:
            line += f" · {self.error}"
        return line

    def _session_rows(self) -> list[tuple[Any, ...]]:
        return [
            (s["id"], s["state"], s["memory"].get("phase", ""), mib(s["memory"]["gpu_bytes"]),
             mib(s["memory"]["host_bytes"]), s["memory"]["paged"])
            for s in self.status.get("sessions", [])
        ]

    _HEADERS = ("session", "state", "phase", "GPU MiB", "host MiB", "paged")

    def _render_device(self) -> None:
        self.device_label.value = f"<b>{html.escape(self.device_line())}</b>"

    def _render_sessions(self) -> None:
        self.sessions_html.value = html_table(self._HEADERS, self._session_rows())

    def _render_plot(self) -> None:
        with self._lock:
            samples = list(self.samples)
        t0 = samples[-1].time
        xs = [s.time - t0 for s in samples]
        fig = new_figure(6.0, 2.2)
        ax = fig.add_subplot()
        style = {"marker": "o"} if len(samples) == 1 else {}  # one reading is a point, not an invisible line
        ax.plot(xs, [s.session_gpu_bytes / 2**20 for s in samples], label=self.sessions_label(), **style)
        ax.plot(xs, [s.host_pool_used / 2**20 for s in samples], label="host pool used", **style)
        if any(s.gpu_used is not None for s in samples):
            ax.plot(xs, [(s.gpu_used or 0) / 2**20 for s in samples], label="device used (NVML)", alpha=0.6, **style)
        ax.set_xlim(min(xs[0], -self.interval * 10), 0)  # time runs up to now; a minimum span, never reversed
        ax.set_ylim(bottom=0)
        ax.set_xlabel("seconds")
        ax.set_ylabel("MiB")
        ax.legend(fontsize=7, loc="upper left")
        self.figure = fig
        self.plot.value = png(fig)

    def __repr__(self) -> str:
        body = text_table(self._HEADERS, self._session_rows()) if self.status else "(no sample yet: call refresh())"
        return f"<VramMonitor {self.device_line()}, {len(self.samples)} sample(s)\n{body}>"
