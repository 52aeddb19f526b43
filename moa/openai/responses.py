"""The OpenAI Responses wire format of mixtures (`POST /v1/responses`), beside `wire` (chat).

`parse_responses` turns a Responses body into the same `ChatCall` a chat-completions request
makes (input items become chat messages, function tools become chat tools, `text.format`
becomes `response_format`) and puts it through `wire.parse_request`'s checks, so both APIs
honour or reject every field alike. `response_object` and `ResponseEvents` write a run as the
`response` object or as the stream of `response.*` events the official SDK parses.

moa stores no responses: `previous_response_id`, `conversation` and `store: true` are refused;
a client sends the whole conversation in `input` (as the Agents SDK does by default).
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from moa.events import Event, FinalDelta, FinalToolCallDelta, RunFinished
from moa.openai.wire import ChatCall, RequestError, parse_request, trace
from moa.result import MixtureResult

NOT_STORED = "is not supported: moa stores no responses; send the whole conversation in input"
INFORMATIONAL = ("user", "metadata", "service_tier", "safety_identifier", "prompt_cache_key")
"""Fields with no effect on a mixture's answer; accepted."""
EMPTY_ONLY = ("include", "reasoning", "prompt", "max_tool_calls", "top_logprobs", "background",
              "context_management", "prompt_cache_retention", "prompt_cache_options")
"""Fields accepted only when absent, null, false or empty (a mixture cannot apply them)."""
KNOWN = {"model", "input", "instructions", "tools", "tool_choice", "parallel_tool_calls",
         "text", "max_output_tokens", "temperature", "top_p", "stream", "stream_options",
         "store", "previous_response_id", "conversation", "truncation",
         *INFORMATIONAL, *EMPTY_ONLY}
CHAT_NAMES = {"max_tokens": "max_output_tokens", "response_format": "text.format",
              "messages": "input"}
"""Chat-completions field names in `wire`'s errors, as this API names them."""
ITEM_KEYS = {
    "message": {"type", "role", "content", "id", "status", "phase"},
    "function_call": {"type", "call_id", "name", "arguments", "id", "status"},
    "function_call_output": {"type", "call_id", "output", "id", "status"},
}
"""Keys an input item may have (`id` and `status` are what an earlier response carried)."""
PART_KEYS = {"type", "text", "annotations", "logprobs"}
FUNCTION_KEYS = ("name", "description", "parameters", "strict")
SCHEMA_KEYS = ("name", "schema", "strict", "description")


@dataclass
class ResponsesCall(ChatCall):
    """A validated Responses request: the chat call to run, plus the request's settings as
    the `response` object repeats them (tools, tool_choice, text, instructions, metadata...)."""

    settings: dict[str, Any] = field(default_factory=dict)


def new_id() -> str:
    return f"resp_moa{uuid.uuid4().hex[:24]}"


# ---- requests -----------------------------------------------------------------------------


def _only(obj: dict[str, Any], allowed: set[str], where: str) -> None:
    """Refuse a key of `obj` outside `allowed` (one whose value is null or false is absent)."""
    extra = sorted(k for k, v in obj.items() if k not in allowed and v not in (None, False))
    if extra:
        raise RequestError(f"{where}.{extra[0]} is not supported.", f"{where}.{extra[0]}")


def _string(obj: dict[str, Any], key: str, where: str, empty: bool = False) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not (value or empty):
        kind = "a string" if empty else "a non-empty string"
        raise RequestError(f"{where}.{key} must be {kind}.", f"{where}.{key}")
    return value


