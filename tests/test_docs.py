"""Every fenced snippet of README.md and docs/*.md is checked, as examples/ are.

A marker is an HTML comment on the line before the fence: `<!-- test: WORDS -->`.

- ```python: each block runs as a script (offline) and must carry a marker:
  `run` runs it as written (loopback server or the bundled model); `run, slow` the same for
  one that loads the real model; `needs-key` marks one that calls a provider needing an API key:
  it runs with every keyed provider pointed at a loopback server and a placeholder key, and
  must have sent that provider a request. `continued` runs it after the page's previous python
  block, as a reader would in one session.
- ```toml / ```json: each block parses and is a mixture config, validated as one (a part of
  one — a `[providers.X]` table, a budget line — is validated inside a small mixture).
  `file PATH`: the block is the file PATH; a shipped file must hold the same (the same text,
  or the same data when the formats differ), any other is written as PATH where the page's
  python blocks run. `output` (json): an example of `moa chat --json`, whose keys must be keys
  of the real output.
- ```bash: `bash -n` passes, every `moa ...` command parses with moa's own parser, every
  `python examples/X.py` exists and every `.[extra]` is an extra of pyproject.toml.
- A fence without a language is text (output, a transcript, a synopsis); no other language is
  used.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from moa.config import from_dict
from moa.providers.registry import default_registry
from moa.testing import LoopbackServer

ROOT = Path(__file__).parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(?P<indent>[ ]*)```(?P<lang>[\w-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```[ ]*$",
                   re.S | re.M)
MARKER = re.compile(r"^\s*<!-- test: (?P<words>[^>]*?) -->\s*$")
LANGUAGES = {"", "python", "toml", "json", "bash"}
MARKS = {"python": {"run", "slow", "needs-key", "continued"}, "toml": {"file"},
         "json": {"file", "output"}}
"""The marker words each language takes (`file` with its path)."""
PLACEHOLDER_KEY = "sk-moa-docs-placeholder"
BASE = {"layers": [{"agents": [{"model": "openai/gpt-4o-mini"}]}],
        "aggregator": {"model": "openai/gpt-4o-mini", "strong": "openai/gpt-4o"}}
"""The mixture a config fragment is validated in (its aggregator is routed, for [router])."""


@dataclass
class Snippet:
    page: Path
    line: int
    lang: str
    code: str
    marks: set[str]
    file: str | None
    before: str = ""
    """The page's earlier python blocks this one continues (`continued`)."""

    @property
    def id(self) -> str:
        return f"{self.page.name}:{self.line}"


def _snippets() -> list[Snippet]:
    found = []
    for page in PAGES:
        text = page.read_text()
        previous = ""
        for match in FENCE.finditer(text):
            start = match.start()
            above = text[:start].rstrip("\n").rsplit("\n", 1)[-1]
            words = [w.strip() for w in m["words"].split(",")] if (m := MARKER.match(above)) else []
            file = next((w.split(None, 1)[1] for w in words if w.startswith("file ")), None)
            indent = len(match["indent"])
            code = "".join(line[indent:] for line in match["body"].splitlines(keepends=True))
            marks = {w for w in words if not w.startswith("file ")}
            snippet = Snippet(page, text[:start].count("\n") + 1, match["lang"], code, marks, file)
            if snippet.lang == "python":
                snippet.before = previous if "continued" in marks else ""
                previous = snippet.before + code
            found.append(snippet)
    return found


SNIPPETS = _snippets()


def _of(lang: str, *marks: str) -> list[Any]:
    return [pytest.param(s, id=s.id, marks=[pytest.mark.slow] if "slow" in s.marks else [])
            for s in SNIPPETS if s.lang == lang and all(m in s.marks for m in marks)]


def test_every_fence_has_a_known_language_and_markers() -> None:
    assert len(SNIPPETS) > 50  # a broken fence pattern must not silently check nothing
    assert {s.id: s.lang for s in SNIPPETS if s.lang not in LANGUAGES} == {}
    words = {s.id: s.marks | ({"file"} if s.file else set()) for s in SNIPPETS}
    wrong = {s.id: words[s.id] for s in SNIPPETS if not words[s.id] <= MARKS.get(s.lang, set())}
    assert wrong == {}, "a marker word the block's language does not take (a typo?)"


def test_every_python_snippet_runs_or_needs_a_key() -> None:
    python = [s for s in SNIPPETS if s.lang == "python"]
    unmarked = [s.id for s in python if not s.marks & {"run", "needs-key"}]
    assert unmarked == [], "mark each with <!-- test: run --> or <!-- test: needs-key -->"
    counts = {kind: sum(kind in s.marks for s in python) for kind in ("run", "needs-key")}
    assert counts["run"] >= 8 and counts["needs-key"] >= 6, counts
    assert counts["run"] + counts["needs-key"] == len(python)


def _files(snippet: Snippet, cwd: Path) -> None:
    """Lay out what a reader of the page has: the checkout's examples/ and the page's files."""
    (cwd / "examples").symlink_to(ROOT / "examples")
    for other in SNIPPETS:
        if other.page == snippet.page and other.file and not (ROOT / other.file).exists():
            (cwd / other.file).write_text(other.code)


def _clean_env() -> dict[str, str]:
    """The environment without any provider key or base-URL override."""
    names = {v for s in default_registry.specs() for v in (s.key_variable, s.base_url_variable)}
    return {k: v for k, v in os.environ.items() if k not in names}


