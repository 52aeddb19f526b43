"""The one async provider interface every backend implements, remote or embedded.

A backend implements `stream()`; `samples()` and `complete()` are built on it, so streaming
and non-streaming calls share one code path (retries, limits, accounting).
"""

from __future__ import annotations

import abc
import math
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import anyio

Message = dict[str, Any]
"""An OpenAI-style chat message: {"role": "system"|"user"|"assistant"|"tool", "content": str},
an assistant turn may carry OpenAI `tool_calls`, a tool turn its `tool_call_id`."""

Tool = dict[str, Any]
"""An OpenAI function tool: {"type": "function", "function": {"name", "description",
"parameters"}}."""

Waiting = Literal["queued", "prompt"]
"""Why a call streams nothing yet: it waits for its turn on the backend, or the backend
evaluates its prompt."""


@dataclass
class ChatRequest:
    """One chat call. `model` is the model name *without* the provider prefix."""

    model: str
    messages: list[Message]
    temperature: float | None = None
    max_tokens: int | None = None
    top_p: float | None = None
    stop: list[str] | None = None
    seed: int | None = None
    n: int = 1
    logprobs: bool = False
    top_logprobs: int | None = None
    continue_final: bool = False
    """The last message is an assistant prefix that the model must continue (not restart)."""
    tools: list[Tool] | None = None
    """Function tools the model may call (only the acting stage of a mixture gets them)."""
    tool_choice: str | dict[str, Any] | None = None
    """"auto", "none", "required" or {"type": "function", "function": {"name": ...}}."""
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    """OpenAI `response_format`: {"type": "json_object"} or {"type": "json_schema", ...}."""
    priority: int = 0
    """A mixture gives each call its stage's depth. Where a backend queues requests (the
    embedded llama.cpp engine), a continuation of higher priority is served first, so the
    final answer's staircase steps do not wait behind an earlier stage's. Not sent to remote
    APIs."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Provider-specific body fields passed through unchanged."""
    on_retry: Callable[[int, str], None] | None = field(default=None, repr=False, compare=False)
    """Called before each retried attempt of this call (HTTP providers retry failed attempts)
    with the number of the attempt about to start (2, 3, ...) and why the last one failed."""
    on_wait: Callable[[Waiting], None] | None = field(default=None, repr=False, compare=False)
    """Called by a backend that serves requests in turn when this call waits for its turn
    ("queued") and when its prompt evaluation starts ("prompt")."""


@dataclass
class Usage:
    prompt_tokens: int = 0
    """Every prompt token, cached ones included."""
    completion_tokens: int = 0
    cached_tokens: int = 0
    """Prompt tokens read from the backend's prompt cache (a part of `prompt_tokens`)."""
    cache_write_tokens: int = 0
    """Prompt tokens written to the backend's prompt cache, where it reports them (Anthropic);
    a part of `prompt_tokens`."""

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def uncached_prompt_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
            self.cached_tokens + other.cached_tokens,
            self.cache_write_tokens + other.cache_write_tokens,
        )


@dataclass
class TokenLogprob:
    token: str
    logprob: float
    top: list[tuple[str, float]] = field(default_factory=list)
    """The top-k alternatives (token, logprob) at this position, when asked for."""


