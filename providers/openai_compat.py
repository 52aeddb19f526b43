"""OpenAI-compatible chat completions over httpx: OpenAI, Together, Groq, Fireworks,
DeepInfra, OpenRouter, DeepSeek, Mistral and local servers (vLLM, llama.cpp, Ollama,
LM Studio).

`spec.options` understood here: `continuation` ("vllm" sends `continue_final_message`,
"prefill" sends a final assistant message as is), `logprobs`, `multi_sample`, `tools` and
`response_format` (booleans, default true: what the server supports; a request using a
switched-off feature is refused), `stream_usage` (default true: ask for a usage chunk with
`stream_options.include_usage`) and `headers` (extra headers).

Tools pass through as OpenAI defines them: `tools`, `tool_choice`, `parallel_tool_calls`
and `response_format` go into the body as given, assistant `tool_calls` and `tool`
messages are sent verbatim, and streamed `delta.tool_calls` come back as `ToolCallDelta`s.

The usage's `prompt_tokens_details.cached_tokens` (prompt tokens served from the server's
prompt cache) becomes `Usage.cached_tokens`.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from pydantic import SecretStr

from moa.errors import ConfigError, ProviderError

from ._lean import ServerSentEvent
from .base import Capabilities, ChatRequest, Delta, TokenLogprob, ToolCallDelta, Usage
from .fastjson import loads
from .http import HttpProvider, retryable_status
from .registry import ProviderSpec
from .secrets import Secrets, excerpt

CONTINUATION_MODES = ("vllm", "prefill")
_EMPTY: dict[str, Any] = {}
_RETRYABLE_ERROR_TYPES = frozenset({"server_error", "rate_limit_error", "overloaded_error",
                                    "api_error", "timeout"})


def parse_logprobs(payload: Any) -> list[TokenLogprob] | None:
    """`choice.logprobs.content` as `TokenLogprob`s (with the top alternatives)."""
    content = payload.get("content") if isinstance(payload, dict) else None
    if not content:
        return None
    out = []
    for entry in content:
        if not isinstance(entry, dict) or "token" not in entry:
            continue
        top = [
            (str(alt["token"]), float(alt["logprob"]))
            for alt in entry.get("top_logprobs") or []
            if isinstance(alt, dict) and "token" in alt
        ]
        out.append(TokenLogprob(str(entry["token"]), float(entry.get("logprob", 0.0)), top))
    return out or None


def parse_usage(usage: dict[str, Any]) -> Usage:
    """An OpenAI `usage` object (a streamed final chunk's or a response body's): cached
    prompt tokens from `prompt_tokens_details.cached_tokens`, or DeepSeek's
    `prompt_cache_hit_tokens`."""
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    if cached is None:
        cached = usage.get("prompt_cache_hit_tokens")
    return Usage(int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0),
                 cached_tokens=int(cached or 0))


def stream_error(who: str, error: Any, *, provider: str, model: str,
                 secrets: Secrets = ()) -> ProviderError:
    """A `ProviderError` for an error object sent inside a stream (`secrets` redacted)."""
    if isinstance(error, dict):
        message = str(error.get("message") or error.get("type") or "unknown error")
        code, kind = error.get("code"), str(error.get("type") or "")
    else:
        message, code, kind = str(error), None, ""
    status = code if isinstance(code, int) else None
    retryable = retryable_status(status) if status else kind in _RETRYABLE_ERROR_TYPES
    return ProviderError(
        f"{who}: the server sent an error inside the stream: {excerpt(message, 300, *secrets)}",
        provider=provider, model=model, status=status, retryable=retryable,
    )


class OpenAIChunkDecoder:
    """Chat-completion chunks -> deltas; the usage is reported once, at the end."""

    def __init__(self, provider: str, model: str, secrets: Secrets = ()) -> None:
        self.provider, self.model = provider, model
        self.secrets = secrets
        """Redacted from the upstream text quoted in an error, before it is cut."""
        self.done = False
        self.finished = False
        self._usage: Usage | None = None
        self._calls: set[tuple[int, int]] = set()
        """(choice, call index) of the tool calls begun so far."""

    def _tool_calls(self, choice: int, entries: Any) -> list[ToolCallDelta] | None:
        """`delta.tool_calls` as pieces; a call must begin with its id and function name."""
        if not entries:
            return None
        pieces = []
        for position, entry in enumerate(entries if isinstance(entries, list) else [entries]):
            if not isinstance(entry, dict):
                raise self._malformed_call(entry)
            index = entry.get("index", position)
            function = entry.get("function")
            function = function if isinstance(function, dict) else {}
            call_id, name = entry.get("id"), function.get("name")
            if not isinstance(index, int) or (
                (choice, index) not in self._calls and not (call_id and name)
            ):
                raise self._malformed_call(entry)
            self._calls.add((choice, index))
            arguments = function.get("arguments") or ""
            if not isinstance(arguments, str):  # some servers send the arguments as an object
                arguments = json.dumps(arguments)
            pieces.append(ToolCallDelta(index, str(call_id) if call_id else None,
                                        str(name) if name else None, arguments))
        return pieces

    def _malformed_call(self, entry: Any) -> ProviderError:
        return ProviderError(
            f"{self.provider}/{self.model}: the server sent a malformed tool-call stream "
            "(a call began without an id and a function name): "
            f"{excerpt(json.dumps(entry), 80, *self.secrets)}",
            provider=self.provider, model=self.model,
        )

    @property
    def complete(self) -> bool:
        return self.done or self.finished

    def _flush_usage(self) -> list[Delta]:
        usage, self._usage = self._usage, None
        return [Delta(usage=usage)] if usage else []

    def feed(self, event: ServerSentEvent) -> list[Delta]:
        data = event.data
        if not data or data.isspace():
            return []
        try:
            chunk = loads(data)
        except ValueError:
            chunk = None
        if not isinstance(chunk, dict):
            if data.strip() == "[DONE]":  # once per stream: not worth a check before parsing
                self.done = True
                return self._flush_usage()
            raise ProviderError(
                f"{self.provider}/{self.model}: the server sent malformed stream data (not a "
                f"JSON object): {excerpt(data.strip(), 60, *self.secrets)!r}",
                provider=self.provider, model=self.model,
            )
        get = chunk.get
        if get("error") or get("object") == "error" or event.event == "error":
            raise stream_error(f"{self.provider}/{self.model}", get("error") or chunk,
                               provider=self.provider, model=self.model, secrets=self.secrets)
        deltas = []
        for choice in get("choices") or ():
            delta = choice.get("delta") or _EMPTY
            text = delta.get("content") or ""
            finish = choice.get("finish_reason")
            logprobs = choice.get("logprobs")
            calls = delta.get("tool_calls")
            if not (logprobs or calls):  # a plain token: the common case, no further parsing
                if finish:
                    self.finished = True
                if text or finish:
                    deltas.append(Delta(text, int(choice.get("index") or 0), finish))
                continue
            index = int(choice.get("index") or 0)
            logprobs = parse_logprobs(logprobs)
            calls = self._tool_calls(index, calls)
            if finish:
                self.finished = True
            if text or finish or logprobs or calls:
                deltas.append(Delta(text, index, finish, None, logprobs, calls))
        usage = get("usage") or (get("x_groq") or _EMPTY).get("usage")
        if isinstance(usage, dict):
            self._usage = parse_usage(usage)
        return deltas

    def end(self) -> list[Delta]:
        return self._flush_usage()


class OpenAICompatProvider(HttpProvider):
    """A `/chat/completions` server reached over HTTP (streaming, SSE)."""

    def __init__(self, spec: ProviderSpec, api_key: SecretStr | None) -> None:
        super().__init__(spec, api_key)
        mode = spec.options.get("continuation")
        if mode is not None and mode not in CONTINUATION_MODES:
            raise ConfigError(
                f"Provider {spec.prefix!r}: continuation must be one of "
                f"{', '.join(CONTINUATION_MODES)}, not {mode!r}."
            )
        self.continuation: str | None = mode  # type: ignore[assignment]
        self.capabilities = Capabilities(
            continuation=mode is not None,
            logprobs=bool(spec.options.get("logprobs", True)),
            multi_sample=bool(spec.options.get("multi_sample", True)),
            tools=bool(spec.options.get("tools", True)),
            response_format=bool(spec.options.get("response_format", True)),
        )
        self._stream_usage = bool(spec.options.get("stream_usage", True))

    def body(self, request: ChatRequest) -> dict[str, Any]:
        """The JSON body sent for `request`."""
        if request.continue_final:
            if self.continuation is None:
                raise ProviderError(
                    f"{self.name}/{request.model}: this server cannot continue an assistant "
                    "message (set options.continuation to 'vllm' or 'prefill' if it can).",
                    provider=self.name, model=request.model,
                )
            if not request.messages or request.messages[-1].get("role") != "assistant":
                raise ProviderError(
                    f"{self.name}/{request.model}: continue_final needs a final assistant "
                    "message.",
                    provider=self.name, model=request.model,
                )
        for feature in ("tools", "response_format"):
            if getattr(request, feature) and not getattr(self.capabilities, feature):
                raise ProviderError(
                    f"{self.name}/{request.model}: this server does not support {feature} "
                    f"(options.{feature} is false).",
                    provider=self.name, model=request.model,
                )
        body: dict[str, Any] = {
            "model": request.model,
            "messages": request.messages,
            "stream": True,
        }
        if self._stream_usage:
            body["stream_options"] = {"include_usage": True}
        optional = {
            "temperature": request.temperature,
            "max_tokens": request.max_tokens,
            "top_p": request.top_p,
            "stop": request.stop,
            "seed": request.seed,
            "tools": request.tools or None,
            "tool_choice": request.tool_choice,
            "parallel_tool_calls": request.parallel_tool_calls,
            "response_format": request.response_format,
        }
        body.update({k: v for k, v in optional.items() if v is not None})
        if request.n != 1:
            body["n"] = request.n
        if request.logprobs:
            body["logprobs"] = True
            if request.top_logprobs is not None:
                body["top_logprobs"] = request.top_logprobs
        if request.continue_final and self.continuation == "vllm":
            body["continue_final_message"] = True
            body["add_generation_prompt"] = False
        body.update(request.extra)
        return body

    def auth_headers(self, key: str) -> dict[str, str]:
        return {"authorization": f"Bearer {key}"} if key else {}

    def stream(self, request: ChatRequest) -> AsyncIterator[Delta]:
        return self.post_stream(
            "/chat/completions",
            request.model,
            self.body(request),
            lambda: OpenAIChunkDecoder(self.name, request.model, self.secrets),
            request.on_retry,
        )
