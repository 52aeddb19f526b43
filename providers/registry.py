"""Resolve `prefix/model` references to shared provider instances.

Each prefix maps to a `ProviderSpec`: which wire protocol (`kind`), the default base URL,
and the environment variables for the key and a base-URL override. Users add or override
entries with `Registry.register()` or a `[providers.NAME]` table in a config file.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from moa.errors import ConfigError, MissingKeyError, UnknownProviderError

from .base import Provider
from .secrets import mask_url

Kind = Literal["openai", "anthropic", "llamacpp", "vllm"]

_FACTORIES: dict[str, str] = {
    "openai": "moa.providers.openai_compat:OpenAICompatProvider",
    "anthropic": "moa.providers.anthropic:AnthropicProvider",
    "llamacpp": "moa.local_engine.llamacpp:LlamaCppEngine",
    "vllm": "moa.local_engine.vllm_engine:VLLMEngine",
}
_EXTRAS: dict[str, str] = {"llamacpp": "local", "vllm": "vllm"}


class Limits(BaseModel):
    """Retry, timeout, concurrency and rate settings of one provider.

    `rpm` / `tpm` and the concurrency caps hold per process with the in-process state, and
    across every replica with a shared one (`moa.state`); there `max_concurrency` is shared only
    when set explicitly (its default stays per process)."""

    model_config = ConfigDict(extra="forbid")

    max_retries: int = Field(3, ge=0, description="Retries after the first attempt.")
    backoff_initial: float = Field(0.5, ge=0, description="First backoff in seconds.")
    backoff_max: float = Field(20.0, ge=0, description="Longest single backoff in seconds.")
    connect_timeout: float = Field(10.0, gt=0)
    read_timeout: float = Field(60.0, gt=0, description="Longest silence inside a stream.")
    total_timeout: float | None = Field(600.0, gt=0, description="Whole-call deadline.")
    max_concurrency: int = Field(16, ge=1, description="Open calls to this provider at once.")
    max_concurrency_per_model: int | None = Field(None, ge=1)
    rpm: int | None = Field(None, ge=1, description="Requests per minute to this provider.")
    tpm: int | None = Field(
        None, ge=1, description="Tokens per minute (worst case reserved, actual usage settled)."
    )
    pool_size: int = Field(
        16, ge=1, description="Connections per connection pool; more open calls use more pools "
        "(httpx's own pool, used under trio or a proxy, does bookkeeping that grows with the "
        "square of its size)."
    )


class ProviderSpec(BaseModel):
    """How to reach one provider prefix."""

    model_config = ConfigDict(extra="forbid")

    prefix: str
    kind: Kind = "openai"
    base_url: str | None = None
    key_env: str | None = None
    """Variable holding the API key; default `PREFIX_API_KEY`."""
    base_url_env: str | None = None
    """Variable overriding the base URL; default `PREFIX_BASE_URL`."""
    key_required: bool = True
    key: SecretStr | None = Field(None, exclude=True, repr=False)
    """An explicit API key (e.g. a wrapped client's); otherwise the key variable is read."""
    limits: Limits = Field(default_factory=Limits)
    options: dict[str, object] = Field(default_factory=dict)
    """Backend-specific options: engine settings for embedded engines; for OpenAI-compatible
    servers `continuation` = "vllm" (send `continue_final_message`) or "prefill" (a final
    assistant message is continued as is) when the server can continue an assistant turn."""

    def __repr_args__(self) -> Any:
        """URL credentials and extra header values (they may hold keys) masked."""
        for name, value in super().__repr_args__():
            if name == "base_url" and value:
                value = mask_url(value)
            elif name == "options" and isinstance(value.get("headers"), dict):
                value = {**value, "headers": dict.fromkeys(value["headers"], "***")}
            yield name, value

    @property
    def env_stem(self) -> str:
        return self.prefix.upper().replace("-", "_").replace(".", "_")

    @property
    def key_variable(self) -> str:
        return self.key_env or f"{self.env_stem}_API_KEY"

    @property
    def base_url_variable(self) -> str:
        return self.base_url_env or f"{self.env_stem}_BASE_URL"

    def api_key(self) -> SecretStr | None:
        if self.key is not None:
            return self.key
        value = os.environ.get(self.key_variable)
        return SecretStr(value) if value else None

    def resolved_base_url(self) -> str | None:
        return os.environ.get(self.base_url_variable) or self.base_url


def _remote(prefix: str, url: str, **kw: object) -> ProviderSpec:
    return ProviderSpec(prefix=prefix, base_url=url, **kw)  # type: ignore[arg-type]


def _local_server(prefix: str, url: str, continuation: str | None = None) -> ProviderSpec:
    options: dict[str, object] = {"continuation": continuation} if continuation else {}
    return ProviderSpec(prefix=prefix, base_url=url, key_required=False, options=options)


BUILTIN_SPECS: list[ProviderSpec] = [
    _remote("openai", "https://api.openai.com/v1"),
    ProviderSpec(prefix="anthropic", kind="anthropic", base_url="https://api.anthropic.com"),
    _remote("together", "https://api.together.xyz/v1"),
    _remote("groq", "https://api.groq.com/openai/v1"),
    _remote("fireworks", "https://api.fireworks.ai/inference/v1"),
    _remote("deepinfra", "https://api.deepinfra.com/v1/openai"),
    _remote("openrouter", "https://openrouter.ai/api/v1"),
    _remote("deepseek", "https://api.deepseek.com/v1"),
    _remote("mistral", "https://api.mistral.ai/v1"),
    _local_server("hosted_vllm", "http://127.0.0.1:8000/v1", "vllm"),
    _local_server("llamacpp", "http://127.0.0.1:8080/v1", "prefill"),
    _local_server("ollama", "http://127.0.0.1:11434/v1"),
    _local_server("lmstudio", "http://127.0.0.1:1234/v1"),
    ProviderSpec(prefix="local", kind="llamacpp", key_required=False),
    ProviderSpec(prefix="vllm", kind="vllm", key_required=False),
]


def split_ref(ref: str) -> tuple[str, str]:
    """Split `prefix/model` into its two parts; the model part may contain slashes."""
    prefix, sep, model = ref.partition("/")
    if not sep or not prefix or not model:
        raise ConfigError(
            f"Model reference {ref!r} must look like 'provider/model', e.g. 'openai/gpt-4o-mini'."
        )
    return prefix, model


class Registry:
    """Prefix -> spec, and one shared provider instance (one connection pool) per prefix."""

    def __init__(self, specs: list[ProviderSpec] | None = None) -> None:
        self._specs: dict[str, ProviderSpec] = {}
        self._instances: dict[str, Provider] = {}
        for spec in BUILTIN_SPECS if specs is None else specs:
            self.register(spec)

    def register(self, spec: ProviderSpec) -> None:
        """Add or replace a prefix; a cached instance of it is dropped."""
        self._specs[spec.prefix] = spec
        self._instances.pop(spec.prefix, None)

    def extended(self, specs: Iterable[ProviderSpec]) -> Registry:
        """This registry when `specs` is empty, else a new one with `specs` added (or replaced)."""
        specs = list(specs)
        if not specs:
            return self
        registry = Registry(self.specs())
        for spec in specs:
            registry.register(spec)
        return registry

    def specs(self) -> list[ProviderSpec]:
        return list(self._specs.values())

    def spec(self, prefix: str) -> ProviderSpec:
        try:
            return self._specs[prefix]
        except KeyError:
            raise UnknownProviderError(prefix, list(self._specs)) from None

    def check(self, ref: str) -> tuple[ProviderSpec, str]:
        """Validate a reference without creating a provider (used at config load time); an
        embedded llama.cpp model's file and options are checked too."""
        prefix, model = split_ref(ref)
        spec = self.spec(prefix)
        if spec.kind == "llamacpp":
            from moa.local_engine.model_files import check_local

            check_local(model, spec.options)
        return spec, model

    def resolve(self, ref: str) -> tuple[Provider, str]:
        """Return the shared provider for `ref` and the model name to send it."""
        spec, model = self.check(ref)
        instance = self._instances.get(spec.prefix)
        if instance is None:
            instance = self._create(spec)
            self._instances[spec.prefix] = instance
        return instance, model

    def _create(self, spec: ProviderSpec) -> Provider:
        key = spec.api_key()
        if spec.key_required and key is None:
            raise MissingKeyError(spec.prefix, spec.key_variable)
        module_name, _, attr = _FACTORIES[spec.kind].partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
            return factory(spec, key)
        except ImportError as err:
            extra = _EXTRAS.get(spec.kind)
            hint = f" install it with: pip install -e '.[{extra}]'" if extra else ""
            raise ConfigError(
                f"Provider {spec.prefix!r} needs the missing package {err.name or err}:{hint}."
            ) from err

    async def aclose(self) -> None:
        """Close this event loop's connections of every provider this registry created.

        The providers stay registered (a later call opens new connections), and connections of
        other event loops stay open: each loop (each `run_sync`, each thread) closes its own.
        Calls still running on a closed pool finish first.
        """
        for instance in list(self._instances.values()):
            await instance.aclose()


default_registry = Registry()
