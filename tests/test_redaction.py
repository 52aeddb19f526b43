"""API keys never show in error messages, tracebacks, reprs or DEBUG logs: a usual key, a
JWT-style key longer than any cut of an upstream message, and a key shorter than
`MIN_SECRET_CHARS` (masked where it is a whole token)."""

from __future__ import annotations

import base64
import json
import logging
import traceback

import pytest

from moa.errors import ProviderError
from moa.providers.base import ChatRequest
from moa.providers.registry import Limits, Registry
from moa.testing import LoopbackServer, ModelBehavior

pytestmark = pytest.mark.anyio

USUAL = "sk-test-Zq8vR2mN5pL0xW7kT4yB"
JWT = ".".join(
    base64.urlsafe_b64encode(part).decode().rstrip("=")
    for part in (b'{"alg":"HS256","typ":"JWT"}',
                 json.dumps({"sub": "grep-redaction", "scopes": ["chat"] * 60}).encode(),
                 b"signature-grep-REDACTION-0123456789abcdef")
)
SHORT = "pk-4Zq7"
KEYS = {"usual": USUAL, "jwt": JWT, "short": SHORT}
HI = [{"role": "user", "content": "hello"}]
FAST = Limits(backoff_initial=0.001, backoff_max=0.002, max_retries=1)


@pytest.fixture(params=list(KEYS))
def secret(request: pytest.FixtureRequest) -> str:
    return KEYS[request.param]


def leaked(text: str, secret: str) -> bool:
    """The key, or 12 characters in a row of it (what a cut key leaves)."""
    return any(secret[i:i + 12] in text for i in range(max(1, len(secret) - 11)))


def everything_about(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc)) + repr(exc) + str(exc)


@pytest.fixture
def env_key(monkeypatch: pytest.MonkeyPatch, loopback: LoopbackServer, secret: str) -> Registry:
    assert len(JWT) > 400
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    monkeypatch.setenv("OPENAI_BASE_URL", loopback.base_url)
    monkeypatch.setenv("ANTHROPIC_API_KEY", secret)
    monkeypatch.setenv("ANTHROPIC_BASE_URL", loopback.anthropic_base_url)
    registry = Registry()
    for prefix in ("openai", "anthropic"):
        registry.register(registry.spec(prefix).model_copy(update={"limits": FAST}))
    return registry


async def test_provider_reprs_hold_no_key(env_key: Registry, secret: str) -> None:
    for ref in ("openai/m", "anthropic/m"):
        provider, _ = env_key.resolve(ref)
        for text in (repr(provider), str(provider), repr(vars(provider)),
                     repr(provider.transport), repr(env_key.spec(ref.split("/")[0]))):  # type: ignore[attr-defined]
            assert not leaked(text, secret), text
    await env_key.aclose()


async def test_errors_and_logs_hold_no_key(
    env_key: Registry, loopback: LoopbackServer, caplog: pytest.LogCaptureFixture, secret: str
) -> None:
    caplog.set_level(logging.DEBUG)
    echoing_error = (
        b'data: {"error": {"message": "key ' + secret.encode() + b' is not allowed",'
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
        assert not leaked(everything_about(exc), secret), everything_about(exc)
    assert "retrying" in caplog.text  # the retry path logged something
    assert not leaked(caplog.text, secret)
    assert any(r.headers.get("authorization") == f"Bearer {secret}" for r in loopback.requests)
    await env_key.aclose()


async def test_rejected_key_names_the_variable_not_the_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with LoopbackServer(api_key="the-right-one") as srv:
        monkeypatch.setenv("OPENAI_API_KEY", USUAL)
        monkeypatch.setenv("OPENAI_BASE_URL", srv.base_url)
        provider, model = Registry().resolve("openai/m")
        with pytest.raises(ProviderError, match="OPENAI_API_KEY") as info:
            await provider.complete(ChatRequest(model=model, messages=HI))
        assert info.value.status == 401
        assert not leaked(everything_about(info.value), USUAL)
        await provider.aclose()
