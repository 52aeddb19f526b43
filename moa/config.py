"""Mixture configuration: pydantic models, presets, and loading from TOML / JSON files.

A preset name, a config file and Python objects all produce the same `MixtureConfig`.
Invalid configs fail at load time with a `ConfigError` naming the field.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from moa.errors import ConfigError
from moa.pricing import Price
from moa.providers.registry import ProviderSpec, Registry, default_registry
from moa.routing.router import RouterConfig
from moa.runtime.budget import Budget
from moa.runtime.prompts import DEBATE_PROMPT, Layout

Mode = Literal["layered", "staircase", "auto"]

# Ceilings on what one request may spend: a typo must not become thousands of paid calls.
MAX_LAYERS = 10
"""Proposer layers (the final aggregator is one more)."""
MAX_AGENTS = 32
"""Agents in one layer."""
MAX_N = 16
"""Samples drawn from one agent."""
MAX_TOKENS = 131_072
"""Tokens one call may generate."""
MAX_SAMPLES = 128
"""Most syntheses one request may ask for (`n`, OpenAI's limit)."""
MAX_ROUNDS = 10
"""Rounds of one debate."""


class AgentConfig(BaseModel):
    """One model call slot: a proposer or an aggregator."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="Model reference 'provider/model'.")
    temperature: float = Field(0.7, ge=0, le=2)
    max_tokens: int = Field(512, gt=0, le=MAX_TOKENS)
    system: str | None = Field(None, description="System prompt of this agent.")
    stop: list[str] | None = Field(
        None, max_length=4, description="Stop strings of this agent (a request's own `stop` "
        "replaces the final aggregator's)."
    )
    name: str | None = None
    n: int = Field(1, ge=1, le=MAX_N, description="Samples drawn from this agent (Self-MoA).")
    strong: str | None = Field(None, description="Strong tier 'provider/model' of a routed stage.")
    """With it the stage is routed: the `[router]` picks `model` (cheap), `strong`, or a skip."""

    @model_validator(mode="after")
    def _model_ref(self) -> AgentConfig:
        for ref in filter(None, (self.model, self.strong)):
            prefix, sep, model = ref.partition("/")
            if not sep or not prefix or not model:
                raise ValueError(
                    f"{ref!r} must look like 'provider/model', e.g. 'openai/gpt-4o-mini'"
                )
        return self

    @property
    def label(self) -> str:
        return self.name or self.model


class LayerConfig(BaseModel):
    """A layer of agents that run concurrently."""

    model_config = ConfigDict(extra="forbid")

    agents: list[AgentConfig] = Field(min_length=1, max_length=MAX_AGENTS)
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
        default_factory=lambda: [16, 128, 512], min_length=1
    )
    """Chunk sizes in tokens, small first; the last repeats. The default keeps staircase's
    uncached prompt tokens within ×1.5 of layered's (docs/staircase.md, measured)."""
    step_tokens: list[Annotated[int, Field(gt=0)]] = Field(
        default_factory=lambda: [16, 128, 512], min_length=1
    )
    """Aggregator tokens per step, small first; the last repeats."""
    start_k: int | None = Field(
        None,
        ge=1,
        description="Start with this many first chunks once grace_s has passed (default: the "
        "layer's min_proposers); with every live reference's first chunk it starts at once.",
    )
    grace_s: float = Field(
        2.0, ge=0, description="Longest wait for the other first chunks once start_k arrived."
    )
    stall_s: float = Field(
        2.0,
        gt=0,
        description="Silence after which an unfinished reference stops holding an aggregator "
        "(staircase and layered alike).",
    )
    pacing: Literal["lockstep", "eager"] = "lockstep"
    """`lockstep`: the aggregator's n-th token comes after every live reference has shown n
    tokens (or finished); `eager`: each step writes its full `step_tokens` on any news."""
    layout: Layout = "paper"
    """How an aggregator is shown its references (moa.runtime.prompts): `paper` (in the system
    message before the conversation, rewritten each step) or `cache` (after the conversation as
    user turns, append-only, so prefix caches reuse every earlier prompt)."""

    @field_validator("layout", mode="before")
    @classmethod
    def _renamed(cls, value: Any) -> Any:
        renamed = {"readable": "paper", "prefix_cache": "cache"}
        if value in renamed:
            raise ValueError(f"layout {value!r} is now called {renamed[value]!r}")
        return value
    keep_truncated: bool = True
    """Keep (labelled) the text of a proposer that failed mid-stream or was left behind."""
    # Start, pacing and straggler rules: moa.runtime.staircase; the step loop is in
    # moa.strategies.graph, the design in docs/staircase.md.

    def chunk_size(self, index: int) -> int:
        """Tokens in chunk `index` (0-based) of a streamed reference."""
        return self.chunk_tokens[min(index, len(self.chunk_tokens) - 1)]

    def step_size(self, index: int) -> int:
        """Tokens the aggregator generates in step `index` (0-based) before it looks again."""
        return self.step_tokens[min(index, len(self.step_tokens) - 1)]


class EvolveConfig(BaseModel):
    """Squeeze Evolve settings (`strategy = "evolve"`, see `moa.strategies.evolve`)."""

    model_config = ConfigDict(extra="forbid")

    group_size: int = Field(4, ge=2, description="K: candidates recombined per group.")
    loops: int = Field(3, ge=0, description="T: recombination loops.")
    stop_agreement: float = Field(1.0, gt=0, le=1)
    """Stop early when this share of the population holds the same final answer."""


class DebateConfig(BaseModel):
    """Multi-agent debate settings (`strategy = "debate"`, see `moa.strategies.debate`)."""

    model_config = ConfigDict(extra="forbid")

    agents: list[AgentConfig] = Field(min_length=1, max_length=MAX_AGENTS)
    """The debaters (an agent with `n = 3` is three debaters of that model)."""
    rounds: int = Field(2, ge=1, le=MAX_ROUNDS)
    """Round 1 is the independent answers; each further round is one revision."""
    final: Literal["vote", "aggregate"] = "vote"
    """`vote`: the majority of the last round's extracted answers (a tie or open-ended text
    goes to the `[aggregator]` when there is one); `aggregate`: the aggregator always writes
    the answer from the last round."""
    prompt: str = DEBATE_PROMPT
    """A revision round's user turn; `{solutions}` becomes the other agents' latest answers."""
    stop_at_consensus: bool = True
    """End the debate after a round in which every answering agent gave the same answer."""

    @field_validator("prompt")
    @classmethod
    def _has_solutions(cls, value: str) -> str:
        if "{solutions}" not in value:
            raise ValueError("the debate prompt must contain {solutions}")
        return value

    @model_validator(mode="after")
    def _two_debaters(self) -> DebateConfig:
        if sum(a.n for a in self.agents) < 2:
            raise ValueError("a debate needs at least two debaters (agents times n)")
        return self

    @property
    def debaters(self) -> int:
        return sum(a.n for a in self.agents)


class MixtureConfig(BaseModel):
    """A whole mixture: proposer layers, then one final aggregator (or, with `strategy =
    "debate"`, the `[debate]` table and an optional aggregator)."""

    model_config = ConfigDict(extra="forbid")

    name: str = "custom"
    strategy: Literal["graph", "evolve", "debate"] = "graph"
    """`graph`: the layers, then the aggregator (layered or staircase). `evolve`: Squeeze Evolve,
    seeded by the one layer's agents, recombined by the aggregator's tiers. `debate`:
    multi-agent debate over the `[debate]` table's rounds, then a vote or the aggregator."""
    layers: list[LayerConfig] = Field(
        default_factory=list, max_length=MAX_LAYERS, validate_default=True
    )
    """Proposer layers. The final aggregator is one more layer, so layers + 1 in all."""
    aggregator: AgentConfig | None = Field(None, validate_default=True)
    """The final aggregator (required but for a debate that votes)."""

    @field_validator("layers")
    @classmethod
    def _some_layers(cls, value: list[LayerConfig], info: ValidationInfo) -> list[LayerConfig]:
        strategy = info.data.get("strategy", "graph")
        if strategy != "debate" and not value:
            raise ValueError(f"the {strategy} strategy needs at least one layer")
        if strategy == "debate" and value:
            raise ValueError("a debate takes its agents from the [debate] table, not from layers")
        return value

    @field_validator("aggregator")
    @classmethod
    def _an_aggregator(cls, value: AgentConfig | None, info: ValidationInfo) -> AgentConfig | None:
        strategy = info.data.get("strategy", "graph")
        if strategy != "debate" and value is None:
            raise ValueError(f"the {strategy} strategy needs an [aggregator]")
        return value
    mode: Mode = "auto"
    deadline_s: float | None = Field(None, gt=0, description="Whole-request deadline.")
    aggregator_context_tokens: int | None = Field(None, gt=0)
    """Context window of aggregators; references are trimmed or windowed to fit."""
    long_references: Literal["trim", "window"] = "trim"
    """When references overflow the context: trim each one, or aggregate them in windows
    carrying the running synthesis forward (Self-MoA-Seq)."""
    tool_result_chars: int = Field(2000, gt=0)
    """Longest tool result an advisor is shown (the acting stage gets every result whole)."""
    staircase: StaircaseConfig = Field(default_factory=StaircaseConfig)
    providers: dict[str, ProviderSpec] = Field(default_factory=dict)
    """Extra or overriding provider prefixes."""
    prices: dict[str, Price] = Field(default_factory=dict)
    """Model reference -> (input, output[, cached_input[, cache_write]]) US dollars per million
    tokens; a missing cached-input or cache-write rate is the input rate (moa.pricing)."""

    @field_validator("prices", mode="before")
    @classmethod
    def _price_forms(cls, value: Any) -> Any:
        for model, price in value.items() if isinstance(value, dict) else ():
            if not (isinstance(price, list | tuple) and 2 <= len(price) <= 4 and all(
                isinstance(rate, int | float) and not isinstance(rate, bool) and rate >= 0
                for rate in price
            )):
                raise ValueError(
                    f"the price of {model!r} must be [input, output], [input, output, "
                    "cached_input] or [input, output, cached_input, cache_write] (US dollars "
                    f"per million tokens, none negative), not {price!r}"
                )
        return value

    budget: Budget = Field(default_factory=Budget)
    """Hard per-request budget (`usd` and/or `tokens`); a call that could exceed it is refused."""
    session_budget: Budget = Field(default_factory=Budget)
    """Hard budget over every request of one `Mixture` object (with a shared state, e.g.
    `moa serve --redis`, of every process using that state: one budget across replicas)."""
    router: RouterConfig | None = None
    """How routed stages (agents with `strong`) pick a tier; default `marginal`, and for evolve
    the paper's rule: the least confident quarter of the groups go strong (`threshold` on the
    signal `rank` at 0.25)."""
    evolve: EvolveConfig | None = None
    debate: DebateConfig | None = None

    @model_validator(mode="before")
    @classmethod
    def _old_routing(cls, data: Any) -> Any:
        """A `RoutingConfig` of old (a `[routing]` table, or top-level tiers) says how to move."""
        if isinstance(data, dict) and ("routing" in data or {"cheap", "strong"} <= set(data)):
            raise ValueError(
                "routing tables are gone: put `strong = \"provider/model\"` on the agents to "
                "route (e.g. the [aggregator]) and the policy in a [router] table "
                "(docs/routing.md shows the shape)"
            )
        return data

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

    @model_validator(mode="after")
    def _strategy(self) -> MixtureConfig:
        if self.strategy != "debate":
            if self.debate is not None:
                raise ValueError('the [debate] table needs strategy = "debate"')
        elif self.debate is None:
            raise ValueError("a debate needs a [debate] table (agents, rounds)")
        elif self.debate.final == "aggregate" and self.aggregator is None:
            raise ValueError('debate.final = "aggregate" needs an [aggregator]')
        return self

    @model_validator(mode="after")
    def _routing(self) -> MixtureConfig:
        routed = any(a.strong for a in self.agents())
        if self.router is not None and not routed:
            raise ValueError(
                "the [router] routes no stage: give an agent a `strong` model (e.g. the "
                "aggregator's) or remove the table"
            )
        final = self.aggregator
        if self.router is not None and self.router.refine_loops and not (final and final.strong):
            raise ValueError("refine_loops needs a routed aggregator: set aggregator.strong")
        if self.strategy == "evolve":
            if len(self.layers) != 1 or not (final and final.strong):
                raise ValueError(
                    "evolve needs one layer (the seed population) and an aggregator with a "
                    "`strong` tier (the recombiners)"
                )
            if self.call_count - 1 < 2:
                raise ValueError("evolve needs a population of at least 2 (agents times n)")
        elif self.evolve is not None:
            raise ValueError("the [evolve] table needs strategy = \"evolve\"")
        return self

    def agents(self) -> list[AgentConfig]:
        return [agent for _, agent in self.agent_fields()]

    @property
    def call_count(self) -> int:
        """Calls of one request (a debate's at most: every round, and the aggregator's)."""
        if self.debate is not None:
            return self.debate.debaters * self.debate.rounds + (self.aggregator is not None)
        return sum(a.n for layer in self.layers for a in layer.agents) + 1

    def call_plan(self) -> list[list[AgentConfig]]:
        """The agents of each step in order: the layers then the aggregator (a debate's rounds,
        then its aggregator when it has one)."""
        steps = [list(layer.agents) for layer in self.layers]
        if self.debate is not None:
            steps += [list(self.debate.agents)] * self.debate.rounds
        return steps + ([[self.aggregator]] if self.aggregator else [])

    @property
    def final(self) -> AgentConfig:
        """The final aggregator (graph and evolve always have one)."""
        assert self.aggregator is not None, "only a voting debate has no aggregator"
        return self.aggregator

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
        if self.debate is not None:
            fields += [(f"debate.agents.{j}", a) for j, a in enumerate(self.debate.agents)]
        return [*fields, *([("aggregator", self.aggregator)] if self.aggregator else [])]

    def model_refs(self) -> list[tuple[str, str]]:
        """Every model reference with the config path that names it (tiers and judge too)."""
        refs = [(f"{where}.{key}", ref) for where, agent in self.agent_fields()
                for key, ref in (("model", agent.model), ("strong", agent.strong)) if ref]
        verifier = self.router.verifier if self.router is not None else None
        if verifier is not None and verifier.model:
            refs.append(("router.verifier.model", verifier.model))
        return refs

    def check_models(self, registry: Registry | None = None) -> None:
        """Fail now, naming the field, if an agent names an unknown provider prefix."""
        registry = self.registry(registry)
        for where, ref in self.model_refs():
            try:
                registry.check(ref)
            except ConfigError as err:
                raise ConfigError(f"Invalid config: field '{where}': {err}") from None


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
LOCAL_AGGREGATOR_SYSTEM = (
    "Answer the question directly in one paragraph, without any introduction."
)


def _local_sampler() -> AgentConfig:
    """The bundled model sampled 3 times, one paragraph each (a stop at the first blank line)."""
    return AgentConfig(model=LOCAL_MODEL, n=3, max_tokens=128, stop=["\n\n"])


def _local_aggregator() -> AgentConfig:
    """The bundled model told to answer directly in one paragraph."""
    return AgentConfig(model=LOCAL_MODEL, max_tokens=192, temperature=0.3,
                       system=LOCAL_AGGREGATOR_SYSTEM, stop=["\n\n"])


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
            # One paragraph each (a stop at the first blank line), told to answer directly: at
            # these caps the answers end by themselves (docs/local.md has the measurement).
            layers=[LayerConfig(agents=[_local_sampler()])],
            aggregator=_local_aggregator(),
            # Layered, in the paper layout: staircase pays on the CPU only in the cache layout,
            # whose accuracy on this model is worse (docs/staircase.md, docs/quality.md).
            mode="layered",
        )
    if name == "debate":
        return MixtureConfig(
            name=name,
            strategy="debate",
            debate=DebateConfig(agents=_agents(_TOGETHER_PROPOSERS[:3]), rounds=2),
            aggregator=AgentConfig(model=_TOGETHER_AGGREGATOR),  # ties and open-ended answers
        )
    if name == "local-debate":
        return MixtureConfig(
            name=name,
            strategy="debate",
            debate=DebateConfig(agents=[_local_sampler()], rounds=2),
            aggregator=_local_aggregator(),
            mode="layered",  # one generation at a time on the CPU (as the local preset)
        )
    raise ConfigError(f"Unknown preset {name!r}; presets: {', '.join(PRESETS)}.")


