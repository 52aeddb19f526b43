"""The OpenAI chat-completions wire format of mixtures, shared by the wrapper and the server.

`parse_request` validates a request body (every field is honoured or rejected, never dropped);
`completion` and `ChunkStream` turn a run into the `chat.completion` object or the
`chat.completion.chunk` events the official SDK parses.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from moa.config import MAX_SAMPLES, MAX_TOKENS
from moa.errors import (
    BudgetExceeded,
    ConfigError,
    DeadlineExceeded,
    MissingKeyError,
    MoaError,
    QuotaExceeded,
    StateUnavailable,
    StructuredOutputError,
    UnsupportedRequest,
)
from moa.events import Event, FinalDelta, FinalToolCallDelta, RunFinished
from moa.providers.base import TokenLogprob, ToolCallDelta
from moa.result import Choice, MixtureResult
from moa.runtime.acting import acting_from

if TYPE_CHECKING:
    from starlette.responses import JSONResponse


class RequestError(MoaError):
    """A chat-completions request the mixture cannot serve; `param` names the field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        self.param = param
        super().__init__(message)


NEUTRAL = {"top_p": 1, "frequency_penalty": 0, "presence_penalty": 0}
"""Fields accepted only at the value that changes nothing (a mixture cannot apply them)."""
INFORMATIONAL = ("user", "metadata", "store", "service_tier")
"""Fields with no effect on a mixture's answer; accepted (and kept in the trace)."""
MAX_STOP = 4
"""Most stop strings a request may give (OpenAI's limit)."""
MAX_DEPTH = 32
"""Deepest JSON nesting a request body may have (a chat request needs 4)."""
REJECTED = ("functions", "function_call", "logit_bias", "audio", "modalities", "prediction",
            "web_search_options", "reasoning_effort")


QUOTA = "insufficient_quota"
"""OpenAI's error type and code (status 429) for a spent quota: retrying does not help."""


class Refused(Exception):
    """A request answered with an OpenAI-shaped error instead of a completion."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None,
                 retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.code, self.param = status, kind, code, param
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        """The JSON answer; 429 and 503 overload carry `Retry-After`, and other 5xx (and a
        spent quota) tell the official SDKs not to retry (`x-should-retry: false`): the mixture
        already retried each upstream call, and a retried mixture repeats every one of them."""
        headers = {}
        if self.retry_after is not None:
            headers["retry-after"] = str(self.retry_after)
        elif self.status >= 500 or self.code == QUOTA:
            headers["x-should-retry"] = "false"
        from starlette.responses import JSONResponse

        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def failure(model: str, err: Exception) -> Refused:
    """The error a failed run is answered with: 504 deadline, 503 not ready or shared state
    away, 429 a client key's quota spent, 502 upstream."""
    if isinstance(err, DeadlineExceeded):
        return Refused(504, str(err), "server_error", "deadline_exceeded")
    if isinstance(err, QuotaExceeded):
        return Refused(429, str(err), QUOTA, QUOTA)
    if isinstance(err, StateUnavailable):
        return Refused(503, str(err), "server_error", "state_unavailable", retry_after=1)
    if isinstance(err, BudgetExceeded):
        return Refused(400, str(err), "invalid_request_error", "budget_exceeded")
    if isinstance(err, UnsupportedRequest):
        return Refused(400, str(err), "invalid_request_error", "unsupported")
    if isinstance(err, StructuredOutputError):
        return Refused(502, str(err), "upstream_error", "invalid_structured_output")
    if isinstance(err, MissingKeyError | ConfigError):
        return Refused(503, f"The server cannot run {model!r}: {err}", "server_error", "not_ready")
    if isinstance(err, MoaError):
        return Refused(502, str(err), "upstream_error", "upstream_failed")
    return Refused(500, "Internal server error.", "server_error")


@dataclass
class ChatCall:
    """A validated request: what to run and how to answer."""

    model: str
    messages: list[dict[str, Any]]
    stream: bool = False
    include_usage: bool = False
    overrides: dict[str, Any] = field(default_factory=dict)
    """temperature / max_tokens / stop / seed for the final aggregator."""


