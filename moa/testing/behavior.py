"""What a loopback model answers, how fast, and which fault it injects.

`plan_reply()` turns a request body into the tokens to send; both wire formats
(OpenAI chat completions and Anthropic messages) share it, so a behaviour means the
same thing on either endpoint.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .gate import Gate

TOKEN_RE = re.compile(r"\s*\S+")
"""A loopback token: one word with its leading whitespace."""

ECHO = "echo"


@dataclass
class ModelBehavior:
    """How one loopback model behaves.

    `reply` is the text to send: a fixed string, `"echo"` (the last user message) or a
    function of the parsed request body. Faults apply to the first `fail_times` requests
    to the model (every request when `fail_times` is None); the `*_after` faults trigger
    after that many tokens of a streamed reply.
    """

    reply: str | Callable[[dict[str, Any]], str] = ECHO
    ttft_s: float = 0.0
    """Delay before the first token (the response headers go out at once)."""
    tokens_per_s: float | None = None
    """Token rate of a streamed reply; None sends tokens without delay."""
    gate: Gate | None = None
    """Send each token of a streamed reply only once the gate lets it pass (explicit pacing);
    a continued reply's tokens count from the start of the whole reply."""
    logprob: float | Callable[[int], float] = -0.05
    """Logprob reported for each token (or a function of the token's index)."""
    prompt_tokens: int | None = None
    """Reported prompt tokens; None counts the words of all messages."""
    completion_tokens: int | None = None
    """Reported completion tokens; None counts the tokens sent."""
    prefill: bool = False
    """Continue a final assistant message even without `continue_final_message`."""
    fail_status: int | None = None
    """Answer with this HTTP status instead of a reply."""
    fail_times: int | None = None
    retry_after: float | None = None
    """Seconds sent in `Retry-After` and `retry-after-ms` with `fail_status`."""
    drop_after: int | None = None
    """Close the socket after this many tokens."""
    malformed_after: int | None = None
    """Send an event whose data is not JSON after this many tokens."""
    stall_after: int | None = None
    """Send this many tokens, then nothing, with the socket left open."""
    error_after: int | None = None
    """Send an error object inside the stream after this many tokens."""
    sse_quirks: bool = False
    """Frame the stream the awkward legal ways: CRLF line ends, comment keep-alives,
    multi-line `data:` fields and `content: null` deltas."""
    raw_sse: bytes | None = None
    """Send exactly these bytes as a streamed response body (framing tests)."""
    echo_credentials: bool = False
    """Injected failures (statuses, error events) quote the request's API key, as some real
    servers do (credential-leak tests)."""


@dataclass
class ReplyPlan:
    """The tokens one request gets, per choice, and what to report about them."""

    tokens: list[list[str]]
    finish_reason: str
    """OpenAI-style: "stop" or "length"."""
    stop_sequence: str | None
    """The stop string that ended the reply, if one did."""
    prompt_tokens: int
    completion_tokens: int
    offset: int = 0
    """Tokens of the reply already written in the assistant turn this request continues."""


def message_text(content: Any) -> str:
    """The text of a message's content: a string or a list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            str(part.get("text", "")) for part in content if isinstance(part, dict)
        )
    return ""


def _reply_text(behavior: ModelBehavior, body: dict[str, Any]) -> str:
    if callable(behavior.reply):
        return behavior.reply(body)
    if behavior.reply != ECHO:
        return behavior.reply
    users = [m for m in body.get("messages", []) if m.get("role") == "user"]
    return message_text(users[-1].get("content")) if users else ""


def _continuing(behavior: ModelBehavior, body: dict[str, Any], anthropic: bool) -> str | None:
    """The assistant prefix to continue, if this request continues one."""
    messages = body.get("messages") or []
    if not messages or messages[-1].get("role") != "assistant":
        return None
    if anthropic or behavior.prefill or body.get("continue_final_message"):
        return message_text(messages[-1].get("content"))
    return None


def plan_reply(
    behavior: ModelBehavior, body: dict[str, Any], *, anthropic: bool = False
) -> ReplyPlan:
    """Decide the tokens for `body`: stop strings, continuation and max_tokens applied."""
    text = _reply_text(behavior, body)
    finish, hit = "stop", None
    stops = body.get("stop_sequences" if anthropic else "stop") or []
    for stop in [stops] if isinstance(stops, str) else stops:
        if stop and stop in text:
            text, hit = text[: text.index(stop)], stop
    prefix = _continuing(behavior, body, anthropic)
    offset = 0
    if prefix is not None:
        stripped = prefix.rstrip() if anthropic else prefix
        if text.startswith(stripped):
            text = text[len(stripped):]
            offset = len(TOKEN_RE.findall(stripped))
    tokens = TOKEN_RE.findall(text)
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    if isinstance(limit, int) and len(tokens) > limit:
        tokens, finish = tokens[:limit], "length"
    n = 1 if anthropic else int(body.get("n") or 1)
    prompt = sum(
        len(TOKEN_RE.findall(message_text(m.get("content")))) for m in body.get("messages", [])
    )
    if anthropic:
        prompt += len(TOKEN_RE.findall(message_text(body.get("system"))))
    return ReplyPlan(
        tokens=[list(tokens) for _ in range(n)],
        finish_reason=finish,
        stop_sequence=hit,
        prompt_tokens=behavior.prompt_tokens if behavior.prompt_tokens is not None else prompt,
        completion_tokens=(
            behavior.completion_tokens
            if behavior.completion_tokens is not None
            else len(tokens) * n
        ),
        offset=offset,
    )


def token_logprob(behavior: ModelBehavior, index: int) -> float:
    lp = behavior.logprob
    return float(lp(index) if callable(lp) else lp)
