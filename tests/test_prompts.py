"""The Aggregate-and-Synthesize prompt: numbering, system merge, multi-turn, layouts."""

from __future__ import annotations

import pytest

from moa.errors import ConfigError
from moa.runtime.feed import Board, Feed
from moa.runtime.prompts import (
    AGGREGATE_PROMPT,
    STREAMING_NOTE,
    TRIMMED_LABEL,
    TRUNCATED_LABEL,
    Reference,
    aggregate_messages,
    as_messages,
    cache_messages,
    fit_references,
    mark_duplicates,
    readable_block,
    same_text,
)
from moa.runtime.staircase import ReferenceView
from moa.tokens import count_tokens

HISTORY = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And times 3?"},
]


def test_references_are_numbered_and_appended_to_the_system_message() -> None:
    block = readable_block([Reference("Twelve."), Reference("It is 12.")])
    out = aggregate_messages(HISTORY, block)
    assert out[0] == {
        "role": "system",
        "content": f"You are terse.\n\n{AGGREGATE_PROMPT}\n1. Twelve.\n2. It is 12.",
    }
    assert out[1:] == HISTORY[1:]
    assert HISTORY[0]["content"] == "You are terse."


def test_without_a_system_message_one_is_added_and_agent_system_goes_first() -> None:
    out = aggregate_messages(as_messages("hi"), readable_block([Reference("a")]))
    assert out == [
        {"role": "system", "content": f"{AGGREGATE_PROMPT}\n1. a"},
        {"role": "user", "content": "hi"},
    ]
    out = aggregate_messages(HISTORY, "BLOCK", system="Be kind.")
    assert out[0]["content"] == "Be kind.\n\nYou are terse.\n\nBLOCK"


def test_multi_turn_history_is_intact_and_strings_are_not_iterated() -> None:
    assert as_messages("What is 2+2?") == [{"role": "user", "content": "What is 2+2?"}]
    messages = as_messages(HISTORY)
    out = aggregate_messages(messages, readable_block([Reference("36")]))
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    assert [m["content"] for m in out[1:]] == ["What is 2+2?", "4", "And times 3?"]
    with pytest.raises(ConfigError, match=r"messages\[0\] must be a dict"):
        as_messages(["What is 2+2?"])  # type: ignore[list-item]
    with pytest.raises(ConfigError, match="last message must be the user"):
        as_messages(HISTORY[:3])


def test_labels_and_exact_duplicates() -> None:
    refs = mark_duplicates(
        [
            Reference("The answer is 4."),
            Reference("The answer  is\n4."),
            Reference("cut", truncated=True),
        ]
    )
    assert refs[1].same_as == 1 and refs[2].same_as is None
    block = readable_block(refs)
    assert block.endswith(
        "\n1. The answer is 4.\n2. (same as response 1)\n3. cut" + TRUNCATED_LABEL
    )
    assert same_text("a b\n c", "a  b c") and not same_text("Paris.", "paris.")


def test_near_duplicates_are_shown_in_full() -> None:
    base = "After checking the wiring, the ladder " + "is stable and rated for the load. " * 12
    safe, unsafe = base + "It is safe.", base + "It is not safe."
    refs = mark_duplicates([Reference(safe), Reference(unsafe), Reference(safe.upper())])
    assert all(r.same_as is None for r in refs)
    block = readable_block(refs)
    assert f"\n1. {safe}\n2. {unsafe}\n3. {safe.upper()}" in block
    assert "same as" not in block


def test_a_stream_ahead_of_an_identical_one_is_an_exact_pointer_plus_its_rest() -> None:
    refs = mark_duplicates(
        [Reference("one two", complete=False), Reference("one two three", complete=False)]
    )
    assert refs[1].same_as == 1 and refs[1].tail == " three"
    assert readable_block(refs).endswith(
        "\n1. one two …\n2. (same as response 1) then … three …" + STREAMING_NOTE
    )
    behind = mark_duplicates(
        [Reference("one two three", complete=False), Reference("one two", complete=False)]
    )
    assert behind[1].same_as is None, "a shorter stream is not the same text"


def test_fit_references_trims_the_longest_first() -> None:
    short, long = "short answer", "word " * 400
    fitted = fit_references([Reference(short), Reference(long)], 100)
    assert fitted[0] == Reference(short)
    assert fitted[1].trimmed and count_tokens(fitted[1].text) <= 100 - count_tokens(short)
    assert TRIMMED_LABEL in readable_block(fitted)


def _feeds(*texts: str, done: bool = True) -> list[Feed]:
    board = Board()
    feeds = [Feed(board, lambda i: 1000) for _ in texts]
    for feed, text in zip(feeds, texts, strict=True):
        feed.push(text)
        if done:
            feed.finish()
    return feeds


def test_finished_references_in_either_layout_are_the_papers_block() -> None:
    expected = readable_block([Reference("one"), Reference("two"), Reference("one", same_as=1)])
    paper = ReferenceView(_feeds("one", "two", "one"), "paper")
    paper.update()
    assert paper.block(AGGREGATE_PROMPT) == expected
    cache = ReferenceView(_feeds("one", "two", "one"), "cache")
    cache.update(instruction=AGGREGATE_PROMPT)
    assert cache.rounds == [expected]


def test_cache_layout_adds_rounds_that_are_never_rewritten() -> None:
    board = Board()
    feeds = [Feed(board, lambda i: 1) for _ in range(2)]
    feeds[0].push("Alpha")
    feeds[1].push("Beta")
    view = ReferenceView(feeds, "cache")
    view.update(instruction="I")
    feeds[0].push(" more")
    feeds[0].finish()
    feeds[1].fail(keep=False)
    view.update(instruction="I")
    first, second = view.rounds
    assert first.startswith("I\n1. Alpha …\n2. Beta …\n\n(Some responses")
    assert second == ("[More of the responses, part 2]\n1. … more\n2. [this response failed; "
                      "disregard what it wrote]")
    view.update(instruction="I")
    assert len(view.rounds) == 2, "no news, no round"


def test_cache_messages_put_the_rounds_after_the_conversation() -> None:
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q?"}]
    out = cache_messages(chat, ["R1", "R2"], "Hello world", system="Judge.")
    assert out[:2] == chat, "the conversation first, exactly as the advisors got it"
    assert out[2:] == [
        {"role": "user", "content": "Judge.\n\nR1"},
        {"role": "user", "content": "R2"},
        {"role": "assistant", "content": "Hello world"},
    ]
    assert cache_messages(chat, ["R1"], "")[-1] == {"role": "user", "content": "R1"}
