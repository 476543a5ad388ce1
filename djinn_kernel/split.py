"""A model split by layer across engines: some decoder layers here, the rest served by another engine (a stage).

A model larger than one GPU's budget can run with its layers spread over engines, each holding only its own
layers' weights and KV. The engine that hosts the session (the *host*) keeps the embeddings, the final norm, the
head and its own layers; each layer that lives on the stage is a ``RemoteLayer`` in the host's model, at the same
module path. So the host's forward, hooks and run machinery stay as they are: a breakpoint, an edit, steering or a
recording at a remote layer's input or output fires on the host, on the hidden state the stage hands back, and
pausing and resuming work unchanged. What the host cannot reach is the inside of a remote layer (its attention or
MLP modules): those paths do not exist in its model.

Each remote layer's forward sends the hidden state, the causal mask and the rotary position embeddings the host
computed to the stage, which runs its layer against its own KV cache for the session and returns the new hidden
state: the same arithmetic as the unsplit forward, so tokens and activations are bitwise equal. The stage keeps
that KV in a session of its own (``Engine.run_layers``), under its own memory manager and budget. The host's cache
holds a one-wide entry per remote layer (one value per token and layer: transformers counts an empty entry as no
tokens), which records the layer's length, what transformers reads for positions and masks. Before a forward the
stage crops its KV to the host's length, so a fresh run, a rewind or a cancelled run on the host leaves both
agreeing.

``Stage`` is what the host calls: ``EngineStage`` for an engine in this process; the cluster backend passes one
that calls an engine actor (cluster/stage.py). Consecutive remote layers share one call when the run does nothing
between them (``RemoteLayer``); a fork forks the stage's half too. Not yet: the fast path (a split model runs on the
module path), moving a split session to another engine (refused), more than one stage.
"""

from __future__ import annotations

import inspect
import weakref
from typing import Protocol

import torch
from torch import nn

from . import hooks
from .errors import InvalidArgumentError, SessionLostError

ATTRIBUTE = "djinn_stage"  # the host's cache carries (stage, stage session id) for its remote layers
AHEAD = "djinn_stage_ahead"  # and, within a forward, (last layer run, its result) of the stretch the stage ran


class Stage(Protocol):
    """Another engine serving some of a split model's layers."""

    def open(self) -> int:
        """A new session there for one host session's KV of these layers."""

    def run(self, sid: int, first: int, last: int, past: int, hidden: torch.Tensor, mask: torch.Tensor | None,
            position_ids: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Layers ``first .. last`` on ``hidden``, after ``past`` tokens of the session's KV; the hidden state
        after ``last``."""

    def fork(self, sid: int) -> int:
        """A new session there with a copy of this one's KV (a forked host session's half)."""

    def close(self, sid: int) -> None:
        """Forget the session's KV there."""


class EngineStage:
    """A stage that is another ``Engine`` in this process (tests; one process over several devices)."""

    def __init__(self, engine: object, model_id: str) -> None:
        self.engine, self.model_id = engine, model_id

    def open(self) -> int:
        return self.engine.open_session(self.model_id, owner="split")

    def run(self, sid: int, first: int, last: int, past: int, hidden: torch.Tensor, mask: torch.Tensor | None,
            position_ids: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return self.engine.run_layers(sid, first, last, past, hidden, mask, position_ids, position_embeddings)

    def fork(self, sid: int) -> int:
        return self.engine.fork(sid)

    def close(self, sid: int) -> None:
        self.engine.close_session(sid)


class RemoteLayer(nn.Module):
    """A decoder layer that runs on a stage (the host's stand-in at the layer's module path).

    Consecutive remote layers share one call to the stage when the run has nothing to do at the activations
    between them (no breakpoint that could fire in this forward, no steering, no recording, not stepping:
    ``Run.watches``): the first of them asks the stage for the whole stretch, and the others pass the result on,
    each still recording its length in the host's cache. Their hooks then see that result, which is harmless
    because the run does nothing with it."""

    runs_elsewhere = "another engine of this split model"  # anatomy.resolve_target says so for paths inside it

    def __init__(self, index: int, path: str) -> None:
        super().__init__()
        self.index, self.path = index, path
        self.following: RemoteLayer | None = None  # the next decoder layer, when it is remote too

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: object = None, past_key_values: object = None,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None, **_: object) -> torch.Tensor:
        kv = cache if cache is not None else past_key_values
        stage = getattr(kv, ATTRIBUTE, None)
        if stage is None or position_embeddings is None:
            raise InvalidArgumentError(
                f"decoder layer {self.index} runs on another engine: run this model through its engine (generate), "
                f"which gives the forward the session's cache"
            )
        link, sid = stage
        past = kv.get_seq_length(self.index)
        length = hidden_states.new_zeros((hidden_states.shape[0], 1, hidden_states.shape[1], 1))
        ahead = getattr(kv, AHEAD, None)
        if ahead is not None and ahead[1]() is hidden_states and self.index <= ahead[0]:
            kv.update(length, length, self.index)  # an earlier layer of this forward ran this one: pass it on
            return hidden_states
        last = self._last(hooks.current())
        out = link.run(sid, self.index, last.index, past, hidden_states, attention_mask, position_ids,
                       position_embeddings).to(hidden_states.device)
        # The stretch's result is what the layers after this one receive, untouched (the run does nothing
        # between them): a weak reference to it says "this forward, this stretch", and dies with the forward.
        setattr(kv, AHEAD, (last.index, weakref.ref(out)))
        kv.update(length, length, self.index)
        return out

    def _last(self, run: object) -> RemoteLayer:
        """The last remote layer this call can run through: up to a boundary the run watches (``Run.watches``;
        a sink that cannot say is taken to watch everything)."""
        watches = getattr(run, "watches", None) if run is not None else (lambda path, side: False)
        last = self
        while last.following is not None and watches is not None and not (
            watches(last.path, "output") or watches(last.following.path, "input")
        ):
            last = last.following
        return last