def _number(body: dict[str, Any], name: str, low: float, high: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise RequestError(f"'{name}' must be a number from {low:g} to {high:g}.", name)
    return float(value)


def _boolean(body: dict[str, Any], name: str, where: str | None = None) -> bool | None:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise RequestError(f"'{where or name}' must be true or false.", where or name)
    return value


def _informational(body: dict[str, Any]) -> None:
    """`user`, `metadata`, `store` and `service_tier`: no effect, but checked like OpenAI."""
    for name in ("user", "service_tier"):
        if body.get(name) is not None and not isinstance(body[name], str):
            raise RequestError(f"'{name}' must be a string.", name)
    _boolean(body, "store")
    metadata = body.get("metadata")
    if metadata is not None and not (
        isinstance(metadata, dict) and len(metadata) <= 16
        and all(isinstance(v, str) and len(k) <= 64 and len(v) <= 512
                for k, v in metadata.items())
    ):
        raise RequestError("'metadata' must be an object of at most 16 string values.",
                           "metadata")


def _integer(body: dict[str, Any], name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise RequestError(f"'{name}' must be an integer from {low} to {high}.", name)
    return value


def load_json(raw: bytes) -> Any:
    """Parse a request body: valid UTF-8 JSON, at most `MAX_DEPTH` deep, no lone surrogates."""
    too_deep = RequestError(f"The request body nests deeper than {MAX_DEPTH} levels.")
    try:
        value = json.loads(raw)
    except RecursionError:
        raise too_deep from None
    except ValueError:  # UnicodeDecodeError included
        raise RequestError("The request body is not valid JSON (UTF-8).") from None
    pending: list[tuple[Any, int]] = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise RequestError(
                    "The request body holds invalid Unicode (an unpaired surrogate escape)."
                ) from None
            continue
        children = [*item, *item.values()] if isinstance(item, dict) else item
        if not isinstance(children, list):
            continue
        if depth > MAX_DEPTH:
            raise too_deep
        pending += [(child, depth + 1) for child in children]
    return value


def _text(content: Any, where: str) -> str:
    """A message content: a string or a list of text parts, joined."""
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text"
                   and isinstance(p.get("text"), str) for p in content):
            raise RequestError(f"{where}: only text parts are supported.", where)
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise RequestError(f"{where} must be a string.", where)
    return content


def _tool_calls(raw: Any, where: str) -> list[dict[str, Any]]:
    """An assistant turn's `tool_calls`, checked and kept verbatim (ids preserved)."""
    if not isinstance(raw, list) or not raw:
        raise RequestError(f"{where} must be a non-empty list of tool calls.", where)
    for call in raw:
        fn = call.get("function") if isinstance(call, dict) else None
        if not (isinstance(call.get("id") if isinstance(call, dict) else None, str)
                and isinstance(fn, dict) and isinstance(fn.get("name"), str)
                and isinstance(fn.get("arguments"), str)):
            raise RequestError(f"{where}: each call needs an 'id' and a 'function' with "
                               "'name' and 'arguments' (a JSON string).", where)
    return [{"id": c["id"], "type": "function", "function": {
        "name": c["function"]["name"], "arguments": c["function"]["arguments"]}} for c in raw]


def _messages(raw: Any) -> list[dict[str, Any]]:
    if not isinstance(raw, list) or not raw:
        raise RequestError("'messages' must be a non-empty list of messages.", "messages")
    out = []
    for i, message in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or message.get("role") not in (
            "system", "developer", "user", "assistant", "tool"
        ):
            raise RequestError(
                f"{where} must be an object with role system, user, assistant or tool.", where
            )
        role = "system" if message["role"] == "developer" else message["role"]
        turn: dict[str, Any] = {"role": role}
        if role == "assistant" and message.get("tool_calls") is not None:
            turn["tool_calls"] = _tool_calls(message["tool_calls"], f"{where}.tool_calls")
            content = message.get("content")
            turn["content"] = "" if content is None else _text(content, f"{where}.content")
        else:
            turn["content"] = _text(message.get("content"), f"{where}.content")
        if role == "tool":
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                raise RequestError(f"{where}.tool_call_id must name the call it answers.",
                                   f"{where}.tool_call_id")
            turn["tool_call_id"] = call_id
        name = message.get("name")
        if name is not None:
            if not isinstance(name, str):
                raise RequestError(f"{where}.name must be a string.", f"{where}.name")
            turn["name"] = name
        out.append(turn)
    return out


def _conversation(raw: Any) -> list[dict[str, Any]]:
    """The messages, and a conversation a mixture can answer: it ends with a user turn or a
    tool result (a client mistake is a 400 before any model runs)."""
    messages = _messages(raw)
    if messages[-1]["role"] not in ("user", "tool"):
        raise RequestError(
            "The last message must be the user's turn or a tool result, not "
            f"{messages[-1]['role']!r}: a mixture answers the latest user turn.", "messages")
    return messages


def _sampling(body: dict[str, Any]) -> dict[str, Any]:
    """`n`, `logprobs` and `top_logprobs` (OpenAI's ranges; top_logprobs needs logprobs)."""
    logprobs = _boolean(body, "logprobs")
    top = _integer(body, "top_logprobs", 0, 20)
    if top is not None and not logprobs:
        raise RequestError("'top_logprobs' needs 'logprobs' to be true.", "top_logprobs")
    return {"n": _integer(body, "n", 1, MAX_SAMPLES), "logprobs": logprobs or None,
            "top_logprobs": top}


def parse_request(body: Any) -> ChatCall:
    """Validate a chat-completions body; raise `RequestError` naming the field at fault."""
    if not isinstance(body, dict):
        raise RequestError("The request body must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError("'model' must name a mixture.", "model")
    for name in REJECTED:
        if body.get(name) not in (None, [], {}):
            raise RequestError(f"'{name}' is not supported by a mixture.", name)
    for name, neutral in NEUTRAL.items():
        if body.get(name) not in (None, neutral):
            raise RequestError(f"'{name}' is not supported by a mixture (only {neutral}).", name)
    known = {"model", "messages", "stream", "stream_options", "temperature", "max_tokens",
             "max_completion_tokens", "stop", "seed", "n", "logprobs", "top_logprobs",
             "response_format", "tools", "tool_choice", "parallel_tool_calls",
             *NEUTRAL, *INFORMATIONAL, *REJECTED}
    unknown = sorted(set(body) - known)
    if unknown:
        raise RequestError(f"Unsupported parameter '{unknown[0]}'.", unknown[0])
    stream = _boolean(body, "stream") or False
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or set(options) - {"include_usage", "include_obfuscation"}:
        raise RequestError("'stream_options' must be an object with 'include_usage'.",
                           "stream_options")
    include_usage = _boolean(options, "include_usage", "stream_options.include_usage")
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, list) and len(stop) <= MAX_STOP
                                 and all(isinstance(s, str) and s for s in stop)):
        raise RequestError(f"'stop' must be a string or a list of at most {MAX_STOP} non-empty "
                           "strings.", "stop")
    _informational(body)
    legacy = _integer(body, "max_tokens", 1, MAX_TOKENS)  # checked even when both are given
    max_tokens = _integer(body, "max_completion_tokens", 1, MAX_TOKENS) or legacy
    overrides = {
        "temperature": _number(body, "temperature", 0, 2),
        "max_tokens": max_tokens,
        "stop": stop or None,
        "seed": _integer(body, "seed", -(2**63), 2**63 - 1),
        **_sampling(body),
        **_acting(body),
    }
    return ChatCall(
        model=model,
        messages=_conversation(body.get("messages")),
        stream=stream,
        include_usage=bool(include_usage),
        overrides={k: v for k, v in overrides.items() if v is not None},
    )


