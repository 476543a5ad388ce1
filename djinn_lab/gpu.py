"""GPU memory as NVML reports it, for the sidebar's VRAM bar.

NVML is initialised on the first sample, never at import, and only ``pynvml.NVMLError`` is caught: a machine
without an NVIDIA driver gets a "no GPU" answer with NVML's reason, any other failure is a bug and raises.
"""

from __future__ import annotations

import threading
from typing import Any


class Nvml:
    """Lazily initialised NVML; ``sample()`` is safe from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._module: Any = None
        self._reason: str | None = None

    def _init(self) -> Any:
        if self._module is None and self._reason is None:
            import pynvml

            try:
                pynvml.nvmlInit()
            except pynvml.NVMLError as exc:
                self._reason = f"no GPU ({exc})"
            else:
                self._module = pynvml
        return self._module

    def sample(self) -> dict[str, Any]:
        """``{"available": False, "reason"}`` or ``{"available": True, "devices": [{index, name, total, used}]}``."""
        with self._lock:
            nvml = self._init()
            if nvml is None:
                return {"available": False, "reason": self._reason}
            devices = []
            for index in range(nvml.nvmlDeviceGetCount()):
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                info = nvml.nvmlDeviceGetMemoryInfo(handle)
                name = nvml.nvmlDeviceGetName(handle)
                devices.append({
                    "index": index,
                    "name": name.decode() if isinstance(name, bytes) else name,
                    "total": int(info.total),
                    "used": int(info.used),
                })  # fmt: skip
            return {"available": True, "devices": devices}
