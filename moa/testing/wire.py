"""The bytes the loopback server sends: OpenAI chat completions and Anthropic messages.

Each `*Frames` class renders one request's reply as SSE events (streaming) or one JSON
document (non-streaming); the server decides when to send what and which fault to inject.
"""

from __future__ import annotations

import json
import time
from typing import Any

from .behavior import ModelBehavior, PlannedCall, ReplyPlan, token_logprob

INJECTED_ERROR = "loopback injected error"


def sse(data: Any, *, event: str | None = None, quirks: bool = False) -> bytes:
    """One SSE event; `quirks` uses CRLF, comments and a multi-line `data:` field."""
    text = data if isinstance(data, str) else json.dumps(data, indent=1 if quirks else None)
    lines = [": keep-alive"] if quirks else []
    if event:
        lines.append(f"event: {event}")
    lines.extend(f"data: {line}" for line in text.split("\n"))
    nl = "\r\n" if quirks else "\n"
    block = nl.join(lines) + nl + nl
    if quirks:
        block = f": ping{nl}{nl}" + block
    return block.encode()


class OpenAIFrames:
    """`/v1/chat/completions` replies."""

    def __init__(
        self, body: dict[str, Any], behavior: ModelBehavior, plan: ReplyPlan, serial: int
    ) -> None:
        self.body, self.behavior, self.plan = body, behavior, plan
        self.error_message = INJECTED_ERROR
        self.id = f"chatcmpl-loop-{serial}"
        self.model = str(body.get("model", ""))
        self.created = int(time.time())
        self.include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        self.top = int(body.get("top_logprobs") or 0) if body.get("logprobs") else -1
        self.malformed_call = False
        """The first tool call's first piece goes out without its id and name."""

    @property
    def quirks(self) -> bool:
        return self.behavior.sse_quirks

    def _logprobs(self, tokens: list[str], start: int) -> dict[str, Any] | None:
        if self.top < 0:
            return None
        content = []
        for offset, token in enumerate(tokens):
            lp = token_logprob(self.behavior, start + offset)
            alternatives = [(token, lp)] + [(f" alt{j}", lp - j) for j in range(1, self.top)]
            content.append(
                {
                    "token": token,
                    "logprob": lp,
                    "bytes": list(token.encode()),
                    "top_logprobs": [
                        {"token": t, "logprob": v, "bytes": list(t.encode())}
                        for t, v in alternatives[: self.top]
                    ],
                }
            )
        return {"content": content}

    def _usage(self) -> dict[str, Any]:
        p, c = self.plan.prompt_tokens, self.plan.completion_tokens
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
                "prompt_tokens_details": {"cached_tokens": self.plan.cached_tokens}}

    def _chunk(self, choices: list[dict[str, Any]]) -> bytes:
        chunk: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if self.include_usage:
            chunk["usage"] = None
        return sse(chunk, quirks=self.quirks)

    def start(self) -> bytes:
        content = None if self.quirks else ""
        return self._chunk(
            [
                {"index": i, "delta": {"role": "assistant", "content": content},
                 "logprobs": None, "finish_reason": None}
                for i in range(len(self.plan.tokens))
            ]
        )

    def _call_entry(self, k: int, call: PlannedCall) -> dict[str, Any]:
        """The first piece of tool call `k`: id, name and empty arguments."""
        if self.malformed_call and k == 0:
            return {"index": k, "type": "function", "function": {"arguments": ""}}
        return {"index": k, "id": call.id, "type": "function",
                "function": {"name": call.name, "arguments": ""}}

    def step(self, index: int, position: int) -> bytes:
        """Step `position` of choice `index`: a text token or a piece of a tool call."""
        tokens = self.plan.tokens[index]
        if position < len(tokens):
            token = tokens[position]
            return self._chunk(
                [{"index": index, "delta": {"content": token},
                  "logprobs": self._logprobs([token], position), "finish_reason": None}]
            )
        k, piece = self.plan.call_step(position - len(tokens))
        call = self.plan.tool_calls[k]
        entry = (self._call_entry(k, call) if piece < 0
                 else {"index": k, "function": {"arguments": call.pieces[piece]}})
        return self._chunk(
            [{"index": index, "delta": {"tool_calls": [entry]}, "logprobs": None,
              "finish_reason": None}]
        )

    def finish(self) -> bytes:
        out = self._chunk(
            [{"index": i, "delta": {}, "logprobs": None, "finish_reason": self.plan.finish_reason}
             for i in range(len(self.plan.tokens))]
        )
        if self.include_usage:
            usage = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                     "model": self.model, "choices": [], "usage": self._usage()}
            out += sse(usage, quirks=self.quirks)
        return out + sse("[DONE]", quirks=self.quirks)

    def malformed(self) -> bytes:
        return b'data: {"id": "broken", "choices": [{"delta": {"content": "x"\n\n'

    def error(self) -> bytes:
        error = {"error": {"message": self.error_message, "type": "server_error", "code": 500}}
        return sse(error, quirks=self.quirks) + sse("[DONE]", quirks=self.quirks)

    def document(self) -> dict[str, Any]:
        """The non-streaming response."""
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [
                {
                    "index": i,
                    "message": self._message(tokens),
                    "logprobs": self._logprobs(tokens, 0),
                    "finish_reason": self.plan.finish_reason,
                }
                for i, tokens in enumerate(self.plan.tokens)
            ],
            "usage": self._usage(),
        }

    def _message(self, tokens: list[str]) -> dict[str, Any]:
        calls = self.plan.tool_calls
        if not calls:
            return {"role": "assistant", "content": "".join(tokens)}
        parts = []
        for k, call in enumerate(calls):
            entry = self._call_entry(k, call)
            entry.pop("index")
            entry["function"]["arguments"] = call.arguments
            parts.append(entry)
        return {"role": "assistant", "content": "".join(tokens) or None, "tool_calls": parts}

    @staticmethod
    def error_document(status: int, message: str) -> dict[str, Any]:
        kind = "rate_limit_error" if status == 429 else (
            "server_error" if status >= 500 else "invalid_request_error"
        )
        return {"error": {"message": message, "type": kind, "code": status}}


