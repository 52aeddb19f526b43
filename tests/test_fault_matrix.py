"""The fault matrix through the official SDK and `moa serve`: each upstream fault (500, 429,
dropped socket, stalled stream, CRLF framing, a key echoed in the error) × streamed or not ×
in a proposer or in the aggregator. A proposer fault costs nothing but that proposer; an
aggregator fault is a 502 (or, once a stream began, an in-stream error); no key ever shows.

Tool faults (a malformed tool-call stream, an upstream that ignores the response format) are
rows at the provider level, for both wire formats: the first is one clear `ProviderError`, the
second comes back as the text sent (validating the format is the caller's job)."""

from __future__ import annotations

import anyio
import openai
import pytest
from pydantic import SecretStr

from moa.config import MixtureConfig
from moa.errors import ProviderError
from moa.openai.server import ServerThread, create_app
from moa.providers.base import ChatRequest
from moa.providers.registry import Limits, ProviderSpec, Registry
from moa.testing import LoopbackServer, ModelBehavior

KEY = "sk-matrix-KEY-5e7d1c9a3b"
AGG = "Paris is the capital of France."
HI = [{"role": "user", "content": "Capital of France?"}]
FAULTS = {
    "500": ModelBehavior(reply=AGG, fail_status=500),
    "429": ModelBehavior(reply=AGG, fail_status=429, retry_after=0),
    "drop": ModelBehavior(reply=AGG, drop_after=2),
    "stall": ModelBehavior(reply=AGG, stall_after=2),
    "crlf": ModelBehavior(reply=AGG, sse_quirks=True),
    "echoed-key": ModelBehavior(reply=AGG, fail_status=401, echo_credentials=True),
}
SUCCEEDS_AS_AGGREGATOR = {"crlf"}


def registry(upstream: LoopbackServer) -> Registry:
    limits = Limits(backoff_initial=0.001, backoff_max=0.002, max_retries=1, read_timeout=0.5)
    registry = Registry()
    registry.register(ProviderSpec(prefix="loop", base_url=upstream.base_url, key=SecretStr(KEY),
                                   key_required=False, limits=limits,
                                   options={"continuation": "vllm"}))
    return registry


def mixtures() -> dict[str, MixtureConfig]:
    def team(proposer: str, aggregator: str) -> MixtureConfig:
        return MixtureConfig.model_validate({
            "mode": "layered",
            "layers": [{"agents": [{"model": "loop/good"}, {"model": f"loop/{proposer}"}]}],
            "aggregator": {"model": f"loop/{aggregator}"},
        })

    served = {f"proposer-{fault}": team(fault, "good") for fault in FAULTS}
    served |= {f"aggregator-{fault}": team("good", fault) for fault in FAULTS}
    return served


def ask(client: openai.OpenAI, model: str, stream: bool) -> str:
    if not stream:
        reply = client.chat.completions.create(model=model, messages=HI)  # type: ignore[arg-type]
        return reply.choices[0].message.content or ""
    chunks = client.chat.completions.create(model=model, messages=HI, stream=True)  # type: ignore[arg-type]
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_fault_matrix_through_the_sdk() -> None:
    with LoopbackServer({"good": ModelBehavior(reply=AGG), **FAULTS}) as upstream, \
            ServerThread(create_app(mixtures(), registry=registry(upstream))) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="client", max_retries=0)
        outcomes = {}
        for fault in FAULTS:
            for stream in (False, True):
                for role in ("proposer", "aggregator"):
                    case = (fault, "stream" if stream else "document", role)
                    try:
                        outcomes[case] = ask(client, f"{role}-{fault}", stream)
                    except openai.APIError as err:
                        outcomes[case] = err
    for (fault, kind, role), outcome in outcomes.items():
        case = f"{fault} in the {role}, {kind}"
        if role == "proposer" or fault in SUCCEEDS_AS_AGGREGATOR:
            assert outcome == AGG, case
            continue
        assert isinstance(outcome, openai.APIError), case
        assert KEY not in str(outcome) and KEY not in repr(outcome.body), case
        if kind == "document":
            assert isinstance(outcome, openai.InternalServerError), case
            assert outcome.status_code == 502 and "final aggregator failed" in str(outcome), case
        else:  # the 200 had gone out: an in-stream error the SDK raises without a status
            assert not isinstance(outcome, openai.APIStatusError), case
            assert "final aggregator failed" in str(outcome), case
    assert any(r.headers.get("authorization") == f"Bearer {KEY}" for r in upstream.requests)


TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
FORMAT = {"type": "json_schema", "json_schema": {"name": "answer", "schema": {"type": "object"}}}
TOOL_FAULTS = {
    "malformed-tool-call": (
        ModelBehavior(reply="", tool_calls=[{"name": "lookup", "arguments": {"q": "x"}}],
                      malformed_tool_call=True),
        {"tools": TOOLS},
    ),
    "ignores-format": (ModelBehavior(reply=AGG, structured=None), {"response_format": FORMAT}),
}


@pytest.mark.anyio
@pytest.mark.parametrize("wire", ["openai", "anthropic"])
@pytest.mark.parametrize("fault", list(TOOL_FAULTS))
async def test_tool_fault_rows(wire: str, fault: str) -> None:
    behavior, fields = TOOL_FAULTS[fault]
    async with LoopbackServer({"m": behavior}) as upstream:
        registry = upstream.registry(prefix="loop", anthropic_prefix="claude")
        provider, model = registry.resolve("loop/m" if wire == "openai" else "claude/m")
        request = ChatRequest(model=model, messages=HI, **fields)  # type: ignore[arg-type]
        with anyio.fail_after(10):
            if fault == "malformed-tool-call":
                with pytest.raises(ProviderError, match="malformed tool-call stream") as info:
                    await provider.complete(request)
                assert str(info.value).startswith(f"{provider.name}/m: ")
                assert info.value.__cause__ is None and info.value.__context__ is None
            else:
                [done] = await provider.complete(request)
                assert (done.text, done.finish_reason, done.tool_calls) == (AGG, "stop", [])
        await registry.aclose()
