"""Djinn: pause a language model's forward pass at any layer, inspect and steer it, and resume.

    import djinn_kernel as dj
    model = dj.load("tiny-llama")
    session = model.session()
    session.break_at(2)
    run = session.generate("Hello", max_new_tokens=8)
    run.pause.activation, run.pause.scale(0.9), run.resume()

Importing this package starts nothing (no threads, no CUDA, no daemon).
"""

from .api import Model, Pause, Run, Session, connect, default_backend, load, local_engine
from .edits import Ablate, AddVector, Edit, Replace, Scale, SetPositions
from .errors import (
    DaemonConnectionError,
    DjinnError,
    ExecutionError,
    InvalidArgumentError,
    InvalidTargetError,
    InvalidTensorError,
    ModelNotFoundError,
    NotPausedError,
    OutOfMemoryError,
    PagingError,
    ProtocolError,
    RunFinishedError,
    SessionBusyError,
    SessionClosedError,
    SessionLostError,
)

__version__ = "0.1.0"


def load_ipython_extension(ipython) -> None:
    """``%load_ext djinn_kernel``: register the ``%djinn`` magic."""
    from .magics import DjinnMagics

    ipython.register_magics(DjinnMagics(ipython))
    from .comm import open_sidebar_channel  # the JupyterLab sidebar's channel (djinn_kernel.comm)

    open_sidebar_channel(ipython)


__all__ = [
    "Ablate",
    "AddVector",
    "DaemonConnectionError",
    "DjinnError",
    "Edit",
    "ExecutionError",
    "InvalidArgumentError",
    "InvalidTargetError",
    "InvalidTensorError",
    "Model",
    "ModelNotFoundError",
    "NotPausedError",
    "OutOfMemoryError",
    "PagingError",
    "Pause",
    "ProtocolError",
    "Replace",
    "Run",
    "RunFinishedError",
    "Scale",
    "Session",
    "connect",
    "default_backend",
    "SessionBusyError",
    "SessionClosedError",
    "SessionLostError",
    "SetPositions",
    "load",
    "local_engine",
]
