"""The fast path's step loop: one thread per model owns the runs that decode on its runner.

Each step it takes new runs from its inbox and runs one forward: up to ``prefill_tokens`` of their prompts packed
into one sequence (a longer prompt in chunks, one per step, prefill.py) with one more row for every run that has a
pending token, or, with no prompt waiting, a batched decode step of those runs (continuous batching: runs join and
leave between steps). A prompt's forward reads the weights anyway: the decoding runs get their token from it
instead of waiting for it and then paying for a step of their own. Request threads only
submit and wait on their run's ``Handoff``, exactly as for a run on the module path, so the engine drives both
kinds of run the same way.

Invariants:
- A step of a run whose breakpoints may hit at that step (``Breakpoint.may_hit``), all at decoder-layer outputs,
  or that is stepping layer by layer, leaves the batch: it runs alone on the session's executor thread
  (``Runner.decode_solo``: graph spans cut at those layers), pauses there like a hook would
  (``Run.on_activation``), and the run rejoins the batch for its next step. A pause therefore never stalls the
  batch.
- A run that records decoder-layer outputs stays in the batch: each forward of it gets host rows to fill
  (``Recorder.taps``), the runner stages and copies them (taps.py), and they count once the forward succeeded
  (``Recorder.written``, in ``_deliver``).
- A run whose session patches prompt rows (``SetPromptRows`` steering at a decoder layer's output) stays in the
  batch: its prefill overwrites those rows of its span of the packed sequence after the layer (after the
  layer's ``AddVector`` steering, whose vector the plan adds to rows patched before it, as the module path's
  order of edits does), before a pause or a tap sees the output; its decode steps are plain.
- A run that needs what only the module path offers (a breakpoint on a submodule or an input, steering other
  than an ``AddVector`` or a ``SetPromptRows`` at a decoder layer's output, a recording of anything but a
  decoder layer's output) is handed over between steps: its KV is copied into a transformers cache and it
  continues on the session's executor thread on the module path to its end.
- Between steps a run's KV (``BlockKV``) holds every token it has fed; the run's last token is pending. A failed
  step leaves each row's ``length`` unchanged (the step advances it only on success), so the session's context
  stays consistent and the failure ends only the runs of that step.
- The scheduler thread is the only writer of a fast run's tokens and KV while the run is live; the engine reads
  them after the run's end event.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .edits import AddVector, SetPromptRows
from .executor import Aborted, Timing
from .handoff import Event
from .prefill import DEFAULT_CHUNK
from .runner import DecodeRow, RowPatch, Runner
from .taps import Tap

if TYPE_CHECKING:
    from .executor import Run
    from .recording import Recording
    from .sessions import SessionState


@dataclass(frozen=True)
class FastPlan:
    """How one forward of a run goes on the fast path: its steering (one vector per decoder layer), the prompt
    rows its prefill patches (by decoder layer, in order) and the layers after which it may stop (empty: it joins
    the batch)."""

    steering: dict[int, torch.Tensor]
    stops: frozenset[int]
    patches: dict[int, list[RowPatch]] = field(default_factory=dict)


def fast_plan(
    session: SessionState,
    token_step: int,
    stepping: bool = False,
    finishing: bool = False,
    recordings: Iterable[Recording] | None = None,
) -> FastPlan | None:
    """The plan of forward number ``token_step``, or ``None`` when it needs the module path (a breakpoint on a
    submodule or an input that may hit, an edit the runner does not apply, or a recording of anything but a
    decoder layer's output). ``recordings``: the run's (its ``Recorder``'s), else the session's."""
    if any(r.layer is None for r in (session.recordings.values() if recordings is None else recordings)):
        return None  # only the module path's hooks see a submodule's output
    layer_paths = session.model.anatomy.layer_paths
    stops = set(range(len(layer_paths))) if stepping else set()
    if not finishing:
        for bp in session.breakpoints:
            if not bp.may_hit(token_step):
                continue
            if bp.side != "output" or bp.layer is None or bp.path != layer_paths[bp.layer]:
                return None
            stops.add(bp.layer)
    vectors: dict[int, torch.Tensor] = {}
    patches: dict[int, list[RowPatch]] = {}
    for steer in list(session.steering.values()):
        edit, layer = steer.edit, steer.layer
        if steer.side != "output" or layer is None or steer.path != layer_paths[layer]:
            return None
        if isinstance(edit, SetPromptRows):
            if token_step == 0:
                patches.setdefault(layer, []).append((edit.positions, edit.values))
            continue
        if not isinstance(edit, AddVector) or edit.positions is not None:
            return None
        add = steer.added
        vectors[layer] = add if layer not in vectors else vectors[layer] + add
        if layer in patches:  # the module path adds it to the rows patched before it; the runner patches after
            patches[layer] = [(rows, values + add) for rows, values in patches[layer]]
    return FastPlan(vectors, frozenset(stops), patches)


@dataclass
class _Job:
    run: Run
    feed: list[int]  # tokens the next forward consumes: the prompt before prefill, then the last token
    prefilled: bool = False
    steering: dict[int, torch.Tensor] = field(default_factory=dict)
    patches: dict[int, list[RowPatch]] = field(default_factory=dict)  # prompt rows the prefill overwrites
    taps: dict[int, Tap] = field(default_factory=dict)  # host rows for this forward's recorded layers


class Scheduler:
    """The step loop of one model's fast path (see the module docstring). Its thread starts on first use."""

    def __init__(self, runner: Runner, name: str, prefill_tokens: int = DEFAULT_CHUNK) -> None:
        """``prefill_tokens`` bounds one step's packed prefill (activation memory, and how long the runs that
        decode wait); a longer prompt goes in chunks, or alone when it must be fed whole (prefill.py)."""
        self.runner = runner
        self.prefill_tokens = prefill_tokens
        self._name = name
        self._inbox: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._jobs: list[_Job] = []
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self.steps = 0
        self.batched_rows = 0  # rows decoded in batched steps, for the mean batch size
        self.prefills = 0
        self.rows_in_prefills = 0  # decoding runs' tokens computed in a prefill's forward
        self.prefill_seconds = 0.0  # wall time of packed prefills and of batched decode steps (token pick included)
        self.decode_seconds = 0.0

    def submit(self, run: Run, feed: list[int], admit_s: float = 0.0) -> None:
        run.timing = Timing(admit_s=admit_s)
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=f"djinn-scheduler-{self._name}", daemon=True)
                self._thread.start()
        self._inbox.put(_Job(run, list(feed)))

    def close(self) -> None:
        if self._thread is not None:
            self._inbox.put(None)
            self._thread.join()
            self._thread = None

    def _loop(self) -> None:
        """Take everything the inbox holds (waiting only when there is nothing to run), then step."""
        while True:
            try:
                job = self._inbox.get(block=not self._jobs)
            except queue.Empty:
                self._step()
                continue
            if job is None:
                return
            self._jobs.append(job)

    def _step(self) -> None:
        """At most ``prefill_tokens`` prompt tokens and one token of every run that has its prompt in, in one
        packed forward; a step without prompts is a batched decode step. A long prompt goes in chunks, and the
        runs decoding never wait behind a prompt: they ride in its forward (one more row each)."""
        ready = [job for job in list(self._jobs) if self._admit(job)]
        decode = [job for job in ready if job.prefilled]
        waiting = [job for job in ready if not job.prefilled]
        if waiting:
            group, tokens = [], 0
            for job in waiting:  # first fit, in arrival order; a prompt fed whole past the budget goes alone
                if not group or tokens + self._piece(job) <= self.prefill_tokens:
                    tokens += self._piece(job)
                    group.append(job)
            self._prefill(group, decode)
            return
        limit = self.runner.max_batch
        for start in range(0, len(decode), limit):
            self._decode(decode[start : start + limit])

    @staticmethod
    def _piece(job: _Job) -> int:
        """How many of the job's prompt tokens its next forward feeds: a chunk, or all (prefill.py)."""
        chunk = job.run.prefill_chunk
        return len(job.feed) if chunk is None else min(len(job.feed), chunk)

    def _admit(self, job: _Job) -> bool:
        """Whether the job's run takes part in this step's batch; otherwise it was cancelled, steps alone
        (it may stop), or was handed over to the module path. A prompt part-way in keeps its first chunk's plan:
        nothing stops or records a chunked prompt (prefill.py)."""
        run = job.run
        step = len(run.tokens)
        if run._aborting:
            self._end(job, Event.CANCELLED)
            return False
        if run.chunking:
            return True
        recorder = run.recorder
        recordings = () if recorder is None else recorder.recordings
        plan = fast_plan(run.session, step, run._stepping, run._finishing, recordings)
        if plan is None:
            self._jobs.remove(job)
            self._hand_over(job)
            return False
        job.steering, job.patches = plan.steering, plan.patches
        run.token_step = step
        if recorder is not None:
            try:
                job.taps = recorder.taps(step, len(job.feed), self.runner.dtype, self.runner.hidden)
            except BaseException as exc:  # noqa: BLE001 - e.g. no host memory for the rows: this run ends, clearly
                self._end(job, Event.FAILED, exc)
                return False
        if plan.stops:
            self._jobs.remove(job)
            run.session.worker.submit(lambda: self._solo(job, plan.stops))
            return False
        return True

    def _solo(self, job: _Job, stops: frozenset[int]) -> None:
        """One forward of a run that may stop, on its session's executor thread; then back to the batch."""
        run = job.run
        paths = run.session.model.anatomy.layer_paths

        def after_layer(layer: int, h: torch.Tensor) -> torch.Tensor | None:
            if layer not in stops and not run._stepping:
                return None
            return run.on_activation(paths[layer], "output", h, hooked=False)

        start = time.perf_counter()
        try:
            if job.prefilled:
                row = DecodeRow(run.cache, job.feed[-1], job.steering, job.taps)
                logits = self.runner.decode_solo(row, set(stops), after_layer, lambda: run._stepping)
            else:
                logits = self.runner.prefill(
                    [(run.cache, job.feed, job.steering)], after_layer, [job.taps], [job.patches]
                )
                job.prefilled = True
                run.prefilled()
        except Aborted:
            run.handoff.post(Event.CANCELLED)
            return
        except BaseException as exc:  # noqa: BLE001 - a failed forward ends this run only
            run.handoff.post(Event.FAILED, exc)
            return
        run.timing.solo_s += time.perf_counter() - start
        run.session.memory.on_growth(run.session.id)
        if self._deliver([job], logits):
            self._inbox.put(job)

    def _prefill(self, jobs: list[_Job], riders: list[_Job]) -> None:
        """One packed forward of each job's next piece of prompt and of every rider's pending token. A job with
        prompt left goes to the back of the queue (runs' chunks take turns); the others have their prompt in and
        get their first token, and each rider its next one."""
        start = time.perf_counter()
        feeds = [job.feed[: self._piece(job)] for job in jobs] + [job.feed for job in riders]
        everyone = jobs + riders
        growing = [job for job in riders if job.run.cache.length + 1 > job.run.cache.capacity]
        try:
            logits = self.runner.prefill(
                [(job.run.cache, feed, job.steering) for job, feed in zip(everyone, feeds)],
                taps=[job.taps for job in everyone],
                patches=[job.patches for job in everyone],
            )
        except BaseException as exc:  # noqa: BLE001 - a failed forward ends the runs in it, nothing else
            for job in everyone:
                self._end(job, Event.FAILED, exc)
            return
        rows = []
        for row, (job, feed) in enumerate(zip(jobs, feeds)):
            job.run.session.memory.on_growth(job.run.session.id)
            if len(feed) < len(job.feed):
                job.feed = job.feed[len(feed) :]
                job.run.chunking = True
                self._jobs.remove(job)
                self._jobs.append(job)
            else:
                job.prefilled = True
                job.run.prefilled()
                rows.append(row)
        for job in growing:
            job.run.session.memory.on_growth(job.run.session.id)
        rows += range(len(jobs), len(everyone))
        done, going_on = [everyone[row] for row in rows], []
        if done:
            going_on = self._deliver(done, logits[rows])  # its token pick waits for the forward
        else:
            self.runner.wait()  # nothing reads a chunk's output: wait here, so its step is timed whole
        seconds = time.perf_counter() - start
        for job in jobs:
            job.run.timing.prefill_s += seconds
        for job in riders:
            job.run.timing.others_prefill_s += seconds
            job.run.timing.others_prefills += 1
        self._keep(done, going_on)
        self.prefills += 1
        self.prefill_seconds += seconds
        self.rows_in_prefills += len(riders)

    def _decode(self, jobs: list[_Job]) -> None:
        start = time.perf_counter()
        rows = [DecodeRow(job.run.cache, job.feed[-1], job.steering, job.taps) for job in jobs]
        growing = [job for job in jobs if job.run.cache.length + 1 > job.run.cache.capacity]
        try:
            logits = self.runner.decode(rows)
        except BaseException as exc:  # noqa: BLE001 - a failed step ends the runs in it, nothing else
            for job in jobs:
                self._end(job, Event.FAILED, exc)
            return
        for job in growing:  # a new block: the memory manager hears of growth once per block, not per token
            job.run.session.memory.on_growth(job.run.session.id)
        going_on = self._deliver(jobs, logits)
        seconds = time.perf_counter() - start
        for job in jobs:
            job.run.timing.decode_s += seconds
            job.run.timing.decode_steps += 1
            job.run.timing.decode_rows += len(rows)
        self._keep(jobs, going_on)
        self.steps += 1
        self.batched_rows += len(rows)
        self.decode_seconds += seconds

    def stats(self) -> dict[str, float]:
        return {
            "decode_steps": self.steps,
            "mean_rows_per_step": self.batched_rows / max(self.steps, 1),
            "decode_seconds": self.decode_seconds,
            "prefills": self.prefills,
            "rows_in_prefills": self.rows_in_prefills,
            "prefill_seconds": self.prefill_seconds,
        }

    def _keep(self, jobs: list[_Job], going_on: list[_Job]) -> None:
        for job in jobs:
            if job not in going_on:
                self._jobs.remove(job)

    def _deliver(self, jobs: list[_Job], logits: torch.Tensor) -> list[_Job]:
        """Pick each row's token (one host sync for all greedy rows), record it, end runs that are done; the
        jobs that go on. The forward succeeded: its recorded rows count."""
        going_on = []
        greedy = logits.argmax(dim=-1).tolist()
        for b, job in enumerate(jobs):
            run = job.run
            if job.taps:
                run.recorder.written(job.taps)
            if run.keep_logits:
                run.logits.append(logits[b].detach().to("cpu", copy=True))
            token = greedy[b] if run.generator is None else int(run.sampling.pick(logits[b : b + 1], run.generator)[0])
            run.tokens.append(token)
            if token in run.session.model.eos_ids or len(run.tokens) >= run.max_new_tokens:
                run.handoff.post(Event.FINISHED)
            else:
                job.feed = [token]
                going_on.append(job)
        return going_on

    def _end(self, job: _Job, event: Event, payload: object = None) -> None:
        self._jobs.remove(job)
        job.run.handoff.post(event, payload)

    def _hand_over(self, job: _Job) -> None:
        """Move the run to the module path: its KV into a transformers cache, its loop to the session's thread."""
        run = job.run
        session = run.session
        try:
            cache = run.cache.to_cache(session.model.model.config)
        except BaseException as exc:  # noqa: BLE001 - e.g. no device memory for the copy: the run ends, clearly
            run.handoff.post(Event.FAILED, exc)
            return
        run.cache = session.cache = cache
        run.feed = job.feed
        session.worker.submit(run.execute)