PRESETS: dict[str, str] = {
    "moa": "3 layers: 6 proposers, 6 refiners, 1 aggregator on Together (13 calls)",
    "moa-lite": "2 layers: 6 proposers, 1 aggregator on Together (7 calls)",
    "self-moa": "Qwen2.5-72B sampled 6 times, then aggregated by itself (7 calls)",
    "local": "SmolLM2-135M on the CPU sampled 3 times, then aggregated by itself (4 calls)",
    "debate": "3 agents on Together debate 2 rounds, then vote; Qwen2.5-72B breaks ties "
    "(7 calls)",
    "local-debate": "SmolLM2-135M as 3 agents, 2 rounds on the CPU, then vote (7 calls)",
}


def preset(name: str) -> MixtureConfig:
    """The named preset as a fresh `MixtureConfig`."""
    return _preset(name)


def with_preset(base: dict[str, Any], own: dict[str, Any]) -> dict[str, Any]:
    """A preset's fields replaced by a file's own top-level fields; the preset's layers or
    debate table are dropped when the file picks the other kind of strategy."""
    data = {**base, **own}
    debate = data.get("strategy") == "debate"
    for key, keep in (("layers", not debate), ("debate", debate)):
        if key not in own and not keep:
            data.pop(key, None)
    return data


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
        if not isinstance(name, str) or name not in PRESETS:
            raise ConfigError(
                f"Invalid config {source}: field 'preset': unknown preset {name!r}; "
                f"presets: {', '.join(PRESETS)}."
            )
        data = with_preset(preset(name).model_dump(exclude_unset=False), data)
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
    except RecursionError:
        raise ConfigError(f"Config file {str(path)!r} nests too deeply.") from None
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
