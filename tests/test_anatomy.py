"""Decoder layers, final norm and unembedding are found generically; unknown models fall back to paths."""

from __future__ import annotations

import pytest
from torch import nn

from djinn_kernel.anatomy import inspect_model, resolve_target
from djinn_kernel.errors import InvalidTargetError


@pytest.mark.inprocess
@pytest.mark.parametrize(
    "name, layers, norm, head",
    [("tiny-llama", "model.layers", "model.norm", "lm_head"), ("tiny-gpt2", "transformer.h", "transformer.ln_f", "lm_head")],
)
def test_known_architectures(engine, name, layers, norm, head):
    import djinn_kernel as dj

    dj.load(name, backend=engine)
    anatomy = engine._model(name).anatomy
    assert anatomy.layers_path == layers and anatomy.num_layers == 4
    assert anatomy.final_norm_path == norm and anatomy.unembed_path == head
    assert anatomy.layer_index(f"{layers}.2") == 2 and anatomy.layer_index(norm) is None


class Blocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.stack = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])
        self.extra = nn.ModuleList([nn.Linear(4, 4)])


class Opaque(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 4), nn.ReLU())


def test_fallback_picks_largest_module_list():
    anatomy = inspect_model(Blocks())
    assert anatomy.layers_path == "stack" and anatomy.layer_paths[-1] == "stack.2"


def test_unsupported_model_still_allows_paths():
    model = Opaque()
    anatomy = inspect_model(model)
    assert anatomy.num_layers == 0
    with pytest.raises(InvalidTargetError, match="module path"):
        resolve_target(model, anatomy, 0)
    assert resolve_target(model, anatomy, "body.0") == "body.0"
    with pytest.raises(InvalidTargetError, match="did you mean .*body.0"):
        resolve_target(model, anatomy, "body.O")
