"""The ``djinn`` command: ``djinn demo`` runs the scripted debugging session on the default model; ``serve``,
``status`` and ``stop`` run and watch the daemon; ``token`` makes, lists and revokes the tokens of other users."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from .errors import DjinnError
from .prefill import DEFAULT_CHUNK


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(model_name=args.model, layer=args.layer, alpha=args.alpha, max_new_tokens=args.max_new_tokens)
    return 0


def _serve(args: argparse.Namespace) -> int:
    from .allocator import bound_arenas

    bound_arenas()  # before the engine and the daemon start their threads (``allocator``: RSS under faults)
    from .auth import TokenStore, require_curve, server_keypair
    from .daemon import Daemon, Security, install_signal_handlers
    from .engine import Engine, default_device, default_memory
    from .memory import LRUPolicy, parse_bytes
    from .policies import make_policy
    from .report import format_size
    from .spill import SpillStore
    from .runtime import DaemonInfo, clear_info, ipc_endpoint, new_key, read_info, runtime_dir, write_info

    folder = runtime_dir()
    running = read_info(folder)
    if running is not None:
        print(f"djinn: a daemon is already running (pid {running.pid}, {', '.join(running.endpoints)})", file=sys.stderr)
        return 1
    public = secret = None
    if args.listen:
        require_curve()  # before any work: tcp:// is encrypted or not served at all
        public, secret = server_keypair(folder)
    if args.ray is None and args.engines is not None:
        print("djinn: --engines is an option of --ray (a cluster's engines)", file=sys.stderr)
        return 2
    if args.ray is not None:
        engine = _cluster(args)  # the engines run in Ray actors; the daemon routes to them as to one engine
        where = f"{engine.device}: " + ", ".join(
            f"{e['name']} on {e['device']} (pid {e['pid']})" for e in engine.status()["engines"]
        )
    else:
        if args.spill_memory and not args.spill_dir:
            print("djinn: --spill-memory needs --spill-dir (the folder to spill to)", file=sys.stderr)
            return 2
        spill = SpillStore(args.spill_dir, parse_bytes(args.spill_memory or "64GiB"), args.spill_threads,
                           parse_bytes(args.spill_block)) if args.spill_dir else None
        device = torch_device(args.device) if args.device else default_device()
        memory = default_memory(
            device,
            budget=parse_bytes(args.gpu_memory) if args.gpu_memory else None,
            host=parse_bytes(args.host_memory) if args.host_memory else None,
            spill=spill,
        )
        if args.page_on_pause and args.policy != "lru":
            print(f"djinn: --page-on-pause is a mode of the lru policy, not of {args.policy}", file=sys.stderr)
            return 2
        memory.policy = LRUPolicy(eager=True) if args.page_on_pause else make_policy(args.policy)
        if args.host_reserve:
            memory.pool.reserve(parse_bytes(args.host_reserve))
        fast = {"auto": None, "on": True, "off": False}[args.fast]
        engine = Engine(
            device=device,
            memory=memory,
            progress=_progress,
            deterministic=args.deterministic,
            fast=fast,
            weight_memory=parse_bytes(args.weight_memory) if args.weight_memory else None,
            ring_slots=args.ring_slots,
            max_context=args.max_context,
            prefill_chunk=args.prefill_chunk,
        )
        where = f"{device}, session budget {format_size(memory.budget)}"
    key, key_file = new_key(folder)
    security = Security(key, TokenStore(folder), secret, parse_bytes(args.max_message_size))
    endpoints = [ipc_endpoint(folder), *args.listen]
    try:
        daemon = Daemon(engine, security, endpoints, lease=args.client_lease)
    except BaseException:
        if args.ray is not None:
            engine.shutdown()  # the engine actors, and Ray if started here: nothing left running behind an error
        raise
    install_signal_handlers(daemon)  # after Ray's start, which sets a SIGTERM handler of its own
    write_info(folder, DaemonInfo(os.getpid(), endpoints, str(key_file), public.decode() if public else None))
    print(f"djinn daemon pid {os.getpid()} on {where}, listening on:")
    for endpoint in endpoints:
        print(f"  {endpoint}")
    if public is not None:
        print(f"owner token for tcp clients: {key.decode()}")
        print(f"server key for tcp clients: {public.decode()}")
        print("other users: `djinn token add NAME` makes a token of their own")
    sys.stdout.flush()
    try:
        daemon.serve_forever()
    finally:
        clear_info(folder, os.getpid())
    return 0


CPU_ENGINE = "djinn_cpu_engine"  # the Ray resource a CPU engine takes, standing in for a GPU (--device cpu)


def _cluster(args: argparse.Namespace):
    """The cluster backend ``djinn serve --ray`` serves: one engine per GPU Ray reports (or ``--engines``), each
    with serve's per-engine options. ``--device cpu`` makes CPU engines standing in for GPUs, on a local Ray."""
    from .errors import InvalidArgumentError

    if args.spill_memory and not args.spill_dir:
        raise InvalidArgumentError("--spill-memory needs --spill-dir (the folder to spill to)")
    if args.page_on_pause and args.policy != "lru":
        raise InvalidArgumentError(f"--page-on-pause is a mode of the lru policy, not of {args.policy}")
    if args.engines is not None and args.engines < 1:
        raise InvalidArgumentError(f"--engines must be at least 1, not {args.engines}")
    if not 0 <= args.rebalance < float("inf"):
        raise InvalidArgumentError(f"--rebalance must be 0 (never) or a number of seconds, not {args.rebalance:g}")
    from .cluster.backend import import_ray

    import_ray()  # before anything starts: Ray missing is said plainly, with the pip command
    from .cluster import connect_cluster

    address = args.ray or None  # `--ray` alone: start a local Ray cluster for this daemon
    cpu = args.device is not None and args.device.split(":")[0] == "cpu"
    ray_options: dict = {"configure_logging": False}
    if cpu:
        if address is not None:
            raise InvalidArgumentError(
                "CPU engines (--device cpu) stand in for GPUs on a local Ray only; use --ray without an address"
            )
        ray_options["resources"] = {CPU_ENGINE: args.engines or 1}
    options = {
        "device": args.device,
        "deterministic": args.deterministic,
        "fast": {"auto": None, "on": True, "off": False}[args.fast],
        "weight_memory": args.weight_memory and _bytes(args.weight_memory),
        "ring_slots": args.ring_slots,
        "max_context": args.max_context,
        "prefill_chunk": args.prefill_chunk,
        "policy": args.policy,
        "gpu_memory": args.gpu_memory,
        "host_memory": args.host_memory,
        "host_reserve": args.host_reserve,
        "page_on_pause": args.page_on_pause,
        "spill_dir": args.spill_dir and os.path.abspath(args.spill_dir),  # each engine spills to <dir>/gpu<index>
        "spill_memory": args.spill_memory,
        "spill_threads": args.spill_threads,
        "spill_block": args.spill_block,
    }
    count = f"{args.engines} engines" if args.engines else "one engine per GPU"
    _progress(f"starting {count} on Ray ({address or 'a local Ray cluster'})")
    try:
        return connect_cluster(
            address, args.engines, resource=CPU_ENGINE if cpu else "GPU", engine_options=options,
            ray_options=ray_options, start_timeout=args.engine_timeout, rebalance_s=args.rebalance or None,
        )
    except InvalidArgumentError as exc:
        if cpu:
            raise
        raise InvalidArgumentError(f"{exc} (without GPUs, --device cpu --engines N runs CPU engines)") from None


