"""What a driver does at a pause: read and edit the paused activation, its logit lens, the layer's KV cache and
attention weights. The engine's methods for these (``Engine`` inherits ``PauseOps``), kept apart from runs,
sessions and paging.

Every method takes the session's lock and holds the session resident (``MemoryManager.resident``) while it
touches session tensors, and what it returns is a copy: the engine's invariants (engine.py) hold here unchanged.
A ``PauseOps`` needs ``_session``, ``_paused_run`` and ``memory`` from the class it is mixed into.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from . import context
from .attention import attention_weights
from .edits import Edit, check_positions, check_tensor
from .errors import InvalidArgumentError, InvalidTargetError
from .executor import KVEdit

if TYPE_CHECKING:
    from .executor import PauseState, Run
    from .sessions import SessionState


def _held_before(run: Run, pause: PauseState) -> int:
    """Tokens the session's cache held before the paused step: its kept context at the prefill (step 0), then
    that plus every token the prefill fed and every token generated before this step."""
    if pause.token_step == 0:
        return run.context_length
    return run.context_length + len(run.prompt_ids) + pause.token_step - 1


class PauseOps:
    """The pause operations of the engine (see the module docstring)."""

    def activation(self, sid: int, original: bool = False) -> torch.Tensor:
        """A CPU copy of the paused activation, made while it is resident: the caller owns it outright."""
        session = self._session(sid)
        with session.lock, self.memory.resident(session.id):
            _, pause = self._paused_run(session)
            return (pause.original if original else pause.current).detach().to("cpu", copy=True)

    def edit(self, sid: int, edit: Edit) -> dict[str, object]:
        """Apply an edit to the paused activation; it takes effect on resume. A failed edit changes nothing."""
        if not isinstance(edit, Edit):
            raise InvalidArgumentError(f"expected an Edit (Replace, Scale, AddVector, Ablate, SetPositions), not {edit!r}")
        session = self._session(sid)
        with session.lock, self.memory.resident(session.id):
            _, pause = self._paused_run(session)
            with torch.inference_mode():
                pause.current = edit.apply(pause.current)
            pause.edits += 1
            return pause.describe()

    def reset_edits(self, sid: int) -> dict[str, object]:
        session = self._session(sid)
        with session.lock, self.memory.resident(session.id):
            _, pause = self._paused_run(session)
            pause.current, pause.edits = pause.original, 0
            return pause.describe()

    def kv(self, sid: int, layer: int) -> dict[str, torch.Tensor]:
        """Decoder layer ``layer``'s keys and values for the tokens before the paused step (the context this step
        attends to besides its own new tokens), as CPU copies ``[kv_heads, tokens, head_dim]``. The same tokens on
        every path and at every layer, whichever layers of the step have already run."""
        session = self._session(sid)
        with session.lock, self.memory.resident(session.id):
            run, pause = self._paused_run(session)
            index = self._kv_layer(session, layer)
            keys, values = context.read_kv(run.cache, index, _held_before(run, pause), session.model.model.config)
            return {"keys": keys.to("cpu", copy=True), "values": values.to("cpu", copy=True)}

    def edit_kv(
        self, sid: int, layer: int, positions: object, keys: torch.Tensor | None = None,
        values: torch.Tensor | None = None,
    ) -> dict[str, object]:
        """Overwrite decoder layer ``layer``'s keys and/or values at token ``positions`` of the context before the
        paused step (e.g. knock a token out). In place: this step's layers that have not run yet and every later
        step read them, and the session keeps them (``rewind`` to before a position drops the edit with the
        token). All or nothing: a refused edit changes nothing."""
        session = self._session(sid)
        with session.lock, self.memory.resident(session.id):
            run, pause = self._paused_run(session)
            index = self._kv_layer(session, layer)
            held = _held_before(run, pause)
            where = check_positions(positions, held, f"the context of layer {index}'s")
            if keys is None and values is None:
                raise InvalidArgumentError("pass keys, values or both: there is nothing to write")
            heads, head_dim, dtype, device = context.kv_shape(run.cache, index)
            like = torch.empty((heads, len(where), head_dim), dtype=dtype, device=device)
            checked = {
                name: None if t is None else check_tensor(t, like=like, what=name)
                for name, t in (("keys", keys), ("values", values))
            }
            old_keys, old_values = (t[:, where].to("cpu", copy=True) for t in context.read_kv(
                run.cache, index, held, session.model.model.config))
            with torch.inference_mode():
                context.write_kv(run.cache, index, where, checked["keys"], checked["values"])
            host = {name: None if t is None else t.detach().to("cpu", copy=True) for name, t in checked.items()}
            run.kv_edits.append(KVEdit(pause.number, index, list(where), host["keys"], host["values"],
                                       old_keys if keys is not None else None, old_values if values is not None else None))
            return {"layer": index, "positions": where, "keys": keys is not None, "values": values is not None}

    def attention(self, sid: int) -> torch.Tensor:
        """The attention weights ``[heads, tokens, context + tokens]`` (CPU) of the decoder layer the paused
        activation feeds (the layer itself at its input side, the next one at an output), for this step's tokens,
        from the activation as edited so far (attention.py)."""
        session = self._session(sid)
        with session.lock, self.memory.resident(session.id):
            run, pause = self._paused_run(session)
            loaded = session.model
            paths = loaded.anatomy.layer_paths
            if pause.layer is None or pause.path != paths[pause.layer]:
                raise InvalidTargetError(
                    "attention weights need a pause on a decoder layer's input or output (the residual stream a "
                    f"layer's attention reads), not at {pause.path}"
                )
            target = pause.layer if pause.side == "input" else pause.layer + 1
            if target >= len(paths):
                raise InvalidTargetError("the last layer's output feeds no attention layer; break at its input")
            held = _held_before(run, pause)
            _here(session, target, "the attention it computes")
            past, _ = context.read_kv(run.cache, target, held, loaded.model.config)
            rotary = getattr(getattr(loaded.model, "model", None), "rotary_emb", None)
            if rotary is None:
                raise InvalidTargetError(
                    "attention weights at a pause are computed for Llama-family models (rotary embeddings, "
                    "self_attn.q_proj/k_proj); this model has no model.rotary_emb"
                )
            with torch.inference_mode():
                weights = attention_weights(loaded.model.get_submodule(paths[target]), rotary, pause.current,
                                            past.to(pause.current.device), held)
            return weights.to("cpu", copy=True)

    def features(self, sid: int, k: int = 5) -> list[list[dict[str, object]]]:
        """The ``k`` most active features of the SAE attached at the paused module, per token of the activation
        as edited so far: ``[{"feature": id, "activation": value}, ...]`` for each token."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise InvalidArgumentError(f"k must be a positive integer, not {k!r}")
        session = self._session(sid)
        with session.lock, self.memory.resident(session.id):
            _, pause = self._paused_run(session)
            sae = session.saes.get(pause.path)
            if sae is None:
                raise InvalidArgumentError(
                    f"no SAE is attached at {pause.path}; attach one with session.attach_sae(target, folder)"
                )
            if pause.side != "output" or pause.current.shape[-1] != sae.d_in:
                raise InvalidArgumentError(f"the SAE reads {sae.d_in}-wide outputs; this pause is not one")
            with torch.inference_mode():
                acts = sae.encode(pause.current.reshape(-1, sae.d_in))
                top = acts.topk(min(k, acts.shape[-1]), dim=-1)
            return [
                [{"feature": int(i), "activation": float(v)} for v, i in zip(values, indices)]
                for values, indices in zip(top.values.tolist(), top.indices.tolist())
            ]

    def _kv_layer(self, session: SessionState, layer: object) -> int:
        layers = len(session.model.anatomy.layer_paths)
        if isinstance(layer, bool) or not isinstance(layer, int) or not -layers <= layer < layers:
            raise InvalidTargetError(f"layer must be a decoder layer index from 0 to {layers - 1}, not {layer!r}")
        return _here(session, layer % layers, "its keys and values")

    def logit_lens(
        self, sid: int, k: int = 5, position: int = -1, edit: Edit | None = None
    ) -> list[dict[str, object]]:
        """Top-k next-token guesses from the paused activation, through the final norm and the unembedding.

        Meaningful at a decoder layer's output (the residual stream); elsewhere the width may not match. With
        ``edit``, the lens of the activation as that edit would leave it, without applying it (a preview).
        """
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise InvalidArgumentError(f"k must be a positive integer, not {k!r}")
        if edit is not None and not isinstance(edit, Edit):
            raise InvalidArgumentError(f"edit must be an Edit (Scale, AddVector ...), not {edit!r}")
        session = self._session(sid)
        with session.lock, self.memory.resident(session.id):
            _, pause = self._paused_run(session)
            loaded = session.model
            anatomy = loaded.anatomy
            if anatomy.unembed_path is None:
                raise InvalidTargetError("this model has no output embedding Djinn can find, so no logit lens")
            head = loaded.model.get_submodule(anatomy.unembed_path)
            h = pause.current
            if edit is not None:
                with torch.inference_mode():
                    h = edit.apply(h)
            if h.dim() < 2 or h.shape[-1] != head.in_features:
                raise InvalidTargetError(
                    f"the logit lens needs a residual-stream activation of width {head.in_features}; this pause "
                    f"at {pause.path} ({pause.side}) has shape {tuple(h.shape)}"
                )
            n = h.shape[-2]
            if isinstance(position, bool) or not isinstance(position, int) or not -n <= position < n:
                raise InvalidArgumentError(f"position {position!r} is outside the {n} positions of this activation")
            with torch.inference_mode():
                logits = loaded.lens(h.reshape(-1, n, h.shape[-1])[0, position])
                probs = logits.float().softmax(-1)
                top = torch.topk(probs, min(k, probs.shape[-1]))
            return [
                {
                    "token_id": int(i),
                    "token": loaded.decode([int(i)]),
                    "prob": float(p),
                    "logit": float(logits[int(i)]),
                }
                for p, i in zip(top.values.tolist(), top.indices.tolist())
            ]


def _here(session: SessionState, index: int, what: str) -> int:
    """``index`` if this engine holds decoder layer ``index`` (not a split model's stage, split.py)."""
    loaded = session.model
    where = getattr(loaded.model.get_submodule(loaded.anatomy.layer_paths[index]), "runs_elsewhere", None)
    if where:
        raise InvalidTargetError(
            f"decoder layer {index} runs on {where}, which holds {what}; read or edit them at a layer this engine "
            f"holds, or pause at layer {index}'s input or output for its activations"
        )
    return index