def _text(content: Any, where: str) -> str:
    """A message's content: a string or a list of input_text / output_text parts, joined."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise RequestError(f"{where} must be a string or a list of text parts.", where)
    for j, part in enumerate(content):
        if not (isinstance(part, dict) and part.get("type") in ("input_text", "output_text")):
            raise RequestError(f"{where}[{j}]: only input_text and output_text parts are "
                               "supported.", f"{where}[{j}]")
        _only(part, PART_KEYS, f"{where}[{j}]")
        _string(part, "text", f"{where}[{j}]", empty=True)
    return "".join(part["text"] for part in content)


def _messages(raw: Any, instructions: Any) -> list[dict[str, Any]]:
    """`instructions` and `input` as chat messages: function_call items become an assistant
    turn's `tool_calls` (consecutive calls join one turn), function_call_output items `tool`
    turns; the call ids pass through unchanged."""
    messages: list[dict[str, Any]] = []
    if instructions is not None:
        if not isinstance(instructions, str):
            raise RequestError("'instructions' must be a string.", "instructions")
        messages.append({"role": "system", "content": instructions})
    if isinstance(raw, str):
        return [*messages, {"role": "user", "content": raw}]
    if not isinstance(raw, list) or not raw:
        raise RequestError("'input' must be a string or a non-empty list of items.", "input")
    for i, item in enumerate(raw):
        where = f"input[{i}]"
        kind = item.get("type", "message") if isinstance(item, dict) else None
        if kind not in ITEM_KEYS:
            raise RequestError(f"{where} must be a message, function_call or "
                               "function_call_output item.", where)
        _only(item, ITEM_KEYS[kind], where)
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise RequestError(f"{where}.role must be user, system, developer or "
                                   "assistant.", f"{where}.role")
            messages.append({"role": role,
                             "content": _text(item.get("content"), f"{where}.content")})
        elif kind == "function_call":
            call = {"id": _string(item, "call_id", where), "type": "function", "function": {
                "name": _string(item, "name", where),
                "arguments": _string(item, "arguments", where, empty=True)}}
            last = messages[-1] if messages else {}
            if last.get("role") == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        else:
            messages.append({"role": "tool", "tool_call_id": _string(item, "call_id", where),
                             "content": _text(item.get("output"), f"{where}.output")})
    return messages


def _tools(raw: Any) -> list[dict[str, Any]] | None:
    """Responses function tools as chat-completions tools; any other tool type is refused."""
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise RequestError("'tools' must be a list of function tools.", "tools")
    out = []
    for i, tool in enumerate(raw):
        where = f"tools[{i}]"
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind != "function":
            raise RequestError(f"{where}: only function tools are supported by a mixture, "
                               f"not {kind!r}.", where)
        _only(tool, {"type", *FUNCTION_KEYS}, where)
        _string(tool, "name", where)
        function = {k: tool[k] for k in FUNCTION_KEYS if tool.get(k) is not None}
        out.append({"type": "function", "function": function})
    return out


def _tool_choice(raw: Any, tools: list[dict[str, Any]] | None) -> Any:
    """"auto", "none", "required" or a named function (one of `tools`), in chat form."""
    names = [tool["function"]["name"] for tool in tools or []]
    if raw is None or raw in ("auto", "none", "required"):
        return raw
    if isinstance(raw, dict) and raw.get("type") == "function" and raw.get("name") in names:
        return {"type": "function", "function": {"name": raw["name"]}}
    raise RequestError('tool_choice must be auto, none, required or {"type": "function", '
                       '"name": <one of the tools>}.', "tool_choice")


def _response_format(text: Any) -> dict[str, Any] | None:
    """`text: {"format": ...}` as a chat-completions `response_format`."""
    if text is None:
        return None
    if not isinstance(text, dict):
        raise RequestError("'text' must be an object with a 'format'.", "text")
    _only(text, {"format"}, "text")
    fmt = text.get("format")
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if fmt is None or kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind != "json_schema":
        raise RequestError("text.format type must be text, json_object or json_schema.",
                           "text.format")
    _only(fmt, {"type", *SCHEMA_KEYS}, "text.format")
    _string(fmt, "name", "text.format")
    if not isinstance(fmt.get("schema"), dict):
        raise RequestError("text.format.schema must be a JSON Schema object.",
                           "text.format.schema")
    spec = {k: fmt[k] for k in SCHEMA_KEYS if fmt.get(k) is not None}
    return {"type": "json_schema", "json_schema": spec}


def _refuse_unsupported(body: dict[str, Any]) -> None:
    unknown = sorted(set(body) - KNOWN)
    if unknown:
        raise RequestError(f"Unsupported parameter '{unknown[0]}'.", unknown[0])
    for name in ("previous_response_id", "conversation"):
        if body.get(name) is not None:
            raise RequestError(f"{name} {NOT_STORED}.", name)
    if body.get("store"):
        raise RequestError(f"store true {NOT_STORED}.", "store")
    if body.get("truncation") not in (None, "disabled"):
        raise RequestError("'truncation' must be disabled: a mixture never drops input.",
                           "truncation")
    for name in EMPTY_ONLY:
        if body.get(name) not in (None, False, [], {}):
            raise RequestError(f"'{name}' is not supported by a mixture.", name)
    if body.get("stream_options") not in (None, {}, {"include_obfuscation": False}):
        raise RequestError("'stream_options' is not supported by a mixture (it never "
                           "obfuscates a stream).", "stream_options")


def parse_responses(body: Any) -> ChatCall:
    """Validate a Responses body; raise `RequestError` naming the field at fault."""
    if not isinstance(body, dict):
        raise RequestError("The request body must be a JSON object.")
    _refuse_unsupported(body)
    tools = _tools(body.get("tools"))
    chat = {
        "model": body.get("model"),
        "messages": _messages(body.get("input"), body.get("instructions")),
        "stream": body.get("stream"),
        "temperature": body.get("temperature"),
        "top_p": body.get("top_p"),
        "max_tokens": body.get("max_output_tokens"),
        "tools": tools,
        "tool_choice": _tool_choice(body.get("tool_choice"), tools),
        "parallel_tool_calls": body.get("parallel_tool_calls"),
        "response_format": _response_format(body.get("text")),
        **{name: body.get(name) for name in ("user", "metadata", "service_tier")},
    }
    try:
        call = parse_request({k: v for k, v in chat.items() if v is not None})
    except RequestError as err:  # named as this API names the field
        message, param = str(err), err.param
        for old, new in CHAT_NAMES.items():
            message = message.replace(old, new)
        root = re.split(r"[\[.]", param or "")[0]
        raise RequestError(message, CHAT_NAMES.get(root, param)) from None
    settings = {
        "instructions": body.get("instructions"),
        "metadata": body.get("metadata") or {},
        "user": body.get("user"),
        "temperature": body.get("temperature"),
        "top_p": body.get("top_p"),
        "max_output_tokens": body.get("max_output_tokens"),
        "tools": body.get("tools") or [],
        "tool_choice": body.get("tool_choice") or "auto",
        "parallel_tool_calls": body.get("parallel_tool_calls") is not False,
        "text": body.get("text") or {"format": {"type": "text"}},
        "truncation": "disabled",
    }
    return ResponsesCall(**vars(call), settings=settings)


# ---- answers ------------------------------------------------------------------------------


def _suffix(response_id: str) -> str:
    return response_id.removeprefix("resp_")


def _message_id(response_id: str) -> str:
    return f"msg_{_suffix(response_id)}"


def _call_id(response_id: str, k: int) -> str:
    """The `k`-th function_call item's id (the stream and the final object agree on it)."""
    return f"fc_{_suffix(response_id)}_{k}"


