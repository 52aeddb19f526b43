"""Mixture configuration: pydantic models, presets, and loading from TOML / JSON files.

A preset name, a config file and Python objects all produce the same `MixtureConfig`.
Invalid configs fail at load time with a `ConfigError` naming the field.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from moa.errors import ConfigError
from moa.providers.registry import ProviderSpec, Registry, default_registry
from moa.runtime.budget import Budget

Mode = Literal["layered", "staircase", "auto"]


class AgentConfig(BaseModel):
    """One model call slot: a proposer or an aggregator."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="Model reference 'provider/model'.")
    temperature: float = Field(0.7, ge=0, le=2)
    max_tokens: int = Field(512, gt=0)
    system: str | None = Field(None, description="System prompt of this agent.")
    name: str | None = None
    n: int = Field(1, ge=1, description="Samples drawn from this agent (Self-MoA).")

    @model_validator(mode="after")
    def _model_ref(self) -> AgentConfig:
        prefix, sep, model = self.model.partition("/")
        if not sep or not prefix or not model:
            raise ValueError("must look like 'provider/model', e.g. 'openai/gpt-4o-mini'")
        return self

    @property
    def label(self) -> str:
        return self.name or self.model


class LayerConfig(BaseModel):
    """A layer of agents that run concurrently."""

    model_config = ConfigDict(extra="forbid")

    agents: list[AgentConfig] = Field(min_length=1)
    min_proposers: int = Field(1, ge=1, description="Answers needed for the layer to succeed.")

    @model_validator(mode="after")
    def _quorum(self) -> LayerConfig:
        total = sum(a.n for a in self.agents)
        if self.min_proposers > total:
            raise ValueError(f"min_proposers={self.min_proposers} exceeds the {total} agents")
        return self


class StaircaseConfig(BaseModel):
    """Staircase streaming settings (see docs/staircase.md)."""

    model_config = ConfigDict(extra="forbid")

    chunk_tokens: list[Annotated[int, Field(gt=0)]] = Field(
        default_factory=lambda: [16, 32, 64], min_length=1
    )
    """Chunk sizes in tokens, small first; the last repeats."""
    step_tokens: list[Annotated[int, Field(gt=0)]] = Field(
        default_factory=lambda: [16, 32, 64], min_length=1
    )
    """Aggregator tokens per step, small first; the last repeats."""
    start_k: int | None = Field(
        None, ge=1, description="k of the fastest-k start (default: the layer's min_proposers)."
    )
    grace_s: float = Field(
        0.25, ge=0, description="Longest wait for slower first chunks once k arrived."
    )
    stall_s: float = Field(
        2.0,
        gt=0,
        description="Silence after which an unfinished reference stops holding an aggregator.",
    )
    layout: Literal["readable", "prefix_cache"] = "readable"
    keep_truncated: bool = True
    """Keep (labelled) the text of a proposer that failed mid-stream."""
    # An aggregator starts when every live reference delivered its first chunk, or once k
    # have and `grace_s` passed; the step loop is in moa.runtime.executor, the design in the docs.

    def chunk_size(self, index: int) -> int:
        """Tokens in chunk `index` (0-based) of a streamed reference."""
        return self.chunk_tokens[min(index, len(self.chunk_tokens) - 1)]

    def step_size(self, index: int) -> int:
        """Tokens the aggregator generates in step `index` (0-based) before it looks again."""
        return self.step_tokens[min(index, len(self.step_tokens) - 1)]