_ANTHROPIC_ERRORS = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
    529: "overloaded_error",
}


class AnthropicFrames:
    """`/v1/messages` replies (Messages API; SSE event types as Anthropic sends them)."""

    def __init__(
        self, body: dict[str, Any], behavior: ModelBehavior, plan: ReplyPlan, serial: int
    ) -> None:
        self.body, self.behavior, self.plan = body, behavior, plan
        self.error_message = INJECTED_ERROR
        self.id = f"msg_loop_{serial}"
        self.model = str(body.get("model", ""))
        self.malformed_call = False
        """The first tool_use block starts without its id and name."""
        self.text_block = bool(plan.tokens[0]) or not plan.tool_calls
        """Whether the reply has a text block (index 0); tool_use blocks follow it."""

    @property
    def quirks(self) -> bool:
        return self.behavior.sse_quirks

    def _tool_block(self, k: int, call: PlannedCall, text: str) -> dict[str, Any]:
        try:
            arguments = json.loads(text) if text else {}
        except ValueError:
            arguments = {}  # cut by max_tokens
        if self.malformed_call and k == 0:
            return {"type": "tool_use", "input": arguments}
        return {"type": "tool_use", "id": call.id, "name": call.name, "input": arguments}

    def _event(self, payload: dict[str, Any]) -> bytes:
        return sse(payload, event=payload["type"], quirks=self.quirks)

    def _stop_reason(self) -> str:
        if self.plan.finish_reason == "length":
            return "max_tokens"
        if self.plan.finish_reason == "tool_calls":
            return "tool_use"
        return "stop_sequence" if self.plan.stop_sequence else "end_turn"

    def _message(self, content: list[dict[str, Any]], stop: str | None, out: int) -> dict:
        return {
            "id": self.id, "type": "message", "role": "assistant", "model": self.model,
            "content": content, "stop_reason": stop,
            "stop_sequence": self.plan.stop_sequence if stop else None,
            "usage": self._usage(out),
        }

    def _usage(self, out: int) -> dict[str, int]:
        """Anthropic's usage: `input_tokens` is the prompt neither read from nor written to
        the cache."""
        plan = self.plan
        fresh = plan.prompt_tokens - plan.cached_tokens - plan.cache_write_tokens
        return {"input_tokens": fresh, "cache_creation_input_tokens": plan.cache_write_tokens,
                "cache_read_input_tokens": plan.cached_tokens, "output_tokens": out}

    def start(self) -> bytes:
        out = self._event({"type": "message_start", "message": self._message([], None, 1)})
        if self.text_block:
            out += self._event({"type": "content_block_start", "index": 0,
                                "content_block": {"type": "text", "text": ""}})
        return out + self._event({"type": "ping"})

    def step(self, index: int, position: int) -> bytes:
        """Step `position` of the reply: a text token or a piece of a tool_use block."""
        tokens = self.plan.tokens[index]
        if position < len(tokens):
            return self._event({"type": "content_block_delta", "index": 0,
                                "delta": {"type": "text_delta", "text": tokens[position]}})
        k, piece = self.plan.call_step(position - len(tokens))
        block = k + self.text_block
        call = self.plan.tool_calls[k]
        if piece >= 0:
            return self._event({"type": "content_block_delta", "index": block,
                                "delta": {"type": "input_json_delta",
                                          "partial_json": call.pieces[piece]}})
        out = self._event({"type": "content_block_stop", "index": block - 1}) if block else b""
        return out + self._event({"type": "content_block_start", "index": block,
                                  "content_block": self._tool_block(k, call, "")})

    def finish(self) -> bytes:
        blocks = len(self.plan.tool_calls) + self.text_block
        return (
            self._event({"type": "content_block_stop", "index": blocks - 1})
            + self._event({"type": "message_delta",
                           "delta": {"stop_reason": self._stop_reason(),
                                     "stop_sequence": self.plan.stop_sequence},
                           "usage": {"output_tokens": self.plan.completion_tokens}})
            + self._event({"type": "message_stop"})
        )

    def malformed(self) -> bytes:
        return b"event: content_block_delta\ndata: {\"type\": \"content_block_delta\", \n\n"

    def error(self) -> bytes:
        return self._event(
            {"type": "error", "error": {"type": "overloaded_error", "message": self.error_message}}
        )

    def document(self) -> dict[str, Any]:
        text = "".join(self.plan.tokens[0])
        content = [{"type": "text", "text": text}] if self.text_block else []
        content += [self._tool_block(k, call, call.arguments)
                    for k, call in enumerate(self.plan.tool_calls)]
        return self._message(content, self._stop_reason(), self.plan.completion_tokens)

    @staticmethod
    def error_document(status: int, message: str) -> dict[str, Any]:
        kind = _ANTHROPIC_ERRORS.get(status, "api_error")
        return {"type": "error", "error": {"type": kind, "message": message}}
