"""What a session watches and changes in its later runs: breakpoints, steering edits, recordings and sparse
autoencoders, each at a decoder layer by index or any module by path. The engine's methods for these
(``Engine`` inherits ``InstrumentOps``), kept apart from runs and paging; a paused run takes the changes made at
its pauses with it when it moves (session_config.py).

Every method takes the session's lock, and checks what it is given now (a typo fails here, not mid-run). An
``InstrumentOps`` needs ``_session`` from the class it is mixed into.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from . import conditions
from .anatomy import resolve_target
from .breakpoints import SIDES, remove_by_id
from .edits import AddVector, Edit, SetPromptRows, check_coefficient, check_tensor
from .errors import InvalidArgumentError, InvalidTargetError, NotPausedError
from .executor import Steering
from .recording import Recording
from .registry import LoadedModel
from .run_state import ENDED
from .sae import SAE
from .sessions import SessionState


class InstrumentOps:
    """The instrument operations of the engine (see the module docstring)."""

    def _target(self, session: SessionState, target: int | str, side: str) -> tuple[str, int | None]:
        if side not in SIDES:
            raise InvalidArgumentError(f"side must be one of {SIDES}, not {side!r}")
        loaded = session.model
        path = resolve_target(loaded.model, loaded.anatomy, target)
        loaded.dispatcher.ensure(path)
        return path, loaded.anatomy.layer_index(path)

    def add_breakpoint(
        self,
        sid: int,
        target: int | str,
        side: str = "output",
        tokens: object = None,
        max_hits: int | None = None,
        when: str | None = None,
    ) -> dict[str, object]:
        """``when``: a condition (see conditions.py), parsed here so that a typo fails now, not mid-run."""
        session = self._session(sid)
        with session.lock:
            path, layer = self._target(session, target, side)
            condition = None if when is None else self._condition(session.model, when)
            if condition is not None and condition.kind == "feature":
                sae = session.saes.get(path) if side == "output" else None
                if sae is None:
                    raise InvalidArgumentError(
                        f"{condition.text!r} reads the SAE attached at {path}'s output; attach one there first "
                        f"(session.attach_sae({target!r}, folder))"
                    )
                if condition.index >= sae.W_enc.shape[1]:
                    raise InvalidArgumentError(
                        f"feature {condition.index} is outside the {sae.W_enc.shape[1]} features of the SAE at {path}"
                    )
            return session.breakpoints.add(path, layer, side, tokens, max_hits, condition).describe()

    @staticmethod
    def _condition(loaded: LoadedModel, when: object) -> conditions.Condition:
        encode = None if loaded.tokenizer is None else loaded.words
        vocab = loaded.model.get_input_embeddings().num_embeddings
        condition = conditions.parse(when, encode, vocab, getattr(loaded.model.config, "hidden_size", None))
        if condition.needs_lens and loaded.anatomy.unembed_path is None:
            raise InvalidTargetError("this model has no output embedding Djinn can find, so no logit-lens condition")
        return condition

    def remove_breakpoint(self, sid: int, bp_id: int | None = None) -> list[int]:
        session = self._session(sid)
        with session.lock:
            return session.breakpoints.remove(bp_id)

    def add_steering(self, sid: int, target: int | str, edit: Edit, side: str = "output") -> dict[str, object]:
        if not isinstance(edit, Edit):
            raise InvalidArgumentError(f"steering needs an Edit (e.g. AddVector), not {type(edit).__name__}")
        session = self._session(sid)
        with session.lock:
            path, layer = self._target(session, target, side)
            if isinstance(edit, AddVector):  # checked now, not at the first forward of some later run
                alpha = check_coefficient(edit.alpha, "alpha")
                vector = self._check_width(session, edit.vector, layer, "steering vector")
                edit = replace(edit, vector=vector, alpha=alpha)
            elif isinstance(edit, SetPromptRows):  # the positions against each prompt, at generate
                positions = edit.positions
                listed = isinstance(positions, (tuple, list, range)) and all(type(p) is int for p in positions)
                if not listed or not positions:
                    raise InvalidArgumentError(f"positions must be a non-empty list of integers, not {positions!r}")
                values = self._check_width(session, edit.values, layer, "values", len(positions))
                edit = replace(edit, positions=tuple(positions), values=values)
            steer = Steering(next(session._steer_ids), path, layer, side, edit.owned())
            session.steering[steer.id] = steer
            return steer.describe()

    @staticmethod
    def _check_width(
        session: SessionState, value: object, layer: int | None, what: str, rows: int | None = None
    ) -> object:
        """Fail at ``steer`` time, not mid-generation, when a layer's width is known from the config: a vector
        ``[hidden]``, or ``[rows, hidden]``; cast to the model's dtype and device (so the kept edit and the fast
        path apply it as the model computes)."""
        hidden = getattr(session.model.model.config, "hidden_size", None)
        if layer is None or hidden is None:
            return value
        like = next(session.model.model.parameters())
        shape = (hidden,) if rows is None else (rows, hidden)
        return check_tensor(value, like=torch.empty(shape, dtype=like.dtype, device=like.device), what=what)

    def remove_steering(self, sid: int, steer_id: int | None = None) -> list[int]:
        session = self._session(sid)
        with session.lock:
            return remove_by_id(session.steering, steer_id, "steering")

    def add_recording(self, sid: int, target: int | str, positions: object = None) -> dict[str, object]:
        """Record ``target``'s output at every step of the session's later runs (recording.py), until removed."""
        if positions is not None:
            if isinstance(positions, int) and not isinstance(positions, bool):
                positions = [positions]
            if not isinstance(positions, (list, tuple, range)) or not positions or not all(
                isinstance(p, int) and not isinstance(p, bool) for p in positions
            ):
                raise InvalidArgumentError(f"positions must be prompt positions (integers) or None, not {positions!r}")
        session = self._session(sid)
        with session.lock:
            path, layer = self._target(session, target, "output")
            if any(r.path == path for r in session.recordings.values()):
                raise InvalidArgumentError(f"{path} is already recorded; remove that recording first")
            recording = Recording(next(session._record_ids), path, layer, None if positions is None else tuple(positions))
            session.recordings[recording.id] = recording
            return recording.describe()

    def remove_recording(self, sid: int, recording_id: int | None = None) -> list[int]:
        session = self._session(sid)
        with session.lock:
            return remove_by_id(session.recordings, recording_id, "recording")

    def recorded(self, sid: int) -> dict[str, torch.Tensor]:
        """The last run's recorded rows by module path (CPU copies), once it has ended."""
        session = self._session(sid)
        run = session.run
        if run is None or run.recorder is None:
            raise InvalidArgumentError("the last run recorded nothing; add a recording with session.record(...)")
        if run.state not in ENDED:
            raise NotPausedError("recordings are available once the run has ended")
        return run.recorder.result()

    def attach_sae(
        self, sid: int, target: int | str, weights: dict[str, torch.Tensor], apply_b_dec_to_input: bool = True
    ) -> dict[str, object]:
        """Attach a sparse autoencoder (its four tensors, sae.py) to ``target``'s output for this session's
        pauses there (``features``); replaces one attached before."""
        if not isinstance(weights, dict) or not isinstance(apply_b_dec_to_input, bool):
            raise InvalidArgumentError("attach_sae takes the SAE's tensors by name and apply_b_dec_to_input (a bool)")
        sae = SAE.checked(weights, apply_b_dec_to_input)
        session = self._session(sid)
        with session.lock:
            path, _ = self._target(session, target, "output")
            hidden = getattr(session.model.model.config, "hidden_size", None)
            if hidden is not None and sae.d_in != hidden and path in session.model.anatomy.layer_paths:
                raise InvalidArgumentError(f"the SAE reads {sae.d_in} dims; {path} gives {hidden}")
            session.saes[path] = sae.to(session.model.device)
            return {"path": path, "d_in": sae.d_in, "d_sae": sae.W_enc.shape[1]}

    def detach_sae(self, sid: int, target: int | str) -> str:
        """Detach the SAE at ``target``; returns its module path."""
        session = self._session(sid)
        with session.lock:
            path, _ = self._target(session, target, "output")
            if session.saes.pop(path, None) is None:
                raise InvalidArgumentError(f"no SAE is attached at {path}")
            return path
