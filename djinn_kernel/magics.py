"""``%djinn``: one line magic whose subcommands are thin calls into the Python API.

The cell returns while a run stays paused (the forward waits on its executor thread, in this kernel or in the
daemon), so widgets stay live and later cells inspect, edit and resume it. ``_djinn`` in the notebook holds the
current pause (or the run once it has finished). Bad arguments and Djinn errors become a short ``UsageError``,
never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
from typing import Any, NoReturn

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_magic, magics_class

from . import api
from .errors import DjinnError
from .report import format_status


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
    p = add("break", "pause at decoder layer LAYER or module PATH")
    p.add_argument("target")
    p.add_argument("--once", action="store_true")
    p.add_argument("--tokens", help="token steps, e.g. 0 (prefill) or 2-5")
    p.add_argument("--max-hits", type=int)
    p.add_argument("--side", choices=("output", "input"), default="output")
    p = add("delete", "delete breakpoint ID, or all of them")
    p.add_argument("id", nargs="?", type=int)
    add("breaks", "list breakpoints")
    p = add("run", "generate from PROMPT; returns at the first pause")
    p.add_argument("prompt", nargs="+")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None)
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

    @line_magic
    def djinn(self, line: str) -> Any:
        """Debug a language model from the notebook.

        %djinn load MODEL [--daemon]            load a model, open a session
        %djinn break LAYER|PATH [--once] [--tokens A-B] [--side input]
        %djinn delete [ID] | breaks             remove / list breakpoints
        %djinn run PROMPT [--max-new-tokens N]  generate; stops at the first pause
        %djinn continue | step | finish | cancel
        %djinn inspect [-k 5]                   activation widget for the pause
        %djinn steer scale 0.9 | add VAR [--alpha 4] [--layer 20] | ablate VAR | reset | clear
        %djinn sessions | vram | status
        %djinn help [SUBCOMMAND]

        The current pause is in the variable ``_djinn``.
        """
        try:
            words = shlex.split(line)
        except ValueError as exc:
            raise UsageError(f"cannot parse {line!r}: {exc}") from None
        if not words:
            return self._help(None)
        args = self.parser.parse_args(words)
        try:
            return getattr(self, f"_{args.command}")(args)
        except DjinnError as exc:
            raise UsageError(f"djinn: {exc}") from None

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

    # subcommands -----------------------------------------------------------------------------------------
    def _load(self, args: argparse.Namespace) -> api.Model:
        if args.daemon:
            api.connect()
        if self.session is not None:
            with contextlib.suppress(DjinnError):  # already gone with its daemon: nothing left to free
                self.session.close()
        self.model = api.load(args.model)
        self.session, self.run = self.model.session(), None
        return self.model

    def _break(self, args: argparse.Namespace) -> str:
        target: int | str = int(args.target) if args.target.lstrip("-").isdigit() else args.target
        bp = self._need_session().break_at(
            target, side=args.side, once=args.once, tokens=args.tokens, max_hits=args.max_hits
        )
        return f"breakpoint {bp} at {target} ({args.side})"

    def _delete(self, args: argparse.Namespace) -> str:
        removed = self._need_session().delete(args.id)
        return f"deleted breakpoint(s) {removed}" if removed else "no breakpoints"

    def _breaks(self, args: argparse.Namespace) -> str:
        rows = self._need_session().breakpoints
        if not rows:
            return "no breakpoints"
        return "\n".join(
            f"{b['id']:>3}  {b['path']} ({b['side']})  tokens={b['tokens'] or 'all'}  "
            f"hits={b['hits']}{'/' + str(b['max_hits']) if b['max_hits'] else ''}"
            for b in rows
        )

    def _run(self, args: argparse.Namespace) -> api.Run:
        session = self._need_session()
        return self._publish(session.generate(" ".join(args.prompt), args.max_new_tokens, chat=args.chat))

    def _continue(self, args: argparse.Namespace) -> api.Run:
        return self._publish(self._need_run().resume())

    def _step(self, args: argparse.Namespace) -> api.Run:
        return self._publish(self._need_run().step())

    def _finish(self, args: argparse.Namespace) -> api.Run:
        return self._publish(self._need_run().finish())

    def _cancel(self, args: argparse.Namespace) -> api.Run:
        return self._publish(self._need_run(paused=False).cancel())

    def _inspect(self, args: argparse.Namespace) -> Any:
        from djinn_widgets import ActivationInspector

        return ActivationInspector(self._need_run().pause, k=args.k)

    def _steer(self, args: argparse.Namespace) -> Any:
        session = self._need_session()
        if args.op == "clear":
            return f"removed steering {session.unsteer()}"
        if args.layer is not None:
            if args.op != "add":
                raise UsageError("persistent steering (--layer) supports add: %djinn steer add VAR --alpha A --layer L")
            layer: int | str = int(args.layer) if args.layer.lstrip("-").isdigit() else args.layer
            steer = session.steer(layer, self._vector(args.value), args.alpha)
            return f"steering {steer}: layer {layer} += {args.alpha} * {args.value} on every token"
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

    def _sessions(self, args: argparse.Namespace) -> Any:
        from djinn_widgets import SessionTable

        return SessionTable(self._backend())

    def _vram(self, args: argparse.Namespace) -> Any:
        from djinn_widgets import VramMonitor

        return VramMonitor(self._backend(), autostart=True)

    def _status(self, args: argparse.Namespace) -> Any:
        return _Text(format_status(self._backend().status()))

    def _help(self, args: argparse.Namespace | None) -> Any:
        name = None if args is None else args.subcommand
        if name is None:
            return _Text(self.parser.format_help())
        choices = self.parser.subcommands  # type: ignore[attr-defined]
        if name not in choices:
            raise UsageError(f"no subcommand {name!r}; one of: {', '.join(choices)}")
        return _Text(choices[name].format_help())


class _Text(str):
    """A string shown as plain text (not as a quoted repr) in the cell's output."""

    def __repr__(self) -> str:
        return str(self)
