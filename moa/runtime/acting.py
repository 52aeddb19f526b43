"""Advisors and one acting stage: how tools and structured outputs go through a mixture.

With `tools` or a `response_format`, only the final aggregator *acts*: it gets the tool schema,
`tool_choice` and the format, and its tool calls or typed answer are the mixture's. Every other
stage *advises*: it never sees the schema; it gets the conversation with earlier tool calls and
tool results rendered as short text (results trimmed to `MixtureConfig.tool_result_chars`),
plus one line naming the tools the acting model can call and, with a format, one line on the
shape the final answer must have. This keeps every advisor call small however long the agent
loop's transcript grows.

The final answer of a structured request is validated (`check_structured`) against its JSON
Schema with the `jsonschema` package; an answer that does not validate fails the run with one
sentence, never a 200 with invalid JSON.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from moa.errors import ConfigError, StructuredOutputError
from moa.providers.base import Message, Tool
from moa.runtime.prompts import append_to_system, content_text

ARGUMENTS_CHARS = 300
"""Longest tool-call argument text an advisor is shown."""


@dataclass(frozen=True)
class Acting:
    """What the acting stage of one request gets (all None / empty: a plain chat request)."""

    tools: list[Tool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None

    @property
    def active(self) -> bool:
        """Whether the final aggregator acts (so it is never skipped nor streamed early)."""
        return bool(self.tools) or self.schema is not None

    @property
    def schema(self) -> dict[str, Any] | None:
        """The JSON Schema the answer must match ({"type": "object"} for json_object)."""
        fmt = self.response_format or {}
        if fmt.get("type") == "json_object":
            return {"type": "object"}
        if fmt.get("type") == "json_schema":
            return dict((fmt.get("json_schema") or {}).get("schema") or {"type": "object"})
        return None

    def tool_names(self) -> list[str]:
        return [str((t.get("function") or {}).get("name")) for t in self.tools or []]

    def advisor_note(self) -> str:
        """The lines an advisor gets about tools and the answer's shape ("" when none)."""
        lines = []
        if self.tools and self.tool_choice != "none":
            lines.append(
                f"The assistant that writes the final reply can call these tools: "
                f"{', '.join(self.tool_names())}. You cannot call them; if a call would help, "
                "say which tool and with which arguments."
            )
        if self.schema is not None:
            shape = json.dumps(self.schema, separators=(",", ":"))
            lines.append(f"The final reply must be a JSON value matching this schema: {shape}")
        return "\n".join(lines)

    def format_instruction(self) -> str:
        """For an acting backend without native structured output: the shape, as a rule."""
        shape = json.dumps(self.schema, separators=(",", ":"))
        return f"Reply with one JSON value only, no prose, matching this JSON Schema: {shape}"


def acting_from(
    tools: list[Tool] | None,
    tool_choice: str | dict[str, Any] | None,
    parallel_tool_calls: bool | None,
    response_format: dict[str, Any] | None,
) -> Acting:
    """Check a request's tool and format arguments (`ConfigError` naming the field)."""
    if tools is not None and not (
        isinstance(tools, list) and all(_is_function_tool(t) for t in tools)
    ):
        raise ConfigError(
            "tools must be a list of function tools: "
            '{"type": "function", "function": {"name": ..., "parameters": {...}}}.'
        )
    names = [t["function"]["name"] for t in tools or []]
    if len(set(names)) != len(names):
        raise ConfigError("tools must have distinct function names.")
    if tool_choice is not None:
        if isinstance(tool_choice, dict):
            name = (tool_choice.get("function") or {}).get("name")
            if tool_choice.get("type") != "function" or name not in names:
                raise ConfigError(
                    "tool_choice must be auto, none, required or "
                    '{"type": "function", "function": {"name": <one of the tools>}}.'
                )
        elif tool_choice not in ("auto", "none", "required"):
            raise ConfigError("tool_choice must be auto, none, required or a named function.")
        elif tool_choice == "required" and not tools:
            raise ConfigError("tool_choice 'required' needs tools.")
    if parallel_tool_calls is not None and not isinstance(parallel_tool_calls, bool):
        raise ConfigError("parallel_tool_calls must be true or false.")
    if response_format is not None:
        kind = response_format.get("type") if isinstance(response_format, dict) else None
        if kind == "text":
            response_format = None
        elif kind == "json_schema":
            spec = response_format.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
                raise ConfigError(
                    'response_format json_schema needs {"json_schema": {"name": ..., '
                    '"schema": {...}}}.'
                )
            _check_schema(spec.get("schema") or {})
        elif kind != "json_object":
            raise ConfigError("response_format type must be text, json_object or json_schema.")
    return Acting(tools or None, tool_choice, parallel_tool_calls, response_format)


