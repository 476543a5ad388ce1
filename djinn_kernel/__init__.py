"""Djinn: pause a language model's forward pass at any layer, inspect and steer it, and resume.

    import djinn_kernel as dj
    model = dj.load("tiny-llama")
    session = model.session()
    session.break_at(2)
    run = session.generate("Hello", max_new_tokens=8)
    run.pause.activation, run.pause.scale(0.9), run.resume()

Importing this package starts nothing (no threads, no CUDA, no daemon).
"""

import importlib
import sys

from .errors import (
    DaemonConnectionError,
    DjinnError,
    EncryptionUnavailableError,
    ExecutionError,
    InvalidArgumentError,
    InvalidTargetError,
    InvalidTensorError,
    MessageTooLargeError,
    ModelNotFoundError,
    NotPausedError,
    OutOfMemoryError,
    PagingError,
    PermissionDeniedError,
    ProtocolError,
    RunFinishedError,
    SessionBusyError,
    SessionClosedError,
    SessionLostError,
    WeightBudgetError,
)

# The API and edits need torch (seconds to import): they load on first use, so `%load_ext` can say so first.
_LAZY = {
    **dict.fromkeys(
        ("Model", "Pause", "Progress", "Run", "RunInterrupted", "Session", "connect", "default_backend", "load",
         "local_engine", "status"),
        "api",
    ),
    **dict.fromkeys(("Ablate", "AddVector", "Edit", "Replace", "Scale", "SetPositions", "SetPromptRows"),
                     "edits"),
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'djinn_kernel' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


__version__ = "0.1.0"


def load_ipython_extension(ipython) -> None:
    """``%load_ext djinn_kernel``: register ``%djinn`` / ``%%djinn`` (see ``djinn_kernel.magics.register``)."""
    if "torch" not in sys.modules:
        print("djinn: importing torch (a few seconds the first time)…", flush=True)
    from .magics import register

    register(ipython)
    from .comm import open_sidebar_channel  # the JupyterLab sidebar's channel (djinn_kernel.comm)

    open_sidebar_channel(ipython)


__all__ = [
    "Ablate",
    "AddVector",
    "DaemonConnectionError",
    "DjinnError",
    "Edit",
    "EncryptionUnavailableError",
    "ExecutionError",
    "InvalidArgumentError",
    "InvalidTargetError",
    "InvalidTensorError",
    "MessageTooLargeError",
    "Model",
    "ModelNotFoundError",
    "NotPausedError",
    "OutOfMemoryError",
    "PagingError",
    "Pause",
    "PermissionDeniedError",
    "ProtocolError",
    "Replace",
    "Progress",
    "Run",
    "RunFinishedError",
    "RunInterrupted",
    "Scale",
    "Session",
    "connect",
    "default_backend",
    "SessionBusyError",
    "SessionClosedError",
    "SessionLostError",
    "WeightBudgetError",
    "SetPositions",
    "SetPromptRows",
    "load",
    "local_engine",
    "status",
]
