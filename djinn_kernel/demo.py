"""The scripted debugging session behind ``djinn demo``: every step is a public API call a user could type."""

from __future__ import annotations

import shutil
import textwrap
import time

import torch

from . import api

QUESTION = "What is the capital of France?"
# A steering vector from contrasting prompts: the mean residual-stream difference at the paused layer.
TOWARD = "I love the ocean: waves, the sea, sailing boats, beaches, fish and the deep blue water."
AWAY = "I love the city: streets, buildings, traffic, offices, shops and the busy town square."


def _mean_activation(session: api.Session, layer: int, prompt: str) -> torch.Tensor:
    session.delete()
    session.break_at(layer, tokens=0)
    run = session.generate(prompt, 1)
    mean = run.pause.activation[0].float().mean(dim=0)
    run.finish()
    session.delete()
    return mean


def _side_by_side(left: str, right: str, titles: tuple[str, str]) -> str:
    width = max(30, min(60, (shutil.get_terminal_size((120, 20)).columns - 3) // 2))
    cols = [textwrap.wrap(text.replace("\n", " ") or "(empty)", width) for text in (left, right)]
    rows = [f"{titles[0]:<{width}} | {titles[1]}", f"{'-' * width}-+-{'-' * width}"]
    for i in range(max(map(len, cols))):
        a = cols[0][i] if i < len(cols[0]) else ""
        b = cols[1][i] if i < len(cols[1]) else ""
        rows.append(f"{a:<{width}} | {b}")
    return "\n".join(rows)


def run_demo(
    model_name: str = "smollm2-135m", layer: int | None = None, alpha: float = 0.75, max_new_tokens: int = 40
) -> dict[str, object]:
    """Load, generate, pause mid-model, inspect, steer, resume; print and return what happened."""
    start = time.perf_counter()
    print(f"[djinn] loading {model_name} ...", flush=True)
    model = api.load(model_name)
    layer = model.num_layers // 2 if layer is None else layer
    print(f"[djinn] {model!r} loaded in {time.perf_counter() - start:.1f} s")

    with model.session() as session:
        plain = session.generate(QUESTION, max_new_tokens)
        print(f"\n> {QUESTION}\n{plain.text.strip()}\n")

        session.break_at(layer, tokens=0)
        run = session.generate(QUESTION, max_new_tokens)
        pause = run.pause
        h = pause.activation
        print(f"[djinn] paused: {pause!r}")
        print(
            f"[djinn] activation {tuple(h.shape)} {h.dtype}: norm {h.float().norm():.2f}, last-token norm "
            f"{h[0, -1].float().norm():.2f}; layers after {layer} have not run"
        )
        lens = pause.logit_lens(k=5)
        print(f"[djinn] logit lens at layer {layer} (next-token guesses from this residual stream):")
        for row in lens:
            print(f"         {row['prob']:6.1%}  {row['token']!r}")
        run.finish()

        # Direction from the contrast, sized like the last token's residual, so alpha is a fraction of it.
        diff = _mean_activation(session, layer, TOWARD) - _mean_activation(session, layer, AWAY)
        steer = (diff / diff.norm() * h[0, -1].float().norm()).to(h.dtype)
        session.break_at(layer, tokens=0)
        run = session.generate(QUESTION, max_new_tokens)
        run.pause.add(steer, alpha)  # the prompt, at this pause
        session.steer(layer, steer, alpha)  # and every token generated after it
        print(f"[djinn] steering layer {layer} toward 'ocean' minus 'city' (alpha {alpha}); resuming")
        run.finish()
        steered = run.text
        session.unsteer()

    print()
    print(_side_by_side(plain.text.strip(), steered.strip(), ("unsteered", f"steered at layer {layer}")))
    print(f"\n[djinn] demo finished in {time.perf_counter() - start:.1f} s")
    return {"plain": plain.text, "steered": steered, "layer": layer, "logit_lens": lens}
