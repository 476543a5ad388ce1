"""The ``djinn`` command: ``djinn demo`` runs the scripted debugging session on the default model."""

from __future__ import annotations

import argparse
import sys

from .errors import DjinnError


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(model_name=args.model, layer=args.layer, alpha=args.alpha, max_new_tokens=args.max_new_tokens)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="djinn", description="Interactive debugger for language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="pause, inspect and steer the default model (a scripted session)")
    demo.add_argument("--model", default="smollm2-135m", help="model name or folder (default: smollm2-135m)")
    demo.add_argument("--layer", type=int, default=None, help="layer to pause at (default: the middle one)")
    demo.add_argument("--alpha", type=float, default=0.75, help="steering strength as a fraction of the residual norm (default: 0.75)")
    demo.add_argument("--max-new-tokens", type=int, default=40, help="tokens to generate (default: 40)")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except DjinnError as exc:
        print(f"djinn: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
