"""Sparse autoencoders on a layer's residual stream: what features a paused activation has, and edits by feature.

An SAE is read from a folder in the SAELens format, directly (no SAELens dependency): ``cfg.json`` (``d_in``,
``d_sae``, optionally ``apply_b_dec_to_input``, default true) and ``sae_weights.safetensors`` with ``W_enc``
``[d_in, d_sae]``, ``b_enc`` ``[d_sae]``, ``W_dec`` ``[d_sae, d_in]`` and ``b_dec`` ``[d_in]``. The encoder is
ReLU: ``f = relu((x - b_dec) @ W_enc + b_enc)`` (``b_dec`` subtracted only when ``apply_b_dec_to_input``), the
decoder ``f @ W_dec + b_dec``. The client reads the folder and sends the weights, so a daemon never opens a
path a remote user names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .edits import ClampFeature
from .errors import InvalidArgumentError

NAMES = ("W_enc", "b_enc", "W_dec", "b_dec")


@dataclass(frozen=True)
class SAE:
    W_enc: torch.Tensor
    b_enc: torch.Tensor
    W_dec: torch.Tensor
    b_dec: torch.Tensor
    apply_b_dec_to_input: bool = True

    @classmethod
    def load(cls, folder: str | Path) -> SAE:
        from safetensors.torch import load_file

        folder = Path(folder)
        try:
            cfg = json.loads((folder / "cfg.json").read_text())
            weights = load_file(str(folder / "sae_weights.safetensors"))
        except (OSError, ValueError) as exc:
            raise InvalidArgumentError(
                f"{folder} is not an SAE folder in the SAELens format (cfg.json + sae_weights.safetensors): {exc}"
            ) from exc
        missing = [name for name in NAMES if name not in weights]
        if missing:
            raise InvalidArgumentError(f"{folder}/sae_weights.safetensors lacks {missing}")
        return cls.checked({name: weights[name] for name in NAMES}, bool(cfg.get("apply_b_dec_to_input", True)))

    @classmethod
    def checked(cls, weights: dict[str, torch.Tensor], apply_b_dec_to_input: bool) -> SAE:
        """An SAE from its four tensors, refusing shapes that do not fit together."""
        if set(weights) != set(NAMES) or not all(isinstance(t, torch.Tensor) for t in weights.values()):
            raise InvalidArgumentError(f"an SAE is the tensors {NAMES}, got {sorted(weights)}")
        w_enc, b_enc, w_dec, b_dec = (weights[name].detach().float() for name in NAMES)
        d_in, d_sae = w_enc.shape if w_enc.dim() == 2 else (-1, -1)
        if w_enc.dim() != 2 or b_enc.shape != (d_sae,) or w_dec.shape != (d_sae, d_in) or b_dec.shape != (d_in,):
            raise InvalidArgumentError(
                f"SAE shapes do not fit: W_enc {tuple(w_enc.shape)}, b_enc {tuple(b_enc.shape)}, W_dec "
                f"{tuple(w_dec.shape)}, b_dec {tuple(b_dec.shape)} (expected [d_in, d_sae], [d_sae], [d_sae, d_in], [d_in])"
            )
        return cls(w_enc, b_enc, w_dec, b_dec, apply_b_dec_to_input)

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in NAMES}

    def to(self, device: torch.device) -> SAE:
        return SAE(*(t.to(device) for t in (self.W_enc, self.b_enc, self.W_dec, self.b_dec)), self.apply_b_dec_to_input)

    def direction(self, feature: int) -> torch.Tensor:
        """The feature's decoder row: the direction it writes into the residual stream."""
        return self.W_dec[self._index(feature)]

    def clamp(self, feature: int, value: float, positions: tuple[int, ...] | None = None) -> ClampFeature:
        """The edit that sets ``feature``'s contribution to ``value`` (``ClampFeature``)."""
        i = self._index(feature)
        b_dec = self.b_dec if self.apply_b_dec_to_input else torch.zeros_like(self.b_dec)
        return ClampFeature(self.W_enc[:, i], float(self.b_enc[i]), self.W_dec[i], b_dec, value, positions)

    def _index(self, feature: object) -> int:
        d_sae = self.W_enc.shape[1]
        if isinstance(feature, bool) or not isinstance(feature, int) or not 0 <= feature < d_sae:
            raise InvalidArgumentError(f"feature must be an index from 0 to {d_sae - 1}, not {feature!r}")
        return feature

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() - self.b_dec if self.apply_b_dec_to_input else x.float()
        return torch.relu(x @ self.W_enc + self.b_enc)

    def decode(self, features: torch.Tensor) -> torch.Tensor:
        return features @ self.W_dec + self.b_dec
