"""`SSEParser` (the transport's event-stream parser) against httpx_sse's line decoder and event
decoder, the reference it replaces: the same events from the same bytes, however the bytes are
cut into network chunks."""

from __future__ import annotations

import random

import pytest
from httpx_sse._decoders import SSEDecoder, SSELineDecoder

from moa.providers.sse import SSEParser

STREAMS = [
    b'data: {"a": 1}\n\ndata: [DONE]\n\n',
    b": hello\r\n\r\ndata: x\r\rdata: y\ndata: z\n\n",  # CRLF, CR, a field over two lines
    b"event: message_start\ndata: {}\n\nevent: ping\n\n",  # an event with no data
    b"id: 7\nretry: 100\ndata:no space\n\nretry: soon\ndata:  two spaces\n\n",
    b"data\n\ndata:\n\n:comment only\n\n\n\nfield: ignored\ndata: kept\n\n",
    "data: caf\u00e9 \u2028 \u00e8\n\n".encode(),  # multibyte characters, U+2028 is no line end
    b"data: \xff broken utf-8\n\n",
    b"id: a\x00b\ndata: nul in the id is ignored\n\n",
    b"data: not closed by a blank line",  # dropped at the end of the stream
    b"data: crlf split\r",  # a CR at the very end
]


def reference(raw: bytes) -> list[tuple[str, str, str, int | None]]:
    lines, decoder = SSELineDecoder(), SSEDecoder()
    out = []
    for line in [*lines.decode(raw.decode("utf-8", "replace")), *lines.flush()]:
        event = decoder.decode(line.rstrip("\n"))
        if event is not None:
            out.append((event.event, event.data, event.id, event.retry))
    return out


def parse(chunks: list[bytes]) -> list[tuple[str, str, str, int | None]]:
    parser = SSEParser()
    return [(e.event, e.data, e.id, e.retry) for chunk in chunks for e in parser.feed(chunk)]


@pytest.mark.parametrize("raw", STREAMS)
def test_same_events_as_httpx_sse_however_the_bytes_are_cut(raw: bytes) -> None:
    expected = reference(raw)
    assert parse([raw]) == expected
    assert parse([raw[i:i + 1] for i in range(len(raw))]) == expected
    rng = random.Random(len(raw))
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, len(raw)), min(3, len(raw) - 1)))
        pieces = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True)]
        assert parse(pieces) == expected


def test_multi_chunk_stream_keeps_the_last_id_and_resets_the_rest() -> None:
    parser = SSEParser()
    [first] = parser.feed(b"id: 1\nevent: e\nretry: 5\ndata: a\n\n")
    [second] = parser.feed(b"data: b\n\n")
    assert (first.id, first.event, first.retry, first.data) == ("1", "e", 5, "a")
    assert (second.id, second.event, second.retry, second.data) == ("1", "message", None, "b")


@pytest.mark.parametrize("text", [
    '{"a": [1, 2.5, "x\\u00e9"], "b": null}', '{"n": NaN}', '{"big": 9223372036854775807}',
    '"\\ud800"', '  {"a": 1}  ', '{"a": 1', "[DONE]", "",
])
def test_chunk_json_is_the_standard_librarys(text: str) -> None:
    """`fastjson.loads` (orjson when installed) gives what `json.loads` gives, errors too."""
    import json
    import math

    from moa.providers.fastjson import loads

    try:
        expected = json.loads(text)
    except ValueError:
        with pytest.raises(ValueError):
            loads(text)
        return
    got = loads(text)
    if isinstance(expected, dict) and isinstance(expected.get("n"), float):
        assert math.isnan(got["n"])
    else:
        assert got == expected and type(got) is type(expected)
