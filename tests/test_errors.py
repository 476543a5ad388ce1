"""Bad input gives a clear DjinnError, never a hang or a deep traceback, and the session stays usable."""

from __future__ import annotations

import os

import pytest
import torch

import djinn_kernel as dj
from conftest import PROMPT, make_engine, reference
from daemon_util import DaemonProcess
from djinn_kernel import cli


def assert_still_usable(session, model):
    session.delete()
    session.unsteer()
    tokens, _ = reference(model)
    assert session.generate(PROMPT, 8).tokens == tokens


def test_nonexistent_layer_and_path(session, model):
    with pytest.raises(dj.InvalidTargetError, match=r"layer 99 does not exist.*0\.\.3"):
        session.break_at(99)
    with pytest.raises(dj.InvalidTargetError, match="did you mean"):
        session.break_at(model.info["layer_paths"][1] + ".mpl")
    with pytest.raises(dj.InvalidTargetError):
        session.break_at(1.5)
    with pytest.raises(dj.InvalidArgumentError, match="side"):
        session.break_at(1, side="middle")
    with pytest.raises(dj.InvalidArgumentError, match="tokens"):
        session.break_at(1, tokens="a-b")
    with pytest.raises(dj.InvalidArgumentError, match="max_hits"):
        session.break_at(1, max_hits=0)
    assert session.breakpoints == []
    assert_still_usable(session, model)


def test_negative_layer_counts_from_end(session, model):
    session.break_at(-1, once=True)
    run = session.generate(PROMPT, 2)
    assert run.pause.layer == model.num_layers - 1
    run.finish()


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda a: a[..., :-1], "shape"),
        (lambda a: a.to(torch.int64), "dtype"),
        (lambda a: torch.full_like(a, 1e39, dtype=torch.float64), "beyond the range"),
        (lambda a: torch.empty_like(a, device="meta"), "device"),
        (lambda a: a.clone().index_fill_(-1, torch.tensor([0]), float("nan")), "NaN or Inf"),
        (lambda a: a.clone().index_fill_(-1, torch.tensor([3]), float("inf")), "NaN or Inf"),
        (lambda a: a.tolist(), "torch.Tensor"),
    ],
)
def test_bad_replacement_is_refused_and_changes_nothing(session, model, make, message):
    tokens, logits = reference(model)
    session.break_at(1, tokens=0)
    run = session.generate(PROMPT, 8, keep_logits=True)
    with pytest.raises(dj.InvalidTensorError, match=message):
        run.pause.replace(make(run.pause.activation))
    assert run.pause.info["edits"] == 0
    run.resume()
    assert run.tokens == tokens and torch.equal(run.logits, logits)
    assert_still_usable(session, model)


def test_bad_edit_arguments(session, model):
    session.break_at(1, tokens=0)
    run = session.generate(PROMPT, 2)
    with pytest.raises(dj.InvalidArgumentError, match="finite"):
        run.pause.scale(float("nan"))
    with pytest.raises(dj.InvalidArgumentError, match="position"):
        run.pause.scale(2.0, positions=[1000])
    with pytest.raises(dj.InvalidTensorError, match="shape"):
        run.pause.add(torch.ones(model.hidden_size + 1))
    with pytest.raises(dj.InvalidTensorError, match="zero vector"):
        run.pause.ablate(torch.zeros(model.hidden_size))
    with pytest.raises(dj.InvalidArgumentError, match="k must be"):
        run.pause.logit_lens(k=0)
    run.finish()
    assert_still_usable(session, model)


def test_resume_on_finished_run(session, model):
    run = session.generate(PROMPT, 2)
    assert run.state == "finished"
    for action in (run.resume, run.step, run.finish):
        with pytest.raises(dj.RunFinishedError, match="generate"):
            action()
    assert_still_usable(session, model)


def test_generate_on_paused_session(session, model):
    session.break_at(0)
    run = session.generate(PROMPT, 4)
    with pytest.raises(dj.SessionBusyError, match="paused run"):
        session.generate(PROMPT, 4)
    assert run.paused
    run.finish()
    assert_still_usable(session, model)


def test_edit_without_pause(session):
    run = session.generate(PROMPT, 2)
    with pytest.raises(dj.RunFinishedError):
        session._backend.edit(session.id, dj.Scale(2.0))
    assert run.pause is None


def test_unknown_model(engine):
    with pytest.raises(dj.ModelNotFoundError, match="never downloads"):
        dj.load("no-such-model-xyz", backend=engine)
    with pytest.raises(dj.ModelNotFoundError):
        dj.load("", backend=engine)


def test_bad_generate_arguments(session, model):
    for kwargs, message in [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_k": 0}, "top_k"),
    ]:
        with pytest.raises(dj.InvalidArgumentError, match=message):
            session.generate(PROMPT, **kwargs)
    with pytest.raises(dj.InvalidArgumentError, match="outside the vocabulary"):
        session.generate([10**9], 2)
    with pytest.raises(dj.InvalidArgumentError, match="empty"):
        session.generate("", 2)
    with pytest.raises(dj.InvalidArgumentError, match="prompt"):
        session.generate(3.5, 2)
    assert_still_usable(session, model)


def test_steering_vector_checked_at_steer_time(session, model):
    with pytest.raises(dj.InvalidTensorError, match="shape"):
        session.steer(1, torch.ones(model.hidden_size + 3))
    with pytest.raises(dj.InvalidTensorError, match="NaN"):
        session.steer(1, torch.full((model.hidden_size,), float("nan")))
    assert session.steering == []
    assert_still_usable(session, model)


