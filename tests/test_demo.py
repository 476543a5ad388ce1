"""The scripted demo runs end to end through the CLI (on a tiny model here; README runs it on smollm2)."""

from __future__ import annotations

from djinn_kernel import cli
from djinn_kernel.demo import run_demo


def test_demo_pauses_inspects_and_steers(capsys):
    result = run_demo("tiny-llama", layer=2, alpha=0.75, max_new_tokens=6)
    out = capsys.readouterr().out
    assert "paused: <djinn Pause at layer 2 (output), token step 0" in out
    assert "logit lens at layer 2" in out and "unsteered" in out
    assert len(result["logit_lens"]) == 5
    assert result["plain"] != result["steered"]


def test_cli_demo_exit_code(capsys):
    assert cli.main(["demo", "--model", "tiny-gpt2", "--max-new-tokens", "4"]) == 0
    assert cli.main(["demo", "--model", "no-such-model"]) == 2
    assert "never downloads" in capsys.readouterr().err
