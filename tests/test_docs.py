"""Docs snippets run in the suite, as examples/ do: every ```python block that follows a
`<!-- test: run -->` line in docs/ or README.md runs as a script (offline, loopback or the bundled
model); `<!-- test: run, slow -->` marks the ones that load the real model. Every ```toml block
must parse."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
PAGES = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]
MARKED = re.compile(r"<!-- test: run(, slow)? -->\n```python\n(.*?)```", re.S)
TOML = re.compile(r"```toml\n(.*?)```", re.S)
KEYS = ("OPENAI_API_KEY", "TOGETHER_API_KEY", "ANTHROPIC_API_KEY", "GROQ_API_KEY")


def _snippets() -> list[object]:
    found = []
    for page in PAGES:
        text = page.read_text()
        for match in MARKED.finditer(text):
            line = text[: match.start()].count("\n") + 1
            marks = [pytest.mark.slow] if match.group(1) else []
            found.append(pytest.param(match.group(2), id=f"{page.name}:{line}", marks=marks))
    return found


SNIPPETS = _snippets()


def test_the_docs_mark_snippets_to_run() -> None:
    assert len(SNIPPETS) >= 2  # a broken marker pattern must not silently run nothing


@pytest.mark.parametrize("code", SNIPPETS)
def test_snippet_runs(code: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in KEYS}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_toml_blocks_parse(page: Path) -> None:
    for block in TOML.findall(page.read_text()):
        tomllib.loads(block)
