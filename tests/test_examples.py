"""Every example runs (they double as end-to-end tests), offline, against the loopback server."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.py"))
KEYS = ("OPENAI_API_KEY", "TOGETHER_API_KEY", "ANTHROPIC_API_KEY")


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_runs(path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in KEYS}
    env["MOA_EXAMPLE_LOOPBACK"] = "1"
    proc = subprocess.run([sys.executable, str(path)], capture_output=True, text=True,
                          timeout=300, env=env, cwd=path.parent)  # real-model ones, loaded
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip()
    assert "Traceback" not in proc.stderr
