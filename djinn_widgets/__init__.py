"""Jupyter widgets for Djinn, built only on the public API (``djinn_kernel.api`` handles and ``status()``).

    from djinn_widgets import ActivationInspector, SteeringPanel, VramMonitor, SessionTable
    ActivationInspector(run.pause)          # heatmap, per-token norms, logit lens at the paused layer
    SteeringPanel(run, vector=v)            # preview an edit's effect on the lens, apply it and compare texts
    VramMonitor(backend).start()            # device and per-session memory, live
    SessionTable(backend)                   # every session the backend reports
    PatchHeatmap(patch_sweep(model, ...))   # the causal-tracing figure of an activation-patching sweep

Importing this package starts nothing: NVML is loaded on a monitor's first refresh, threads only by ``start()``.
Each widget has a text ``repr`` that front ends without the widget manager show instead.
"""

from .inspector import ActivationInspector
from .patching import PatchHeatmap
from .sessions import SessionTable
from .steering import SteeringPanel
from .vram import Sample, VramMonitor

__all__ = ["ActivationInspector", "PatchHeatmap", "Sample", "SessionTable", "SteeringPanel", "VramMonitor"]
