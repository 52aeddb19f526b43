"""No credential in any output: distinctive keys, upstreams that echo them in 401/429/500 bodies
and in-stream errors, and a grep of every surface — log lines at every level, errors and their
tracebacks, results, the server's answers and logs, the wrapper, `moa chat --debug`, reprs.
Keys of every length: a JWT-style key longer than any cut of an upstream message (its head must
not survive the cut) and a key shorter than `MIN_SECRET_CHARS`."""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import subprocess
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import openai
import pytest

import moa
from moa.errors import MoaError, ProviderError
from moa.mixture import Mixture
from moa.openai.server import ServerThread, create_app
from moa.providers.base import ChatRequest
from moa.providers.registry import Limits, ProviderSpec, Registry
from moa.providers.secrets import MIN_SECRET_CHARS, excerpt, mask_url, redact
from moa.testing import LoopbackServer, ModelBehavior

OPENAI_KEY = "sk-grep-OPENAI-7f3a9c2e11d4"
ANTHROPIC_KEY = "sk-ant-grep-ANTHROPIC-4d8b6e0f22"
URL_PASSWORD = "pw-grep-URLPASS-93kd"
KEYS = (OPENAI_KEY, ANTHROPIC_KEY, URL_PASSWORD)
JWT_KEY = ".".join(
    base64.urlsafe_b64encode(part).decode().rstrip("=")
    for part in (b'{"alg":"RS256","typ":"JWT","kid":"grep-JWT"}',
                 json.dumps({"iss": "grep-JWT-issuer", "aud": ["moa"] * 80, "exp": 1}).encode(),
                 b"grep-JWT-signature-" + bytes(range(48, 123)))
)
SHORT_KEY = "k-9Qz"
FAST = Limits(backoff_initial=0.001, backoff_max=0.002, max_retries=1, read_timeout=5)
HI = [{"role": "user", "content": "hello"}]
ECHOING = {
    "k401": ModelBehavior(fail_status=401, echo_credentials=True),
    "k429": ModelBehavior(fail_status=429, retry_after=0, echo_credentials=True),
    "k500": ModelBehavior(fail_status=500, echo_credentials=True),
    "kfirst": ModelBehavior(reply="a b c", error_after=0, echo_credentials=True),
    "kmid": ModelBehavior(reply="a b c", error_after=1, echo_credentials=True),
    "ok": ModelBehavior(reply="fine answer"),
}


def leaks(text: str) -> list[str]:
    return [key for key in KEYS if key in text or key[6:] in text]


def described(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc)) + repr(exc) + str(exc)


@pytest.fixture
def upstream(monkeypatch: pytest.MonkeyPatch) -> Iterator[LoopbackServer]:
    with LoopbackServer(ECHOING) as server:
        monkeypatch.setenv("OPENAI_API_KEY", OPENAI_KEY)
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        monkeypatch.setenv("ANTHROPIC_API_KEY", ANTHROPIC_KEY)
        monkeypatch.setenv("ANTHROPIC_BASE_URL", server.anthropic_base_url)
        yield server


def registry() -> Registry:
    registry = Registry()
    for prefix in ("openai", "anthropic"):
        registry.register(registry.spec(prefix).model_copy(update={"limits": FAST}))
    return registry


def team(prefix: str, proposers: list[str], aggregator: str) -> dict:
    return {"mode": "layered",
            "layers": [{"agents": [{"model": f"{prefix}/{m}"} for m in proposers]}],
            "aggregator": {"model": f"{prefix}/{aggregator}"}}


FAILING = ["k401", "k429", "k500", "kfirst", "kmid"]