def test_failure_inside_forward_ends_only_that_run(session, model):
    """A steering edit that only turns out wrong mid-forward fails its run with a Djinn error, nothing else."""
    path = "model.layers.0.mlp.up_proj" if model.name == "tiny-llama" else "transformer.h.0.mlp.c_fc"
    session.steer(path, torch.ones(model.hidden_size))
    other = model.session()
    try:
        other.break_at(2, once=True)
        paused = other.generate(PROMPT, 4)
        with pytest.raises(dj.InvalidTensorError, match="token step 0"):
            session.generate(PROMPT, 4)
        assert session.run.state == "failed" and "steering vector" in session.run.refresh()._snapshot["error"]
        assert paused.paused
        paused.finish()
        assert paused.state == "finished"
    finally:
        other.close()
    assert_still_usable(session, model)


def test_a_run_beyond_the_declared_context_is_refused(engine):
    llama = dj.load("tiny-llama", backend=engine)
    with llama.session() as session:
        with pytest.raises(dj.InvalidArgumentError, match="exceed the 256 positions"):
            session.generate([5, 6, 7], 10**9)
        first = session.generate([5 + i % 50 for i in range(200)], 40)
        with pytest.raises(dj.InvalidArgumentError, match="rewind"):
            session.generate([9] * 10, 10, fresh=False)
        assert len(first.tokens) == 40 and session.history == 240, "a refused request changes nothing"
        assert_still_usable(session, llama)


def test_an_operators_max_context_caps_every_run_below_the_models(tmp_path, monkeypatch, capsys):
    capped = make_engine(max_context=40)
    try:
        llama = dj.load("tiny-llama", backend=capped)
        with llama.session() as session:
            with pytest.raises(dj.InvalidArgumentError, match=r"exceed the 40 positions .*--max-context"):
                session.generate([5] * 30, 11)
            assert len(session.generate([5] * 30, 10).tokens) == 10, "up to the cap runs"
    finally:
        capped.shutdown()
    with pytest.raises(dj.InvalidArgumentError, match="max_context must be an integer >= 2"):
        make_engine(max_context=1)
    daemon = DaemonProcess("--max-context", "40")
    try:
        with dj.load("tiny-llama", backend=daemon.client()).session() as session:
            with pytest.raises(dj.InvalidArgumentError, match=r"exceed the 40 positions .*--max-context"):
                session.generate([5] * 30, 11)
    finally:
        daemon.stop()
    monkeypatch.setenv("DJINN_RUNTIME_DIR", str(tmp_path))
    os.chmod(tmp_path, 0o700)
    assert cli.main(["serve", "--device", "cpu", "--max-context", "1"]) == 2
    assert "max_context must be an integer >= 2" in capsys.readouterr().err


def test_prompt_longer_than_learned_positions(engine):
    gpt2 = dj.load("tiny-gpt2", backend=engine)
    with gpt2.session() as session:
        with pytest.raises(dj.InvalidArgumentError, match="exceed the 256 positions"):
            session.generate([5 + i % 50 for i in range(250)], 7)
        assert len(session.generate([5 + i % 50 for i in range(250)], 6).tokens) == 6
        assert_still_usable(session, gpt2)


@pytest.mark.inprocess
def test_model_exception_becomes_execution_error(engine):
    from conftest import torch_model

    gpt2 = dj.load("tiny-gpt2", backend=engine)

    def broken(module, args, output):
        raise RuntimeError("a layer failed")

    handle = torch_model(engine, gpt2).get_submodule("transformer.h.1").register_forward_hook(broken)
    with gpt2.session() as session:
        try:
            with pytest.raises(dj.ExecutionError, match="a layer failed.*still usable"):
                session.generate(PROMPT, 2)
        finally:
            handle.remove()
        assert session.run.state == "failed"
        assert_still_usable(session, gpt2)


@pytest.mark.inprocess
def test_model_built_in_code_without_tokenizer(engine):
    from djinn_kernel.builtin import build_builtin

    net, _, _ = build_builtin("tiny-llama")
    info = engine.register_model("code-llama", net)
    assert info["source"] == "in code" and info["num_layers"] == 4
    with pytest.raises(dj.InvalidArgumentError, match="already loaded"):
        engine.register_model("code-llama", net)
    model = dj.Model(engine, info)
    with model.session() as s:
        with pytest.raises(dj.InvalidArgumentError, match="token ids"):
            s.generate("text", 2)
        run = s.generate([5, 6, 7], 3)
        assert len(run.tokens) == 3 and run.text is None
        reports = []
        streamed = s.generate([5, 6, 7], 3, on_progress=reports.append)  # streamed progress has no text to show
        assert streamed.tokens == run.tokens and reports[-1].done and reports[-1].text == ""


@pytest.mark.inprocess
def test_load_from_a_local_folder(engine, tmp_path):
    from djinn_kernel.builtin import build_builtin

    net, tokenizer, _ = build_builtin("tiny-gpt2")
    net.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model = dj.load(str(tmp_path), backend=engine)
    assert model.num_layers == 4 and model.info["source"] == str(tmp_path)
    tokens, _ = reference(dj.load("tiny-gpt2", backend=engine))
    with model.session() as s:
        assert s.generate(PROMPT, 8).tokens == tokens, "same weights from disk, same greedy tokens"
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(dj.ModelNotFoundError, match="not a loadable"):
        dj.load(str(tmp_path) + "/", backend=engine)
