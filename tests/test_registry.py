"""Model references, environment conventions and user-registered prefixes."""

from __future__ import annotations

from pathlib import Path

import pytest

from moa.config import load_file
from moa.errors import ConfigError, MissingKeyError, UnknownProviderError
from moa.providers.anthropic import AnthropicProvider
from moa.providers.base import ChatRequest
from moa.providers.openai_compat import OpenAICompatProvider
from moa.providers.registry import BUILTIN_SPECS, ProviderSpec, Registry
from moa.testing import LoopbackServer, ModelBehavior

HI = [{"role": "user", "content": "ping"}]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No provider variables leak in from the machine running the tests."""
    for spec in BUILTIN_SPECS:
        monkeypatch.delenv(spec.key_variable, raising=False)
        monkeypatch.delenv(spec.base_url_variable, raising=False)


@pytest.mark.parametrize(
    ("prefix", "key_var", "url_var"),
    [
        ("openai", "OPENAI_API_KEY", "OPENAI_BASE_URL"),
        ("anthropic", "ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL"),
        ("together", "TOGETHER_API_KEY", "TOGETHER_BASE_URL"),
        ("hosted_vllm", "HOSTED_VLLM_API_KEY", "HOSTED_VLLM_BASE_URL"),
    ],
)
def test_variable_names_follow_vendor_sdks(prefix: str, key_var: str, url_var: str) -> None:
    spec = Registry().spec(prefix)
    assert (spec.key_variable, spec.base_url_variable) == (key_var, url_var)


@pytest.mark.anyio
async def test_openai_prefix_reads_key_and_base_url(
    monkeypatch: pytest.MonkeyPatch, loopback: LoopbackServer
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-test")
    monkeypatch.setenv("OPENAI_BASE_URL", loopback.base_url)
    loopback.set_behavior("gpt-4o-mini", ModelBehavior(reply="pong"))
    registry = Registry()
    provider, model = registry.resolve("openai/gpt-4o-mini")
    assert isinstance(provider, OpenAICompatProvider) and model == "gpt-4o-mini"
    [done] = await provider.complete(ChatRequest(model=model, messages=HI))
    assert done.text == "pong"
    assert loopback.requests[-1].headers["authorization"] == "Bearer sk-openai-test"
    assert registry.resolve("openai/other")[0] is provider  # one shared instance per prefix
    await registry.aclose()


@pytest.mark.anyio
async def test_anthropic_prefix_reads_key_and_base_url(
    monkeypatch: pytest.MonkeyPatch, loopback: LoopbackServer
) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test")
    monkeypatch.setenv("ANTHROPIC_BASE_URL", loopback.anthropic_base_url)
    registry = Registry()
    provider, model = registry.resolve("anthropic/claude-sonnet-4")
    assert isinstance(provider, AnthropicProvider)
    [done] = await provider.complete(ChatRequest(model=model, messages=HI))
    assert done.text == "ping"
    request = loopback.requests[-1]
    assert (request.path, request.model) == ("/v1/messages", "claude-sonnet-4")
    assert request.headers["x-api-key"] == "sk-ant-test"
    await registry.aclose()


def test_other_prefixes_read_name_api_key_and_name_base_url(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TOGETHER_API_KEY", "tg-test")
    provider, model = Registry().resolve("together/Qwen/Qwen2.5-72B-Instruct-Turbo")
    assert model == "Qwen/Qwen2.5-72B-Instruct-Turbo"  # the model part keeps its slashes
    assert provider.base_url == "https://api.together.xyz/v1"  # type: ignore[attr-defined]
    monkeypatch.setenv("TOGETHER_BASE_URL", "http://127.0.0.1:9/v1/")
    provider, _ = Registry().resolve("together/x")
    assert provider.base_url == "http://127.0.0.1:9/v1"  # type: ignore[attr-defined]


def test_missing_key_names_prefix_and_variable() -> None:
    with pytest.raises(MissingKeyError) as info:
        Registry().resolve("groq/llama-3.3-70b-versatile")
    assert (info.value.prefix, info.value.variable) == ("groq", "GROQ_API_KEY")
    assert "'groq'" in str(info.value) and "GROQ_API_KEY" in str(info.value)


def test_local_servers_need_no_key() -> None:
    provider, model = Registry().resolve("ollama/llama3.1")
    assert model == "llama3.1"
    assert provider.base_url == "http://127.0.0.1:11434/v1"  # type: ignore[attr-defined]


def test_unknown_prefix_and_bad_reference() -> None:
    with pytest.raises(UnknownProviderError, match="'nosuch'") as info:
        Registry().resolve("nosuch/model")
    assert info.value.prefix == "nosuch"
    assert "openai" in str(info.value)  # the known prefixes are listed
    with pytest.raises(ConfigError, match="provider/model"):
        Registry().check("gpt-4o")


def test_continuation_support_of_builtin_local_servers() -> None:
    registry = Registry()
    vllm, _ = registry.resolve("hosted_vllm/m")
    llamacpp, _ = registry.resolve("llamacpp/m")
    ollama, _ = registry.resolve("ollama/m")
    assert vllm.capabilities.continuation and llamacpp.capabilities.continuation
    assert not ollama.capabilities.continuation


@pytest.mark.anyio
async def test_user_registered_prefix(
    monkeypatch: pytest.MonkeyPatch, loopback: LoopbackServer
) -> None:
    registry = Registry()
    registry.register(ProviderSpec(prefix="my-lab", base_url=loopback.base_url))
    assert registry.spec("my-lab").key_variable == "MY_LAB_API_KEY"
    with pytest.raises(MissingKeyError, match="MY_LAB_API_KEY"):
        registry.resolve("my-lab/m")
    monkeypatch.setenv("MY_LAB_API_KEY", "lab-key")
    provider, model = registry.resolve("my-lab/m")
    [done] = await provider.complete(ChatRequest(model=model, messages=HI))
    assert done.text == "ping"
    registry.register(ProviderSpec(prefix="my-lab", base_url=loopback.base_url,
                                   key_required=False))
    assert registry.resolve("my-lab/m")[0] is not provider  # re-registering drops the instance
    await registry.aclose()
    await provider.aclose()


@pytest.mark.anyio
async def test_providers_table_in_a_toml_config(
    tmp_path: Path, loopback: LoopbackServer
) -> None:
    path = tmp_path / "mix.toml"
    path.write_text(
        f"""
[[layers]]
agents = [{{ model = "lab/a" }}, {{ model = "lab/b" }}]

[aggregator]
model = "lab/agg"

[providers.lab]
base_url = "{loopback.base_url}"
key_required = false
options = {{ continuation = "vllm" }}
limits = {{ max_concurrency = 2, max_retries = 1 }}
"""
    )
    config = load_file(path)
    registry = config.registry(Registry())
    provider, model = registry.resolve("lab/agg")
    assert provider.capabilities.continuation
    assert provider.transport.limits.max_concurrency == 2  # type: ignore[attr-defined]
    [done] = await provider.complete(ChatRequest(model=model, messages=HI))
    assert done.text == "ping"
    await registry.aclose()
