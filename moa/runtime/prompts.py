"""The Aggregate-and-Synthesize prompt (arXiv 2406.04692) and its staircase layouts.

An aggregating agent gets the conversation unchanged plus, appended to the system message (a
new one when there is none), the instruction and the earlier layer's responses numbered 1..n.
Only the latest user turn is answered from references; earlier turns stay plain history.

Two layouts (docs/staircase.md): `paper` puts the instruction and the references in the system
message before the conversation, each response contiguous (rewritten at every staircase step);
`cache` sends the conversation exactly as the advisors got it, then the instruction and the
references as a user turn; under staircase each step appends the references' new chunks as a
new user turn, and the aggregator's own text so far follows as the assistant turn it continues.
So the advisors' prompt is a prefix of the aggregator's, and each step's prompt up to its own
text is a prefix of the next step's (only the own text, at most `max_tokens`, is re-read).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal

from moa.errors import ConfigError
from moa.providers.base import Message
from moa.tokens import count_tokens, truncate

AGGREGATE_PROMPT = (
    "You have been provided with a set of responses from various models to the latest user "
    "query. Your task is to synthesize these responses into a single, high-quality response. "
    "It is crucial to critically evaluate the information provided in these responses, "
    "recognizing that some of it may be biased or incorrect. Your response should not simply "
    "replicate the given answers but should offer a refined, accurate, and comprehensive reply "
    "to the instruction. Ensure your response is well-structured, coherent, and adheres to the "
    "highest standards of accuracy and reliability.\n\nResponses from models:"
)
SMALL_MODEL_INSTRUCTION = (
    "Here are answers from other assistants to the latest user query. Some may be wrong. "
    "Reply with the correct answer only, in the form the user asked for.\n\nAnswers:"
)
"""A shorter instruction for small models (`moa bench quality` measures it)."""
DEBATE_PROMPT = (
    "These are the solutions to the problem from other agents:\n\n{solutions}\n\nUsing the "
    "solutions from other agents as additional information, can you provide your answer to the "
    "problem? Examine your solution and those of the other agents step by step, and end with "
    "your final answer."
)
"""A debate round's prompt (Du et al., 2023, adapted from its math and MMLU prompts);
`{solutions}` becomes the other agents' latest answers, one `DEBATE_SOLUTION` each."""
DEBATE_SOLUTION = "One agent solution: ```{text}```"
Layout = Literal["paper", "cache"]
TRUNCATED_LABEL = " [truncated: this model stopped before finishing]"
FAILED_LABEL = " [this response failed; disregard what it wrote]"
TRIMMED_LABEL = " [trimmed to fit the context]"
IN_PROGRESS_LABEL = " …"
STREAMING_NOTE = (
    "\n\n(Some responses are still being written and more of them will follow. Continue your "
    "answer from what is known so far.)"
)
ROUND_HEADER = "[More of the responses, part {n}]"


@dataclass(frozen=True)
class Reference:
    """One earlier agent's response as an aggregator sees it."""

    text: str
    complete: bool = True
    truncated: bool = False
    """The agent failed mid-stream; `text` is what it wrote before."""
    trimmed: bool = False
    same_as: int | None = None
    """Number (1-based) of an earlier reference whose text this one repeats exactly (up to
    whitespace); its text is not fed again."""
    continued: bool = False
    """More text of a response begun in an earlier round (prefix_cache layout)."""
    tail: str = ""
    """With `same_as`: what this response adds after repeating all that one shows so far."""


def as_messages(messages: str | list[Message]) -> list[Message]:
    """A user string or a list of message dicts -> a fresh list of message dicts, checked."""
    if isinstance(messages, str):
        return [{"role": "user", "content": messages}]
    if not isinstance(messages, list) or not messages:
        raise ConfigError("messages must be a string or a non-empty list of message dicts.")
    out: list[Message] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise ConfigError(
                f"messages[{i}] must be a dict with 'role' and 'content', "
                f"not {type(message).__name__}."
            )
        out.append(dict(message))
    if out[-1]["role"] not in ("user", "tool"):
        raise ConfigError("The last message must be the user's turn (or a tool result).")
    return out


