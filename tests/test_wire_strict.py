"""Strict wire: every invalid field is a 400 naming it, before any model runs, on `moa serve`
(raw JSON) and in the wrapper (the SDK's `BadRequestError`)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

import moa
from moa.config import MixtureConfig
from moa.openai.server import ServerThread, create_app
from moa.testing import LoopbackServer

HI = [{"role": "user", "content": "Capital of France?"}]
TEAM = {"layers": [{"agents": [{"model": "loop/a"}]}], "aggregator": {"model": "loop/agg"}}

CORPUS: list[tuple[dict[str, Any], str]] = [
    ({"max_tokens": "bad", "max_completion_tokens": 10}, "max_tokens"),
    ({"stream": 0}, "stream"),
    ({"stream": True, "stream_options": {"include_usage": "no"}}, "stream_options.include_usage"),
    ({"stream_options": {"include_usage": True, "extra": 1}}, "stream_options"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 123}]}]},
     "messages[0].content"),
    ({"user": 123}, "user"),
    ({"metadata": "x"}, "metadata"),
    ({"store": "yes"}, "store"),
    ({"stop": [f"s{i}" for i in range(100)]}, "stop"),
    ({"stop": [""]}, "stop"),
    ({"messages": [*HI, {"role": "assistant", "content": "Paris."}]}, "messages"),
    ({"messages": [{"role": "system", "content": "Be brief."}]}, "messages"),
    ({"messages": [{"role": "user", "content": "hi", "name": 7}]}, "messages[0].name"),
    ({"messages": [{"role": "tool", "content": "18 C"}]}, "messages[0].tool_call_id"),
    ({"messages": [*HI, {"role": "assistant", "tool_calls": [{"id": "c1"}]},
                   {"role": "tool", "tool_call_id": "c1", "content": "x"}]},
     "messages[1].tool_calls"),
    ({"temperature": 3}, "temperature"),
    ({"seed": 1.5}, "seed"),
    ({"parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"tool_choice": "required"}, "tool_choice"),
]


@pytest.fixture(scope="module")
def upstream() -> Iterator[LoopbackServer]:
    with LoopbackServer() as server:
        yield server


@pytest.fixture(scope="module")
def server(upstream: LoopbackServer) -> Iterator[ServerThread]:
    config = MixtureConfig.model_validate(TEAM)
    with ServerThread(create_app({"team": config}, registry=upstream.registry())) as running:
        yield running


@pytest.mark.parametrize(("fields", "param"), CORPUS, ids=[p for _, p in CORPUS])
def test_served_invalid_field_is_a_400_naming_it(
    upstream: LoopbackServer, server: ServerThread, fields: dict[str, Any], param: str
) -> None:
    before = len(upstream.requests)
    body = {"model": "team", "messages": HI, **fields}
    response = httpx.post(server.base_url + "/chat/completions", json=body, timeout=30)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    assert len(upstream.requests) == before  # no model ran


@pytest.mark.parametrize(("fields", "param"), CORPUS, ids=[p for _, p in CORPUS])
def test_wrapper_invalid_field_is_the_sdks_bad_request(
    upstream: LoopbackServer, fields: dict[str, Any], param: str
) -> None:
    team = {"layers": [{"agents": [{"model": "client/a"}]}],
            "aggregator": {"model": "client/agg"}}
    client = moa.OpenAI(base_url=upstream.base_url, api_key="unused", mixtures={"team": team})
    before = len(upstream.requests)
    body = {"messages": HI, **fields}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="team", **body)
    assert caught.value.body["param"] == param
    assert len(upstream.requests) == before

