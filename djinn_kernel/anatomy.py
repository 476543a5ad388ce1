"""Where things are inside a Hugging Face causal LM: decoder layers, final norm, unembedding, module paths.

Architectures name these differently (``model.layers`` for Llama/Mistral/Qwen2/Gemma/Phi, ``transformer.h`` for
GPT-2, ``gpt_neox.layers``, ``model.decoder.layers`` ...). We look at known paths first and then fall back to the
largest ``nn.ModuleList`` whose length is the configured layer count, so most new models work unchanged. A model
where no layer list is found still supports breakpoints by module path.
"""

from __future__ import annotations

import difflib
import functools
from dataclasses import dataclass

from torch import nn

from .errors import InvalidTargetError

_LAYER_LIST_PATHS = (
    "model.layers",
    "transformer.h",
    "gpt_neox.layers",
    "model.decoder.layers",
    "transformer.layers",
    "transformer.blocks",
    "model.language_model.layers",
)
_FINAL_NORM_NAMES = ("norm", "ln_f", "final_layernorm", "final_layer_norm", "final_norm", "norm_f")


@dataclass(frozen=True)
class Anatomy:
    """The named parts of one model that breakpoints, stepping and the logit lens rely on."""

    layers_path: str | None
    layer_paths: tuple[str, ...]
    final_norm_path: str | None
    unembed_path: str | None

    @property
    def num_layers(self) -> int:
        return len(self.layer_paths)

    @functools.cached_property
    def _index(self) -> dict[str, int]:
        return {path: i for i, path in enumerate(self.layer_paths)}

    def layer_index(self, path: str) -> int | None:
        """Called by every hook on every forward: a dict lookup, not a scan of the layer list."""
        return self._index.get(path)


def _get(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _find_layer_list(model: nn.Module) -> str | None:
    for path in _LAYER_LIST_PATHS:
        if isinstance(_get(model, path), nn.ModuleList):
            return path
    expected = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    candidates = [
        (len(m), name)
        for name, m in model.named_modules()
        if isinstance(m, nn.ModuleList) and len(m) > 0 and (expected is None or len(m) == expected)
    ]
    return max(candidates)[1] if candidates else None


def _find_final_norm(model: nn.Module, layers_path: str | None) -> str | None:
    if layers_path is None:
        return None
    parent = layers_path.rpartition(".")[0]
    for name in _FINAL_NORM_NAMES:
        path = f"{parent}.{name}" if parent else name
        if _get(model, path) is not None:
            return path
    return None


def _find_unembed(model: nn.Module) -> str | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        return None
    for name, module in model.named_modules():
        if module is head:
            return name
    return None


def inspect_model(model: nn.Module) -> Anatomy:
    """Locate the parts of ``model`` that Djinn needs; missing parts are ``None`` rather than an error."""
    layers_path = _find_layer_list(model)
    layer_paths: tuple[str, ...] = ()
    if layers_path is not None:
        layer_paths = tuple(f"{layers_path}.{i}" for i in range(len(model.get_submodule(layers_path))))
    return Anatomy(
        layers_path=layers_path,
        layer_paths=layer_paths,
        final_norm_path=_find_final_norm(model, layers_path),
        unembed_path=_find_unembed(model),
    )


def resolve_target(model: nn.Module, anatomy: Anatomy, target: int | str) -> str:
    """Turn a layer index (negative counts from the end) or a dotted module path into a module path."""
    if isinstance(target, bool) or not isinstance(target, (int, str)):
        raise InvalidTargetError(f"a target is a decoder-layer index or a module path, not {target!r}")
    if isinstance(target, int):
        n = anatomy.num_layers
        if n == 0:
            raise InvalidTargetError(
                "this model has no decoder-layer list Djinn recognises; break at a module path instead "
                "(see model.module_paths())"
            )
        if not -n <= target < n:
            raise InvalidTargetError(f"layer {target} does not exist: this model has layers 0..{n - 1}")
        return anatomy.layer_paths[target % n]
    if target.isdigit() or (target.startswith("-") and target[1:].isdigit()):
        return resolve_target(model, anatomy, int(target))
    if _get(model, target) is None or target == "":
        parts = target.split(".")
        for depth in range(1, len(parts)):
            outer = ".".join(parts[:depth])
            where = getattr(_get(model, outer), "runs_elsewhere", None)  # e.g. split.RemoteLayer
            if where:
                raise InvalidTargetError(
                    f"module path {target!r} is inside {outer}, which runs on {where}: break, steer or record at "
                    f"{outer} itself (its input or output)"
                )
        hint = _closest_paths(model, target)
        raise InvalidTargetError(
            f"module path {target!r} does not exist in this model"
            + (f"; did you mean {', '.join(hint)}?" if hint else "; list them with model.module_paths()")
        )
    return target


def _closest_paths(model: nn.Module, target: str, limit: int = 3) -> list[str]:
    names = [name for name, _ in model.named_modules() if name]
    return difflib.get_close_matches(target, names, n=limit)