class MixtureConfig(BaseModel):
    """A whole mixture: proposer layers, then one final aggregator."""

    model_config = ConfigDict(extra="forbid")

    name: str = "custom"
    layers: list[LayerConfig] = Field(min_length=1)
    """Proposer layers. The final aggregator is one more layer, so layers + 1 in all."""
    aggregator: AgentConfig
    mode: Mode = "auto"
    deadline_s: float | None = Field(None, gt=0, description="Whole-request deadline.")
    aggregator_context_tokens: int | None = Field(None, gt=0)
    """Context window of aggregators; references are trimmed or windowed to fit."""
    long_references: Literal["trim", "window"] = "trim"
    """When references overflow the context: trim each one, or aggregate them in windows
    carrying the running synthesis forward (Self-MoA-Seq)."""
    staircase: StaircaseConfig = Field(default_factory=StaircaseConfig)
    providers: dict[str, ProviderSpec] = Field(default_factory=dict)
    """Extra or overriding provider prefixes."""
    prices: dict[str, tuple[float, float]] = Field(default_factory=dict)
    """Model reference -> (input, output) US dollars per million tokens."""
    budget: Budget = Field(default_factory=Budget)
    """Hard per-request budget (`usd` and/or `tokens`); a call that could exceed it is refused."""
    session_budget: Budget = Field(default_factory=Budget)
    """Hard budget over every request of one `Mixture` object."""
    routing: dict[str, Any] | None = None
    """A routed strategy over this file's models (`moa.routing.strategy.RoutingConfig`); `moa eval`
    and `moa calibrate` use it, the layered executor ignores it."""

    @model_validator(mode="before")
    @classmethod
    def _provider_prefixes(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("providers"), dict):
            data = dict(data)
            data["providers"] = {
                k: {"prefix": k, **v} if isinstance(v, dict) else v
                for k, v in data["providers"].items()
            }
        return data

    def agents(self) -> list[AgentConfig]:
        return [a for layer in self.layers for a in layer.agents] + [self.aggregator]

    @property
    def call_count(self) -> int:
        return sum(a.n for layer in self.layers for a in layer.agents) + 1

    def registry(self, base: Registry | None = None) -> Registry:
        """A registry with this config's providers added to `base` (the default one)."""
        return (base or default_registry).extended(self.providers.values())

    def agent_fields(self) -> list[tuple[str, AgentConfig]]:
        """Every agent with the config path that names it, e.g. 'layers.0.agents.2'."""
        fields = [
            (f"layers.{i}.agents.{j}", agent)
            for i, layer in enumerate(self.layers)
            for j, agent in enumerate(layer.agents)
        ]
        return [*fields, ("aggregator", self.aggregator)]

    def check_models(self, registry: Registry | None = None) -> None:
        """Fail now, naming the field, if an agent names an unknown provider prefix."""
        registry = self.registry(registry)
        for where, agent in self.agent_fields():
            try:
                registry.check(agent.model)
            except ConfigError as err:
                raise ConfigError(f"Invalid config: field '{where}.model': {err}") from None


def _agents(models: list[str], **kw: Any) -> list[AgentConfig]:
    return [AgentConfig(model=m, **kw) for m in models]


_TOGETHER_PROPOSERS = [
    "together/Qwen/Qwen2.5-72B-Instruct-Turbo",
    "together/meta-llama/Llama-3.3-70B-Instruct-Turbo",
    "together/deepseek-ai/DeepSeek-V3",
    "together/mistralai/Mixtral-8x22B-Instruct-v0.1",
    "together/google/gemma-2-27b-it",
    "together/Qwen/Qwen2.5-7B-Instruct-Turbo",
]
_TOGETHER_AGGREGATOR = "together/Qwen/Qwen2.5-72B-Instruct-Turbo"
LOCAL_MODEL = "local/smollm2"


