"""``SteeringPanel``: try an edit on a paused run, see what it does to the prediction, then commit to it.

Preview applies the edit, reads the logit lens, and resets the pause, so a preview never leaks into the run.
Apply & resume makes the edit stick, finishes the run, and generates the same prompt (as token ids, so the
chat template is not applied twice) in a fresh session with no breakpoints and no steering: the unsteered
baseline the steered text is compared with.
"""

from __future__ import annotations

import html
from typing import TYPE_CHECKING, Any

import ipywidgets as W
import torch

from djinn_kernel.api import RunInterrupted
from djinn_kernel.edits import Ablate, AddVector, Edit, Scale
from djinn_kernel.errors import DjinnError, InvalidArgumentError, NotPausedError

from ._handles import as_run
from ._render import TextFallback, html_table, visible

if TYPE_CHECKING:
    from djinn_kernel.api import Pause, Run

OPS = ("scale", "add", "ablate")
SLIDER_WIDTH = "480px"  # 20 units over ~400 px of track: a 25 px drag moves it by about 1


class SteeringPanel(TextFallback, W.VBox):
    """Op, coefficient, Preview and Apply & resume for ``run``'s current pause.

    ``add`` (``alpha * vector``) and ``ablate`` (project ``vector`` out) need ``vector``, a 1-D tensor of the
    hidden size; without one only ``scale`` is offered. ``max_new_tokens`` for the baseline defaults to the
    number of tokens the steered run produced (the run's own limit is not part of its snapshot).
    DjinnErrors go to ``status`` rather than into the widget callback.
    """

    def __init__(
        self,
        run: Run | Pause,
        vector: torch.Tensor | None = None,
        *,
        k: int = 5,
        max_new_tokens: int | None = None,
    ) -> None:
        if vector is not None and not isinstance(vector, torch.Tensor):
            raise TypeError(f"vector must be a torch.Tensor or None, not {type(vector).__name__}")
        self.run = as_run(run)
        self.vector = vector
        self.k = k
        self.max_new_tokens = max_new_tokens
        self.before: list[dict[str, Any]] = []
        self.after: list[dict[str, Any]] = []
        self.steered_text: str | None = None
        self.original_text: str | None = None
        self.enabled_ops = OPS if vector is not None else ("scale",)
        self.op = W.Dropdown(options=list(self.enabled_ops), value="scale", description="op")
        # Wide enough that a drag moves the coefficient by tenths, not by fours; the readout takes typed values.
        self.coefficient = W.FloatSlider(
            value=2.0,
            min=-10.0,
            max=10.0,
            step=0.05,
            description="coef",
            continuous_update=False,
            layout=W.Layout(width=SLIDER_WIDTH),
        )
        self.preview_button = W.Button(description="Preview", icon="eye")
        self.apply_button = W.Button(description="Apply & resume", icon="play", button_style="warning")
        self.rerun_button = W.Button(description="Run again", icon="repeat", tooltip="same prompt, same breakpoints")
        hint = "" if vector is not None else "<i>add / ablate need a vector: SteeringPanel(run, vector=v)</i>"
        self.hint = W.HTML(hint)
        self.status = W.HTML()
        self.lens_table = W.HTML()
        self.comparison = W.HTML()
        self.op.observe(self._on_op, names="value")
        self.preview_button.on_click(lambda _: self.preview())
        self.apply_button.on_click(lambda _: self.apply_and_resume())
        self.rerun_button.on_click(lambda _: self.rerun())
        super().__init__(
            [
                W.HBox([self.op, self.coefficient]),
                self.hint,
                W.HBox([self.preview_button, self.apply_button, self.rerun_button]),
                self.status,
                self.lens_table,
                self.comparison,
            ]
        )
        self._sync_buttons()

    # actions ------------------------------------------------------------------------------------------------
    def preview(self) -> None:
        """Show the top-k logit lens before and after the edit; the pause is left as it was."""
        try:
            pause = self._pause()
            self.before = pause.logit_lens(self.k)
            self.after = pause.logit_lens(self.k, edit=self._edit())
        except DjinnError as exc:
            self._error(exc)
            return
        self.lens_table.value = self._lens_html()
        note = ""
        if self.op.value == "scale" and self.coefficient.value > 0 and _ids(self.before) == _ids(self.after):
            note = " (the final norm makes the lens blind to a positive scale here; later layers are not)"
        self.status.value = f"preview of {html.escape(self._describe())}: not applied{note}"

    def apply_and_resume(self) -> None:
        """Apply the edit, finish the run, and compare its text with an unsteered run of the same prompt.

        While it runs the buttons are disabled, the status says so and the steered text streams in. The
        notebook's interrupt button cancels the run (as for any call that drives one) and the status says so.
        """
        try:
            pause = self._pause()
            self._busy(f"applying {self._describe()} and running to the end…")
            pause.apply(self._edit())
            self.run.finish(on_progress=self._stream_steered)
        except (DjinnError, RunInterrupted) as exc:
            self._error(exc)
            return
        finally:
            self._idle()
        if self.run.state != "finished":
            self.status.value = _red(f"the run {self.run.state}: {self.run.error}")
            return
        self.steered_text = self.run.text
        try:
            self.original_text = self._baseline()
        except DjinnError as exc:
            self._error(exc)
        self.comparison.value = html_table(
            ["unsteered", f"steered ({self._describe()})"],
            [(self.original_text if self.original_text is not None else "—", self.steered_text)],
        )
        if self.original_text is not None:
            self.status.value = f"applied {html.escape(self._describe())} and finished"

    def rerun(self) -> None:
        """Run the same prompt again in the same session (same breakpoints), to try another edit on it."""
        n = self.max_new_tokens or max(1, len(self.run.tokens))
        try:
            self._busy("running the prompt again…")
            run = self.run.session.generate(self.run.prompt_ids, n)
        except (DjinnError, RunInterrupted) as exc:
            self._error(exc)
            return
        finally:
            self._idle()
        self.run = run
        self._sync_buttons()
        self.before, self.after, self.steered_text, self.original_text = [], [], None, None
        self.lens_table.value = self.comparison.value = ""
        if run.paused:
            self.status.value = html.escape(f"run {run.id} paused at {run.pause.path}, token step {run.token_step}")
        else:
            self.status.value = _red(f"run {run.id} {run.state} without pausing: set a breakpoint (%djinn break)")

    # helpers ------------------------------------------------------------------------------------------------
    def _busy(self, message: str) -> None:
        self.status.value = f"<i>{html.escape(message)}</i>"
        self.apply_button.description = "Running…"
        self.preview_button.disabled = self.apply_button.disabled = self.rerun_button.disabled = True

    def _idle(self) -> None:
        self.apply_button.description = "Apply & resume"
        self.rerun_button.disabled = False
        self._sync_buttons()

    def _stream_steered(self, progress: Any) -> None:
        self.comparison.value = html_table([f"steered ({self._describe()}), streaming"], [(progress.text,)])
        self.status.value = f"<i>{html.escape(progress.line())}</i>"

    def _pause(self) -> Pause:
        latest = self.run.session.run
        if latest is not None and latest is not self.run and latest.paused:
            self.run = latest  # a run started elsewhere (a later %djinn run): steer that one
        pause = self.run.pause
        if pause is None:
            raise NotPausedError(
                f"run {self.run.id} is {self.run.state}, not paused: nothing to steer; press Run again for a new run"
            )
        return pause

    def _edit(self) -> Edit:
        op, coef = self.op.value, float(self.coefficient.value)
        if op == "scale":
            return Scale(coef)
        if self.vector is None:
            raise InvalidArgumentError(f"{op} needs a steering vector: SteeringPanel(run, vector=v)")
        return AddVector(self.vector, coef) if op == "add" else Ablate(self.vector)

    def _baseline(self) -> str:
        """The same prompt ids in a new session of the same model, no breakpoints, same number of tokens."""
        n = self.max_new_tokens or max(1, len(self.run.tokens))
        with self.run.session.model.session() as session:
            return session.generate(self.run.prompt_ids, n).text

    def _describe(self) -> str:
        op = self.op.value
        return "ablate(vector)" if op == "ablate" else f"{op}({self.coefficient.value:g})"

    def _lens_html(self) -> str:
        rows = []
        for i in range(max(len(self.before), len(self.after))):
            b = self.before[i] if i < len(self.before) else None
            a = self.after[i] if i < len(self.after) else None
            rows.append((i + 1, _entry(b), _entry(a)))
        return html_table(["#", "lens before", f"after {self._describe()}"], rows)

    def _on_op(self, change: dict[str, Any]) -> None:
        self.coefficient.disabled = change["new"] == "ablate"

    def _sync_buttons(self) -> None:
        done = not self.run.paused
        self.preview_button.disabled = self.apply_button.disabled = done
        self.rerun_button.disabled = not done

    def _error(self, exc: DjinnError | RunInterrupted) -> None:
        self.status.value = _red(f"{type(exc).__name__}: {exc}")

    def __repr__(self) -> str:
        ops = "/".join(self.enabled_ops)
        lines = [f"<SteeringPanel run {self.run.id} ({self.run.state}), ops {ops}, edit {self._describe()}"]
        if self.after:
            lines.append("  lens before: " + ", ".join(_entry(r) for r in self.before))
            lines.append("  lens after:  " + ", ".join(_entry(r) for r in self.after))
        if self.steered_text is not None:
            lines.append(f"  unsteered: {self.original_text}")
            lines.append(f"  steered:   {self.steered_text}")
        return "\n".join(lines) + ">"


def _entry(row: dict[str, Any] | None) -> str:
    return "" if row is None else f"'{visible(row['token'])}' {row['prob']:.3f}"


def _ids(rows: list[dict[str, Any]]) -> list[int]:
    return [r["token_id"] for r in rows]


def _red(text: str) -> str:
    return f"<b style='color:#b00'>{html.escape(text)}</b>"
