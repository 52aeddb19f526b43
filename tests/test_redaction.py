"""API keys never show in error messages, tracebacks, reprs or DEBUG logs."""

from __future__ import annotations

import logging
import traceback

import pytest

from moa.errors import ProviderError
from moa.providers.base import ChatRequest
from moa.providers.registry import Limits, Registry
from moa.testing import LoopbackServer, ModelBehavior

pytestmark = pytest.mark.anyio

SECRET = "sk-test-Zq8vR2mN5pL0xW7kT4yB"
HI = [{"role": "user", "content": "hello"}]
FAST = Limits(backoff_initial=0.001, backoff_max=0.002, max_retries=1)


def leaked(text: str) -> bool:
    return SECRET in text or SECRET[8:] in text


def everything_about(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc)) + repr(exc) + str(exc)


@pytest.fixture
def env_key(monkeypatch: pytest.MonkeyPatch, loopback: LoopbackServer) -> Registry:
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    monkeypatch.setenv("OPENAI_BASE_URL", loopback.base_url)
    monkeypatch.setenv("ANTHROPIC_API_KEY", SECRET)
    monkeypatch.setenv("ANTHROPIC_BASE_URL", loopback.anthropic_base_url)
    registry = Registry()
    for prefix in ("openai", "anthropic"):
        registry.register(registry.spec(prefix).model_copy(update={"limits": FAST}))
    return registry


async def test_provider_reprs_hold_no_key(env_key: Registry) -> None:
    for ref in ("openai/m", "anthropic/m"):
        provider, _ = env_key.resolve(ref)
        for text in (repr(provider), str(provider), repr(vars(provider)),
                     repr(provider.transport), repr(env_key.spec(ref.split("/")[0]))):  # type: ignore[attr-defined]
            assert not leaked(text), text
    await env_key.aclose()


async def test_errors_and_logs_hold_no_key(
    env_key: Registry, loopback: LoopbackServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    echoing_error = (
        b'data: {"error": {"message": "key ' + SECRET.encode() + b' is not allowed",'
        b' "type": "invalid_request_error", "code": 403}}\n\n'
    )
    loopback.set_behavior("echo-key", ModelBehavior(raw_sse=echoing_error))
    loopback.set_behavior("busy", ModelBehavior(fail_status=503))
    loopback.set_behavior("drop", ModelBehavior(reply="a b c", drop_after=1))
    loopback.set_behavior("ok", ModelBehavior(reply="fine"))
    failures: list[ProviderError] = []
    for ref in ("openai/echo-key", "openai/busy", "openai/drop", "anthropic/busy",
                "anthropic/drop"):
        provider, model = env_key.resolve(ref)
        with pytest.raises(ProviderError) as info:
            await provider.complete(ChatRequest(model=model, messages=HI))
        failures.append(info.value)
    for ref in ("openai/ok", "anthropic/ok"):
        provider, model = env_key.resolve(ref)
        [done] = await provider.complete(ChatRequest(model=model, messages=HI))
        assert done.text == "fine"
    assert "is not allowed" in str(failures[0]) and "***" in str(failures[0])
    for exc in failures:
        assert not leaked(everything_about(exc)), everything_about(exc)
    assert "retrying" in caplog.text  # the retry path logged something
    assert not leaked(caplog.text)
    assert any(r.headers.get("authorization") == f"Bearer {SECRET}" for r in loopback.requests)
    await env_key.aclose()


async def test_rejected_key_names_the_variable_not_the_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with LoopbackServer(api_key="the-right-one") as srv:
        monkeypatch.setenv("OPENAI_API_KEY", SECRET)
        monkeypatch.setenv("OPENAI_BASE_URL", srv.base_url)
        provider, model = Registry().resolve("openai/m")
        with pytest.raises(ProviderError, match="OPENAI_API_KEY") as info:
            await provider.complete(ChatRequest(model=model, messages=HI))
        assert info.value.status == 401
        assert not leaked(everything_about(info.value))
        await provider.aclose()
