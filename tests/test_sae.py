"""Sparse-autoencoder features: a tiny SAE trained here on the tiny model's activations, saved in the SAELens
format, attached to a session; its features at a pause and the feature edits equal a direct computation."""

from __future__ import annotations

import json

import pytest
import torch

import djinn_kernel as dj
from djinn_kernel.errors import InvalidArgumentError
from djinn_kernel.sae import SAE

LAYER = 1
PROMPT = list(range(5, 17))


@pytest.fixture(scope="module")
def sae_folder(backends, tmp_path_factory):
    """Train a 32-feature ReLU SAE on layer 1's outputs of a few prompts and save it as SAELens does."""
    model = dj.load("tiny-llama", backend=backends("inprocess"))
    gen = torch.Generator().manual_seed(0)
    rows = []
    with model.session() as s:
        s.record(LAYER)
        for _ in range(6):
            rows.append(s.generate(torch.randint(3, 90, (16,), generator=gen).tolist(), 4).recorded[LAYER])
    x = torch.cat(rows).float()
    d_in, d_sae = x.shape[1], 32
    torch.manual_seed(0)
    w_dec = torch.nn.Parameter(torch.randn(d_sae, d_in) / d_in**0.5)
    w_enc = torch.nn.Parameter(w_dec.detach().T.contiguous())
    b_enc, b_dec = torch.nn.Parameter(torch.zeros(d_sae)), torch.nn.Parameter(x.mean(0).clone())
    opt = torch.optim.Adam([w_enc, b_enc, w_dec, b_dec], lr=1e-2)
    for _ in range(150):
        f = torch.relu((x - b_dec) @ w_enc + b_enc)
        loss = ((f @ w_dec + b_dec - x) ** 2).mean() + 1e-3 * f.abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("sae")
    save_file({"W_enc": w_enc.detach(), "b_enc": b_enc.detach(), "W_dec": w_dec.detach(), "b_dec": b_dec.detach()},
              str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({"d_in": d_in, "d_sae": d_sae, "apply_b_dec_to_input": True}))
    return folder


def test_the_folder_loads_and_encodes_as_the_formula_says(sae_folder):
    sae = SAE.load(sae_folder)
    x = torch.randn(5, sae.d_in)
    f = sae.encode(x)
    assert torch.equal(f, torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)) and (f >= 0).all()
    assert torch.equal(sae.decode(f), f @ sae.W_dec + sae.b_dec)
    (sae_folder / "bad").mkdir(exist_ok=True)
    with pytest.raises(InvalidArgumentError, match="SAELens"):
        SAE.load(sae_folder / "bad")
    with pytest.raises(InvalidArgumentError, match="do not fit"):
        SAE.checked({**sae.tensors(), "b_dec": torch.zeros(3)}, True)


@pytest.mark.parametrize("kind", ["inprocess", "daemon"])
def test_features_at_a_pause_and_feature_edits(kind, backends, sae_folder):
    sae = SAE.load(sae_folder)
    model = dj.load("tiny-llama", backend=backends(kind))
    with model.session() as s:
        info = s.attach_sae(LAYER, sae_folder)
        assert info == {"path": f"model.layers.{LAYER}", "d_in": sae.d_in, "d_sae": 32}
        s.break_at(LAYER, tokens=0)
        run = s.generate(PROMPT, 4, keep_logits=True)
        h = run.pause.activation[0]
        top = sae.encode(h).topk(3, dim=-1)
        got = run.pause.features(3)
        assert [[r["feature"] for r in row] for row in got] == top.indices.tolist()
        assert torch.allclose(torch.tensor([[r["activation"] for r in row] for row in got]), top.values, atol=1e-5)

        feature = int(top.indices[-1, 0])
        run.pause.clamp_feature(feature, 0.0, positions=[-1])
        edited = run.pause.activation[0]
        f_last = torch.relu((h[-1] - sae.b_dec) @ sae.W_enc[:, feature] + sae.b_enc[feature])
        assert torch.allclose(edited[-1], h[-1] - f_last * sae.W_dec[feature], atol=1e-5)
        assert torch.equal(edited[:-1], h[:-1])
        run.pause.reset()
        run.pause.add_feature(feature, 2.0)
        assert torch.allclose(run.pause.activation[0], h + 2.0 * sae.W_dec[feature], atol=1e-6)
        run.finish()
        s.delete()

        steer = s.steer_feature(LAYER, feature, 2.0)
        by_feature = s.generate(PROMPT, 4, keep_logits=True)
        s.unsteer(steer)
        s.steer(LAYER, sae.W_dec[feature], 2.0)
        by_vector = s.generate(PROMPT, 4, keep_logits=True)
        assert by_feature.tokens == by_vector.tokens and torch.equal(by_feature.logits, by_vector.logits)
        s.unsteer()
        s.clamp_feature(LAYER, feature, 0.0)
        assert s.generate(PROMPT, 4).state == "finished"
        s.unsteer()

        with pytest.raises(InvalidArgumentError, match="feature must be"):
            s.steer_feature(LAYER, 32, 1.0)
        with pytest.raises(InvalidArgumentError, match="no SAE is attached"):
            s.steer_feature(0, 1, 1.0)
        s.break_at(0, tokens=0)
        run = s.generate(PROMPT, 2)
        with pytest.raises(InvalidArgumentError, match="no SAE is attached"):
            run.pause.features()
        run.finish()
        s.detach_sae(LAYER)
        with pytest.raises(InvalidArgumentError, match="no SAE is attached"):
            s.steer_feature(LAYER, feature, 1.0)


def test_the_inspector_lists_the_top_features_of_the_chosen_position(backends, sae_folder):
    from djinn_widgets import ActivationInspector

    sae = SAE.load(sae_folder)
    model = dj.load("tiny-llama", backend=backends("inprocess"))
    with model.session() as s:
        s.break_at(LAYER, tokens=0)
        run = s.generate(PROMPT, 2)
        assert ActivationInspector(run.pause).features_table.value == "", "no SAE attached: nothing shown"
        s.attach_sae(LAYER, sae_folder)
        inspector = ActivationInspector(run.pause)
        top = sae.encode(run.pause.activation[0]).topk(inspector.k, dim=-1).indices
        assert [r["feature"] for r in inspector.features[-1]] == top[-1].tolist()
        assert f">{int(top[-1, 0])}<" in inspector.features_table.value
        inspector.position_control.value = 0
        assert [r["feature"] for r in inspector.features[0]] == top[0].tolist()
        assert f">{int(top[0, 0])}<" in inspector.features_table.value
        run.finish()