def _acting(body: dict[str, Any]) -> dict[str, Any]:
    """tools, tool_choice, parallel_tool_calls and response_format, checked."""
    names = ("tools", "tool_choice", "parallel_tool_calls", "response_format")
    given = {name: body.get(name) for name in names}
    try:
        acting = acting_from(**given)
    except ConfigError as err:
        first = str(err).split()[0].removesuffix("'s")  # each message begins with the field
        raise RequestError(str(err), first if first in names else None) from None
    values = (acting.tools, acting.tool_choice, acting.parallel_tool_calls,
              acting.response_format)
    return {name: value for name, value in zip(names, values, strict=True) if value is not None}


def new_id() -> str:
    return f"chatcmpl-moa-{uuid.uuid4().hex[:24]}"


def usage_dict(result: MixtureResult) -> dict[str, Any]:
    """The whole mixture's usage: every call's tokens, since every call is paid for; the
    prompt tokens read from the backends' prompt caches in `prompt_tokens_details`."""
    usage = result.usage
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.cached_tokens}}


def trace(result: MixtureResult) -> dict[str, Any]:
    """The mixture's trace (agents, usage, cost, timings) without the answer text."""
    data = result.to_dict()
    data.pop("text", None)
    for part in (*data.get("agents", []), *data.get("choices", [])):
        part.pop("text", None)
    return data


