"""Shared fixtures: one in-process engine per test module and the two tiny offline models."""

from __future__ import annotations

import pytest

import djinn_kernel as dj
from djinn_kernel.engine import Engine

PROMPT = "Hello, world"


@pytest.fixture(scope="module")
def engine() -> Engine:
    eng = Engine(device="cpu")
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
