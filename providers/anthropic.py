"""Anthropic Messages API (`POST /v1/messages`, streaming) over httpx.

System messages go to the `system` field; a final assistant message is continued
natively (prefill), so `continue_final` needs no server option. `spec.options` understood
here: `version` (the `anthropic-version` header), `max_tokens` (sent when a request has
none; the API requires one), `cache_control` (default true, see below) and `headers` (extra
headers).

Prompt caching: the stable prefix of a request gets `cache_control: {"type": "ephemeral"}`
breakpoints, on the system prompt and on the last message before the final user turn (what
the next call of the same conversation, or an aggregator reading it, sends again), within the
API's 4 breakpoints. The usage's `cache_read_input_tokens` become `Usage.cached_tokens` and its
`cache_creation_input_tokens` `Usage.cache_write_tokens`; `prompt_tokens` is the sum of both
and `input_tokens` (the uncached rest). `cache_control = false` sends no breakpoints.

Tools: OpenAI function tools become Anthropic `tools` ({name, description, input_schema});
`tool_choice` "auto"/"required"/"none"/named becomes {"type": "auto"/"any"/"none"/"tool"},
with `disable_parallel_tool_use` when `parallel_tool_calls` is false. Assistant `tool_calls`
become `tool_use` blocks and consecutive `tool` messages one user message of `tool_result`
blocks. Streamed `tool_use` blocks come back as `ToolCallDelta`s numbered from 0.

`response_format` has no native equivalent; it becomes a *format tool* named after the
schema (`json_schema.name`, else "response") whose input schema is the JSON schema
(`{"type": "object"}` for `json_object`). Without tools, or with `tool_choice` "none", the
format tool is forced; with tools and `tool_choice` "auto" (or unset) it is offered beside
them, and the model picks; when `tool_choice` forces a call (required or named), it is left
out. The format tool's input streams back as the reply *text* (finish "stop"), never as a
tool call.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from pydantic import SecretStr

from moa.errors import ProviderError

from ._lean import ServerSentEvent
from .base import Capabilities, ChatRequest, Delta, Message, Tool, ToolCallDelta, Usage
from .fastjson import loads
from .http import HttpProvider
from .registry import ProviderSpec
from .secrets import Secrets, excerpt

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


FORMAT_DESCRIPTION = "Give your final answer as this tool's input, in the required format."

TOOL_CHOICES = {"auto": "auto", "required": "any", "none": "none"}
"""OpenAI tool_choice strings -> Anthropic tool_choice types."""

USAGE_KEYS = ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens",
              "output_tokens")
"""The counts of an Anthropic `usage` object: uncached input, cache writes, cache reads, output."""
MAX_BREAKPOINTS = 4
"""The most `cache_control` blocks one request may carry."""


def _cached(content: Any) -> list[dict[str, Any]] | None:
    """`content` with a cache breakpoint on its last block; None when it has no block."""
    if isinstance(content, str) and content:
        content = [{"type": "text", "text": content}]
    if isinstance(content, list) and content and isinstance(content[-1], dict):
        return [*content[:-1], {**content[-1], "cache_control": {"type": "ephemeral"}}]
    return None


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

    def __init__(
        self, provider: str, model: str, skip_space: int = 0, format_tool: str | None = None,
        secrets: Secrets = (),
    ) -> None:
        self.provider, self.model = provider, model
        self.secrets = secrets
        """Redacted from the upstream text quoted in an error, before it is cut."""
        self.stopped = False
        self.usage = Usage()
        self._counts = dict.fromkeys(USAGE_KEYS, 0)
        self._skip = skip_space
        self._format_tool = format_tool
        self._blocks: dict[int, int | None] = {}
        """Content block index -> tool-call index (None: the format tool, read as text)."""
        self._calls = 0

    @property
    def complete(self) -> bool:
        return self.stopped

    def _error(self, error: Any) -> ProviderError:
        error = error if isinstance(error, dict) else {}
        kind = str(error.get("type") or "api_error")
        status = ERROR_STATUS.get(kind)
        message = excerpt(str(error.get("message") or kind), 300, *self.secrets)
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
            data = loads(event.data) if event.data.strip() else {}
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise ProviderError(
                f"{self.provider}/{self.model}: the server sent malformed stream data "
                f"(not a JSON object): {excerpt(event.data, 60, *self.secrets)!r}",
                provider=self.provider, model=self.model,
            )
        kind = data.get("type") or event.event
        if kind == "error":
            raise self._error(data.get("error"))
        if kind == "message_start":
            self._count((data.get("message") or {}).get("usage"))
        elif kind == "content_block_start":
            return self._block_start(data)
        elif kind == "content_block_delta":
            delta = data.get("delta") or {}
            if delta.get("type") == "text_delta" and (text := self._trim(delta.get("text", ""))):
                return [Delta(text=text)]
            if delta.get("type") == "input_json_delta" and data.get("index") in self._blocks:
                return self._arguments(self._blocks[data["index"]], delta.get("partial_json"))
        elif kind == "message_delta":
            self._count(data.get("usage"))
            reason = (data.get("delta") or {}).get("stop_reason")
            if reason == "tool_use" and not self._calls:
                reason = "end_turn"  # only the format tool was called: its input is the answer
            finish = STOP_REASONS.get(reason, reason) if reason else None
            return [Delta(finish_reason=finish, usage=self.usage)]
        elif kind == "message_stop":
            self.stopped = True
        return []

    def end(self) -> list[Delta]:
        return []

    def _count(self, usage: Any) -> None:
        """Fold in a `usage` object; the counts it has replace earlier ones (message_delta's
        are cumulative). The prompt is the uncached input plus cache writes and reads."""
        if isinstance(usage, dict):
            self._counts.update({k: int(usage[k]) for k in USAGE_KEYS if usage.get(k) is not None})
        fresh, write, read, out = (self._counts[k] for k in USAGE_KEYS)
        self.usage = Usage(fresh + write + read, out, cached_tokens=read, cache_write_tokens=write)

    def _block_start(self, data: dict[str, Any]) -> list[Delta]:
        block = data.get("content_block")
        if not isinstance(block, dict) or block.get("type") != "tool_use":
            return []
        call_id, name = block.get("id"), block.get("name")
        if not call_id or not name or not isinstance(data.get("index"), int):
            raise ProviderError(
                f"{self.provider}/{self.model}: the server sent a malformed tool-call stream "
                "(a tool_use block began without an id and a name): "
                f"{excerpt(json.dumps(block), 80, *self.secrets)}",
                provider=self.provider, model=self.model,
            )
        call = None if name == self._format_tool else self._calls
        self._blocks[data["index"]] = call
        initial = block.get("input")
        arguments = json.dumps(initial) if isinstance(initial, dict) and initial else ""
        if call is None:
            return self._arguments(None, arguments)
        self._calls += 1
        return [Delta(tool_calls=[ToolCallDelta(call, str(call_id), str(name), arguments)])]

    @staticmethod
    def _arguments(call: int | None, piece: Any) -> list[Delta]:
        if not isinstance(piece, str) or not piece:
            return []
        if call is None:
            return [Delta(text=piece)]
        return [Delta(tool_calls=[ToolCallDelta(call, arguments=piece)])]


class AnthropicProvider(HttpProvider):
    """Claude models through the Messages API."""

    capabilities = Capabilities(continuation=True, logprobs=False, multi_sample=False,
                                tools=True, response_format=True)

    def __init__(self, spec: ProviderSpec, api_key: SecretStr | None) -> None:
        self._version = str(spec.options.get("version", API_VERSION))
        super().__init__(spec, api_key)
        self._max_tokens = int(spec.options.get("max_tokens", DEFAULT_MAX_TOKENS))  # type: ignore[call-overload]
        self._cache_control = bool(spec.options.get("cache_control", True))

    def _fail(self, request: ChatRequest, message: str) -> ProviderError:
        return ProviderError(f"{self.name}/{request.model}: {message}",
                             provider=self.name, model=request.model)

    def body(self, request: ChatRequest) -> tuple[dict[str, Any], int, str | None]:
        """The JSON body for `request`, the whitespace cut from the end of a prefill, and
        the name of the format tool standing in for `response_format` (if one is sent)."""
        if request.n != 1:
            raise self._fail(request, "the Messages API serves one reply per call (n must be 1).")
        system = "\n\n".join(_text(m.get("content")) for m in request.messages
                             if m.get("role") == "system")
        messages = self._messages(request)
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
        format_tool = self._add_tools(request, body)
        if self._cache_control:
            self._mark_prefix(body)
        body.update(request.extra)
        return body, cut, format_tool

    @staticmethod
    def _mark_prefix(body: dict[str, Any]) -> None:
        """Cache breakpoints on the system prompt and on the last message before the final
        user turn, as many as fit beside those the messages already carry."""
        messages = body["messages"]
        room = MAX_BREAKPOINTS - sum(
            isinstance(block, dict) and "cache_control" in block
            for message in messages if isinstance(message.get("content"), list)
            for block in message["content"]
        )
        if room > 0 and (system := _cached(body.get("system"))):
            body["system"], room = system, room - 1
        users = [i for i, message in enumerate(messages) if message.get("role") == "user"]
        before = users[-1] - 1 if users else -1
        if room > 0 and before >= 0 and (content := _cached(messages[before].get("content"))):
            messages[before] = {**messages[before], "content": content}

    def _messages(self, request: ChatRequest) -> list[Message]:
        """Non-system messages; tool calls and results as Anthropic content blocks."""
        messages: list[Message] = []
        previous = None
        for message in request.messages:
            role = message.get("role")
            if role == "system":
                continue
            if role == "tool":
                result = {"type": "tool_result", "tool_use_id": message.get("tool_call_id"),
                          "content": _text(message.get("content"))}
                if previous == "tool":
                    messages[-1]["content"].append(result)
                else:
                    messages.append({"role": "user", "content": [result]})
            elif role == "assistant" and message.get("tool_calls"):
                text = _text(message.get("content"))
                blocks = [{"type": "text", "text": text}] if text else []
                blocks += [self._tool_use(request, call) for call in message["tool_calls"]]
                messages.append({"role": "assistant", "content": blocks})
            else:
                messages.append(dict(message))
            previous = role
        return messages

    def _tool_use(self, request: ChatRequest, call: dict[str, Any]) -> dict[str, Any]:
        function = call.get("function") or {}
        try:
            arguments = json.loads(function.get("arguments") or "{}")
        except ValueError:
            arguments = None
        if not isinstance(arguments, dict):
            raise self._fail(request, f"the arguments of tool call {call.get('id')!r} are not "
                                      "a JSON object (Anthropic needs one).")
        return {"type": "tool_use", "id": call.get("id"), "name": function.get("name"),
                "input": arguments}

    def _add_tools(self, request: ChatRequest, body: dict[str, Any]) -> str | None:
        """Put tools, tool_choice and the format tool into `body`; the format tool's name."""
        tools = [self._tool(request, tool) for tool in request.tools or []]
        choice = request.tool_choice
        fmt = self._format_tool(request)
        if fmt is not None:
            if any(tool["name"] == fmt["name"] for tool in tools):
                raise self._fail(request, f"the response format {fmt['name']!r} has the name "
                                          "of a tool; rename one of them.")
            if not tools or choice == "none":
                choice = {"type": "function", "function": {"name": fmt["name"]}}
            elif choice not in (None, "auto"):
                fmt = None  # a call is forced this turn: the format applies to a later one
        if fmt is not None:
            tools.append(fmt)
        if not tools:
            return None
        body["tools"] = tools
        mapped = self._tool_choice(request, choice)
        if mapped is not None:
            body["tool_choice"] = mapped
        return fmt["name"] if fmt else None

    def _tool(self, request: ChatRequest, tool: Tool) -> dict[str, Any]:
        function = tool.get("function") if tool.get("type") == "function" else None
        if not isinstance(function, dict) or not function.get("name"):
            raise self._fail(request, "only function tools with a name can be sent "
                                      f"(got {json.dumps(tool)[:60]}).")
        out = {"name": function["name"],
               "input_schema": function.get("parameters") or {"type": "object", "properties": {}}}
        if function.get("description"):
            out["description"] = function["description"]
        return out

    def _tool_choice(self, request: ChatRequest, choice: Any) -> dict[str, Any] | None:
        if isinstance(choice, str) and choice in TOOL_CHOICES:
            mapped = {"type": TOOL_CHOICES[choice]}
        elif isinstance(choice, dict) and (choice.get("function") or {}).get("name"):
            mapped = {"type": "tool", "name": choice["function"]["name"]}
        elif choice is None:
            mapped = {"type": "auto"} if request.parallel_tool_calls is False else None
        else:
            raise self._fail(request, f"tool_choice {choice!r} is not understood.")
        if mapped is not None and request.parallel_tool_calls is False and mapped["type"] != "none":
            mapped["disable_parallel_tool_use"] = True
        return mapped

    def _format_tool(self, request: ChatRequest) -> dict[str, Any] | None:
        """The tool that stands in for `response_format` (None for plain text)."""
        fmt = request.response_format
        kind = fmt.get("type") if fmt else "text"
        if kind == "text":
            return None
        if kind == "json_object":
            name, schema = "response", {"type": "object"}
        elif kind == "json_schema":
            spec = (fmt or {}).get("json_schema") or {}
            name, schema = spec.get("name") or "response", spec.get("schema") or {"type": "object"}
        else:
            raise self._fail(request, f"response_format type {kind!r} is not understood.")
        return {"name": name, "description": FORMAT_DESCRIPTION, "input_schema": schema}

    def auth_headers(self, key: str) -> dict[str, str]:
        headers = {"anthropic-version": self._version}
        if key:
            headers["x-api-key"] = key
        return headers

    def stream(self, request: ChatRequest) -> AsyncIterator[Delta]:
        body, cut, format_tool = self.body(request)
        return self.post_stream(
            "/v1/messages",
            request.model,
            body,
            lambda: AnthropicEventDecoder(self.name, request.model, cut, format_tool,
                                          self.secrets),
            request.on_retry,
        )