def _preset(name: str) -> MixtureConfig:
    if name == "moa":
        layer = LayerConfig(agents=_agents(_TOGETHER_PROPOSERS))
        return MixtureConfig(
            name=name,
            layers=[layer, layer.model_copy(deep=True)],
            aggregator=AgentConfig(model=_TOGETHER_AGGREGATOR),
        )
    if name == "moa-lite":
        return MixtureConfig(
            name=name,
            layers=[LayerConfig(agents=_agents(_TOGETHER_PROPOSERS))],
            aggregator=AgentConfig(model=_TOGETHER_AGGREGATOR),
        )
    if name == "self-moa":
        return MixtureConfig(
            name=name,
            layers=[LayerConfig(agents=[AgentConfig(model=_TOGETHER_AGGREGATOR, n=6)])],
            aggregator=AgentConfig(model=_TOGETHER_AGGREGATOR),
        )
    if name == "local":
        return MixtureConfig(
            name=name,
            # Kept by `moa bench quality` (docs/quality.md): on the dev split no mixture of this
            # model beat it, and it stays within the interval of the model alone.
            layers=[LayerConfig(agents=[AgentConfig(model=LOCAL_MODEL, n=3, max_tokens=128)])],
            aggregator=AgentConfig(model=LOCAL_MODEL, max_tokens=192, temperature=0.3),
            # One generation at a time on the CPU: staircase cannot overlap the proposers and
            # its steps cost extra prefills (docs/staircase.md has the figures).
            mode="layered",
        )
    raise ConfigError(f"Unknown preset {name!r}; presets: {', '.join(PRESETS)}.")


PRESETS: dict[str, str] = {
    "moa": "3 layers: 6 proposers, 6 refiners, 1 aggregator on Together (13 calls)",
    "moa-lite": "2 layers: 6 proposers, 1 aggregator on Together (7 calls)",
    "self-moa": "Qwen2.5-72B sampled 6 times, then aggregated by itself (7 calls)",
    "local": "SmolLM2-135M on the CPU sampled 3 times, then aggregated by itself (4 calls)",
}


def preset(name: str) -> MixtureConfig:
    """The named preset as a fresh `MixtureConfig`."""
    return _preset(name)


def _format_validation_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "(top level)"
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"Invalid config {source}: field '{where}': {first['msg']}{more}."


def from_dict(
    data: dict[str, Any], *, source: str = "object", registry: Registry | None = None
) -> MixtureConfig:
    """Validate a plain dict (parsed TOML / JSON) into a `MixtureConfig`.

    A `preset` key starts from that preset; the other keys replace its top-level fields.
    """
    if "preset" in data:
        data = dict(data)
        name = data.pop("preset")
        if name not in PRESETS:
            raise ConfigError(
                f"Invalid config {source}: field 'preset': unknown preset {name!r}; "
                f"presets: {', '.join(PRESETS)}."
            )
        data = {**preset(name).model_dump(exclude_unset=False), **data}
    try:
        config = MixtureConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None
    config.check_models(registry)
    return config


def read_file(path: str | Path) -> dict[str, Any]:
    """Parse a `.toml` or `.json` config file into a plain dict, not yet validated."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"Cannot read config file {str(path)!r}: {err.strerror}.") from None
    try:
        data = json.loads(raw) if path.suffix.lower() == ".json" else tomllib.loads(raw.decode())
    except (ValueError, UnicodeDecodeError) as err:
        raise ConfigError(f"Config file {str(path)!r} is malformed: {err}.") from None
    if not isinstance(data, dict):
        raise ConfigError(f"Config file {str(path)!r} must hold a table / object at the top level.")
    return data


def load_file(path: str | Path, *, registry: Registry | None = None) -> MixtureConfig:
    """Load a mixture from a `.toml` or `.json` file."""
    return from_dict(read_file(path), source=repr(str(path)), registry=registry)


def load(
    source: str | Path | MixtureConfig | dict[str, Any], *, registry: Registry | None = None
) -> MixtureConfig:
    """A preset name, a file path, a dict or a `MixtureConfig` -> `MixtureConfig`."""
    if isinstance(source, MixtureConfig):
        return source
    if isinstance(source, dict):
        return from_dict(source, registry=registry)
    text = str(source)
    if text in PRESETS:
        return preset(text)
    if isinstance(source, Path) or text.endswith((".toml", ".json")) or "/" in text:
        return load_file(source, registry=registry)
    raise ConfigError(f"Unknown preset {text!r}; presets: {', '.join(PRESETS)}.")