@pytest.mark.anyio
async def test_library_errors_results_and_every_log_level_hold_no_key(
    upstream: LoopbackServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    seen: list[str] = []
    for prefix in ("openai", "anthropic"):
        reg = registry()
        # Proposers fail every way, the answer still comes: the result records their errors.
        ok = Mixture(team(prefix, [*FAILING, "ok"], "ok"), registry=reg)
        result = await ok.run(HI)
        assert result.text == "fine answer"
        seen += [json.dumps(result.to_dict()), repr(result)]
        # The aggregator fails mid-stream, quoting the key.
        bad = Mixture(team(prefix, ["ok"], "kmid"), registry=reg)
        with pytest.raises(MoaError) as info:
            await bad.run(HI)
        seen += [described(info.value), json.dumps(getattr(info.value, "partial", None) and
                                                   info.value.partial.to_dict())]
        for ref in (f"{prefix}/{m}" for m in FAILING):
            provider, model = reg.resolve(ref)
            with pytest.raises(ProviderError) as failed:
                await provider.complete(ChatRequest(model=model, messages=HI))
            assert "request key: ***" in str(failed.value), str(failed.value)
            seen += [described(failed.value), repr(provider), repr(vars(provider))]
        await reg.aclose()
    assert "retrying" in caplog.text, "the retry log line (INFO) was exercised"
    assert any(r.levelno == logging.DEBUG for r in caplog.records)
    for text in [*seen, caplog.text]:
        assert not leaks(text), text
    sent = {r.headers.get("authorization") or r.headers.get("x-api-key") for r in upstream.requests}
    assert f"Bearer {OPENAI_KEY}" in sent and ANTHROPIC_KEY in sent  # the keys were really sent


def test_server_answers_and_logs_hold_no_key(
    upstream: LoopbackServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    mixtures = {name: moa.config.load(team("openai", ["ok"], name)) for name in FAILING}
    mixtures["proposers"] = moa.config.load(team("anthropic", FAILING, "ok"))
    seen: list[str] = []
    with ServerThread(create_app(mixtures, registry=registry())) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="client-key", max_retries=0)
        for name in mixtures:
            for stream in (False, True):
                try:
                    reply = client.chat.completions.create(model=name, messages=HI, stream=stream)  # type: ignore[call-overload]
                    seen.append(str([chunk for chunk in reply] if stream else reply))
                except openai.APIError as err:
                    seen += [str(err), repr(err.body)]
    assert len(seen) > 10
    for text in [*seen, caplog.text]:
        assert not leaks(text), text


def test_wrapper_errors_hold_no_key(upstream: LoopbackServer) -> None:
    mixtures = {agg: team("client", ["ok"], agg) for agg in ("k401", "k500", "kmid")}
    client = moa.OpenAI(base_url=upstream.base_url, api_key=OPENAI_KEY, max_retries=0,
                        mixtures=mixtures)
    for name in mixtures:
        with pytest.raises(MoaError) as info:
            client.chat.completions.create(model=name, messages=HI)  # type: ignore[arg-type]
        assert not leaks(described(info.value)), described(info.value)
    assert not leaks(repr(client))


def test_moa_chat_debug_output_holds_no_key(upstream: LoopbackServer, tmp_path: Path) -> None:
    config = tmp_path / "leak.toml"
    config.write_text(
        'mode = "layered"\n[[layers]]\nagents = [{model = "openai/k429"},'
        ' {model = "openai/k500"}, {model = "anthropic/kfirst"}, {model = "openai/ok"}]\n'
        '[aggregator]\nmodel = "openai/kmid"\n'
        "[providers.openai.limits]\nbackoff_initial = 0.001\nbackoff_max = 0.002\n"
        "max_retries = 1\n"
    )
    env = {**os.environ, "OPENAI_API_KEY": OPENAI_KEY, "ANTHROPIC_API_KEY": ANTHROPIC_KEY}
    for debug in (["--debug"], []):
        proc = subprocess.run(
            [sys.executable, "-m", "moa.cli", "chat", *debug, "-c", str(config), "--json", "hi"],
            capture_output=True, text=True, env=env, timeout=120, stdin=subprocess.DEVNULL,
        )
        assert proc.returncode != 0 and "***" in proc.stdout + proc.stderr
        assert not leaks(proc.stdout + proc.stderr), proc.stdout + proc.stderr


@pytest.mark.anyio
async def test_url_credentials_are_masked_in_reprs_messages_and_moa_models(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    url = f"http://user:{URL_PASSWORD}@127.0.0.1:9/v1"  # port 9: nothing listens
    spec = ProviderSpec(prefix="lab", base_url=url, key_required=False, limits=FAST,
                        options={"headers": {"x-secret": OPENAI_KEY}})
    reg = Registry()
    reg.register(spec)
    provider, model = reg.resolve("lab/m")
    with pytest.raises(ProviderError, match=r"connection to http://127\.0\.0\.1:9 failed") as info:
        await provider.complete(ChatRequest(model=model, messages=HI))
    await reg.aclose()
    for text in (repr(spec), repr(provider), described(info.value), caplog.text):
        assert not leaks(text), text
    proc = subprocess.run([sys.executable, "-m", "moa.cli", "models", "--json"],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "OPENAI_BASE_URL": url})
    assert proc.returncode == 0 and "***@127.0.0.1:9" in proc.stdout
    assert not leaks(proc.stdout + proc.stderr)


def test_short_keys_are_masked_as_whole_tokens_only() -> None:
    assert len(SHORT_KEY) < MIN_SECRET_CHARS
    assert redact("the upstream exploded", "e") == "the upstream exploded"
    assert redact(f"key {OPENAI_KEY} refused", "e", OPENAI_KEY) == "key *** refused"
    assert redact(f"bad key {SHORT_KEY}.", SHORT_KEY) == "bad key ***."
    assert redact(f"key={SHORT_KEY}, x{SHORT_KEY}y", SHORT_KEY) == f"key=***, x{SHORT_KEY}y"
    assert redact("a letter e stands alone", "e") == "a letter *** stands alone"
    assert mask_url("http://127.0.0.1:8000/v1") == "http://127.0.0.1:8000/v1"


def test_a_cut_never_leaves_the_head_of_a_key() -> None:
    text = "x" * 250 + f" key {JWT_KEY} refused"
    assert excerpt(text, 300, JWT_KEY) == ("x" * 250 + " key *** refused")[:300]
    assert not head_leaks(excerpt(text, 300, JWT_KEY), JWT_KEY)


def head_leaks(text: str, key: str) -> bool:
    """The key, or (for a long one) 12 characters in a row of it: what a cut key leaves."""
    if len(key) < MIN_SECRET_CHARS:
        return re.search(rf"(?<![0-9A-Za-z]){re.escape(key)}(?![0-9A-Za-z])", text) is not None
    return any(key[i:i + 12] in text for i in range(len(key) - 11))


@pytest.mark.parametrize("key", [JWT_KEY, SHORT_KEY], ids=["jwt", "short"])
def test_long_and_short_keys_show_nowhere_not_even_cut(
    key: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    """An upstream that quotes the key in status bodies and in-stream errors: the messages
    are cut to a few hundred characters, the JWT is longer than that."""
    assert len(JWT_KEY) > 600
    caplog.set_level(logging.DEBUG)
    seen: list[str] = []
    with LoopbackServer(ECHOING) as upstream:
        for prefix, where in (("OPENAI", upstream.base_url),
                              ("ANTHROPIC", upstream.anthropic_base_url)):
            monkeypatch.setenv(f"{prefix}_API_KEY", key)
            monkeypatch.setenv(f"{prefix}_BASE_URL", where)

        async def library() -> None:
            reg = registry()
            for ref in ("openai/k401", "openai/k500", "openai/kfirst", "anthropic/k500",
                        "anthropic/kfirst"):
                provider, model = reg.resolve(ref)
                with pytest.raises(ProviderError) as failed:
                    await provider.complete(ChatRequest(model=model, messages=HI))
                assert "request key: ***" in str(failed.value), str(failed.value)
                seen.append(described(failed.value))
            await reg.aclose()

        anyio.run(library)
        mixtures = {name: moa.config.load(team("openai", ["ok"], name))
                    for name in ("k401", "k500", "kmid")}
        with ServerThread(create_app(mixtures, registry=registry())) as server:
            client = openai.OpenAI(base_url=server.base_url, api_key="client-key", max_retries=0)
            for name in mixtures:
                for stream in (False, True):
                    with pytest.raises(openai.APIError) as answered:
                        reply = client.chat.completions.create(  # type: ignore[call-overload]
                            model=name, messages=HI, stream=stream)
                        list(reply) if stream else None
                    seen += [str(answered.value), repr(answered.value.body)]
        config = tmp_path / "leak.toml"
        config.write_text(
            'mode = "layered"\n[[layers]]\nagents = [{model = "openai/k500"},'
            ' {model = "openai/ok"}]\n[aggregator]\nmodel = "openai/kmid"\n'
            "[providers.openai.limits]\nbackoff_initial = 0.001\nmax_retries = 0\n"
        )
        chat = subprocess.run(
            [sys.executable, "-m", "moa.cli", "chat", "-c", str(config), "hi"],
            capture_output=True, text=True, env=dict(os.environ), timeout=120,
            stdin=subprocess.DEVNULL,
        )
    assert chat.returncode != 0 and "***" in chat.stderr, chat.stderr
    assert any("***" in text for text in seen)
    for text in [*seen, caplog.text, chat.stdout + chat.stderr]:
        assert not head_leaks(text, key), text


def test_connection_reuse_after_echoed_key_errors(upstream: LoopbackServer) -> None:
    """The server's error answers leave its keep-alive connection usable."""
    mixtures = {"bad": moa.config.load(team("openai", ["ok"], "k500")),
                "good": moa.config.load(team("openai", ["ok"], "ok"))}
    with ServerThread(create_app(mixtures, registry=registry())) as server, \
            httpx.Client(base_url=server.base_url, timeout=30) as http:
        for name, status in (("bad", 502), ("good", 200), ("bad", 502), ("good", 200)):
            response = http.post("/chat/completions", json={"model": name, "messages": HI})
            assert response.status_code == status and not leaks(response.text)
            assert response.headers.get("connection") != "close"


@pytest.mark.anyio
async def test_url_credentials_travel_as_a_header_that_no_log_shows(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)  # httpx logs each request's URL at INFO
    basic = "Basic " + base64.b64encode(f"user:{URL_PASSWORD}".encode()).decode()
    with LoopbackServer(ECHOING) as upstream:
        url = upstream.base_url.replace("http://", f"http://user:{URL_PASSWORD}@")
        reg = Registry()
        reg.register(ProviderSpec(prefix="lab", base_url=url, key_required=False, limits=FAST))
        provider, _ = reg.resolve("lab/ok")
        [done] = await provider.complete(ChatRequest(model="ok", messages=HI))
        assert done.text == "fine answer"
        assert upstream.requests[-1].headers["authorization"] == basic
        with pytest.raises(ProviderError, match=r"request key: \*\*\*") as info:
            await provider.complete(ChatRequest(model="k500", messages=HI))
        await reg.aclose()
    assert "HTTP Request: POST http://127.0.0.1" in caplog.text
    for text in (described(info.value), caplog.text, repr(provider)):
        assert not leaks(text) and basic.split()[1] not in text, text


def test_url_credentials_beside_a_key_are_reported_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """`user:password@` in OPENAI_BASE_URL and OPENAI_API_KEY would both be the authorization
    header: the key wins, and one line says so — not one per request or per registry."""
    told = ("openai: OPENAI_API_KEY and the user:password@ in OPENAI_BASE_URL are both set; "
            "the key is sent and the URL's credentials are not.")
    with LoopbackServer(ECHOING) as upstream:
        url = upstream.base_url.replace("http://", f"http://user:{URL_PASSWORD}@")
        monkeypatch.setenv("OPENAI_BASE_URL", url)
        monkeypatch.setenv("OPENAI_API_KEY", OPENAI_KEY)

        async def calls() -> None:
            for _ in range(2):  # two registries, three requests each
                reg = Registry()
                provider, model = reg.resolve("openai/ok")
                for _ in range(3):
                    [done] = await provider.complete(ChatRequest(model=model, messages=HI))
                    assert done.text == "fine answer"
                await reg.aclose()

        anyio.run(calls)
        assert {r.headers["authorization"] for r in upstream.requests} == {f"Bearer {OPENAI_KEY}"}
        chat = subprocess.run(
            [sys.executable, "-m", "moa.cli", "chat", "-p", "openai/ok", "-p", "openai/ok",
             "-a", "openai/ok", "hi"],
            capture_output=True, text=True, env=dict(os.environ), timeout=120,
            stdin=subprocess.DEVNULL,
        )
    assert [r.getMessage() for r in caplog.records if "user:password@" in r.getMessage()] == [told]
    assert chat.returncode == 0, chat.stderr
    assert chat.stderr.count("user:password@") == 1 and told in chat.stderr, chat.stderr
    assert not leaks(caplog.text + chat.stdout + chat.stderr)