def _is_function_tool(tool: Any) -> bool:
    fn = tool.get("function") if isinstance(tool, dict) else None
    return (
        isinstance(tool, dict)
        and tool.get("type") == "function"
        and isinstance(fn, dict)
        and isinstance(fn.get("name"), str)
        and bool(fn["name"])
    )


def _check_schema(schema: dict[str, Any]) -> None:
    from jsonschema import exceptions, validators

    try:
        validators.validator_for(schema).check_schema(schema)
    except exceptions.SchemaError as err:
        message = f"response_format's schema is not a valid JSON Schema: {err.message}"
        raise ConfigError(message) from None


def check_structured(text: str, acting: Acting) -> Any:
    """The final answer parsed, or `StructuredOutputError` saying why it does not fit."""
    schema = acting.schema
    if schema is None:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        start = text.strip()[:60]
        raise StructuredOutputError(
            f"The final answer is not valid JSON, though the request asked for a "
            f"{acting.response_format['type']} response (it begins {start!r})."  # type: ignore[index]
        ) from None
    from jsonschema import validators

    validator = validators.validator_for(schema)(schema)
    error = next(iter(validator.iter_errors(value)), None)
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "the top level"
        raise StructuredOutputError(
            f"The final answer does not match the requested schema at {where}: {error.message}."
        )
    return value


def advisor_messages(messages: list[Message], acting: Acting, result_chars: int) -> list[Message]:
    """The conversation as advisors see it: tool calls and results as short text, same-role
    turns joined, and the acting note appended to the system message. A conversation without
    tool turns is kept as it is."""
    note = acting.advisor_note()
    if not any(m["role"] == "tool" or m.get("tool_calls") for m in messages):
        return append_to_system(messages, note) if note else list(messages)
    out: list[Message] = []
    for message in messages:
        role, text = message["role"], content_text(message.get("content"))
        if role == "tool":
            role, text = "user", _tool_result(message, messages, result_chars)
        elif role == "assistant" and message.get("tool_calls"):
            calls = [_call_line(c) for c in message["tool_calls"]]
            text = "\n".join([text, *calls] if text else calls)
        if out and out[-1]["role"] == role != "system":  # tool results after a user turn
            out[-1]["content"] += "\n\n" + text
        else:
            out.append({"role": role, "content": text})
    return append_to_system(out, note) if note else out


def _call_line(call: dict[str, Any]) -> str:
    fn = call.get("function") or {}
    arguments = _trim(str(fn.get("arguments") or ""), ARGUMENTS_CHARS)
    return f"[called tool {fn.get('name')} with {arguments or '{}'}]"


def _tool_result(message: Message, messages: list[Message], limit: int) -> str:
    call_id = message.get("tool_call_id")
    name = next(
        (
            (c.get("function") or {}).get("name")
            for m in messages
            for c in m.get("tool_calls") or []
            if c.get("id") == call_id
        ),
        None,
    )
    result = _trim(content_text(message.get("content")), limit)
    return f"[result of tool {name or message.get('name') or call_id}: {result}]"


def _trim(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + f" … [{len(text) - limit} chars cut]"
