"""The README's Python blocks marked runnable (``<!-- runnable -->`` on the line before) run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
_BLOCK = re.compile(r"<!-- runnable -->\n```python\n(.*?)```", re.S)
BLOCKS = _BLOCK.findall(README.read_text(encoding="utf-8"))


def test_the_readme_has_runnable_blocks():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_a_readme_block_runs_as_written(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # blocks may write runs/ here
    exec(compile(BLOCKS[index], f"README.md block {index}", "exec"), {"__name__": "__readme__"})