class Elsewhere(nn.Module):
    """A stage's stand-in for a layer it does not serve: calling it is a bug in the split, said plainly."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def forward(self, *args: object, **kwargs: object) -> torch.Tensor:
        raise InvalidArgumentError(f"decoder layer {self.index} is not served by this stage of the split model")


def layer_list(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a Llama-family model (``model.layers``), whose layers take the rotary position
    embeddings as an argument: the host computes them once and hands them to the stage."""
    try:
        found = model.get_submodule("model.layers")
    except AttributeError:
        found = None
    if not isinstance(found, nn.ModuleList) or not found or not any(
        "position_embeddings" in inspect.signature(layer.forward).parameters for layer in found
    ):
        raise InvalidArgumentError(
            f"{type(model).__name__} cannot be split by layer: splitting is built for Llama-family models (decoder "
            f"layers at model.layers that take rotary position embeddings)"
        )
    return found


def check_range(model: nn.Module, layers: range) -> nn.ModuleList:
    found = layer_list(model)
    if not isinstance(layers, range) or layers.step != 1 or not layers or layers.start < 0 or layers.stop > len(found):
        raise InvalidArgumentError(
            f"a split takes a contiguous, non-empty range of the model's {len(found)} decoder layers, not {layers}"
        )
    if len(layers) == len(found):
        raise InvalidArgumentError("a split leaves at least one layer on each side; serve the whole model instead")
    return found


def check_at(model: nn.Module, split_at: int) -> int:
    """``split_at`` if it leaves layers on both sides of the split (the stage serves layers 0 .. split_at - 1)."""
    count = len(layer_list(model))
    if isinstance(split_at, bool) or not isinstance(split_at, int) or not 0 < split_at < count:
        raise InvalidArgumentError(
            f"split_at must be a layer index from 1 to {count - 1} (the stage runs the layers before it, the host "
            f"the rest), not {split_at!r}"
        )
    return split_at


def not_movable(sid: int, model: str) -> InvalidArgumentError:
    """Why session ``sid`` of the split ``model`` stays where it is: said by the engine and by a cluster's front,
    which refuses before placing it anywhere, in the session ids each of them knows."""
    return InvalidArgumentError(
        f"session {sid} is of {model}, a model split across engines, whose sessions cannot be moved to another "
        f"engine yet (its KV is in two places); open another session and run it again there"
    )


def host_id(name: str, split_at: int) -> str:
    """The model id of a split's host: sessions open on it."""
    return f"{name}:split{split_at}"


def stage_id(name: str, split_at: int) -> str:
    return f"{name}:layers0-{split_at - 1}"


def cut_for_host(model: nn.Module, remote: range) -> None:
    """Replace the layers in ``remote`` by ``RemoteLayer`` stand-ins (their weights are freed with them)."""
    found = check_range(model, remote)
    stand_ins = [RemoteLayer(i, f"model.layers.{i}") for i in remote]
    for layer, after in zip(stand_ins, stand_ins[1:]):
        layer.following = after
    for layer in stand_ins:
        found[layer.index] = layer


def cut_for_stage(model: nn.Module, served: range) -> None:
    """Replace every layer outside ``served`` by an ``Elsewhere`` stand-in."""
    found = check_range(model, served)
    for i in range(len(found)):
        if i not in served:
            found[i] = Elsewhere(i)


class StageRef(tuple):
    """(stage, stage session id) on a host's cache. A copy of the cache (a fork) shares it: the stage is a service,
    not state, and each run attaches its own session's anyway."""

    def __deepcopy__(self, memo: dict) -> StageRef:
        return self


def attach(cache: object, stage: Stage, sid: int) -> None:
    """Give the host's module-path cache its stage session, which its remote layers call."""
    setattr(cache, ATTRIBUTE, StageRef((stage, sid)))


def layers_forward(layers: nn.ModuleList, first: int, last: int, cache_arg: str, kv: object, past: int,
                   hidden: torch.Tensor, mask: torch.Tensor | None, position_ids: torch.Tensor,
                   position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Served layers ``first .. last`` on the stage, each with its KV cropped to the host's ``past`` tokens first
    (a fresh run, a rewind or a cancelled run there); holding fewer means the state was lost."""
    if not 0 <= first <= last < len(layers) or any(isinstance(layers[i], Elsewhere) for i in range(first, last + 1)):
        raise InvalidArgumentError(f"decoder layers {first}-{last} are not all served by this stage of the split model")
    for index in range(first, last + 1):
        held = kv.get_seq_length(index)
        if held < past:
            raise SessionLostError(
                f"the stage holds {held} tokens of decoder layer {index}'s KV where the session has {past}; close "
                f"the session and open a new one"
            )
        if held > past:
            entry = kv.layers[index]
            entry.keys, entry.values = entry.keys[..., :past, :], entry.values[..., :past, :]
        out = layers[index](hidden, attention_mask=mask, position_ids=position_ids,
                            position_embeddings=position_embeddings, use_cache=True, **{cache_arg: kv})
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden
