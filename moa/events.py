"""The typed event stream of a mixture run.

One stream feeds the CLI, the OpenAI surfaces, tracing, the router and the tests.
Agents are identified by `AgentId`: layer index (0-based; the final aggregator has the
last index), slot index within the layer, and the model reference.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from moa.providers.base import Message, TokenLogprob, ToolCallDelta, Usage, Waiting

if TYPE_CHECKING:
    from moa.result import MixtureResult


@dataclass(frozen=True)
class AgentId:
    """Who an agent is. Equality ignores `model`: a routed stage keeps its identity when the
    router picks its tier."""

    layer: int
    index: int
    model: str = field(compare=False)
    """The model that answers; for a routed stage not yet decided, its cheap tier."""
    name: str = ""
    final: bool = False
    """True for the final aggregator, whose deltas are the answer."""
    strong: str | None = field(default=None, compare=False)
    """A routed stage's strong tier while the router has not decided (then `model` is only
    a candidate); None once decided and for stages that are not routed."""
    prefix: str = "L"
    """What `layer` counts in the key: L (a graph's layer) or R (a debate's round)."""

    @property
    def key(self) -> str:
        return "final" if self.final else f"{self.prefix}{self.layer + 1}.{self.index + 1}"

    @property
    def label(self) -> str:
        tiers = f"{self.model} | {self.strong}" if self.strong else self.model
        return f"{self.key} {self.name or tiers}"


@dataclass(frozen=True)
class Event:
    """Base class; `t` is seconds since the run started."""

    t: float


@dataclass(frozen=True)
class RunStarted(Event):
    mixture: str
    mode: str
    agents: list[AgentId]


@dataclass(frozen=True)
class Notice(Event):
    """Something the user should know, e.g. a fallback from staircase to layered mode."""

    message: str
    kind: str = "info"


@dataclass(frozen=True)
class AgentStarted(Event):
    agent: AgentId


@dataclass(frozen=True)
class AgentCall(Event):
    """A provider call of the agent starts (a staircase aggregator makes one per step).

    Emitted only when a subscriber asked for calls (`Run.trace_calls`, set while OpenTelemetry
    traces the run); `messages` is the prompt the call sends, and is set only when prompts are
    captured (`Run.trace_prompts`: the GenAI content switch)."""

    agent: AgentId
    max_tokens: int
    messages: list[Message] | None = None


@dataclass(frozen=True)
class AgentWaiting(Event):
    """A call of the agent streams nothing yet because it waits for its turn on a backend
    that serves requests in turn ("queued"), or that backend evaluates its prompt ("prompt")."""

    agent: AgentId
    why: Waiting


@dataclass(frozen=True)
class AgentRetrying(Event):
    """A call of the agent failed and is tried again: `attempt` is the attempt about to start
    (2 for the first retry), `reason` why the last one failed."""

    agent: AgentId
    attempt: int
    reason: str


@dataclass(frozen=True)
class AgentDelta(Event):
    agent: AgentId
    text: str


@dataclass(frozen=True)
class AgentFinished(Event):
    agent: AgentId
    text: str
    finish_reason: str | None
    ttft_s: float | None
    latency_s: float


@dataclass(frozen=True)
class AgentFailed(Event):
    agent: AgentId
    error: str
    partial_text: str = ""


@dataclass(frozen=True)
class UsageReport(Event):
    agent: AgentId
    usage: Usage
    cost_usd: float | None


@dataclass(frozen=True)
class FinalDelta(Event):
    """A piece of the final answer (the final aggregator's output), in order; `index` is the
    choice it belongs to (n > 1) and `logprobs` its tokens' logprobs when they were asked for."""

    text: str
    index: int = 0
    logprobs: list[TokenLogprob] | None = None


@dataclass(frozen=True)
class FinalToolCallDelta(Event):
    """A piece of a tool call of the final answer (the acting stage), in order."""

    call: ToolCallDelta
    index: int = 0
    """The choice it belongs to (n > 1)."""


@dataclass(frozen=True)
class RouteDecision(Event):
    """The router chose a tier (or a skip) for a stage; `signals` say why (and, for an
    aggregating stage, how many references were complete or partial when it decided)."""

    stage: str
    choice: str
    reason: str
    signals: dict[str, Any] = field(default_factory=dict)
    agent: AgentId | None = None
    """The agent of the stage (None for a stage that is not one agent, e.g. an evolve stop)."""


@dataclass(frozen=True)
class StaircaseStep(Event):
    """A staircase aggregator takes a step: its `step`-th call (1-based) may write `max_tokens`
    tokens after the `written` it wrote so far. `shown`: tokens of each reference it is shown
    (by the reference's key, e.g. "L1.2"); `margin`: how far the slowest live reference is
    ahead of it (`Pacer.lead`; None when no reference streams any more); `last`: the free call
    made once the references are done (or left behind)."""

    agent: AgentId
    step: int
    max_tokens: int
    written: int
    shown: dict[str, int] = field(default_factory=dict)
    margin: int | None = None
    last: bool = False


@dataclass(frozen=True)
class RunFinished(Event):
    result: MixtureResult


@dataclass(frozen=True)
class RunFailed(Event):
    error: str
    result: MixtureResult | None = None