@dataclass
class ToolCallDelta:
    """A piece of a streamed tool call, as OpenAI streams them: the first piece of call
    `index` carries its `id` and `name`, later pieces more of `arguments` (JSON text)."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass
class ToolCall:
    """A complete tool call; `arguments` is the JSON text the model wrote."""

    id: str
    name: str
    arguments: str = ""

    def as_message_part(self) -> dict[str, Any]:
        """The OpenAI `tool_calls` entry of an assistant message."""
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


def assemble_tool_calls(pieces: list[ToolCallDelta]) -> list[ToolCall]:
    """Join streamed tool-call pieces into complete calls, in index order."""
    calls: dict[int, ToolCall] = {}
    for piece in pieces:
        call = calls.setdefault(piece.index, ToolCall(id="", name=""))
        call.id = piece.id or call.id
        call.name = piece.name or call.name
        call.arguments += piece.arguments
    return [calls[i] for i in sorted(calls)]


@dataclass
class Delta:
    """One increment of a streamed reply.

    `index` is the choice index (n > 1). A delta may carry only text, only tool-call
    pieces, only a finish reason, or only usage (the final usage chunk of a stream).
    """

    text: str = ""
    index: int = 0
    finish_reason: str | None = None
    usage: Usage | None = None
    logprobs: list[TokenLogprob] | None = None
    tool_calls: list[ToolCallDelta] | None = None


@dataclass
class Completion:
    """A finished reply for one choice."""

    text: str
    finish_reason: str | None = None
    usage: Usage = field(default_factory=Usage)
    logprobs: list[TokenLogprob] | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do beyond plain chat."""

    continuation: bool = False
    """Can continue a final assistant message (needed by staircase streaming)."""
    logprobs: bool = False
    multi_sample: bool = False
    """Serves n > 1 in one request sharing the prompt's cache."""
    queued: bool = False
    """Serves requests in turn (an embedded engine): a request waiting for its turn or in a
    long prompt evaluation streams nothing, yet is busy, not stalled."""
    tools: bool = False
    """Honours `tools` / `tool_choice` and streams tool calls."""
    response_format: bool = False
    """Honours `response_format` (JSON object / JSON schema) natively."""


class Provider(abc.ABC):
    """A backend that serves chat calls. Instances are shared and safe to use concurrently."""

    name: str = "provider"
    capabilities: Capabilities = Capabilities()

    @abc.abstractmethod
    def stream(self, request: ChatRequest) -> AsyncIterator[Delta]:
        """Yield deltas as they arrive; raise a `moa.errors.ProviderError` on failure."""

    async def samples(self, request: ChatRequest) -> AsyncIterator[Delta]:
        """`stream()` for any `n`: the backend's own `n` where it has one (`multi_sample`),
        else `n` concurrent calls of one sample each (seeds `seed + i`), merged by index."""
        if request.n == 1 or self.capabilities.multi_sample:
            async for delta in self.stream(request):
                yield delta
            return
        send, receive = anyio.create_memory_object_stream[Delta | Exception](math.inf)

        async def one(index: int, out: anyio.abc.ObjectSendStream[Delta | Exception]) -> None:
            seed = None if request.seed is None else request.seed + index
            deltas = self.stream(replace(request, n=1, seed=seed))
            async with out:
                try:
                    async for delta in deltas:
                        out.send_nowait(replace(delta, index=index))
                except Exception as err:
                    out.send_nowait(err)
                finally:
                    with anyio.CancelScope(shield=True):
                        await deltas.aclose()  # type: ignore[attr-defined]

        # Entered by hand: a `yield` inside `async with` would turn an early `aclose()` into
        # an exception group.
        tg = anyio.create_task_group()
        await tg.__aenter__()
        try:
            async with send:
                for index in range(request.n):
                    tg.start_soon(one, index, send.clone())
            async with receive:
                async for item in receive:
                    if isinstance(item, Exception):
                        raise item
                    yield item
        finally:
            tg.cancel_scope.cancel()
            await tg.__aexit__(None, None, None)

    async def complete(self, request: ChatRequest) -> list[Completion]:
        """Run a call to the end and return one completion per choice (len == request.n)."""
        texts: dict[int, list[str]] = {i: [] for i in range(request.n)}
        finish: dict[int, str | None] = {}
        logprobs: dict[int, list[TokenLogprob]] = {}
        calls: dict[int, list[ToolCallDelta]] = {}
        usage = Usage()
        async for delta in self.samples(request):
            if delta.text:
                texts.setdefault(delta.index, []).append(delta.text)
            if delta.finish_reason:
                finish[delta.index] = delta.finish_reason
            if delta.logprobs:
                logprobs.setdefault(delta.index, []).extend(delta.logprobs)
            if delta.tool_calls:
                texts.setdefault(delta.index, [])
                calls.setdefault(delta.index, []).extend(delta.tool_calls)
            if delta.usage:
                usage = usage + delta.usage
        return [
            Completion(
                text="".join(texts[i]),
                finish_reason=finish.get(i),
                usage=usage if i == 0 else Usage(),
                logprobs=logprobs.get(i),
                tool_calls=assemble_tool_calls(calls.get(i, [])),
            )
            for i in sorted(texts)
        ]

    async def aclose(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Release connections or engine resources."""
