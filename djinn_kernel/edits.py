"""Declarative edits of an activation: the write-back half of a breakpoint, and persistent steering.

An edit is a small frozen dataclass that can be validated once, applied where the activation lives (in the
engine, or in the daemon without a round trip of the whole tensor), and sent over the wire as a JSON header plus
raw tensor frames. ``apply`` never mutates its input: it returns a new tensor, so the paused frame's original
value stays intact until the run resumes with the result.

Activations are ``[batch, tokens, hidden]`` (or any shape whose last dimension is the hidden size); vectors are
``[hidden]`` and broadcast over batch and tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import ClassVar

import torch

from .errors import InvalidArgumentError, InvalidTensorError


def check_tensor(value: object, *, like: torch.Tensor, what: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """Validate a user tensor against the activation it will touch; return it on that device and in its dtype.

    Any floating-point dtype and any device is accepted and cast (a float32 vector for a bf16 model is what
    TransformerLens and nnsight users pass); what cannot be meant is refused: another shape, integer or bool
    values, a meta tensor (no values), NaN or Inf, or values the model's dtype cannot hold.
    """
    if not isinstance(value, torch.Tensor):
        raise InvalidTensorError(f"{what} must be a torch.Tensor, got {type(value).__name__}")
    want_shape = tuple(like.shape) if shape is None else shape
    if tuple(value.shape) != want_shape:
        raise InvalidTensorError(f"{what} has shape {tuple(value.shape)}; expected {want_shape}")
    if not value.is_floating_point():
        raise InvalidTensorError(
            f"{what} has dtype {value.dtype}; pass floating-point values (they are cast to the model's {like.dtype})"
        )
    if value.device.type == "meta":
        raise InvalidTensorError(f"{what} is on device meta: it has no values to apply")
    if not bool(torch.isfinite(value).all()):
        raise InvalidTensorError(f"{what} contains NaN or Inf values")
    cast = value.to(device=like.device, dtype=like.dtype)
    if not bool(torch.isfinite(cast).all()):
        raise InvalidTensorError(f"{what} has values beyond the range of {like.dtype}")
    return cast


def check_coefficient(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgumentError(f"{what} must be a number, got {value!r}")
    if value != value or value in (float("inf"), float("-inf")):
        raise InvalidArgumentError(f"{what} must be finite, got {value}")
    return float(value)


@dataclass(frozen=True)
class Edit:
    """Base class: ``apply(activation) -> new activation``. Subclasses are registered by ``kind``."""

    kind: ClassVar[str] = ""
    registry: ClassVar[dict[str, type[Edit]]] = {}
    # As persistent steering, whether it acts at a run's prefill only (its positions are the prompt's).
    prefill_only: ClassVar[bool] = False

    def __init_subclass__(cls) -> None:
        super().__init_subclass__()
        Edit.registry[cls.kind] = cls

    def apply(self, activation: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensor-valued fields, which travel as raw frames rather than in the JSON header."""
        return {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)}

    def scalars(self) -> dict[str, object]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in self.tensors()}

    def owned(self) -> Edit:
        """The same edit holding its own copies of its tensors: one kept for later (persistent steering) must not
        change when the caller later modifies the tensor it passed, in-process as through the daemon."""
        return replace(self, **{name: t.detach().clone() for name, t in self.tensors().items()})


@dataclass(frozen=True)
class Replace(Edit):
    """Replace the whole activation with a user tensor of identical shape and dtype."""

    kind: ClassVar[str] = "replace"
    value: torch.Tensor

    def apply(self, activation: torch.Tensor) -> torch.Tensor:
        return check_tensor(self.value, like=activation, what="replacement").clone()


@dataclass(frozen=True)
class Scale(Edit):
    """Multiply the activation (optionally only some token positions) by a factor."""

    kind: ClassVar[str] = "scale"
    factor: float
    positions: tuple[int, ...] | None = None

    def apply(self, activation: torch.Tensor) -> torch.Tensor:
        factor = check_coefficient(self.factor, "scale factor")
        out = activation.clone()
        index = _positions(activation, self.positions)
        out[..., index, :] = activation[..., index, :] * factor
        return out


@dataclass(frozen=True)
class AddVector(Edit):
    """Add ``alpha * vector`` at every position (or the given ones): the classic steering intervention."""

    kind: ClassVar[str] = "add"
    vector: torch.Tensor
    alpha: float = 1.0
    positions: tuple[int, ...] | None = None

    def apply(self, activation: torch.Tensor) -> torch.Tensor:
        alpha = check_coefficient(self.alpha, "alpha")
        vector = check_tensor(self.vector, like=activation, what="steering vector", shape=(activation.shape[-1],))
        out = activation.clone()
        index = _positions(activation, self.positions)
        out[..., index, :] = activation[..., index, :] + alpha * vector
        return out


@dataclass(frozen=True)
class Ablate(Edit):
    """Project a direction out of the activation: ``h - (h·d̂) d̂`` for a unit ``d̂``."""

    kind: ClassVar[str] = "ablate"
    direction: torch.Tensor
    positions: tuple[int, ...] | None = None

    def apply(self, activation: torch.Tensor) -> torch.Tensor:
        direction = check_tensor(self.direction, like=activation, what="direction", shape=(activation.shape[-1],))
        norm = direction.float().norm()
        if norm == 0:
            raise InvalidTensorError("direction to ablate is the zero vector")
        unit = (direction.float() / norm).to(activation.dtype)
        out = activation.clone()
        index = _positions(activation, self.positions)
        h = activation[..., index, :]
        out[..., index, :] = h - (h @ unit).unsqueeze(-1) * unit
        return out


