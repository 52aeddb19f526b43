"""Tool calls and structured output for the embedded engines, as plain text.

A chat template may know nothing of tools, so both engines speak one text convention:

- The offered tools are listed in the system message (after the caller's system text, or in a
  new first system message), one JSON line each, then the instruction to answer in plain text
  or with `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`. With tool_choice "none"
  the list is followed by "Do not call a tool now" instead.
- An assistant turn's `tool_calls` become such lines after its text; a `tool` turn becomes a
  user turn `The tool NAME (call ID) returned: CONTENT` (consecutive results share one turn).
- A reply is split back per choice (`ToolCallSplitter`): one whose text starts, after
  whitespace, with `<tool_call>` (or any reply when a bare JSON call is forced) is held back
  and parsed into tool calls when it ends (finish reason "tool_calls"); if it cannot be parsed
  (cut by max_tokens, unknown tool) it is returned as the text it is. Any other reply streams
  as text.

Which replies are possible is each engine's business: llama.cpp constrains sampling with a
grammar, vLLM with structured outputs. `call_schema` is the JSON schema of one call.
"""

from __future__ import annotations

import contextlib
import copy
import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from moa.errors import ConfigError
from moa.providers.base import (
    ChatRequest,
    Delta,
    Message,
    Tool,
    ToolCall,
    ToolCallDelta,
)

TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(TOOL_OPEN) + r"\s*(.*?)\s*" + re.escape(TOOL_CLOSE), re.S)
CALL_INSTRUCTION = (
    f'To call a tool, reply with only {TOOL_OPEN}{{"name": <tool name>, "arguments": '
    f"<arguments object>}}{TOOL_CLOSE}; otherwise answer in plain text."
)
NO_CALL_INSTRUCTION = "Do not call a tool now: answer in plain text."
RESULT = "The tool {name} (call {id}) returned: {content}"
"""How a `tool` turn reads, as a user turn. SmolLM2-135M answers from this wording; after
"Tool result (name, id):" it called the same tool again."""


@dataclass(frozen=True)
class ToolPlan:
    """What a request allows: `offered` tools are described, `callable` ones may be called
    now, `forced` means the reply must be a call, `parallel` that it may hold several."""

    offered: list[Tool] = field(default_factory=list)
    callable: list[Tool] = field(default_factory=list)
    forced: bool = False
    parallel: bool = False


def tool_name(tool: Tool) -> str:
    return str((tool.get("function") or {}).get("name") or "")


def tool_plan(request: ChatRequest) -> ToolPlan:
    """The request's tools and tool_choice, checked (a ConfigError names what is wrong).

    A reply holds several calls only with `parallel_tool_calls=True` (a small model told it
    may repeat tends to repeat the same call until max_tokens)."""
    tools = list(request.tools or [])
    for tool in tools:
        if tool.get("type", "function") != "function" or not tool_name(tool):
            raise ConfigError(
                "Each tool must be {'type': 'function', 'function': {'name': ..., "
                f"'parameters': ...}}, got {json.dumps(tool)[:80]}."
            )
    choice = request.tool_choice if request.tool_choice is not None else "auto"
    if isinstance(choice, dict):
        name = str((choice.get("function") or {}).get("name") or "")
        named = [t for t in tools if tool_name(t) == name]
        if not named:
            raise ConfigError(f"tool_choice names the function {name!r}, which is not in tools.")
        return ToolPlan(tools, named[:1], True, False)
    if choice not in ("auto", "none", "required"):
        raise ConfigError(
            f"tool_choice must be 'auto', 'none', 'required' or a named function, not {choice!r}."
        )
    if choice == "required" and not tools:
        raise ConfigError("tool_choice 'required' needs at least one tool.")
    callable_ = [] if choice == "none" else tools
    return ToolPlan(tools, callable_, choice == "required", request.parallel_tool_calls is True)


def format_schema(response_format: dict[str, Any] | None) -> dict[str, Any] | None:
    """The JSON schema a `response_format` asks for ({"type": "object"} for json_object), or
    None for plain text."""
    kind = (response_format or {}).get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        schema = ((response_format or {}).get("json_schema") or {}).get("schema")
        if not isinstance(schema, dict):
            raise ConfigError("response_format 'json_schema' needs json_schema.schema, an object.")
        return schema
    raise ConfigError(
        f"response_format type must be 'text', 'json_object' or 'json_schema', not {kind!r}."
    )


def call_schema(tools: list[Tool]) -> dict[str, Any]:
    """The JSON schema of one call `{"name": ..., "arguments": ...}` to one of `tools`.

    Each tool's parameters keep their own `$ref`s: they are copied under `$defs/toolN` and
    their local references re-rooted there."""
    alternatives, defs = [], {}
    for i, tool in enumerate(tools):
        params = (tool.get("function") or {}).get("parameters") or {"type": "object"}
        params = _rebase_refs(copy.deepcopy(params), f"#/$defs/tool{i}/")
        defs[f"tool{i}"] = params
        alternatives.append({
            "type": "object",
            "properties": {"name": {"const": tool_name(tool)}, "arguments": params},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        })
    return {"anyOf": alternatives, "$defs": defs}