def finish_reason(choice: Choice) -> str:
    if choice.tool_calls:
        return "tool_calls"
    return "length" if choice.finish_reason == "length" else "stop"


def message(choice: Choice) -> dict[str, Any]:
    """A synthesis as an assistant message: its text and its tool calls (ids kept)."""
    out: dict[str, Any] = {"role": "assistant", "content": choice.text}
    if choice.tool_calls:
        out["content"] = choice.text or None
        out["tool_calls"] = [call.as_message_part() for call in choice.tool_calls]
    return out


def _token(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode())}


def logprobs_dict(logprobs: list[TokenLogprob] | None) -> dict[str, Any] | None:
    """Token logprobs in OpenAI's `choices[].logprobs` shape (None when not asked for)."""
    if logprobs is None:
        return None
    content = [
        {**_token(lp.token, lp.logprob), "top_logprobs": [_token(t, v) for t, v in lp.top]}
        for lp in logprobs
    ]
    return {"content": content, "refusal": None}


def completion(result: MixtureResult, model: str) -> dict[str, Any]:
    """A `chat.completion` object for a finished run, with the trace under `moa`."""
    return {
        "id": new_id(),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": choice.index,
                "message": message(choice),
                "finish_reason": finish_reason(choice),
                "logprobs": logprobs_dict(choice.logprobs),
            }
            for choice in result.choices
        ],
        "usage": usage_dict(result),
        "moa": trace(result),
    }


def tool_call_delta(piece: ToolCallDelta) -> dict[str, Any]:
    """A streamed tool-call piece as OpenAI sends it (id, type and name on the first piece)."""
    out: dict[str, Any] = {"index": piece.index, "function": {"arguments": piece.arguments}}
    if piece.id is not None:
        out["id"], out["type"] = piece.id, "function"
    if piece.name is not None:
        out["function"]["name"] = piece.name
    return out


class ChunkStream:
    """Turns a run's events into `chat.completion.chunk` objects (dicts), in order."""

    def __init__(self, model: str, include_usage: bool) -> None:
        self.model = model
        self.include_usage = include_usage
        self.id = new_id()
        self.created = int(time.time())
        self.started: set[int] = set()
        """The choices whose first chunk (the assistant role) went out."""

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.model, "choices": choices, **extra}

    def _delta(self, index: int, delta: dict[str, Any], finish: str | None = None,
               logprobs: list[TokenLogprob] | None = None) -> list[dict[str, Any]]:
        """The choice's chunk, after its role chunk when it is the choice's first."""
        out = []
        if index not in self.started:
            self.started.add(index)
            out = self._delta(index, {"role": "assistant", "content": ""})
        return [*out, self._chunk([{"index": index, "delta": delta, "finish_reason": finish,
                                    "logprobs": logprobs_dict(logprobs)}])]

    def feed(self, event: Event) -> list[dict[str, Any]]:
        """The chunks this event produces (the answer's deltas and, at the end, the finish)."""
        if isinstance(event, FinalDelta) and event.text:
            return self._delta(event.index, {"content": event.text}, logprobs=event.logprobs)
        if isinstance(event, FinalToolCallDelta):
            return self._delta(event.index, {"tool_calls": [tool_call_delta(event.call)]})
        if not isinstance(event, RunFinished):
            return []
        result = event.result
        out: list[dict[str, Any]] = []
        for choice in result.choices:
            out += self._delta(choice.index, {}, finish_reason(choice))
        out[-1]["moa"] = trace(result)
        if self.include_usage:
            out.append(self._chunk([], usage=usage_dict(result)))
        return out
