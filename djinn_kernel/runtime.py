"""Where a user's local daemon lives: a private runtime folder with its socket, key and pid file.

The folder is ``$DJINN_RUNTIME_DIR``, else ``$XDG_RUNTIME_DIR/djinn``, else ``/tmp/djinn-<uid>``; it is created
with mode 0700 and refused if another user owns it or others can enter it, so only this user can open the
``ipc://`` socket or read the key that signs every message.
"""

from __future__ import annotations

import json
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from .errors import DaemonConnectionError


def runtime_dir() -> Path:
    if os.environ.get("DJINN_RUNTIME_DIR"):
        path = Path(os.environ["DJINN_RUNTIME_DIR"])
    elif os.environ.get("XDG_RUNTIME_DIR"):
        path = Path(os.environ["XDG_RUNTIME_DIR"]) / "djinn"
    else:
        path = Path(f"/tmp/djinn-{os.getuid()}")
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.stat()
    if info.st_uid != os.getuid() or stat.S_IMODE(info.st_mode) & 0o077:
        raise DaemonConnectionError(
            f"{path} must belong to you and be private (chmod 700 {path}); refusing to put the daemon's key there"
        )
    return path


@dataclass(frozen=True)
class DaemonInfo:
    """What a running daemon publishes in ``daemon.json`` so local clients can find and trust it."""

    pid: int
    endpoints: list[str]
    key_file: str
    server_key: str | None = None  # the CURVE public key of its tcp:// endpoints, for local tcp clients

    @property
    def ipc(self) -> str:
        return next(e for e in self.endpoints if e.startswith("ipc://"))

    def key(self) -> bytes:
        return Path(self.key_file).read_bytes().strip()


def ipc_endpoint(folder: Path) -> str:
    return f"ipc://{folder / 'daemon.sock'}"


def new_key(folder: Path) -> tuple[bytes, Path]:
    """A fresh random key in a file only this user can read (0600); also the ``tcp://`` token."""
    key = secrets.token_hex(32).encode()
    path = folder / "daemon.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
    return key, path


def write_info(folder: Path, info: DaemonInfo) -> None:
    tmp = folder / f"daemon.json.{os.getpid()}"
    tmp.write_text(json.dumps(info.__dict__))
    os.replace(tmp, folder / "daemon.json")


def read_info(folder: Path) -> DaemonInfo | None:
    """The published daemon, or None when there is none or its process is gone."""
    try:
        data = json.loads((folder / "daemon.json").read_text())
        info = DaemonInfo(int(data["pid"]), list(data["endpoints"]), str(data["key_file"]), data.get("server_key"))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return info if pid_alive(info.pid) else None


def clear_info(folder: Path, pid: int) -> None:
    info = read_info(folder)
    if info is None or info.pid == pid:
        for name in ("daemon.json", "daemon.key"):
            (folder / name).unlink(missing_ok=True)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