@dataclass(frozen=True)
class SetPositions(Edit):
    """Overwrite the hidden vectors at given token positions with rows of ``values`` (``[len(positions), hidden]``)."""

    kind: ClassVar[str] = "set"
    positions: tuple[int, ...]
    values: torch.Tensor

    def apply(self, activation: torch.Tensor) -> torch.Tensor:
        index = _positions(activation, self.positions)
        values = check_tensor(
            self.values, like=activation, what="values", shape=(len(index), activation.shape[-1])
        )
        out = activation.clone()
        out[..., index, :] = values
        return out


@dataclass(frozen=True)
class SetPromptRows(SetPositions):
    """``SetPositions`` over the prompt: as persistent steering it overwrites those rows of each run's prefill
    (activation patching without a pause, batched on the fast path) and leaves the decode steps alone. Positions
    count among the tokens the prefill feeds, negatives from the end; at a pause it acts as ``SetPositions``."""

    kind: ClassVar[str] = "set_prompt_rows"
    prefill_only: ClassVar[bool] = True

    def rows(self, tokens: int) -> list[int]:
        """The positions among a prefill of ``tokens`` tokens, each named once (a row set twice is ambiguous)."""
        rows = check_positions(self.positions, tokens, "the prompt's")
        if len(set(rows)) != len(rows):
            raise InvalidArgumentError(f"positions {list(self.positions)} name a prompt row twice; give each once")
        return rows


@dataclass(frozen=True)
class ClampFeature(Edit):
    """Set one SAE feature's contribution to ``value``: ``h + (value - f(h)) * decoder`` with the feature's
    activation ``f(h) = relu((h - b_dec) @ encoder + bias)`` (sae.py); at every position or the given ones."""

    kind: ClassVar[str] = "clamp_feature"
    encoder: torch.Tensor  # the feature's column of W_enc, [hidden]
    bias: float  # its b_enc entry
    decoder: torch.Tensor  # its row of W_dec, [hidden]
    b_dec: torch.Tensor  # subtracted before encoding (zeros when the SAE does not), [hidden]
    value: float
    positions: tuple[int, ...] | None = None

    def apply(self, activation: torch.Tensor) -> torch.Tensor:
        value = check_coefficient(self.value, "feature value")
        bias = check_coefficient(self.bias, "feature bias")
        hidden = (activation.shape[-1],)
        like = activation.float()
        encoder, decoder, b_dec = (
            check_tensor(t, like=like, what=name, shape=hidden)
            for name, t in (("encoder", self.encoder), ("decoder", self.decoder), ("b_dec", self.b_dec))
        )
        out = activation.clone()
        index = _positions(activation, self.positions)
        h = activation[..., index, :].float()
        feature = torch.relu((h - b_dec) @ encoder + bias)
        out[..., index, :] = (h + (value - feature).unsqueeze(-1) * decoder).to(activation.dtype)
        return out


def _positions(activation: torch.Tensor, positions: tuple[int, ...] | list[int] | None) -> list[int] | slice:
    """Validate token positions against the activation's token axis (second to last); negatives count from the end."""
    if positions is None:
        return slice(None)
    if activation.dim() < 2:
        raise InvalidArgumentError("positions need an activation with a token axis")
    return check_positions(positions, activation.shape[-2], "this activation's")


def check_positions(positions: object, n: int, whose: str) -> list[int]:
    """Token positions among ``n`` (negatives count from the end), as given, at least one; ``whose`` names the
    ``n`` positions in the error (e.g. "this activation's")."""
    if isinstance(positions, int) and not isinstance(positions, bool):
        positions = [positions]
    if not isinstance(positions, (list, tuple, range)):
        raise InvalidArgumentError(f"positions must be a list of integers or a range, not {positions!r}")
    out = []
    for p in positions:
        if isinstance(p, bool) or not isinstance(p, int) or not -n <= p < n:
            raise InvalidArgumentError(f"position {p!r} is outside {whose} {n} token positions")
        out.append(p % n)
    if not out:
        raise InvalidArgumentError("positions is empty")
    return out


def edit_from_parts(kind: str, scalars: dict[str, object], tensors: dict[str, torch.Tensor]) -> Edit:
    """Rebuild an edit from its wire form, refusing unknown kinds and fields instead of guessing."""
    cls = Edit.registry.get(kind)
    if cls is None:
        raise InvalidArgumentError(f"unknown edit kind {kind!r}; known: {', '.join(sorted(Edit.registry))}")
    names = {f.name for f in fields(cls)}
    given = {**scalars, **tensors}
    if set(given) - names:
        raise InvalidArgumentError(f"edit {kind!r} has no field(s) {sorted(set(given) - names)}")
    if isinstance(given.get("positions"), list):
        given["positions"] = tuple(given["positions"])
    try:
        return cls(**given)
    except TypeError as exc:
        raise InvalidArgumentError(f"edit {kind!r}: {exc}") from None
