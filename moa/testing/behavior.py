"""What a loopback model answers, how fast, and which fault it injects.

`plan_reply()` turns a request body into the tokens to send; both wire formats
(OpenAI chat completions and Anthropic messages) share it, so a behaviour means the
same thing on either endpoint.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from .gate import Gate

TOKEN_RE = re.compile(r"\s*\S+")
"""A loopback token: one word with its leading whitespace."""

ECHO = "echo"

PROMPT_HISTORY = 64
"""How many recent prompts per model the simulated prompt cache keeps."""

PromptToken = tuple[int, str, str]
"""A loopback prompt token with the position and role of its message (-1: Anthropic's
`system`), so two prompts share a prefix only message by message."""

CallSpec = dict[str, Any]
"""A tool call a loopback model makes: {"name": str, "arguments": dict | str, "id"?: str}."""


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
    cache_min_tokens: int = 32
    """Prompt caching as OpenAI reports it: a request's cached tokens are the longest prefix
    (in prompt tokens, message by message) it shares with one of the last `PROMPT_HISTORY`
    requests to the model, when that prefix has at least this many tokens (OpenAI: 1024)."""
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
    tool_calls: list[CallSpec] | Callable[[dict[str, Any]], list[CallSpec]] | None = None
    """Calls to make, each {"name": str, "arguments": dict | str} (optionally "id"; else
    `call_<serial>_<k>`, on Anthropic `toolu_<serial>_<k>`), or a function of the request body.
    Made when the request carries `tools`, its tool choice is not "none" and its last message
    is not a tool result (so turn 2 of an agent loop answers in text). A named tool choice
    keeps only that tool's calls; `parallel_tool_calls: false` (Anthropic
    `disable_parallel_tool_use`) keeps only the first. Any `reply` text goes out before the
    calls; the arguments stream in several pieces and count as completion tokens."""
    structured: Any = None
    """The answer to a request for structured output: on OpenAI a `response_format` of
    `json_object` / `json_schema` makes the reply text `json.dumps(structured)` (on a turn
    that makes no tool calls; with calls, `reply` goes before them); on Anthropic a
    `tool_choice` forcing a tool that `tool_calls` does not call makes one call of that tool
    with `structured` as its input (how the Anthropic provider asks for a format). Either way
    it is tokenised like a reply (`max_tokens` cuts it). None: the model ignores the format."""
    malformed_tool_call: bool = False
    """The first piece of the first tool call lacks its id and name (a broken tool stream)."""


@dataclass
class PlannedCall:
    """One tool call of a reply; `pieces` are its arguments JSON text as streamed."""

    id: str
    name: str
    pieces: list[str]

    @property
    def arguments(self) -> str:
        return "".join(self.pieces)


@dataclass
class ReplyPlan:
    """The tokens one request gets, per choice, and what to report about them.

    A streamed choice is a sequence of steps: its text tokens, then for each tool call a
    header (id and name) followed by its argument pieces.
    """

    tokens: list[list[str]]
    finish_reason: str
    """OpenAI-style: "stop", "length" or "tool_calls"."""
    stop_sequence: str | None
    """The stop string that ended the reply, if one did."""
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    """Prompt tokens read from the simulated prompt cache (a part of `prompt_tokens`)."""
    cache_write_tokens: int = 0
    """Prompt tokens written to it (Anthropic, up to the last `cache_control` breakpoint)."""
    offset: int = 0
    """Tokens of the reply already written in the assistant turn this request continues."""
    tool_calls: list[PlannedCall] = field(default_factory=list)
    """Sent after the text, in every choice."""

    def steps(self, index: int = 0) -> int:
        """How many steps choice `index` streams."""
        return len(self.tokens[index]) + sum(1 + len(c.pieces) for c in self.tool_calls)

    def call_step(self, step: int) -> tuple[int, int]:
        """(call, piece) of the `step`-th tool-call step; piece -1 is the call's header."""
        for k, call in enumerate(self.tool_calls):
            if step <= len(call.pieces):
                return k, step - 1
            step -= len(call.pieces) + 1
        raise IndexError(step)


