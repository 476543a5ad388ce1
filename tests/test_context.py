"""Sessions keep their conversation: history and KV across runs, fork, rewind, idle paging, chat turns.

The reference for every continued run is a fresh run over the same tokens: continuing must give what
recomputing the whole history would. Tests marked with ``kind`` run in-process and against a daemon, each on the
module path only and with the batched fast path (where a breakpoint hands a run over to the module path).
"""

from __future__ import annotations

import pytest

import djinn_kernel as dj
from conftest import budget_for
from djinn_kernel.context import chat_turn_ids

KINDS = ["inprocess", "daemon", "inprocess-fast", "daemon-fast"]
FIRST = list(range(5, 21))
SECOND = list(range(30, 38))


def fresh_tokens(model: dj.Model, ids: list[int], n: int) -> list[int]:
    with model.session() as s:
        return s.generate(ids, n).tokens


@pytest.mark.parametrize("kind", KINDS)
def test_a_continued_run_equals_a_fresh_run_over_the_whole_history(kind, backends):
    model = dj.load("tiny-llama", backend=backends(kind))
    with model.session() as s:
        first = s.generate(FIRST, 4)
        second = s.generate(SECOND, 5, fresh=False)
        assert second.prompt_ids == [first.tokens[-1], *SECOND], "only the pending token and the new turn run"
        assert s.history == len(FIRST) + 4 + len(SECOND) + 5
        assert second.tokens == fresh_tokens(model, [*FIRST, *first.tokens, *SECOND], 5)
        again = s.generate(FIRST, 4)
        assert again.tokens == first.tokens and s.history == len(FIRST) + 4, "fresh=True forgets the conversation"


@pytest.mark.parametrize("kind", KINDS)
def test_fork_branches_the_conversation(kind, backends):
    model = dj.load("tiny-llama", backend=backends(kind))
    with model.session() as s:
        s.break_at(2)
        first = s.generate(FIRST, 4)
        first.finish()
        fork = s.fork()
        try:
            assert fork.breakpoints == [] and fork.history == s.history
            mine = fork.generate(SECOND, 5, fresh=False)
            assert mine.state == "finished", "the fork has no breakpoint of its own"
            theirs = s.generate(SECOND, 5, fresh=False)
            theirs.finish()
            assert mine.tokens == theirs.tokens == fresh_tokens(model, [*FIRST, *first.tokens, *SECOND], 5)
        finally:
            fork.close()


@pytest.mark.parametrize("kind", KINDS)
def test_rewind_replays_a_continuation(kind, backends):
    model = dj.load("tiny-llama", backend=backends(kind))
    with model.session() as s:
        first = s.generate(FIRST, 4)
        second = s.generate(SECOND, 5, fresh=False)
        s.rewind(len(FIRST) + 4)
        assert s.history == len(FIRST) + 4
        assert s.generate(SECOND, 5, fresh=False).tokens == second.tokens
        s.rewind(10)
        assert s.generate(SECOND, 5, fresh=False).tokens == fresh_tokens(model, [*FIRST[:10], *SECOND], 5)
        with pytest.raises(dj.InvalidArgumentError, match="from 0 to"):
            s.rewind(s.history + 1)
        assert first.tokens


@pytest.mark.parametrize("kind", KINDS)
def test_an_idle_conversation_is_paged_under_pressure_and_comes_back_exact(kind, backends):
    budget = budget_for(1.5, len(FIRST) + 4 + len(SECOND), 5, admitted_prompt=2 * len(FIRST), fast=kind.endswith("fast"))
    model = dj.load("tiny-llama", backend=backends(kind, budget))
    expected = None
    with model.session() as a, model.session() as b:
        first = a.generate(FIRST, 4)
        b.generate(FIRST + FIRST, 4)  # admitting b needs room: idle a is paged
        assert a.status()["state"] == "paged" and a.status()["memory"]["host_bytes"] > 0
        expected = fresh_tokens(model, [*FIRST, *first.tokens, *SECOND], 5)
        assert a.generate(SECOND, 5, fresh=False).tokens == expected
        a.page_out()
        assert a.status()["state"] == "paged"
        a.rewind(len(FIRST) + 4)
        assert a.generate(SECOND, 5, fresh=False).tokens == expected


@pytest.mark.parametrize("kind", KINDS)
def test_a_cancelled_run_leaves_a_conversation_that_continues(kind, backends):
    model = dj.load("tiny-llama", backend=backends(kind))
    with model.session() as s:
        s.break_at(2, tokens=2)
        run = s.generate(FIRST, 8)
        assert run.paused and run.token_step == 2
        run.cancel()
        s.delete()
        assert s.history == len(FIRST) + 2, "the two tokens made before the cancel are kept"
        going_on = s.generate(SECOND, 5, fresh=False)
        assert going_on.tokens == fresh_tokens(model, [*FIRST, *run.tokens, *SECOND], 5)


def test_busy_sessions_refuse_fork_and_rewind(backends):
    model = dj.load("tiny-llama", backend=backends("inprocess"))
    with model.session() as s:
        s.break_at(1, once=True)
        run = s.generate(FIRST, 3)
        for call in (s.fork, lambda: s.rewind(0)):
            with pytest.raises(dj.SessionBusyError, match="finish or cancel it"):
                call()
        run.finish()


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class Recorder:
    """A tokenizer stand-in that records the text it is asked to encode (the template logic is the subject)."""

    chat_template = CHATML

    def __init__(self) -> None:
        self.encoded: list[str] = []

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        from jinja2 import Template

        return Template(CHATML).render(messages=messages, add_generation_prompt=add_generation_prompt)

    def decode(self, ids, skip_special_tokens=False):
        return {7: "<|im_end|>"}[ids[0]]

    def __call__(self, text, add_special_tokens=True):
        self.encoded.append(text)
        return {"input_ids": [ord(c) for c in text]}


def test_a_chat_turn_closes_the_reply_and_opens_the_next_turn():
    tok = Recorder()
    ids = chat_turn_ids(tok, [1, 2, 7], (7,), "And Germany?")
    assert tok.encoded == ["\n<|im_start|>user\nAnd Germany?<|im_end|>\n<|im_start|>assistant\n"]
    assert ids == [ord(c) for c in tok.encoded[0]]
    chat_turn_ids(tok, [1, 2, 3], (7,), "Go on")  # the reply was cut by max_new_tokens: close it first
    assert tok.encoded[-1] == "<|im_end|>\n<|im_start|>user\nGo on<|im_end|>\n<|im_start|>assistant\n"
