"""Edits are pure functions of the activation, validated before they touch it."""

from __future__ import annotations

import pytest
import torch

from djinn_kernel.edits import Ablate, AddVector, Replace, Scale, SetPositions, edit_from_parts
from djinn_kernel.errors import InvalidArgumentError, InvalidTensorError

H = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)


def test_scale_and_positions():
    assert torch.equal(Scale(2.0).apply(H), H * 2)
    out = Scale(0.0, (0, -1)).apply(H)
    assert torch.equal(out[:, 1], H[:, 1]) and not out[:, 0].any() and not out[:, 2].any()


def test_add_vector():
    v = torch.tensor([1.0, 0.0, -1.0, 2.0])
    assert torch.equal(AddVector(v, 0.5).apply(H), H + 0.5 * v)
    out = AddVector(v, 1.0, (1,)).apply(H)
    assert torch.equal(out[:, 1], H[:, 1] + v) and torch.equal(out[:, 0], H[:, 0])


def test_ablate_removes_direction():
    d = torch.tensor([1.0, 1.0, 0.0, 0.0])
    out = Ablate(d).apply(H)
    assert torch.allclose(out @ (d / d.norm()), torch.zeros(2, 3), atol=1e-5)
    assert torch.equal(out[..., 2:], H[..., 2:])


def test_set_positions_and_replace():
    rows = torch.full((1, 4), 7.0)
    out = SetPositions((2,), rows).apply(H)
    assert (out[:, 2] == 7).all() and torch.equal(out[:, :2], H[:, :2])
    with pytest.raises(InvalidTensorError, match="shape"):
        SetPositions((1, 2), rows).apply(H)
    assert torch.equal(Replace(H * 3).apply(H), H * 3)


def test_apply_never_mutates_input():
    before = H.clone()
    for edit in (Scale(3.0), AddVector(torch.ones(4)), Ablate(torch.ones(4)), Replace(H + 1)):
        edit.apply(H)
    assert torch.equal(H, before)


def test_wire_round_trip():
    edit = AddVector(torch.ones(4), 2.0, (0, 1))
    again = edit_from_parts(edit.kind, {**edit.scalars(), "positions": [0, 1]}, edit.tensors())
    assert again.kind == "add" and again.positions == (0, 1) and torch.equal(again.apply(H), edit.apply(H))
    with pytest.raises(InvalidArgumentError, match="unknown edit kind"):
        edit_from_parts("explode", {}, {})
    with pytest.raises(InvalidArgumentError, match="no field"):
        edit_from_parts("scale", {"factor": 1.0, "boom": 2}, {})


def test_persistent_steering_keeps_its_own_copy_of_the_vector():
    import djinn_kernel as dj
    from conftest import PROMPT, make_engine

    engine = make_engine()
    model = dj.load("tiny-llama", backend=engine)
    v = torch.randn(model.hidden_size, generator=torch.Generator().manual_seed(3))
    with model.session() as s:
        s.steer(1, v, alpha=2.0)
        before = s.generate(PROMPT, 6).tokens
        v.add_(100.0)  # the caller reuses its tensor; the session's steering must not move with it
        assert s.generate(PROMPT, 6).tokens == before
    engine.shutdown()
