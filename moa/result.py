"""What a mixture run returns: the answer, every agent's output, usage, cost and timings."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from moa.events import AgentId, RouteDecision
from moa.providers.base import TokenLogprob, ToolCall, Usage


@dataclass
class AgentOutput:
    agent: AgentId
    text: str = ""
    ok: bool = False
    error: str | None = None
    truncated: bool = False
    """The agent failed mid-stream; `text` is what arrived before."""
    finish_reason: str | None = None
    usage: Usage = field(default_factory=Usage)
    cost_usd: float | None = None
    ttft_s: float | None = None
    latency_s: float | None = None
    calls: int = 0
    """Provider calls this agent made, retried attempts included (staircase aggregators make
    one per step); usage and cost are counted per call, not per attempt."""


@dataclass
class Choice:
    """One synthesis of the final aggregator (a request with `n` > 1 has several)."""

    index: int
    text: str
    finish_reason: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    """Its tokens' logprobs, when the request asked for them."""


@dataclass
class MixtureResult:
    text: str
    outputs: list[AgentOutput]
    mixture: str = ""
    mode: str = "layered"
    ttft_s: float | None = None
    """Seconds from the start of the run to the first token of the final answer."""
    latency_s: float = 0.0
    notices: list[str] = field(default_factory=list)
    budget: dict[str, Any] = field(default_factory=dict)
    """Spend against the budgets (`moa.runtime.budget.BudgetGuard.report()`): a `request` entry and,
    with a shared ledger, a `session` entry, each with spent / limits / calls / refused."""
    decisions: list[RouteDecision] = field(default_factory=list)
    """The router's decisions, in order (empty when no stage is routed)."""
    tool_calls: list[ToolCall] = field(default_factory=list)
    """The acting stage's tool calls (empty when it answered in text only)."""
    finish_reason: str | None = None
    """The final answer's finish reason ("stop", "length", "tool_calls", ...)."""
    choices: list[Choice] = field(default_factory=list)
    """Every synthesis, in order; the first is `text`, `tool_calls` and `finish_reason`."""
    saved_calls: int = 0
    """Calls the strategy chose not to make (a debate that stopped at consensus)."""

    def tiers(self) -> dict[str, int]:
        """Routing choices counted, e.g. {"cheap": 4, "strong": 1, "skip": 0}."""
        counts = {"cheap": 0, "strong": 0, "skip": 0}
        for d in self.decisions:
            counts[d.choice] = counts.get(d.choice, 0) + 1
        return counts

    @property
    def usage(self) -> Usage:
        total = Usage()
        for out in self.outputs:
            total = total + out.usage
        return total

    @property
    def cost_usd(self) -> float | None:
        """Total cost, or None when no agent had a known price."""
        costs = [o.cost_usd for o in self.outputs if o.cost_usd is not None]
        return sum(costs) if costs else None

    @property
    def calls(self) -> int:
        return sum(o.calls for o in self.outputs)

    @property
    def failed(self) -> list[AgentOutput]:
        return [o for o in self.outputs if not o.ok]

    def proposals(self, layer: int = 0) -> list[AgentOutput]:
        return [o for o in self.outputs if o.agent.layer == layer and not o.agent.final]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (used by `moa chat --json` and the server's trace)."""
        usage = self.usage
        return {
            "mixture": self.mixture,
            "mode": self.mode,
            "text": self.text,
            "ttft_s": self.ttft_s,
            "latency_s": self.latency_s,
            "calls": self.calls,
            "saved_calls": self.saved_calls,
            "usage": {
                "prompt_tokens": usage.prompt_tokens,
                "completion_tokens": usage.completion_tokens,
                "cached_tokens": usage.cached_tokens,
                "cache_write_tokens": usage.cache_write_tokens,
            },
            "tool_calls": [asdict(c) for c in self.tool_calls],
            "finish_reason": self.finish_reason,
            "choices": [
                {"index": c.index, "text": c.text, "finish_reason": c.finish_reason}
                for c in self.choices
            ],
            "cost_usd": self.cost_usd,
            "notices": list(self.notices),
            "budget": self.budget,
            "routing": [
                {
                    "stage": d.stage,
                    "agent": d.agent.key if d.agent else None,
                    "choice": d.choice,
                    "reason": d.reason,
                    "signals": d.signals,
                }
                for d in self.decisions
            ],
            "agents": [
                {
                    "id": o.agent.key,
                    "model": o.agent.model,
                    "name": o.agent.name,
                    **{k: v for k, v in asdict(o).items() if k not in ("agent", "usage")},
                    "usage": asdict(o.usage),
                }
                for o in self.outputs
            ],
        }