def _message(item_id: str, text: str, status: str) -> dict[str, Any]:
    return {"type": "message", "id": item_id, "role": "assistant", "status": status,
            "content": [{"type": "output_text", "text": text, "annotations": [],
                         "logprobs": []}]}


def _function_call(item_id: str, call_id: str, name: str, arguments: str,
                   status: str) -> dict[str, Any]:
    return {"type": "function_call", "id": item_id, "call_id": call_id, "name": name,
            "arguments": arguments, "status": status}


def _usage(result: MixtureResult) -> dict[str, Any]:
    """The whole mixture's usage: every call's tokens, since every call is paid for."""
    usage = result.usage
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": usage.cached_tokens,
                                 "cache_write_tokens": usage.cache_write_tokens},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage.total_tokens,
    }


def _response(call: ChatCall, response_id: str, status: str, created: float,
              **fields: Any) -> dict[str, Any]:
    """A `response` object; `fields` fill in output, usage, error and the like."""
    settings = call.settings if isinstance(call, ResponsesCall) else {}
    return {
        "id": response_id, "object": "response", "created_at": created, "model": call.model,
        "status": status, "output": [], "usage": None, "error": None,
        "incomplete_details": None, "previous_response_id": None, "reasoning": None,
        "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
        **settings, **fields,
    }


def response_object(result: MixtureResult, call: ChatCall, response_id: str) -> dict[str, Any]:
    """The `response` object of a finished run, with the mixture's trace under `moa`.

    Its output is a message (when there is text, or nothing else) and one `function_call`
    item per tool call; a final answer cut by the token limit makes it `incomplete`.
    """
    cut = result.finish_reason == "length"
    status = "incomplete" if cut else "completed"
    output = []
    if result.text or not result.tool_calls:
        output.append(_message(_message_id(response_id), result.text, status))
    for k, tool_call in enumerate(result.tool_calls):
        output.append(_function_call(_call_id(response_id, k), tool_call.id, tool_call.name,
                                     tool_call.arguments, status))
    now = time.time()
    return _response(
        call, response_id, status, now, completed_at=None if cut else now, output=output,
        usage=_usage(result),
        incomplete_details={"reason": "max_output_tokens"} if cut else None,
        moa=trace(result),
    )


@dataclass
class _Item:
    """An output item being streamed: a message's text or a function call's arguments."""

    index: int
    item: dict[str, Any]
    text: str = ""


