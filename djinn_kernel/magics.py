"""``%djinn``: one line (and cell) magic whose subcommands are thin calls into the Python API.

The cell returns while a run stays paused (the forward waits on its executor thread, in this kernel or in the
daemon), so widgets stay live and later cells inspect, edit and resume it. ``_djinn`` in the notebook holds the
current pause (or the run once it has finished). Bad arguments and Djinn errors become a short ``UsageError``,
never a traceback, phrased in magics (``%djinn cancel``) rather than in API calls (``run.cancel()``).

Generation streams into the cell (the text so far and a progress line, updated in place) and Kernel →
Interrupt cancels the run the cell was driving, with one line saying so.

IPython reads a line ending in ``?`` as a help request before any magic sees it, which would swallow
``%djinn run What is the capital of France?``; ``protect_question_marks`` (an input transformer registered by
``%load_ext djinn_kernel``) hands such ``%djinn`` lines to the magic unchanged.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import re
import shlex
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any, NoReturn

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class

from . import api
from .errors import DjinnError
from .report import breakpoints_html, breakpoints_text, format_status

# ``%djinn SUBCOMMAND ...?``, optionally assigned (``run = %djinn run ...?``); not ``%djinn?`` (help on the magic).
_QUESTION_LINE = re.compile(r"^(?P<indent>\s*)(?:(?P<target>[\w.]+)\s*=\s*)?%djinn\s+(?P<args>\S.*\?)\s*$")

# API phrases in engine messages, and what a magic user types instead.
_MAGIC_WORDS = (
    ("run.finish()", "%djinn finish"),
    ("run.cancel()", "%djinn cancel"),
    ("run.resume()", "%djinn continue"),
    ("session.generate(prompt)", "%djinn run PROMPT"),
    ("session.generate()", "%djinn run PROMPT"),
    ("model.session()", "%djinn load MODEL"),
    ("run.pause", "_djinn"),
)


def protect_question_marks(lines: list[str]) -> list[str]:
    """Input transformer: rewrite ``%djinn ...?`` lines into the call IPython would make, so the trailing ``?``
    stays part of the prompt instead of becoming a help request (``Object `France` not found.``)."""
    out = []
    for line in lines:
        m = _QUESTION_LINE.match(line.rstrip("\n"))
        if m is None:
            out.append(line)
            continue
        call = f"get_ipython().run_line_magic('djinn', {m['args']!r})"
        target = f"{m['target']} = " if m["target"] else ""
        out.append(f"{m['indent']}{target}{call}\n")
    return out


def for_magics(message: str) -> str:
    """An API-phrased message (``run.cancel()``) in the words of the magics (``%djinn cancel``)."""
    for api_words, magic_words in _MAGIC_WORDS:
        message = message.replace(api_words, magic_words)
    return message


def show_interrupt(shell: Any, etype: type, value: BaseException, tb: Any, tb_offset: int | None = None) -> list[str]:
    """IPython custom exception handler: an interrupted run is one line, not a traceback through the engine.

    The cell still ends in an error, so "Run all" stops at it as the user asked. IPython leaves showing it to the
    handler (its return value is only checked), so the handler shows it as the error output itself."""
    stb = [for_magics(str(value))]
    shell._showtraceback(etype, value, stb)
    return stb


def register(shell: Any) -> None:
    """Register the magic, the ``?`` protection and the one-line report of an interrupted run (once per shell)."""
    shell.register_magics(DjinnMagics(shell))
    if protect_question_marks not in shell.input_transformers_cleanup:
        shell.input_transformers_cleanup.append(protect_question_marks)
        _rescue_this_cell(shell)
    shell.set_custom_exc((api.RunInterrupted,), show_interrupt)


def _rescue_this_cell(shell: Any) -> None:
    """``%load_ext djinn_kernel`` and ``%djinn run ...?`` in one cell: IPython transformed the whole cell before
    the extension existed, so the ``%djinn`` line already became a help request (``pinfo France``). For the rest
    of this cell, ``pinfo`` of exactly that word runs the ``%djinn`` line instead; other help requests are left
    alone, and lines whose result was assigned get a message, since the assignment itself is lost."""
    running = getattr(shell.displayhook, "exec_result", None)  # the cell being run, as typed
    raw = running.info.raw_cell if running is not None and running.info is not None else ""
    pending: dict[str, str] = {}
    for line in raw.splitlines():
        m = _QUESTION_LINE.match(line)
        if m is None:
            continue
        help_call = re.search(r"run_line_magic\('pinfo2?', '(.*)'\)", _plain_transform(line.strip()))
        if help_call is None:
            continue
        if m["target"]:
            print(f"djinn: IPython read {line.strip()!r} as a help request (the extension was loaded in the same "
                  f"cell); run the cell again", flush=True)  # fmt: skip
        else:
            pending[help_call[1]] = m["args"]
    if not pending:
        return
    magics = shell.magics_manager.magics["line"]
    original = magics["pinfo"]

    def pinfo(parameter_s: str = "", *args: Any, **kwargs: Any) -> Any:
        if parameter_s in pending:
            return shell.run_line_magic("djinn", pending.pop(parameter_s))
        return original(parameter_s, *args, **kwargs)

    def restore(*_: Any) -> None:
        magics["pinfo"] = original
        shell.events.unregister("post_run_cell", restore)

    magics["pinfo"] = pinfo
    shell.events.register("post_run_cell", restore)


def _plain_transform(line: str) -> str:
    """What IPython makes of ``line`` without Djinn's transformer."""
    from IPython.core.inputtransformer2 import TransformerManager

    return TransformerManager().transform_cell(line + "\n")


