"""A scripted agent: rounds of generate → tool call → generate with the tool's result appended, on one session.

It exists to show (in a notebook, next to ``%djinn vram``) and to measure (experiments/exp1_agents) what the
phase signals do: around every tool call the driver says ``io_wait`` and ``compute`` through
``session.tool_call``, so under the ``signal`` policies the agent's KV leaves the device while the tool runs and
is back when it answers. The conversation continues over the kept KV (``generate(..., fresh=False)``).

    script = random_script(seed=1, vocab=model.info["vocab_size"], prompt_tokens=512, rounds=4)
    records = run_agent(model.session(), script)           # or AgentRun(session, script).start() in a notebook
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidArgumentError, OutOfMemoryError


@dataclass(frozen=True)
class Step:
    """One round: ``input`` (the prompt, then each tool's result) → ``max_new_tokens`` generated → a tool call of
    ``tool_s`` seconds (None: the agent ends after this round)."""

    input: str | list[int]
    max_new_tokens: int
    tool_s: float | None = None


@dataclass(frozen=True)
class AgentScript:
    steps: tuple[Step, ...]
    hints: bool = True  # pass each tool's duration as io_wait's expected_s (an oracle hint) or no hint at all

    def __post_init__(self) -> None:
        if not self.steps:
            raise InvalidArgumentError("an agent script needs at least one step")
        for step in self.steps:
            if step.tool_s is not None and not step.tool_s >= 0:
                raise InvalidArgumentError(f"a tool call lasts >= 0 seconds, not {step.tool_s!r}")


@dataclass
class RoundRecord:
    """What one round cost: ``latency_s`` is the whole generate call (queueing for memory included)."""

    index: int
    started: float  # time.monotonic() when the round asked to generate
    latency_s: float
    queued_s: float  # of which spent waiting for room (OutOfMemoryError at admission, retried)
    tokens: list[int]
    tool_s: float | None
    io_wait: dict[str, Any] | None = None  # the policy's decision at the tool call that followed
    error: str | None = None
    timing: dict[str, float] | None = None  # the run's ``Run.timing``: where its time went (fast path)


def simulated_tool(index: int, seconds: float) -> None:
    """A tool that takes ``seconds`` of wall time and answers nothing (the script holds its result)."""
    threading.Event().wait(seconds)


@dataclass
class AgentRun:
    """Drives one script on one session; ``records`` fills as rounds end (readable from another thread)."""

    session: Any
    script: AgentScript
    tool: Callable[[int, float], None] = simulated_tool
    wait_for_room: Callable[[], None] | None = None  # called after OutOfMemoryError, before retrying; None: raise
    records: list[RoundRecord] = field(default_factory=list)

    def start(self) -> threading.Thread:
        """Run on a background thread, so the notebook cell returns and ``%djinn vram`` shows the agent's KV
        leave the device at each tool call and come back; ``records`` fills as rounds end."""
        thread = threading.Thread(target=self.run, name=f"djinn-agent-{self.session.id}", daemon=True)
        thread.start()
        return thread

    def run(self) -> list[RoundRecord]:
        for index, step in enumerate(self.script.steps):
            record = self._round(index, step)
            self.records.append(record)
            if record.error is not None:
                break
            if step.tool_s is not None:
                with self.session.tool_call(step.tool_s if self.script.hints else None) as decision:
                    record.io_wait = decision
                    self.tool(index, step.tool_s)
        return self.records

    def _round(self, index: int, step: Step) -> RoundRecord:
        started = time.monotonic()
        queued = 0.0
        while True:
            try:
                run = self.session.generate(step.input, step.max_new_tokens, fresh=index == 0)
                break
            except OutOfMemoryError as exc:
                if self.wait_for_room is None:
                    return RoundRecord(index, started, time.monotonic() - started, queued, [], step.tool_s,
                                       error=f"OutOfMemoryError: {exc}")
                waited = time.monotonic()
                self.wait_for_room()
                queued += time.monotonic() - waited
        latency = time.monotonic() - started
        error = None if run.state == "finished" else f"run ended {run.state}: {run.error}"
        return RoundRecord(index, started, latency, queued, run.tokens, step.tool_s, error=error, timing=run.timing)


def run_agent(session: Any, script: AgentScript, tool: Callable[[int, float], None] = simulated_tool) -> list[RoundRecord]:
    """Run ``script`` on ``session`` to its end on this thread; one record per round."""
    return AgentRun(session, script, tool).run()


def random_script(
    seed: int,
    vocab: int,
    prompt_tokens: int = 1024,
    rounds: int = 4,
    new_tokens: tuple[int, int] = (50, 100),
    tool_s: tuple[float, float] = (0.2, 2.0),
    result_tokens: tuple[int, int] = (16, 64),
    hints: bool = True,
) -> AgentScript:
    """A seeded agent of random token ids: a prompt, then ``rounds`` rounds of ``new_tokens`` generated (uniform)
    and a tool call of ``tool_s`` seconds (uniform) whose result (``result_tokens`` ids) is the next input."""
    if rounds < 1 or prompt_tokens < 1 or vocab < 4:
        raise InvalidArgumentError("rounds and prompt_tokens must be >= 1 and vocab >= 4")
    rng = random.Random(seed)
    ids = lambda n: [rng.randrange(3, vocab) for _ in range(n)]  # noqa: E731 - ids 0-2 are pad/bos/eos
    steps = []
    text: list[int] = ids(prompt_tokens)
    for r in range(rounds):
        last = r == rounds - 1
        steps.append(Step(text, rng.randint(*new_tokens), None if last else rng.uniform(*tool_s)))
        text = ids(rng.randint(*result_tokens))
    return AgentScript(tuple(steps), hints)