def content_text(content: Any) -> str:
    """Text of a message content: a string, or the text parts of a content-part list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return "" if content is None else str(content)


def with_system(messages: list[Message], system: str | None) -> list[Message]:
    """Put an agent's own system prompt in front of the conversation's system message."""
    if not system:
        return list(messages)
    if messages and messages[0]["role"] == "system":
        first = content_text(messages[0].get("content"))
        return [{**messages[0], "content": f"{system}\n\n{first}"}, *messages[1:]]
    return [{"role": "system", "content": system}, *messages]


def append_to_system(messages: list[Message], block: str) -> list[Message]:
    """Append `block` to the existing system message (blank line between), or add one."""
    if messages and messages[0]["role"] == "system":
        first = content_text(messages[0].get("content"))
        return [{**messages[0], "content": f"{first}\n\n{block}"}, *messages[1:]]
    return [{"role": "system", "content": block}, *messages]


def entry(number: int, ref: Reference) -> str:
    """One numbered line of the references list."""
    if ref.same_as is not None:
        body = f"(same as response {ref.same_as})"
        if ref.tail:
            body += f" then …{ref.tail}"
    else:
        body = f"…{ref.text}" if ref.continued else ref.text
        if ref.trimmed:
            body += TRIMMED_LABEL
    if ref.truncated:
        body += TRUNCATED_LABEL
    elif not ref.complete:
        body += IN_PROGRESS_LABEL
    return f"\n{number}. {body}"


def readable_block(refs: list[Reference], instruction: str = AGGREGATE_PROMPT) -> str:
    """Instruction plus every response contiguous, numbered 1..n (the paper's layout)."""
    block = instruction + "".join(entry(i, ref) for i, ref in enumerate(refs, 1))
    if any(not r.complete for r in refs):
        block += STREAMING_NOTE
    return block


def round_text(instruction: str, lines: list[str], n: int, *, streaming: bool) -> str:
    """One round of the cache layout: the instruction (first round) or a part header, the
    numbered lines, and a note while responses are still being written."""
    head = instruction if n == 1 else ROUND_HEADER.format(n=n)
    return head + "".join(lines) + (STREAMING_NOTE if streaming else "")


def aggregate_messages(
    messages: list[Message], block: str, *, system: str | None = None, own: str = ""
) -> list[Message]:
    """The aggregator's chat in the paper layout: its system prompt, the conversation with
    `block` appended to the system message, and its own output so far as a final assistant
    turn to continue."""
    out = append_to_system(with_system(messages, system), block)
    if own:
        out.append({"role": "assistant", "content": own})
    return out


def cache_messages(
    messages: list[Message], rounds: list[str], own: str, system: str | None = None
) -> list[Message]:
    """The aggregator's chat in the cache layout: the conversation as the advisors got it,
    each round as a user turn (its own system prompt opens the first), and its own output so
    far as a final assistant turn to continue."""
    out = list(messages)
    for k, text in enumerate(rounds):
        out.append({"role": "user", "content": f"{system}\n\n{text}" if not k and system
                    else text})
    if own:
        out.append({"role": "assistant", "content": own})
    return out


def _normal(text: str) -> str:
    return " ".join(text.split())


def same_text(a: str, b: str) -> bool:
    """Whether two texts are byte-identical once runs of whitespace are made one space.

    Nothing looser counts: "is safe" and "is not safe" are different responses.
    """
    return _normal(a) == _normal(b)


def _repeat(ref: Reference, earlier: Reference) -> Reference | None:
    """`ref` as an exact pointer to `earlier` (plus the text it adds), else None."""
    if same_text(ref.text, earlier.text):
        return replace(ref, same_as=0)
    if not earlier.complete and earlier.text.strip() and ref.text.startswith(earlier.text):
        return replace(ref, same_as=0, tail=ref.text[len(earlier.text) :])
    return None


def mark_duplicates(refs: list[Reference]) -> list[Reference]:
    """Replace each reference that repeats an earlier one exactly by a pointer to it.

    A streamed reference whose text so far is the whole text shown so far of an earlier,
    unfinished one plus more becomes a pointer plus that additional text. Near duplicates
    are shown in full: a pointer never stands for different content.
    """
    out: list[Reference] = []
    for ref in refs:
        for number, earlier in enumerate(out, 1):
            repeat = _repeat(ref, earlier) if ref.text and earlier.same_as is None else None
            if repeat is not None:
                ref = replace(repeat, same_as=number)
                break
        out.append(ref)
    return out


def fit_references(refs: list[Reference], budget: int) -> list[Reference]:
    """Trim the longest references (water-filling) so their texts total at most `budget` tokens."""
    sizes = [0 if r.same_as else count_tokens(r.text) for r in refs]
    if sum(sizes) <= budget:
        return refs
    share, left, pending = 0, max(budget, 0), sorted(range(len(refs)), key=lambda i: sizes[i])
    caps = dict.fromkeys(range(len(refs)), 0)
    while pending:
        share = left // len(pending)
        if sizes[pending[0]] > share:
            break
        i = pending.pop(0)
        caps[i] = sizes[i]
        left -= sizes[i]
    for i in pending:
        caps[i] = share
    return [
        ref if caps[i] >= sizes[i] else replace(ref, text=truncate(ref.text, caps[i]), trimmed=True)
        for i, ref in enumerate(refs)
    ]