class _Parser(argparse.ArgumentParser):
    """argparse that reports through IPython instead of exiting the kernel."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message}\n{self.format_usage().strip()}")

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        raise UsageError(message or self.format_usage().strip())


def _parser() -> _Parser:
    parser = _Parser(prog="%djinn", add_help=False, description="Pause, inspect and steer a language model.")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser, metavar="SUBCOMMAND")

    def add(name: str, help_text: str) -> _Parser:
        return sub.add_parser(name, help=help_text, description=help_text, add_help=False)

    p = add("load", "load MODEL (built-in name, folder or cached hub id) and open a session on it")
    p.add_argument("model")
    p.add_argument("--daemon", action="store_true", help="run it in the shared daemon (started if needed)")
    p.add_argument("--split-at", type=int, metavar="K",
                   help="on a cluster daemon: layers 0..K-1 on one engine, the rest and the session on another")
    p = add("break", "pause at decoder layer LAYER or module PATH")
    p.add_argument("target")
    p.add_argument("--once", action="store_true")
    p.add_argument("--tokens", help="token steps, e.g. 0 (prefill) or 2-5")
    p.add_argument("--max-hits", type=int)
    p.add_argument("--side", choices=("output", "input"), default="output")
    p.add_argument("--when", help="pause only where a condition holds, e.g. \"norm > 50\", "
                                  "\"lens_top1 becomes ' Paris'\" or \"feature[7] > 2.5\"")
    p = add("delete", "delete breakpoint ID, or all of them")
    p.add_argument("id", nargs="?", type=int)
    add("breaks", "list breakpoints")
    p = add("run", "generate from PROMPT (or the cell's body under %%djinn run); returns at the first pause")
    p.add_argument("prompt", nargs="*")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--continue", dest="cont", action="store_true", help="continue the conversation (next turn)")
    add("fork", "copy the session's conversation into a new session and drive that one")
    p = add("rewind", "keep the first TOKENS tokens of the conversation")
    p.add_argument("tokens", type=int)
    add("continue", "resume to the next breakpoint hit")
    add("step", "resume to the next decoder layer")
    add("finish", "run to the end, ignoring breakpoints")
    add("cancel", "stop the current run")
    p = add("inspect", "show the paused activation (heatmap, norms, logit lens)")
    p.add_argument("-k", type=int, default=5)
    p = add("steer", "edit the paused activation, or steer persistently with --layer")
    p.add_argument("op", choices=("scale", "add", "ablate", "reset", "clear"))
    p.add_argument("value", nargs="?", help="factor for scale; notebook variable holding a vector for add/ablate")
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--layer", help="steer this layer on every token of every run instead of the current pause")
    p = add("io-wait", "the session waits on a tool: the paging policy may move its KV to the host meanwhile")
    p.add_argument("expected", nargs="?", type=float, help="expected seconds of the wait (a prefetch hint)")
    add("compute", "the tool answered: bring the session's KV back now")
    add("sessions", "table of the sessions of this engine or daemon")
    add("vram", "live device and session memory monitor")
    add("status", "text status of the engine or daemon")
    p = add("help", "usage of one subcommand")
    p.add_argument("subcommand", nargs="?")
    parser.subcommands = sub.choices  # type: ignore[attr-defined]
    return parser


@magics_class
class DjinnMagics(Magics):
    """Holds the notebook's current model, session and run; everything else lives behind the API."""

    def __init__(self, shell: Any) -> None:
        super().__init__(shell)
        self.parser = _parser()
        self.model: api.Model | None = None
        self.session: api.Session | None = None
        self.run: api.Run | None = None
        self.monitor: Any = None  # the VramMonitor of the last %djinn vram: one sampler at a time

    @line_cell_magic
    def djinn(self, line: str, cell: str | None = None) -> Any:
        """Debug a language model from the notebook.

        %djinn load MODEL [--daemon]            load a model, open a session
        %djinn break LAYER|PATH [--once] [--tokens A-B] [--side input]
        %djinn delete [ID] | breaks             remove / list breakpoints
        %djinn run PROMPT [--max-new-tokens N]  generate (streamed); stops at the first pause
        %%djinn run [--max-new-tokens N]        the same, the cell's body is the prompt
        %djinn run --continue PROMPT            the conversation's next turn; fork | rewind TOKENS
        %djinn continue | step | finish | cancel  (Kernel → Interrupt cancels a run in progress)
        %djinn inspect [-k 5]                   activation widget for the pause
        %djinn steer scale 0.9 | add VAR [--alpha 4] [--layer 20] | ablate VAR | reset | clear
        %djinn io-wait [SECONDS] | compute      an agent's tool call: its KV may leave the GPU meanwhile
        %djinn sessions | vram | status
        %djinn help [SUBCOMMAND]

        The current pause is in the variable ``_djinn``.
        """
        try:
            words = shlex.split(line, comments=True)
        except ValueError as exc:
            raise UsageError(f"cannot parse {line!r}: {exc}") from None
        if not words:
            return self._help(None)
        args = self.parser.parse_args(words)
        if cell is not None:
            if args.command != "run":
                raise UsageError(f"%%djinn takes only run (the body is the prompt), not {args.command}")
            args.prompt = [cell.strip()]
        try:
            return getattr(self, f"_{args.command.replace('-', '_')}")(args)
        except DjinnError as exc:
            raise UsageError(f"djinn: {for_magics(str(exc))}") from None
        except api.RunInterrupted as exc:
            if exc.run is not None:
                self._publish(exc.run)
            raise

    # helpers ---------------------------------------------------------------------------------------------
    def _need_session(self) -> api.Session:
        if self.session is None:
            raise UsageError("no model loaded: run %djinn load MODEL first (e.g. %djinn load smollm2-135m)")
        return self.session

    def _need_run(self, paused: bool = True) -> api.Run:
        if self.run is None:
            raise UsageError("no run yet: start one with %djinn run PROMPT")
        if paused and not self.run.paused:
            raise UsageError(f"the run is {self.run.state}, not paused; start another with %djinn run PROMPT")
        return self.run

    def _publish(self, run: api.Run) -> api.Run:
        self.run = run
        self.shell.user_ns["_djinn"] = run.pause if run.paused else run
        return run

    def _vector(self, name: str | None) -> Any:
        if not name:
            raise UsageError("add and ablate need a notebook variable holding a vector, e.g. %djinn steer add v")
        if name not in self.shell.user_ns:
            raise UsageError(f"no notebook variable named {name!r}")
        return self.shell.user_ns[name]

    def _backend(self) -> Any:
        return self.model._backend if self.model is not None else api.default_backend()

    def _live(self) -> Live:
        return Live(in_kernel=getattr(self.shell, "kernel", None) is not None)

    # subcommands -----------------------------------------------------------------------------------------
    def _load(self, args: argparse.Namespace) -> api.Model:
        if args.daemon:
            api.connect()
        if self.session is not None:
            with contextlib.suppress(DjinnError):  # already gone with its daemon: nothing left to free
                self.session.close()
        self._close_monitor()
        with ticker(f"loading {args.model}"):
            self.model = api.load(args.model, split_at=args.split_at)
        self.session, self.run = self.model.session(), None
        return self.model

    def _break(self, args: argparse.Namespace) -> Rich:
        target: int | str = int(args.target) if args.target.lstrip("-").isdigit() else args.target
        bp = self._need_session().break_at(
            target, side=args.side, once=args.once, tokens=args.tokens, max_hits=args.max_hits, when=args.when
        )
        condition = f" when {args.when}" if args.when else ""
        return Rich(f"breakpoint {bp} at {target} ({args.side}){condition}")

    def _delete(self, args: argparse.Namespace) -> Rich:
        removed = self._need_session().delete(args.id)
        return Rich(f"deleted breakpoint(s) {removed}" if removed else "no breakpoints")

    def _breaks(self, args: argparse.Namespace) -> Rich:
        rows = self._need_session().breakpoints
        return Rich(breakpoints_text(rows), breakpoints_html(rows))

    def _run(self, args: argparse.Namespace) -> api.Run:
        session = self._need_session()
        if not args.prompt or not " ".join(args.prompt).strip():
            raise UsageError("the following arguments are required: prompt (or put it in a %%djinn run cell)")
        prompt = " ".join(args.prompt)
        with self._live() as live:
            return self._publish(
                session.generate(prompt, args.max_new_tokens, chat=args.chat, fresh=not args.cont, on_progress=live)
            )

    def _fork(self, args: argparse.Namespace) -> Rich:
        parent = self._need_session()
        self.session, self.run = parent.fork(), None
        return Rich(
            f"session {self.session.id} is a fork of session {parent.id} ({self.session.history} tokens); "
            f"%djinn now drives session {self.session.id}, session {parent.id} stays open"
        )

    def _rewind(self, args: argparse.Namespace) -> Rich:
        session = self._need_session()
        had = session.history
        session.rewind(args.tokens)
        return Rich(f"kept {args.tokens} of {had} tokens; %djinn run --continue goes on from there")

    def _continue(self, args: argparse.Namespace) -> api.Run:
        run = self._need_run()
        with self._live() as live:
            return self._publish(run.resume(on_progress=live))

    def _step(self, args: argparse.Namespace) -> api.Run:
        run = self._need_run()
        with self._live() as live:
            return self._publish(run.step(on_progress=live))

    def _finish(self, args: argparse.Namespace) -> api.Run:
        run = self._need_run()
        with self._live() as live:
            return self._publish(run.finish(on_progress=live))

    def _cancel(self, args: argparse.Namespace) -> api.Run:
        return self._publish(self._need_run(paused=False).cancel())

    def _close_monitor(self) -> None:
        if self.monitor is not None:
            self.monitor.close()
            self.monitor = None

    def _inspect(self, args: argparse.Namespace) -> Any:
        from djinn_widgets import ActivationInspector

        return ActivationInspector(self._need_run().pause, k=args.k)

    def _steer(self, args: argparse.Namespace) -> Any:
        session = self._need_session()
        if args.op == "clear":
            return Rich(f"removed steering {session.unsteer()}")
        if args.layer is not None:
            if args.op != "add":
                raise UsageError("persistent steering (--layer) supports add: %djinn steer add VAR --alpha A --layer L")
            layer: int | str = int(args.layer) if args.layer.lstrip("-").isdigit() else args.layer
            steer = session.steer(layer, self._vector(args.value), args.alpha)
            return Rich(f"steering {steer}: layer {layer} += {args.alpha} * {args.value} on every token")
        pause = self._need_run().pause
        if args.op == "reset":
            return pause.reset()
        if args.op == "scale":
            try:
                factor = float(args.value)
            except (TypeError, ValueError):
                raise UsageError(f"scale needs a number, e.g. %djinn steer scale 0.9 (got {args.value!r})") from None
            return pause.scale(factor)
        if args.op == "add":
            return pause.add(self._vector(args.value), args.alpha)
        return pause.ablate(self._vector(args.value))

    def _io_wait(self, args: argparse.Namespace) -> Rich:
        session = self._need_session()
        decision = session.io_wait(args.expected)
        action = "paging out in the background" if decision["paging"] else "kept on the device"
        return Rich(f"session {session.id} waits on IO: {action} ({decision['reason']}); %djinn compute ends the wait")

    def _compute(self, args: argparse.Namespace) -> Rich:
        session = self._need_session()
        moved = session.compute()
        back = f"paged {moved['bytes'] / 2**20:.2f} MiB back in" if moved["bytes"] else "its KV was on the device"
        return Rich(f"session {session.id} computes again: {back}")

    def _sessions(self, args: argparse.Namespace) -> Any:
        from djinn_widgets import SessionTable

        return SessionTable(self._backend())

    def _vram(self, args: argparse.Namespace) -> Any:
        from djinn_widgets import VramMonitor

        self._close_monitor()
        self.monitor = VramMonitor(self._backend(), autostart=True)
        return self.monitor

    def _status(self, args: argparse.Namespace) -> Any:
        return Rich(format_status(self._backend().status()), pre=True)

    def _help(self, args: argparse.Namespace | None) -> Any:
        name = None if args is None else args.subcommand
        if name is None:
            return Rich(self.parser.format_help(), pre=True)
        choices = self.parser.subcommands  # type: ignore[attr-defined]
        if name not in choices:
            raise UsageError(f"no subcommand {name!r}; one of: {', '.join(choices)}")
        return Rich(choices[name].format_help(), pre=True)


