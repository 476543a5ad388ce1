"""Shared fixtures: one backend per test module and the two tiny offline models.

The backend is an in-process engine, or with ``DJINN_TEST_BACKEND=daemon`` a client of a real daemon process,
so the engine's tests also run over the wire; ``DJINN_TEST_DEVICE=cuda`` runs them on a GPU. Tests marked ``inprocess`` reach into engine internals (the
underlying nn.Module, hooks) and are skipped against the daemon.
"""

from __future__ import annotations

import faulthandler
import functools
import os

import pytest
import torch

import djinn_kernel as dj
from djinn_kernel.engine import Engine

PROMPT = "Hello, world"
# "inprocess" (deterministic, module path only), "fast" (in-process with the batched fast path) or "daemon".
BACKEND = os.environ.get("DJINN_TEST_BACKEND", "inprocess")
# DJINN_TEST_DEVICE=cuda runs the engine tests on a GPU; deterministic attention keeps runs bitwise repeatable.
DEVICE = os.environ.get("DJINN_TEST_DEVICE", "cpu")


# DJINN_LONG=1 gives the load, soak, fault and fuzz tests the full counts instead of their fast CI ones (the
# same tests, nothing skipped; figures of both in docs/reliability.md).
LONG = os.environ.get("DJINN_LONG") == "1"


def scaled(fast: int, full: int) -> int:
    """A count for CI, or with DJINN_LONG=1 the long variant's."""
    return full if LONG else fast


# A test still running after this long is taken for a deadlock: every thread's stack is dumped and the process
# exits with an error, so CI fails with the evidence instead of hanging until its time limit.
WATCHDOG_SECONDS = 3600 if LONG else 300


