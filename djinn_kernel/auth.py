"""Who may talk to the daemon, and how a message proves it is new: tokens, the CURVE key pair, replay checks.

Principals: the daemon's owner (the local user who started it) signs with the daemon's own key, from the
private runtime folder or the token `djinn serve` prints; every other user signs with a token made by
`djinn token add NAME` (``NAME:SECRET``), kept in ``tokens.json`` in the same folder (mode 0600), so only the
owner can make or revoke one. A token's secret is an HMAC key; it never travels on the wire.

Transport: ``tcp://`` endpoints are encrypted with CurveZMQ. The daemon's long-term CURVE key pair is kept in
``curve.json`` (0600) so the public key remote users were given stays valid across restarts; each client
makes a fresh key pair per connection. ``ipc://`` is protected by the folder's permissions instead.

Invariant (``ReplayGuard``): a client's sequence number is accepted at most once, and only within a window
below the newest one accepted; the guard is touched only by the daemon's IO thread.
"""

from __future__ import annotations

import collections
import fcntl
import json
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

from .errors import EncryptionUnavailableError, InvalidArgumentError, ProtocolError

OWNER = ""  # the key id of the daemon's own key
USER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
TOKENS_FILE = "tokens.json"
CURVE_FILE = "curve.json"


def parse_token(token: str) -> tuple[str, bytes]:
    """``(user, key)`` of a token: ``NAME:SECRET`` from `djinn token add`, or the owner's bare key."""
    user, sep, secret = token.strip().rpartition(":")
    if not sep:
        return OWNER, token.strip().encode()
    if not USER_NAME.fullmatch(user) or not secret:
        raise InvalidArgumentError("a token is NAME:SECRET as `djinn token add NAME` printed it, or the daemon's key")
    return user, secret.encode()


def require_curve() -> None:
    """Refuse ``tcp://`` where ZeroMQ cannot encrypt, rather than send prompts and tensors in clear text."""
    if not zmq.has("curve"):
        raise EncryptionUnavailableError(
            f"this ZeroMQ ({zmq.zmq_version()}) was built without CURVE encryption, so tcp:// is refused; install "
            "pyzmq's wheel from PyPI (its bundled libzmq has CURVE) or use the local ipc:// daemon"
        )


def _write_private(path: Path, text: str) -> None:
    """Replace ``path`` atomically with a file only this user can read."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def server_keypair(folder: Path) -> tuple[bytes, bytes]:
    """The daemon's CURVE ``(public, secret)`` keys (Z85), made on first use and kept for later starts."""
    path = folder / CURVE_FILE
    with open(folder / "curve.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():
            public, secret = zmq.curve_keypair()
            _write_private(path, json.dumps({"public": public.decode(), "secret": secret.decode()}))
        keys = json.loads(path.read_text())
    return keys["public"].encode(), keys["secret"].encode()


class TokenStore:
    """The named tokens of one runtime folder. The daemon reads the file again whenever it changed, so a token
    added or removed while it runs counts from the next message on."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / TOKENS_FILE
        self._lock_path = folder / "tokens.lock"
        self._stamp: tuple[int, int] | None = None
        self._keys: dict[str, bytes] = {}

    def _read(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        return data if isinstance(data, dict) else {}

    def _change(self, edit: Any) -> Any:
        with open(self._lock_path, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            tokens = self._read()
            result = edit(tokens)
            _write_private(self.path, json.dumps(tokens, indent=1, sort_keys=True))
        return result

    def add(self, name: str) -> str:
        """Make a token for ``name`` and return it; refuses a name that has one (remove it first)."""
        if not USER_NAME.fullmatch(name):
            raise InvalidArgumentError(f"{name!r:.40} is not a user name: 1-32 letters, digits, '_', '.', '-'")

        def edit(tokens: dict[str, Any]) -> str:
            if name in tokens:
                raise InvalidArgumentError(f"{name} has a token already; `djinn token remove {name}` first")
            tokens[name] = {"secret": secrets.token_hex(32)}
            return f"{name}:{tokens[name]['secret']}"

        return self._change(edit)

    def remove(self, name: str) -> None:
        def edit(tokens: dict[str, Any]) -> None:
            if tokens.pop(name, None) is None:
                raise InvalidArgumentError(f"no token named {name!r:.40}; `djinn token list` shows them")

        self._change(edit)

    def names(self) -> list[str]:
        return sorted(self._read())

    def key(self, name: str) -> bytes | None:
        """The HMAC key of ``name``'s token, or None when there is none (never made, or removed)."""
        try:
            info = self.path.stat()
            stamp = (info.st_ino, info.st_mtime_ns)
        except FileNotFoundError:
            stamp = None
        if stamp != self._stamp:
            self._keys = {n: str(t.get("secret", "")).encode() for n, t in self._read().items() if isinstance(t, dict)}
            self._stamp = stamp
        return self._keys.get(name)


@dataclass
class _Window:
    """The sequence numbers one client used lately: the highest, and a bit for each of the ``size`` below it."""

    highest: int = 0
    mask: int = 0  # bit i set: sequence number ``highest - i`` was accepted

    def accept(self, seq: int, size: int) -> None:
        if seq > self.highest:
            shift = seq - self.highest
            self.mask = 1 if shift >= size else ((self.mask << shift) | 1) & ((1 << size) - 1)
            self.highest = seq
            return
        offset = self.highest - seq
        if offset >= size:
            raise ProtocolError(f"request too old (sequence number {seq}, newest {self.highest}): refused as a replay")
        if self.mask >> offset & 1:
            raise ProtocolError(f"replayed request refused: sequence number {seq} was used already")
        self.mask |= 1 << offset


class ReplayGuard:
    """Refuses a request the daemon has accepted before, or one meant for an earlier daemon.

    A client numbers its requests 1, 2, 3, ... across all its sockets, so two threads' requests may arrive out
    of order: any number not used yet within ``window`` of the newest is accepted. A client stays remembered
    after it goes, until ``max_clients`` newer ones push it out, so its captured messages cannot bring it back.
    Clients are kept per user, so one user cannot spend another's numbers.
    """

    def __init__(self, instance: str, max_clients: int = 100_000, window: int = 4096) -> None:
        self.instance = instance
        self.max_clients = max_clients
        self.window = window
        self._seen: collections.OrderedDict[tuple[str, str], _Window] = collections.OrderedDict()

    def check(self, user: str, header: dict[str, Any]) -> None:
        """Accept ``header`` once: raises ``ProtocolError`` for a replayed, too old or misaddressed request."""
        client, seq = header.get("client"), header.get("seq")
        if not isinstance(client, str) or not 0 < len(client) <= 64:
            raise ProtocolError("a request must carry its client id")
        if type(seq) is not int or seq < 1:
            raise ProtocolError("a request must carry a sequence number (1, 2, ...)")
        if header.get("op") != "hello" and header.get("daemon") != self.instance:
            raise ProtocolError("this request was meant for another daemon (it restarted?); connect again")
        window = self._seen.setdefault((user, client), _Window())
        self._seen.move_to_end((user, client))
        window.accept(seq, self.window)
        while len(self._seen) > self.max_clients:
            self._seen.popitem(last=False)