def _run(snippet: Snippet, cwd: Path, env: dict[str, str]) -> None:
    _files(snippet, cwd)
    proc = subprocess.run([sys.executable, "-c", snippet.before + snippet.code],
                          capture_output=True, text=True, timeout=300, env=env, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("snippet", _of("python", "run"))
def test_snippet_runs(snippet: Snippet, tmp_path: Path) -> None:
    _run(snippet, tmp_path, _clean_env())


@pytest.fixture(scope="module")
def provider() -> Iterator[LoopbackServer]:
    """One loopback server standing in for every provider that needs a key."""
    with LoopbackServer() as server:
        yield server


@pytest.mark.parametrize("snippet", _of("python", "needs-key"))
def test_needs_key_snippet_runs_against_a_stand_in(
    snippet: Snippet, provider: LoopbackServer, tmp_path: Path
) -> None:
    env = _clean_env()
    for spec in default_registry.specs():
        if spec.key_required:
            env[spec.key_variable] = PLACEHOLDER_KEY
            anthropic = spec.kind == "anthropic"
            env[spec.base_url_variable] = provider.anthropic_base_url if anthropic else \
                provider.base_url
    seen = len(provider.requests)
    _run(snippet, tmp_path, env)
    sent = [r.headers.get("authorization", "") + r.headers.get("x-api-key", "")
            for r in provider.requests[seen:]]
    assert any(PLACEHOLDER_KEY in h for h in sent), "it must call a provider that needs a key"


@pytest.mark.parametrize("snippet", _of("toml") + _of("json"))
def test_config_block_is_valid(
    snippet: Snippet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tomllib.loads(snippet.code) if snippet.lang == "toml" else json.loads(snippet.code)
    if "output" in snippet.marks:
        _same_keys(data, _chat_json_output(tmp_path))
        return
    if snippet.file and (ROOT / snippet.file).exists():
        shipped = ROOT / snippet.file
        if shipped.suffix == f".{snippet.lang}":
            assert snippet.code == shipped.read_text(), f"{snippet.id} is not {snippet.file}"
        else:
            assert data == tomllib.loads(shipped.read_text()), f"{snippet.id} is not {shipped}"
    monkeypatch.chdir(tmp_path)
    for name in re.findall(r'"local/([^"/][^"]*\.gguf)"', snippet.code):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)  # the reader's own model:
        (tmp_path / name).write_bytes(b"GGUF" + bytes(28))           # a stand-in GGUF file
    whole = bool({"layers", "preset", "debate"} & set(data))
    from_dict(data if whole else {**BASE, **data}, source=snippet.id)


def _same_keys(doc: Any, real: Any, where: str = "") -> None:
    """Every key of the documented JSON is a key of the real one, at every level."""
    if isinstance(doc, dict):
        assert isinstance(real, dict), where
        for key, value in doc.items():
            if key != "...":
                assert key in real, f"{where}.{key} is not in the real output"
                _same_keys(value, real[key], f"{where}.{key}")
    elif isinstance(doc, list) and doc and real:
        _same_keys(doc[0], real[0], f"{where}[0]")


def _chat_json_output(tmp: Path) -> dict[str, Any]:
    """What `moa chat --json` prints for a small mixture on the loopback server."""
    from moa.cli.main import run as moa

    config = tmp / "loop.toml"
    with LoopbackServer() as server, contextlib.redirect_stdout(io.StringIO()) as out:
        config.write_text(f'[providers.loop]\nbase_url = "{server.base_url}"\n'
                          "key_required = false\n")
        assert moa(["chat", "-c", str(config), "-p", "loop/a", "--json", "Hi"]) == 0
    return json.loads(out.getvalue())


@pytest.mark.parametrize("snippet", _of("bash"))
def test_bash_block_is_valid(snippet: Snippet) -> None:
    syntax = subprocess.run(["bash", "-n"], input=snippet.code, capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    for argv in _commands(snippet.code):
        if argv[0] == "moa":
            _parse_moa(argv[1:])
        elif argv[0] in ("python", "python3") and argv[1].startswith("examples/"):
            assert (ROOT / argv[1]).is_file(), argv
        elif argv[:2] == ["pip", "install"]:
            for arg in argv:
                if m := re.fullmatch(r"\.\[([\w,-]+)\]", arg):
                    assert set(m[1].split(",")) <= set(extras), arg


def _commands(code: str) -> Iterator[list[str]]:
    """Each simple command of a shell block, without leading VAR=value assignments."""
    for line in code.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        argv: list[str] = []
        for token in [*lexer, ";"]:
            if token not in ("&&", "||", "|", ";", "&"):
                argv.append(token)
                continue
            while argv and re.fullmatch(r"\w+=.*", argv[0]):
                argv.pop(0)
            if argv:
                yield argv
            argv = []


def _parse_moa(argv: list[str]) -> None:
    """Parse `moa ARGV` (and a bench's own flags) as the command does, without running it."""
    from moa.cli.main import _chosen, build_parser

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            args = build_parser(_chosen(argv)).parse_args(argv)
            if args.command == "bench" and args.name:
                import argparse

                parser = argparse.ArgumentParser(conflict_handler="resolve")
                parser.add_argument("--json", action="store_true")
                parser.add_argument("--debug", action="store_true")
                importlib.import_module(f"moa.bench.{args.name}").add_arguments(parser)
                parser.parse_args(args.bench_args)
        except SystemExit as exit:
            assert exit.code == 0, f"moa {shlex.join(argv)}: {err.getvalue().strip()[-300:]}"