@pytest.fixture(autouse=True)
def deadlock_watchdog():
    faulthandler.dump_traceback_later(WATCHDOG_SECONDS, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


def make_engine(**kwargs) -> Engine:
    return Engine(device=DEVICE, deterministic=True, **kwargs)


@functools.cache
def _builtin_net(name: str) -> torch.nn.Module:
    from djinn_kernel.builtin import build_builtin

    return build_builtin(name)[0]


def budget_for(
    runs: float, prompt_tokens: int, new_tokens: int, admitted_prompt: int | None = None, name: str = "tiny-llama",
    fast: bool = False,
) -> int:
    """A session budget that holds ``runs`` runs' KV in all and the activations of a prompt of ``admitted_prompt``
    tokens (default ``prompt_tokens``), so that such a run is admitted (prefill.py: admission reserves a run's KV
    for its whole length and its prompt's activations, which go back once the prompt is in; a prompt under the
    chunk goes in whole; on the CPU both paths cost the same). ``fast``: the KV in whole blocks, at least one run's,
    as the fast path allocates and admits it (kv_blocks.py)."""
    from djinn_kernel.kv_blocks import BLOCK_TOKENS
    from djinn_kernel.prefill import ActivationCost
    from djinn_kernel.registry import kv_bytes_per_token

    net = _builtin_net(name)
    admitted = prompt_tokens if admitted_prompt is None else admitted_prompt
    activations = ActivationCost.of(net, torch.device(DEVICE), False).bytes(admitted, admitted)
    tokens = (prompt_tokens + new_tokens) * runs
    if fast:
        blocks = max(-(-tokens // BLOCK_TOKENS), -(-(prompt_tokens + new_tokens) // BLOCK_TOKENS))
        tokens = blocks * BLOCK_TOKENS
    return int(kv_bytes_per_token(net) * tokens) + activations


def pytest_configure(config):
    config.addinivalue_line("markers", "inprocess: needs the in-process engine's internals")
    config.addinivalue_line("markers", "module_path: observes Hugging Face's modules running (not the fast path)")


def pytest_collection_modifyitems(config, items):
    skips = {
        "daemon": ("inprocess", "reaches into engine internals; covered by the in-process run"),
        "fast": ("module_path", "counts Hugging Face module calls, which the fast path does not make"),
    }
    if BACKEND in skips:
        marker, reason = skips[BACKEND]
        for item in items:
            if marker in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="module")
def engine():
    if BACKEND == "daemon":
        from daemon_util import DaemonProcess

        daemon = DaemonProcess()
        yield daemon.client()
        daemon.stop()
        return
    eng = Engine(device=DEVICE, fast=True) if BACKEND == "fast" else make_engine()
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-gpt2"])
def model(request, engine: Engine) -> dj.Model:
    return dj.load(request.param, backend=engine)


@pytest.fixture(scope="module")
def llama(engine: Engine) -> dj.Model:
    return dj.load("tiny-llama", backend=engine)


@pytest.fixture
def session(model: dj.Model):
    with model.session() as s:
        yield s


@pytest.fixture
def llama_session(llama: dj.Model):
    with llama.session() as s:
        yield s


def torch_model(engine: Engine, model: dj.Model):
    """The underlying nn.Module, for tests that count or compare against Hugging Face directly."""
    return engine._model(model.info["id"]).model


def plain_run(backends, prompt: list[int], new: int):
    """The in-process tiny Llama's nn.Module, and the tokens and logits of a plain run of ``prompt``: what the
    interpretability tests hold against Hugging Face's own computation."""
    engine = backends("inprocess")
    model = dj.load("tiny-llama", backend=engine)
    with model.session() as s:
        run = s.generate(prompt, new, keep_logits=True)
        return torch_model(engine, model), run.tokens, run.logits


def hf_forwards(net, prompt: list[int], fed: list[int], cache=None, **kwargs):
    """Hugging Face's own forwards as a run makes them: the prompt, then one token of ``fed`` at a time, over one
    ``DynamicCache`` (``cache`` if given); yields each forward's output (same GEMM shapes, so the same bits)."""
    from djinn_kernel.decode import ForwardCall

    from transformers import DynamicCache

    cache = DynamicCache(config=net.config) if cache is None else cache
    with torch.inference_mode():
        for ids in [prompt, *([t] for t in fed)]:
            yield net(torch.tensor([ids]), **kwargs, **ForwardCall.of(net).kwargs(cache))


def reference(model: dj.Model, prompt: str = PROMPT, max_new_tokens: int = 8):
    """Tokens and logits of a run with no breakpoint and no steering."""
    with model.session() as s:
        run = s.generate(prompt, max_new_tokens, keep_logits=True)
        assert run.state == "finished"
        return run.tokens, run.logits


def drain(run) -> list[tuple]:
    """Resume a run to the end, recording where each pause stopped."""
    stops = []
    while run.paused:
        p = run.pause
        stops.append((p.layer, p.path, p.side, p.token_step))
        run.resume()
    return stops


@pytest.fixture(scope="module")
def backends():
    """``backends(kind, budget)``: an in-process engine or a daemon client per kind and session budget, shared by
    one test module, so a module's tests run every way whatever DJINN_TEST_BACKEND says. Kinds: "inprocess",
    "daemon" (deterministic, module path only), "inprocess-fast", "daemon-fast" (the batched fast path)."""
    from daemon_util import DaemonProcess

    from djinn_kernel.memory import LRUPolicy, MemoryManager, MiB

    made: dict[tuple[str, int | None], object] = {}
    daemons: list[DaemonProcess] = []

    def get(kind: str, budget: int | None = None):
        if (kind, budget) not in made:
            fast = kind.endswith("-fast")
            if kind.startswith("inprocess"):
                memory = MemoryManager(torch.device(DEVICE), budget or 1 << 40, 1 << 30, LRUPolicy(), chunk_bytes=MiB)
                made[kind, budget] = Engine(device=DEVICE, memory=memory, fast=True) if fast else make_engine(memory=memory)
            else:
                args = (["--gpu-memory", str(budget)] if budget else []) + (["--fast", "on"] if fast else [])
                daemons.append(DaemonProcess(*args))
                made[kind, budget] = daemons[-1].client()
        return made[kind, budget]

    yield get
    for (kind, _), backend in made.items():
        if kind.startswith("inprocess"):
            backend.shutdown()
    for daemon in daemons:
        daemon.stop()
