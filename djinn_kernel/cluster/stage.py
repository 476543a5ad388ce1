"""A split model's stage that is an engine actor of the cluster (split.py; the backend's ``load_split``).

The host engine's remote layers call it from their forward, inside the host actor: each call is one Ray call to the
stage's actor, with the hidden state, mask and position embeddings on the CPU (through Ray's object store) and the
new hidden state back. Errors come back as they are raised there; a stage actor that has gone, or came back
restarted by Ray without the layers and their KV, is an ``EngineLostError`` naming it, which fails the host's run.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import DjinnError, EngineLostError, ModelNotFoundError, SessionClosedError


class ActorStage:
    """``split.Stage`` over Ray: the engine actor ``actor`` (named ``name``) serving model ``model_id``."""

    def __init__(self, actor: Any, model_id: str, name: str) -> None:
        self.actor, self.model_id, self.name = actor, model_id, name

    def _call(self, op: str, *args: Any) -> Any:
        import ray
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayTaskError

        try:
            return ray.get(self.actor.call.remote(op, *args))
        except (ActorDiedError, ActorUnavailableError) as exc:
            raise self._lost(f"is gone ({type(exc).__name__})") from None
        except RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, (SessionClosedError, ModelNotFoundError)) and op != "close_session":
                # Only the host closes a stage session: one the stage no longer has went with its process.
                raise self._lost("restarted, without these layers' weights and KV") from None
            if isinstance(cause, DjinnError):
                raise cause from None
            raise exc.as_instanceof_cause() from None

    def _lost(self, what: str) -> EngineLostError:
        return EngineLostError(
            f"engine {self.name}, which serves the first layers of {self.model_id.split(':')[0]} for this split "
            f"model, {what}; load the split model again (djinn_kernel.load(..., split_at=...)) and open a new session"
        )

    def open(self) -> int:
        return self._call("open_session", self.model_id, "split")

    def run(self, sid: int, first: int, last: int, past: int, hidden: torch.Tensor, mask: torch.Tensor | None,
            position_ids: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        host = [t.to("cpu") for t in (hidden, position_ids, *position_embeddings)]
        return self._call("run_layers", sid, first, last, past, host[0], None if mask is None else mask.to("cpu"),
                          host[1], (host[2], host[3]))

    def fork(self, sid: int) -> int:
        return self._call("fork", sid)

    def close(self, sid: int) -> None:
        self._call("close_session", sid)
