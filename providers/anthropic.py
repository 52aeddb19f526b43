"""Anthropic Messages API (`POST /v1/messages`, streaming) over httpx.

System messages go to the `system` field; a final assistant message is continued
natively (prefill), so `continue_final` needs no server option. `spec.options` understood
here: `version` (the `anthropic-version` header), `max_tokens` (sent when a request has
none; the API requires one) and `headers` (extra headers).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from httpx_sse import ServerSentEvent
from pydantic import SecretStr

from moa.errors import ProviderError

from .base import Capabilities, ChatRequest, Delta, Message, Usage
from .http import HttpProvider
from .registry import ProviderSpec

API_VERSION = "2023-06-01"
DEFAULT_MAX_TOKENS = 4096

STOP_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
"""Anthropic stop reasons -> OpenAI-style finish reasons."""

ERROR_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "overloaded_error": 529,
}
"""Anthropic error types -> the HTTP status Anthropic uses for them."""


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


class AnthropicEventDecoder:
    """Messages SSE events -> deltas.

    `skip_space` is how many whitespace characters were cut from the end of a prefill
    (the API rejects trailing whitespace); as many are dropped from the continuation's start.
    """

    def __init__(self, provider: str, model: str, skip_space: int = 0) -> None:
        self.provider, self.model = provider, model
        self.stopped = False
        self.usage = Usage()
        self._skip = skip_space

    @property
    def complete(self) -> bool:
        return self.stopped

    def _error(self, error: Any) -> ProviderError:
        error = error if isinstance(error, dict) else {}
        kind = str(error.get("type") or "api_error")
        status = ERROR_STATUS.get(kind)
        message = str(error.get("message") or kind)[:300]
        return ProviderError(
            f"{self.provider}/{self.model}: the server sent an error inside the stream: "
            f"{message}",
            provider=self.provider, model=self.model, status=status,
            retryable=status is not None and (status == 429 or status >= 500),
        )

    def _trim(self, text: str) -> str:
        while self._skip and text and text[0].isspace():
            text, self._skip = text[1:], self._skip - 1
        if text:
            self._skip = 0
        return text

    def feed(self, event: ServerSentEvent) -> list[Delta]:
        try:
            data = json.loads(event.data) if event.data.strip() else {}
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise ProviderError(
                f"{self.provider}/{self.model}: the server sent malformed stream data "
                f"(not a JSON object): {event.data[:60]!r}",
                provider=self.provider, model=self.model,
            )
        kind = data.get("type") or event.event
        if kind == "error":
            raise self._error(data.get("error"))
        if kind == "message_start":
            usage = (data.get("message") or {}).get("usage") or {}
            self.usage = Usage(
                sum(int(usage.get(k) or 0) for k in
                    ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")),
                int(usage.get("output_tokens") or 0),
            )
        elif kind == "content_block_delta":
            delta = data.get("delta") or {}
            if delta.get("type") == "text_delta" and (text := self._trim(delta.get("text", ""))):
                return [Delta(text=text)]
        elif kind == "message_delta":
            usage = data.get("usage") or {}
            if usage.get("output_tokens") is not None:
                self.usage.completion_tokens = int(usage["output_tokens"])
            if usage.get("input_tokens") is not None:
                self.usage.prompt_tokens = int(usage["input_tokens"])
            reason = (data.get("delta") or {}).get("stop_reason")
            finish = STOP_REASONS.get(reason, reason) if reason else None
            return [Delta(finish_reason=finish, usage=self.usage)]
        elif kind == "message_stop":
            self.stopped = True
        return []

    def end(self) -> list[Delta]:
        return []


class AnthropicProvider(HttpProvider):
    """Claude models through the Messages API."""

    capabilities = Capabilities(continuation=True, logprobs=False, multi_sample=False)

    def __init__(self, spec: ProviderSpec, api_key: SecretStr | None) -> None:
        super().__init__(spec, api_key)
        self._version = str(spec.options.get("version", API_VERSION))
        self._max_tokens = int(spec.options.get("max_tokens", DEFAULT_MAX_TOKENS))  # type: ignore[call-overload]

    def _fail(self, request: ChatRequest, message: str) -> ProviderError:
        return ProviderError(f"{self.name}/{request.model}: {message}",
                             provider=self.name, model=request.model)

    def body(self, request: ChatRequest) -> tuple[dict[str, Any], int]:
        """The JSON body for `request`, and the whitespace cut from the end of a prefill."""
        if request.n != 1:
            raise self._fail(request, "the Messages API serves one reply per call (n must be 1).")
        system = "\n\n".join(_text(m.get("content")) for m in request.messages
                             if m.get("role") == "system")
        messages: list[Message] = [dict(m) for m in request.messages if m.get("role") != "system"]
        cut = 0
        if request.continue_final:
            if not messages or messages[-1].get("role") != "assistant":
                raise self._fail(request, "continue_final needs a final assistant message.")
            prefix = _text(messages[-1].get("content"))
            cut = len(prefix) - len(prefix.rstrip())
            messages[-1] = {"role": "assistant", "content": prefix.rstrip()}
        body: dict[str, Any] = {
            "model": request.model,
            "messages": messages,
            "max_tokens": request.max_tokens or self._max_tokens,
            "stream": True,
        }
        if system:
            body["system"] = system
        if request.temperature is not None:
            body["temperature"] = request.temperature
        if request.top_p is not None:
            body["top_p"] = request.top_p
        if request.stop:
            body["stop_sequences"] = request.stop
        body.update(request.extra)
        return body, cut

    def auth_headers(self, key: str) -> dict[str, str]:
        headers = {"anthropic-version": self._version}
        if key:
            headers["x-api-key"] = key
        return headers

    def stream(self, request: ChatRequest) -> AsyncIterator[Delta]:
        body, cut = self.body(request)
        return self.post_stream(
            "/v1/messages",
            request.model,
            body,
            lambda: AnthropicEventDecoder(self.name, request.model, cut),
            request.on_retry,
        )