def _bytes(text: str) -> int:
    from .memory import parse_bytes

    return parse_bytes(text)


def torch_device(name: str):
    import torch

    return torch.device(name)


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _status(args: argparse.Namespace) -> int:
    from .client import connect
    from .report import format_status

    client = connect(start=False, name="djinn status")
    status = client.status()
    client.close()
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    print(format_status(status))
    return 0


def _stop(args: argparse.Namespace) -> int:
    from .client import connect
    from .runtime import pid_alive

    client = connect(start=False, name="djinn stop")
    pid = client.daemon["pid"]
    client.shutdown()
    client.close()
    deadline = time.monotonic() + args.timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)  # waiting for another process to exit
    if pid_alive(pid):
        print(f"djinn: daemon pid {pid} did not exit within {args.timeout} s", file=sys.stderr)
        return 1
    print(f"djinn daemon pid {pid} stopped")
    return 0


def _token(args: argparse.Namespace) -> int:
    """Tokens live in the private runtime folder: making one needs this user's account, like starting the daemon."""
    from .auth import TokenStore, server_keypair
    from .runtime import runtime_dir

    folder = runtime_dir()
    store = TokenStore(folder)
    if args.action == "list":
        for name in store.names():
            print(name)
        return 0
    if args.action == "remove":
        store.remove(args.name)
        print(f"token of {args.name} removed; its clients are refused from their next message")
        return 0
    print(store.add(args.name))
    public = server_keypair(folder)[0].decode()
    print(f"give {args.name} this token and the server key {public} (`djinn serve --listen` uses it)", file=sys.stderr)
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

    serve = sub.add_parser("serve", help="run the GPU-owning daemon in the foreground")
    serve.add_argument("--listen", action="append", default=[], metavar="tcp://HOST:PORT",
                       help="also accept remote clients here, encrypted (they need the printed token and server key)")
    serve.add_argument("--device", default=None, help="torch device (default: cuda if present, else cpu)")
    serve.add_argument("--gpu-memory", default=None, help="session-state budget, e.g. 16GiB (default: free less 2 GiB)")
    serve.add_argument("--weight-memory", default=None,
                       help="device bytes each model's weights may take, e.g. 16GiB; a larger model streams the "
                            "decoder layers that do not fit from pinned host memory (default: no limit)")
    serve.add_argument("--ring-slots", type=int, default=2,
                       help="device slots the streamed layers pass through (default: 2)")
    serve.add_argument("--host-memory", default=None, help="host pool capacity, e.g. 64GiB (default: half the RAM)")
    serve.add_argument("--host-reserve", default=None, help="pin this much of the host pool at start, e.g. 8GiB")
    serve.add_argument("--page-on-pause", action="store_true", help="page a session out as soon as it pauses")
    serve.add_argument("--spill-dir", default=None,
                       help="a folder for the disk tier: paged sessions spill there when the host pool is full")
    serve.add_argument("--spill-memory", default=None,
                       help="the most the disk tier may hold, e.g. 200GiB (default with --spill-dir: 64GiB)")
    serve.add_argument("--spill-threads", type=int, default=4,
                       help="disk tier reads and writes in flight at once (default: 4)")
    serve.add_argument("--spill-block", default="16MiB",
                       help="the disk tier moves files in blocks of this size, a multiple of 4 KiB; reads go through "
                            "2 x --spill-threads such blocks pinned at start (default: 16MiB)")
    serve.add_argument("--policy", choices=("hold", "lru", "signal", "signal-keep-short"), default="lru",
                       help="paging policy: hold (never swap), lru (under pressure, default), signal (page out on "
                            "session.io_wait, prefetch by its hint), signal-keep-short (signal, but keep waits "
                            "shorter than 2 x the swap time); see docs/agents.md")
    serve.add_argument("--deterministic", action="store_true",
                       help="math attention only, so runs repeat bit for bit on a GPU (slower)")
    serve.add_argument("--fast", choices=("auto", "on", "off"), default="auto",
                       help="batched fast decode path for Llama-family models (default: on with CUDA, unless "
                            "--deterministic)")
    serve.add_argument("--max-context", type=int, default=None, metavar="TOKENS",
                       help="most positions (context + new tokens) any run may span, below each model's own context")
    serve.add_argument("--prefill-chunk", type=int, default=DEFAULT_CHUNK, metavar="TOKENS",
                       help="a longer prompt is fed in forwards of this many tokens, bounding its activations, "
                            f"with other sessions' decode steps between them (default: {DEFAULT_CHUNK})")
    serve.add_argument("--client-lease", type=float, default=5.0,
                       help="seconds without a heartbeat before a client's sessions are reclaimed (default: 5)")
    serve.add_argument("--max-message-size", default="1GiB",
                       help="largest frame (one tensor) a client may send; larger ones are dropped unread "
                       "(default: 1GiB)")
    serve.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                       help="serve a Ray cluster: one engine per GPU, sessions placed and migrated between them "
                            "(docs/cluster.md). ADDRESS: a cluster to join ('auto': the one this machine is part "
                            "of); without it a local Ray starts. Needs pip install 'djinn-kernel[ray]'")
    serve.add_argument("--engines", type=int, default=None, metavar="N",
                       help="with --ray: how many engines (default: one per GPU Ray reports); with --device cpu, N "
                            "CPU engines standing in for GPUs. --gpu-memory, --host-memory and the model options "
                            "apply to each engine")
    serve.add_argument("--engine-timeout", type=float, default=300.0, metavar="SECONDS",
                       help="with --ray: how long the engines may take to start (default: 300)")
    serve.add_argument("--rebalance", type=float, default=5.0, metavar="SECONDS",
                       help="with --ray: how often sessions move off an engine whose sessions hold more than its "
                            "budget, to one with room (default: 5; 0: never)")
    serve.set_defaults(func=_serve)

    token = sub.add_parser("token", help="tokens for other users of this daemon (`token add NAME` prints one)")
    token_actions = token.add_subparsers(dest="action", required=True)
    for action, text in (("add", "make a token for NAME and print it"), ("remove", "revoke NAME's token")):
        token_actions.add_parser(action, help=text).add_argument("name", metavar="NAME")
    token_actions.add_parser("list", help="the names that have a token")
    token.set_defaults(func=_token)

    status = sub.add_parser("status", help="show the daemon's models, sessions and memory")
    status.add_argument("--json", action="store_true", help="print the raw status as JSON")
    status.set_defaults(func=_status)

    stop = sub.add_parser("stop", help="stop the daemon (its sessions are closed)")
    stop.add_argument("--timeout", type=float, default=30.0)
    stop.set_defaults(func=_stop)
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