class ResponseEvents:
    """Turns a run's events into the Responses stream's events (dicts), in order.

    `response.created` and `response.in_progress` first; then each output item in turn
    (`output_item.added`, its content's deltas and done events, `output_item.done`), a new
    item closing the one before; last `response.completed` (`response.incomplete` when the
    answer was cut by the token limit) with the whole `response` object. `fail()` ends a
    stream whose run failed with `response.failed`.
    """

    def __init__(self, call: ChatCall, response_id: str) -> None:
        self.call, self.id = call, response_id
        self.created = time.time()
        self.sequence = 0
        self.started = False
        self.items: list[_Item] = []
        self.open: _Item | None = None
        self.calls: dict[int, _Item] = {}  # a tool-call delta's index -> its item
        self.message: _Item | None = None

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return event

    def _start(self) -> list[dict[str, Any]]:
        if self.started:
            return []
        self.started = True
        snapshot = _response(self.call, self.id, "in_progress", self.created)
        return [self._event("response.created", response=snapshot),
                self._event("response.in_progress", response=snapshot)]

    def _add(self, item: dict[str, Any]) -> list[dict[str, Any]]:
        """Close the open item and open `item` (announced empty: its text comes in deltas)."""
        out = self._close(None)
        self.open = _Item(len(self.items), item)
        self.items.append(self.open)
        empty = {"content": []} if item["type"] == "message" else {"arguments": ""}
        out.append(self._event("response.output_item.added", output_index=self.open.index,
                               item={**item, **empty, "status": "in_progress"}))
        if item["type"] == "message":
            self.message = self.open
            out.append(self._event("response.content_part.added", **self._where(self.open),
                                   part={**item["content"][0], "text": ""}))
        return out

    def _where(self, open_: _Item, content: bool = True) -> dict[str, Any]:
        where = {"item_id": open_.item["id"], "output_index": open_.index}
        return {**where, "content_index": 0} if content else where

    def _delta(self, open_: _Item, delta: str) -> list[dict[str, Any]]:
        open_.text += delta
        if open_ is not self.open or not delta:  # an item already closed: the final object
            return []                            # has the rest
        if open_.item["type"] == "message":
            return [self._event("response.output_text.delta", **self._where(open_),
                                delta=delta, logprobs=[])]
        return [self._event("response.function_call_arguments.delta",
                            **self._where(open_, content=False), delta=delta)]

    def _close(self, final: dict[str, Any] | None) -> list[dict[str, Any]]:
        """Done events for the open item (`final`: its finished form from the result)."""
        open_, self.open = self.open, None
        if open_ is None:
            return []
        if open_.item["type"] == "message":
            done = final or _message(open_.item["id"], open_.text, "completed")
            part = done["content"][0]
            return [
                self._event("response.output_text.done", **self._where(open_),
                            text=part["text"], logprobs=[]),
                self._event("response.content_part.done", **self._where(open_), part=part),
                self._event("response.output_item.done", output_index=open_.index, item=done),
            ]
        done = final or {**open_.item, "arguments": open_.text, "status": "completed"}
        return [
            self._event("response.function_call_arguments.done",
                        **self._where(open_, content=False), arguments=done["arguments"],
                        name=done["name"]),
            self._event("response.output_item.done", output_index=open_.index, item=done),
        ]

    def feed(self, event: Event) -> list[dict[str, Any]]:
        """The stream events this run event produces."""
        out = self._start()
        if isinstance(event, FinalDelta) and event.text:
            if self.message is None:
                out += self._add(_message(_message_id(self.id), "", "in_progress"))
            assert self.message is not None
            out += self._delta(self.message, event.text)
        elif isinstance(event, FinalToolCallDelta):
            piece = event.call
            if piece.index not in self.calls:
                item_id = _call_id(self.id, len(self.calls))
                out += self._add(_function_call(item_id, piece.id or "", piece.name or "", "",
                                                "in_progress"))
                assert self.open is not None
                self.calls[piece.index] = self.open
            out += self._delta(self.calls[piece.index], piece.arguments)
        elif isinstance(event, RunFinished):
            out += self._finish(event.result)
        return out

    def _finish(self, result: MixtureResult) -> list[dict[str, Any]]:
        response = response_object(result, self.call, self.id)
        response["created_at"] = self.created
        final = {item["id"]: item for item in response["output"]}
        out = self._close(final.get(self.open.item["id"]) if self.open else None)
        streamed = {open_.item["id"] for open_ in self.items}
        for item in response["output"]:  # one the run did not stream (an empty answer)
            if item["id"] not in streamed:
                out += self._add(item)
                assert self.open is not None
                message = item["type"] == "message"
                out += self._delta(self.open, item["content"][0]["text"] if message
                                   else item["arguments"])
                out += self._close(item)
        done = "incomplete" if response["status"] == "incomplete" else "completed"
        return [*out, self._event(f"response.{done}", response=response)]

    def fail(self, code: str | None, message: str) -> list[dict[str, Any]]:
        """The events that end a stream whose run failed: `response.failed` with the error."""
        response = _response(self.call, self.id, "failed", self.created,
                             error={"code": code or "server_error", "message": message})
        return [*self._start(), self._event("response.failed", response=response)]