def _rebase_refs(node: Any, root: str) -> Any:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/"):
            node["$ref"] = root + ref[2:]
        for value in node.values():
            _rebase_refs(value, root)
    elif isinstance(node, list):
        for value in node:
            _rebase_refs(value, root)
    return node


def text_of(content: Any) -> str:
    """A message's content as text (None -> "", content parts -> their text joined)."""
    if content is None:
        return ""
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return str(content)


def call_text(name: str, arguments: Any) -> str:
    """One call in the text convention; `arguments` as JSON text or an object."""
    if isinstance(arguments, str):
        with contextlib.suppress(ValueError):  # else keep the text the model wrote
            arguments = json.loads(arguments or "{}")
    body = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return f"{TOOL_OPEN}{body}{TOOL_CLOSE}"


def tools_prompt(plan: ToolPlan) -> str:
    lines = ["You can use these tools (parameters as JSON Schema):"]
    for tool in plan.offered:
        function = tool.get("function") or {}
        described = {k: function[k] for k in ("name", "description", "parameters") if k in function}
        lines.append(json.dumps(described, ensure_ascii=False))
    lines.append(CALL_INSTRUCTION if plan.callable else NO_CALL_INSTRUCTION)
    return "\n".join(lines)


def render_tool_turns(messages: list[Message], plan: ToolPlan) -> list[Message]:
    """`messages` as plain system/user/assistant turns in the text convention (module notes).

    Messages without tools pass unchanged, so a request without tools renders as before."""
    out: list[Message] = []
    names: dict[str, str] = {}  # call id -> tool name, for the results that follow
    after_result = False
    for message in messages:
        role = message.get("role")
        if role == "assistant" and message.get("tool_calls"):
            lines = [text_of(message.get("content"))] if message.get("content") else []
            for call in message["tool_calls"]:
                function = call.get("function") or {}
                names[str(call.get("id", ""))] = str(function.get("name", ""))
                lines.append(call_text(str(function.get("name", "")), function.get("arguments")))
            turn = {k: v for k, v in message.items() if k != "tool_calls"}
            out.append({**turn, "content": "\n".join(lines)})
        elif role == "tool":
            call_id = str(message.get("tool_call_id", ""))
            name = names.get(call_id) or str(message.get("name") or "tool")
            result = RESULT.format(name=name, id=call_id, content=text_of(message.get("content")))
            if after_result:
                out[-1] = {**out[-1], "content": out[-1]["content"] + "\n\n" + result}
            else:
                out.append({"role": "user", "content": result})
        else:
            out.append(dict(message))
        after_result = role == "tool"
    if plan.offered:
        listing = tools_prompt(plan)
        if out and out[0].get("role") == "system":
            out[0] = {**out[0], "content": f"{text_of(out[0].get('content'))}\n\n{listing}"}
        else:
            out.insert(0, {"role": "system", "content": listing})
    return out


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def parse_tool_calls(text: str, tools: list[Tool]) -> list[ToolCall]:
    """The calls in a held-back reply: its `<tool_call>` blocks, or the whole text as one bare
    JSON call. [] unless each one names one of `tools` and has an arguments object."""
    names = {tool_name(t) for t in tools}
    bodies = _BLOCK.findall(text) if TOOL_OPEN in text else [text]
    calls = []
    for body in bodies:
        try:
            found = json.loads(body)
        except ValueError:
            return []
        if not isinstance(found, dict) or found.get("name") not in names:
            return []
        arguments = found.get("arguments", found.get("parameters", {}))
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError:
                return []
        if not isinstance(arguments, dict):
            return []
        text = json.dumps(arguments, ensure_ascii=False)
        calls.append(ToolCall(new_call_id(), found["name"], text))
    return calls


@dataclass
class ToolCallSplitter:
    """One choice's deltas in; out the same deltas, or the tool calls its reply holds.

    `bare`: the reply is a bare JSON call (vLLM's forced calls), so all of it is held.
    `prefix`: with continuation, the assistant text so far (part of the reply, already sent).
    """

    plan: ToolPlan
    bare: bool = False
    prefix: str = ""
    held: list[Delta] = field(default_factory=list)
    passing: bool = False

    def feed(self, delta: Delta) -> list[Delta]:
        if self.passing or not self.plan.callable or delta.usage is not None:
            return [delta]
        self.held.append(delta)
        text = (self.prefix + "".join(d.text for d in self.held)).lstrip()
        if not self.bare and not (text.startswith(TOOL_OPEN) or TOOL_OPEN.startswith(text)):
            self.passing = True
            return self.flush()
        return self._end() if delta.finish_reason else []

    def flush(self) -> list[Delta]:
        """What is still held, as it came (a stream that ended without a finish reason)."""
        held, self.held = self.held, []
        return held

    def _end(self) -> list[Delta]:
        calls = parse_tool_calls(
            self.prefix + "".join(d.text for d in self.held), self.plan.callable
        )
        if not calls:
            return self.flush()
        held = self.flush()
        logprobs = [lp for d in held for lp in d.logprobs or []] or None
        pieces = [ToolCallDelta(i, c.id, c.name, c.arguments) for i, c in enumerate(calls)]
        return [
            Delta(
                index=held[-1].index,
                finish_reason="tool_calls",
                logprobs=logprobs,
                tool_calls=pieces if self.plan.parallel else pieces[:1],
            )
        ]
