"""Input checks before any paid call: ceilings on what one request may spend, config mistakes
as a `ConfigError` naming the field, and `moa chat` refusing empty or non-UTF-8 questions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from moa.cli.main import run
from moa.config import MAX_AGENTS, MAX_LAYERS, MAX_N, MAX_TOKENS, from_dict, load_file
from moa.errors import ConfigError

AGENT = {"model": "ollama/m"}


def config(**fields: Any) -> dict[str, Any]:
    return {"layers": [{"agents": [AGENT]}], "aggregator": AGENT, **fields}


@pytest.mark.parametrize(
    ("data", "field"),
    [
        (config(layers=[{"agents": [AGENT]}] * (MAX_LAYERS + 1)), "'layers'"),
        (config(layers=[{"agents": [AGENT] * (MAX_AGENTS + 1)}]), "'layers.0.agents'"),
        (config(layers=[{"agents": [{**AGENT, "n": MAX_N + 1}]}]), "'layers.0.agents.0.n'"),
        (config(aggregator={**AGENT, "max_tokens": MAX_TOKENS + 1}), "'aggregator.max_tokens'"),
        (config(aggregator={**AGENT, "max_tokens": int("9" * 4000)}), "'aggregator.max_tokens'"),
        (config(preset=["moa"]), "'preset'"),
        (config(layers=5), "'layers'"),
        (config(layers=[{"agents": [AGENT], "min_proposers": "x"}]), "'layers.0.min_proposers'"),
    ],
)
def test_config_mistakes_and_ceilings_name_the_field(data: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        from_dict(data)


def test_a_deeply_nested_config_file_is_one_sentence(tmp_path: Path) -> None:
    for name, text in (("deep.json", "[" * 100_000), ("deep.toml", "a = " + "[" * 100_000)):
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(ConfigError, match="nests too deeply"):
            load_file(path)


CHAT = ["chat", "-p", "ollama/m"]  # a local server: no key, and nothing is ever sent here
TOKENS_CEILING = f"--max-tokens must be at most {MAX_TOKENS}."


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([*CHAT, ""], "The question is empty: ask something."),
        ([*CHAT, "   "], "The question is empty: ask something."),
        ([*CHAT, "-l", "10000", "hi"],
         f"--layers must be from 2 to {MAX_LAYERS + 1}: proposer layers plus the aggregator."),
        ([*CHAT, "--max-tokens", "9" * 4000, "hi"], TOKENS_CEILING),
        ([*CHAT, "--max-tokens", str(MAX_TOKENS + 1), "hi"], TOKENS_CEILING),
    ],
)
def test_moa_chat_refuses_bad_input_before_any_call(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sys, "stdin", None)
    assert run(argv) == 1
    assert capsys.readouterr().err == f"moa: {message}\n"


def test_moa_chat_names_non_utf8_stdin() -> None:
    for argv in ([*CHAT], [*CHAT, "Summarise this:"]):
        proc = subprocess.run([sys.executable, "-m", "moa.cli", *argv],
                              input=b"caf\xe9 au lait\n", capture_output=True, timeout=60)
        assert proc.returncode == 1
        assert proc.stderr.decode() == (
            "moa: stdin is not valid UTF-8 text (byte 3); convert it, e.g. with iconv.\n"
        )


def test_server_json_corpus_matches_the_config_ceiling() -> None:
    from moa.openai.wire import RequestError, parse_request

    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert parse_request({**body, "max_tokens": MAX_TOKENS}).overrides["max_tokens"] == MAX_TOKENS
    with pytest.raises(RequestError, match=f"from 1 to {MAX_TOKENS}"):
        parse_request(json.loads(json.dumps({**body, "max_tokens": MAX_TOKENS + 1})))
