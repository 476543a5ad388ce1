"""Permanent, shared forward hooks that route activations to whichever run is executing on the current thread.

One copy of a model serves every session, so hooks cannot belong to a session. Each hooked module gets one
forward hook (output side) and one forward pre-hook (input side) for the model's lifetime; they look up the run
bound to the current thread (``bind``) and return at once when none is bound or it does not care. A run's
executor thread binds itself for the duration of its forward passes, so concurrent sessions on different
threads see only their own breakpoints and steering.

A hook returns ``None`` unless the run changed the value; returning ``None`` leaves the module's output object
untouched, which is what makes an unmodified pause bitwise-identical to no pause at all.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Protocol

import torch
from torch import nn

_current = threading.local()


class ActivationSink(Protocol):
    def on_activation(self, path: str, side: str, value: torch.Tensor) -> torch.Tensor | None: ...


def current() -> ActivationSink | None:
    """The run bound to this thread, if any."""
    return getattr(_current, "sink", None)


@contextlib.contextmanager
def bind(sink: ActivationSink | None) -> Iterator[None]:
    """Route hook calls made on this thread to ``sink`` while the block runs (None: to no run)."""
    previous = getattr(_current, "sink", None)
    _current.sink = sink
    try:
        yield
    finally:
        _current.sink = previous


def _primary(value: object) -> torch.Tensor | None:
    """The activation a module hands on: the tensor itself, or the first element of a tuple output."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None


def _with_primary(value: object, new: torch.Tensor) -> object:
    if isinstance(value, torch.Tensor):
        return new
    return type(value)([new, *value[1:]])


class HookDispatcher:
    """Installs the routing hooks on a model's modules, once per module, on demand."""

    def __init__(self, model: nn.Module) -> None:
        self._model = model
        self._hooked: dict[str, tuple[object, object]] = {}
        self._lock = threading.Lock()

    def ensure(self, path: str) -> None:
        with self._lock:
            if path in self._hooked:
                return
            module = self._model.get_submodule(path)
            self._hooked[path] = (
                module.register_forward_hook(self._output_hook(path)),
                module.register_forward_pre_hook(self._input_hook(path), with_kwargs=True),
            )

    def remove(self) -> None:
        """Take every hook off the model (when its engine shuts down), so another engine can serve it."""
        with self._lock:
            for handles in self._hooked.values():
                for handle in handles:
                    handle.remove()
            self._hooked.clear()

    @staticmethod
    def _output_hook(path: str):
        def hook(module: nn.Module, args: tuple, output: object) -> object:
            sink = getattr(_current, "sink", None)
            if sink is None:
                return None
            value = _primary(output)
            if value is None:
                return None
            new = sink.on_activation(path, "output", value)
            return None if new is None else _with_primary(output, new)

        return hook

    @staticmethod
    def _input_hook(path: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            sink = getattr(_current, "sink", None)
            if sink is None:
                return None
            if args and isinstance(args[0], torch.Tensor):
                new = sink.on_activation(path, "input", args[0])
                return None if new is None else ((new, *args[1:]), kwargs)
            if isinstance(kwargs.get("hidden_states"), torch.Tensor):
                new = sink.on_activation(path, "input", kwargs["hidden_states"])
                return None if new is None else (args, {**kwargs, "hidden_states": new})
            return None

        return hook