class Rich(str):
    """A message as cell output: plain text (not a quoted repr), and HTML where the front end renders it."""

    def __new__(cls, text: str, html_text: str | None = None, *, pre: bool = False) -> Rich:
        self = super().__new__(cls, text)
        self._html = html_text if html_text is not None else _html_of(text, pre)
        return self

    def __repr__(self) -> str:
        return str(self)

    def _repr_html_(self) -> str:
        return self._html


def _html_of(text: str, pre: bool) -> str:
    import html

    return f"<pre>{html.escape(text)}</pre>" if pre else f"<span>{html.escape(text)}</span>"


class Live:
    """Streams a run into the cell while a magic drives it: the text so far and a progress line.

    In a kernel both sit in one display output updated in place; when the call returns that output keeps only
    the final progress line, and the run's own display (the magic's result) shows the text. Outside a kernel
    (terminal IPython, tests) the text goes to stdout as it comes and the progress line once at the end.
    """

    def __init__(self, in_kernel: bool) -> None:
        self.in_kernel = in_kernel
        self.handle: Any = None
        self.last: api.Progress | None = None

    def __enter__(self) -> Live:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: object) -> None:
        if self.last is None:
            return
        if isinstance(exc, api.RunInterrupted) and exc.run is not None:  # the line must not say "running"
            self.last = dataclasses.replace(self.last, state=exc.run.state, pause=None, done=True)
        self._show(self.last, final=True)

    def __call__(self, progress: api.Progress) -> None:
        self.last = progress
        if self.in_kernel:
            self._show(progress, final=False)
        elif progress.new_text:
            sys.stdout.write(progress.new_text)
            sys.stdout.flush()

    def _show(self, progress: api.Progress, final: bool) -> None:
        if not self.in_kernel:
            if final:
                print(("\n" if progress.text else "") + progress.line())
            return
        from IPython.display import display

        view = _LiveView(progress.line(), "" if final else progress.text)
        if self.handle is None:
            self.handle = display(view, display_id=True)
        else:
            self.handle.update(view)


class _LiveView:
    def __init__(self, line: str, text: str) -> None:
        self.line, self.text = line, text

    def __repr__(self) -> str:
        return f"{self.text}\n{self.line}" if self.text else self.line

    def _repr_html_(self) -> str:
        import html

        text = f"<div style='white-space:pre-wrap;font-family:monospace'>{html.escape(self.text)}</div>"
        line = f"<div class='djinn-progress' style='color:#666;font-size:90%'>{html.escape(self.line)}</div>"
        return (text if self.text else "") + line


@contextlib.contextmanager
def ticker(what: str, every: float = 1.0) -> Iterator[None]:
    """Say on stdout that ``what`` is under way, and how long it took, when it takes more than ``every`` s.

    Loading or converting a model takes seconds to a minute; a silent cell looks hung.
    """
    start = time.monotonic()
    done = threading.Event()
    said = threading.Event()

    def announce() -> None:
        if not done.wait(every):
            said.set()
            print(f"djinn: {what}…", flush=True)

    thread = threading.Thread(target=announce, name="djinn-ticker", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        if said.is_set():
            print(f"djinn: {what} took {time.monotonic() - start:.1f} s", flush=True)
