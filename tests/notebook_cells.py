"""The README's "In a notebook" section as notebook cells: the magics test runs them through IPython, the browser
test through JupyterLab, both verbatim, so the README cannot drift from what works."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_notebook_cells() -> list[str]:
    """The code blocks of the section, in order, each one cell."""
    section = README.read_text().split("## In a notebook", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)