def message_text(content: Any) -> str:
    """The text of a message's content: a string or a list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            str(part.get("text", "")) for part in content if isinstance(part, dict)
        )
    return ""


def _prompt_words(message: dict[str, Any]) -> list[str]:
    """Loopback prompt tokens of a message: its text, tool-call arguments and tool results."""
    parts = [message_text(message.get("content"))]
    for call in message.get("tool_calls") or []:
        parts.append(str((call.get("function") or {}).get("arguments") or ""))
    content = message.get("content")
    for block in content if isinstance(content, list) else []:
        if isinstance(block, dict) and block.get("type") == "tool_use":
            parts.append(json.dumps(block.get("input")))
        elif isinstance(block, dict) and block.get("type") == "tool_result":
            parts.append(message_text(block.get("content")))
    return [word for part in parts for word in TOKEN_RE.findall(part)]


def _marked(content: Any) -> bool:
    """Whether a content list carries a `cache_control` breakpoint."""
    return isinstance(content, list) and any(
        isinstance(block, dict) and "cache_control" in block for block in content
    )


def prompt_sequence(body: dict[str, Any], anthropic: bool) -> tuple[list[PromptToken], int]:
    """The request's prompt tokens in order (on Anthropic the system prompt first) and how
    many of them end at its last `cache_control` breakpoint (0 when it has none)."""
    sequence: list[PromptToken] = []
    marked = 0
    if anthropic:
        system = body.get("system")
        sequence += [(-1, "system", w) for w in TOKEN_RE.findall(message_text(system))]
        marked = len(sequence) if _marked(system) else 0
    for i, message in enumerate(body.get("messages") or []):
        sequence += [(i, str(message.get("role")), w) for w in _prompt_words(message)]
        marked = len(sequence) if _marked(message.get("content")) else marked
    return sequence, marked


def cached_prefix(sequence: list[PromptToken], history: Iterable[list[PromptToken]],
                  minimum: int) -> int:
    """The longest prefix `sequence` shares with a prompt of `history`; 0 below `minimum`."""
    best = 0
    for earlier in history:
        n = 0
        for a, b in zip(sequence, earlier, strict=False):
            if a != b:
                break
            n += 1
        best = max(best, n)
    return best if best >= max(minimum, 1) else 0


def _after_tool_result(body: dict[str, Any], anthropic: bool) -> bool:
    messages = body.get("messages") or []
    last = messages[-1] if messages else {}
    if not anthropic:
        return last.get("role") == "tool"
    content = last.get("content")
    return last.get("role") == "user" and isinstance(content, list) and any(
        isinstance(b, dict) and b.get("type") == "tool_result" for b in content
    )


def _plan_calls(
    behavior: ModelBehavior, body: dict[str, Any], anthropic: bool, serial: int
) -> tuple[list[PlannedCall], bool]:
    """The tool calls this request gets (before `max_tokens`), and whether the tool choice
    forces a call (then no text goes before the calls, as real models do)."""
    if not body.get("tools"):
        return [], False
    choice = body.get("tool_choice")
    if anthropic:
        choice = choice if isinstance(choice, dict) else {}
        kind = choice.get("type")
        forced = choice.get("name") if kind == "tool" else None
        single = bool(choice.get("disable_parallel_tool_use"))
    else:
        kind = choice if isinstance(choice, str) else None
        forced = (choice.get("function") or {}).get("name") if isinstance(choice, dict) else None
        single = body.get("parallel_tool_calls") is False
    forcing = forced is not None or kind in ("any", "required")
    if kind == "none" or (not forcing and _after_tool_result(body, anthropic)):
        return [], forcing
    wanted = behavior.tool_calls(body) if callable(behavior.tool_calls) else behavior.tool_calls
    wanted = list(wanted or [])
    if forced is not None:
        wanted = [c for c in wanted if c.get("name") == forced]
        if not wanted and anthropic and behavior.structured is not None:
            wanted = [{"name": forced, "arguments": behavior.structured}]
    if single:
        wanted = wanted[:1]
    prefix = "toolu" if anthropic else "call"
    calls = []
    for k, call in enumerate(wanted):
        arguments = call.get("arguments", {})
        text = arguments if isinstance(arguments, str) else json.dumps(arguments)
        calls.append(PlannedCall(str(call.get("id") or f"{prefix}_{serial}_{k}"),
                                 str(call["name"]), TOKEN_RE.findall(text)))
    return calls, forcing


def _format_requested(body: dict[str, Any]) -> bool:
    fmt = body.get("response_format")
    return isinstance(fmt, dict) and fmt.get("type") in ("json_object", "json_schema")


def _reply_text(behavior: ModelBehavior, body: dict[str, Any], formatted: bool) -> str:
    """The text to send; `formatted`: the answer is the structured output if one is asked."""
    if formatted and behavior.structured is not None and _format_requested(body):
        return json.dumps(behavior.structured)
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
    behavior: ModelBehavior, body: dict[str, Any], *, anthropic: bool = False, serial: int = 0
) -> ReplyPlan:
    """Decide the tokens for `body`: stop strings, continuation, tool calls and max_tokens
    applied (`serial` numbers generated call ids)."""
    calls, forcing = _plan_calls(behavior, body, anthropic, serial)
    text = "" if calls and forcing else _reply_text(behavior, body, not (anthropic or calls))
    finish, hit = "stop", None
    stops = body.get("stop_sequences" if anthropic else "stop") or []
    for stop in [stops] if isinstance(stops, str) else stops:
        if stop and stop in text:
            text, hit, calls = text[: text.index(stop)], stop, []
    prefix = _continuing(behavior, body, anthropic)
    offset = 0
    if prefix is not None:
        stripped = prefix.rstrip() if anthropic else prefix
        if text.startswith(stripped):
            text = text[len(stripped):]
            offset = len(TOKEN_RE.findall(stripped))
    tokens = TOKEN_RE.findall(text)
    if calls:
        finish = "tool_calls"
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    if isinstance(limit, int):
        if len(tokens) > limit:
            tokens, finish, calls = tokens[:limit], "length", []
        budget = limit - len(tokens)
        for k, call in enumerate(calls):
            if len(call.pieces) > budget:
                call.pieces, finish, calls = call.pieces[:budget], "length", calls[: k + 1]
                break
            budget -= len(call.pieces)
    n = 1 if anthropic else int(body.get("n") or 1)
    prompt = len(prompt_sequence(body, anthropic)[0])
    produced = len(tokens) + sum(len(c.pieces) for c in calls)
    return ReplyPlan(
        tokens=[list(tokens) for _ in range(n)],
        finish_reason=finish,
        stop_sequence=hit,
        prompt_tokens=behavior.prompt_tokens if behavior.prompt_tokens is not None else prompt,
        completion_tokens=(
            behavior.completion_tokens
            if behavior.completion_tokens is not None
            else produced * n
        ),
        offset=offset,
        tool_calls=calls,
    )


def token_logprob(behavior: ModelBehavior, index: int) -> float:
    lp = behavior.logprob
    return float(lp(index) if callable(lp) else lp)
