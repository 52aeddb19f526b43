"""The routed mixture: proposers, aggregation and refinement loops, each stage routed.

Two model tiers (`cheap`, `strong`) and a router (`moa.routing.router`) decide, stage by stage,
which tier runs it or whether it is skipped: proposer slots start on the router's proposer tier; the
aggregation sees the proposers' signals (agreement, token confidence) and may be skipped
(return the majority answer), run cheap or run strong; each refinement loop sees the latest
answer's signals and may stop the loop. A budget (`moa.runtime.budget`) is checked before every
call. An optional verifier (`moa.routing.verifier`, off by default) adds a judge call's score to
the signals
of the aggregation and of each refinement loop.

Configuration lives in its own table (`RoutingConfig`), either a file of its own or the
`[routing]` table of a mixture config file. `strategy = "evolve"` runs Squeeze Evolve
(`moa.routing.evolve`) with the same tiers, budget and events instead.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import anyio
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from moa.config import read_file
from moa.errors import (
    AggregatorFailed,
    BudgetExceeded,
    ConfigError,
    MoaError,
    NotEnoughProposers,
    ProviderError,
)
from moa.events import (
    AgentDelta,
    AgentFailed,
    AgentFinished,
    AgentId,
    AgentStarted,
    Event,
    FinalDelta,
    RouteDecision,
    RunFailed,
    RunFinished,
    RunStarted,
    UsageReport,
)
from moa.pricing import price_function
from moa.providers.base import ChatRequest, Message, TokenLogprob, Usage
from moa.providers.registry import ProviderSpec, Registry, default_registry
from moa.result import AgentOutput, MixtureResult
from moa.routing.router import Decision, Router, Stage, router_from_config
from moa.routing.signals import agreement, confidence, group_signals
from moa.routing.verifier import VerifierConfig, judge_messages, verdict
from moa.runtime.budget import Budget, BudgetGuard, Ledger, SessionBudget
from moa.runtime.prompts import (
    AGGREGATE_PROMPT,
    Reference,
    aggregate_messages,
    as_messages,
    readable_block,
    with_system,
)
from moa.tokens import count_messages, count_tokens

Tier = Literal["cheap", "strong"]


class EvolveConfig(BaseModel):
    """Squeeze Evolve settings (see `moa.routing.evolve`)."""

    model_config = ConfigDict(extra="forbid")

    population: int = Field(8, ge=2, description="N: candidates seeded by the strong model.")
    group_size: int = Field(4, ge=2, description="K: candidates recombined per group.")
    loops: int = Field(3, ge=0, description="T: recombination loops.")
    strong_percentile: float = Field(25.0, ge=0, le=100)
    """Groups whose confidence is at or below this per-problem percentile go to the strong tier."""
    stop_agreement: float = Field(1.0, gt=0, le=1)
    """Stop early when this share of the population holds the same final answer."""
    seed_tier: Tier = "strong"


class RoutingConfig(BaseModel):
    """A routed strategy: two tiers, a router, a stage shape and budgets."""

    model_config = ConfigDict(extra="forbid")

    name: str = "routed"
    cheap: str = Field(description="Model reference of the cheap tier.")
    strong: str = Field(description="Model reference of the strong tier.")
    strategy: Literal["mixture", "evolve"] = "mixture"
    proposers: int = Field(3, ge=1)
    refine_loops: int = Field(0, ge=0)
    temperature: float = Field(0.7, ge=0, le=2)
    aggregator_temperature: float = Field(0.3, ge=0, le=2)
    max_tokens: int = Field(512, gt=0)
    system: str | None = None
    logprobs: bool = True
    top_logprobs: int = Field(5, ge=0, le=20)
    router: dict[str, Any] = Field(default_factory=lambda: {"policy": "marginal"})
    budget: Budget = Field(default_factory=Budget)
    """Hard per-request budget."""
    session_budget: Budget = Field(default_factory=Budget)
    """Hard budget over every request of one `RoutedMixture` object."""
    evolve: EvolveConfig = Field(default_factory=EvolveConfig)
    verifier: VerifierConfig | None = None
    """A judge call that scores the current answer before the aggregation and each refinement
    loop (signal `verifier`); None (the default) makes no such call."""
    prices: dict[str, tuple[float, float]] = Field(default_factory=dict)
    """Model reference -> (input, output) US dollars per million tokens."""
    providers: dict[str, ProviderSpec] = Field(default_factory=dict)

    def tier_model(self, tier: str) -> str:
        return self.strong if tier == "strong" else self.cheap

    def registry(self, base: Registry | None = None) -> Registry:
        return (base or default_registry).extended(self.providers.values())


def load_routing(
    source: str | Path | dict[str, Any] | RoutingConfig, *, registry: Registry | None = None
) -> RoutingConfig:
    """A `RoutingConfig` from an object, a dict, or a TOML / JSON file.

    A file may be a routing table of its own or a mixture config with a `[routing]` table; then
    the mixture's `prices` and `providers` apply and the tiers default to the first proposer
    (cheap) and the aggregator (strong).
    """
    if isinstance(source, RoutingConfig):
        return source
    data = source if isinstance(source, dict) else read_file(source)
    if "routing" in data:
        routing = dict(data["routing"] or {})
        for key in ("prices", "providers"):
            if key in data:
                routing.setdefault(key, data[key])
        layers = data.get("layers") or []
        if layers and layers[0].get("agents"):
            routing.setdefault("cheap", layers[0]["agents"][0].get("model"))
        if isinstance(data.get("aggregator"), dict):
            routing.setdefault("strong", data["aggregator"].get("model"))
        data = routing
    if isinstance(data.get("providers"), dict):
        data = {**data, "providers": {k: {"prefix": k, **v} for k, v in data["providers"].items()}}
    try:
        config = RoutingConfig.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise ConfigError(f"Invalid routing config: field '{where}': {first['msg']}.") from None
    router_from_config(config.router)
    checker = config.registry(registry)
    checker.check(config.cheap)
    checker.check(config.strong)
    if config.verifier is not None and config.verifier.model is not None:
        checker.check(config.verifier.model)
    return config


def reference_messages(
    messages: list[Message], references: list[str], instruction: str = AGGREGATE_PROMPT
) -> list[Message]:
    """The Aggregate-and-Synthesize prompt (`moa.runtime.prompts`) over finished references."""
    block = readable_block([Reference(text) for text in references], instruction)
    return aggregate_messages(messages, block)


def stage_seed(seed: int | None, offset: int) -> int | None:
    return None if seed is None else seed * 10_007 + offset


@dataclass
class Reply:
    """One finished (or failed) call with the logprobs it returned."""

    output: AgentOutput
    logprobs: list[TokenLogprob] | None = None

    @property
    def ok(self) -> bool:
        return self.output.ok


@dataclass
class RoutedResult(MixtureResult):
    """A `MixtureResult` plus the routing decisions."""

    decisions: list[RouteDecision] = field(default_factory=list)

    def tiers(self) -> dict[str, int]:
        """Calls per tier choice and skips, e.g. {"cheap": 4, "strong": 1, "skip": 0}."""
        counts = {"cheap": 0, "strong": 0, "skip": 0}
        for d in self.decisions:
            counts[d.choice] = counts.get(d.choice, 0) + 1
        return counts

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["routing"] = {
            "decisions": [
                {"stage": d.stage, "choice": d.choice, "reason": d.reason, "signals": d.signals}
                for d in self.decisions
            ]
        }
        return out


class RunContext:
    """Calls, events, budget and results of one routed run (shared by the strategies)."""

    def __init__(
        self,
        config: RoutingConfig,
        registry: Registry,
        router: Router,
        guard: BudgetGuard,
        emit: Callable[[Event], None],
    ) -> None:
        self.config = config
        self.registry = registry
        self.router = router
        self.guard = guard
        self._emit = emit
        self.t0 = time.perf_counter()
        self.outputs: list[AgentOutput] = []
        self.decisions: list[RouteDecision] = []
        self.final_text: list[str] = []
        self.first_final: float | None = None

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def emit(self, event: Event) -> None:
        self._emit(event)

    def emit_final(self, text: str) -> None:
        if text:
            if self.first_final is None:
                self.first_final = self.now()
            self.final_text.append(text)
            self.emit(FinalDelta(t=self.now(), text=text))

    def estimate(self, tier: str, messages: list[Message], completion: int) -> float | None:
        return self.guard.price(
            self.config.tier_model(tier), Usage(count_messages(messages), completion)
        )

    def route(self, stage: Stage, messages: list[Message] | None = None) -> Decision:
        """Ask the router, then fit its choice to the budget (downgrade or skip if needed)."""
        stage.remaining = self.guard.remaining_fraction()
        decision = self.router.decide(stage)
        if messages is not None and decision.choice != "skip":
            for tier in ("strong", "cheap") if decision.choice == "strong" else ("cheap",):
                why = self.guard.why_not(
                    self.config.tier_model(tier), messages, self.config.max_tokens
                )
                if why is None:
                    if tier != decision.choice:
                        decision = Decision(
                            tier, f"{decision.reason}; strong over budget", decision.signals
                        )
                    break
            else:
                if stage.can_skip:
                    decision = Decision(
                        "skip", f"{decision.reason}; over budget ({why})", decision.signals
                    )
        event = decision.event(stage.name, self.now())
        self.decisions.append(event)
        self.emit(event)
        return decision

    async def call(
        self,
        agent: AgentId,
        messages: list[Message],
        *,
        temperature: float,
        seed: int | None,
        final: bool = False,
        max_tokens: int | None = None,
        ask_logprobs: bool = True,
    ) -> Reply:
        """Reserve the call's worst case (or raise `BudgetExceeded`), run it, report events."""
        limit = max_tokens or self.config.max_tokens
        reservation = self.guard.reserve(agent.model, messages, limit)
        return await self.run_reserved(
            agent,
            messages,
            reservation,
            temperature=temperature,
            seed=seed,
            final=final,
            max_tokens=limit,
            ask_logprobs=ask_logprobs,
        )

    async def run_reserved(
        self,
        agent: AgentId,
        messages: list[Message],
        reservation: Any,
        *,
        temperature: float,
        seed: int | None,
        final: bool = False,
        max_tokens: int | None = None,
        ask_logprobs: bool = True,
    ) -> Reply:
        """Run a call whose budget is reserved; a failure is reported in the reply, not raised."""
        output = AgentOutput(agent=agent, calls=1)
        self.outputs.append(output)
        self.emit(AgentStarted(t=self.now(), agent=agent))
        started = time.perf_counter()
        parts: list[str] = []
        logprobs: list[TokenLogprob] = []
        usage: Usage | None = None
        try:
            provider, model = self.registry.resolve(agent.model)
            want_logprobs = ask_logprobs and self.config.logprobs and provider.capabilities.logprobs
            request = ChatRequest(
                model=model,
                messages=messages,
                temperature=temperature,
                max_tokens=max_tokens or self.config.max_tokens,
                seed=seed,
                logprobs=want_logprobs,
                top_logprobs=self.config.top_logprobs if want_logprobs else None,
            )
            async for delta in provider.stream(request):
                if delta.text:
                    if output.ttft_s is None:
                        output.ttft_s = time.perf_counter() - started
                    parts.append(delta.text)
                    self.emit(AgentDelta(t=self.now(), agent=agent, text=delta.text))
                    if final:
                        self.emit_final(delta.text)
                if delta.logprobs:
                    logprobs.extend(delta.logprobs)
                if delta.finish_reason:
                    output.finish_reason = delta.finish_reason
                if delta.usage:
                    usage = delta.usage
        except BaseException as err:
            # A call stopped after it generated text was billed for that text; a cancelled
            # call must give its reservation back too.
            output.text = "".join(parts)
            spent = Usage(count_messages(messages), count_tokens(output.text)) if parts else None
            output.cost_usd = self.guard.settle(reservation, spent)
            if not isinstance(err, (ProviderError, MoaError)):
                raise
            output.error, output.truncated = str(err), bool(parts)
            output.latency_s = time.perf_counter() - started
            self.emit(
                AgentFailed(t=self.now(), agent=agent, error=str(err), partial_text=output.text)
            )
            if spent:
                output.usage = spent
                self.emit(UsageReport(t=self.now(), agent=agent, usage=spent,
                                      cost_usd=output.cost_usd))
            return Reply(output)
        output.text = "".join(parts)
        output.usage = usage or Usage(count_messages(messages), count_tokens(output.text))
        output.cost_usd = self.guard.settle(reservation, output.usage)
        output.ok = True
        output.latency_s = time.perf_counter() - started
        self.emit(
            AgentFinished(
                t=self.now(),
                agent=agent,
                text=output.text,
                finish_reason=output.finish_reason,
                ttft_s=output.ttft_s,
                latency_s=output.latency_s,
            )
        )
        self.emit(
            UsageReport(t=self.now(), agent=agent, usage=output.usage, cost_usd=output.cost_usd)
        )
        return Reply(output, logprobs or None)

    def result(self, text: str, mode: str) -> RoutedResult:
        return RoutedResult(
            text=text,
            outputs=self.outputs,
            mixture=self.config.name,
            mode=mode,
            ttft_s=self.first_final,
            latency_s=self.now(),
            decisions=self.decisions,
            budget=self.guard.report(),
        )


def best_supporter(replies: list[Reply]) -> Reply | None:
    """The most confident reply holding the majority answer (first one without logprobs)."""
    ok = [r for r in replies if r.ok]
    votes = agreement([r.output.text for r in ok])
    if votes.majority is None:
        return None
    supporters = [ok[i] for i in votes.supporters()]

    def score(reply: Reply) -> float:
        conf = confidence(reply.logprobs)
        return conf.bottom10 if conf is not None else -math.inf

    return max(supporters, key=score)


def reply_signals(replies: list[Reply]) -> dict[str, Any]:
    ok = [r for r in replies if r.ok]
    return group_signals([r.output.text for r in ok], [r.logprobs for r in ok])


async def run_mixture(ctx: RunContext, messages: list[Message], seed: int | None) -> str:
    """Proposers -> aggregation -> refinement loops, every stage routed. Returns the answer."""
    cfg = ctx.config
    base = with_system(messages, cfg.system)
    slots: list[tuple[AgentId, Any]] = []
    for i in range(cfg.proposers):
        decision = ctx.route(Stage(name=f"propose.{i + 1}", kind="propose"))
        tier = "cheap" if decision.choice == "skip" else decision.choice
        agent = AgentId(layer=0, index=i, model=cfg.tier_model(tier), name=f"{tier} proposer")
        slots.append((agent, ctx.guard.reserve(agent.model, base, cfg.max_tokens)))
    proposals: list[Reply] = [None] * len(slots)  # type: ignore[list-item]

    async def propose(i: int, agent: AgentId, reservation: Any) -> None:
        proposals[i] = await ctx.run_reserved(
            agent, base, reservation, temperature=cfg.temperature, seed=stage_seed(seed, i + 1)
        )

    async with anyio.create_task_group() as tg:
        for i, (agent, reservation) in enumerate(slots):
            tg.start_soon(propose, i, agent, reservation)
    ok = [r for r in proposals if r.ok]
    if not ok:
        raise NotEnoughProposers(
            "Every proposer failed; no answer to aggregate.", ctx.result("", "routed")
        )

    answer = await _aggregate(ctx, base, ok, seed, layer=1, references=[r.output.text for r in ok])
    for loop in range(1, cfg.refine_loops + 1):
        if answer.reply is None:
            break
        signals = reply_signals([answer.reply])
        signals["agreement"] = _agreement_with(answer.text, ok)
        signals.update(await verify(ctx, base, answer.text, ok, layer=1 + loop, seed=seed))
        refs = [answer.text, *(r.output.text for r in ok)]
        stage = Stage(name=f"refine.{loop}", kind="refine", signals=signals, can_skip=True)
        agg = reference_messages(base, refs)
        stage.costs = {t: ctx.estimate(t, agg, _mean_completion(ok)) for t in ("cheap", "strong")}
        decision = ctx.route(stage, agg)
        if decision.choice == "skip":
            break
        answer = await _aggregate_call(
            ctx,
            agg,
            decision.choice,
            seed,
            layer=1 + loop,
            final=loop == cfg.refine_loops,
            fallback=answer,
        )
    if not ctx.final_text:
        ctx.emit_final(answer.text)
    return answer.text


async def verify(
    ctx: RunContext,
    messages: list[Message],
    candidate: str,
    replies: list[Reply],
    *,
    layer: int,
    seed: int | None,
) -> dict[str, Any]:
    """The verifier's signals on `candidate` ({} when the verifier is off).

    Pairwise, the rival is the most confident reply holding another final answer (another
    text when answers cannot be extracted); without one the judge scores pointwise. The call
    counts in calls, cost and budget; a refused or failed call leaves `verifier` None.
    """
    cfg = ctx.config.verifier
    if cfg is None:
        return {}
    rival = rival_of(candidate, replies) if cfg.mode == "pairwise" else None
    signals: dict[str, Any] = {
        "verifier": None,
        "verifier_mode": "pointwise" if rival is None else "pairwise",
    }
    agent = AgentId(layer=layer, index=1, model=cfg.model or ctx.config.cheap, name="verifier")
    try:
        reply = await ctx.call(
            agent,
            judge_messages(messages, candidate, rival),
            temperature=cfg.temperature,
            seed=stage_seed(seed, 200 + layer),
            max_tokens=cfg.max_tokens,
            ask_logprobs=False,
        )
    except BudgetExceeded as err:
        signals["verifier_error"] = str(err)
        return signals
    if reply.ok:
        signals["verifier"] = verdict(reply.output.text, pairwise=rival is not None)
        if signals["verifier"] is None:
            signals["verifier_error"] = "the judge's reply holds no score"
    else:
        signals["verifier_error"] = reply.output.error
    return signals


def rival_of(candidate: str, replies: list[Reply]) -> str | None:
    """The most confident reply whose final answer (or, without one, text) differs."""
    mine = agreement([candidate]).answers[0]

    def differs(text: str) -> bool:
        if mine is None:
            return text.strip() != candidate.strip()
        return agreement([text]).answers[0] != mine

    def score(reply: Reply) -> float:
        conf = confidence(reply.logprobs)
        return conf.bottom10 if conf is not None else -math.inf

    others = [r for r in replies if r.ok and differs(r.output.text)]
    return max(others, key=score).output.text if others else None


@dataclass
class _Answer:
    text: str
    reply: Reply | None


def _agreement_with(text: str, proposals: list[Reply]) -> float:
    """Share of proposals whose final answer equals the answer of `text`."""
    votes = agreement([text, *(r.output.text for r in proposals)])
    mine = votes.answers[0]
    if mine is None:
        return 0.0
    return sum(a == mine for a in votes.answers[1:]) / max(len(proposals), 1)


def _mean_completion(replies: list[Reply]) -> int:
    return max(1, sum(r.output.usage.completion_tokens for r in replies) // max(len(replies), 1))


async def _aggregate(
    ctx: RunContext,
    base: list[Message],
    ok: list[Reply],
    seed: int | None,
    *,
    layer: int,
    references: list[str],
) -> _Answer:
    signals = reply_signals(ok)
    majority = best_supporter(ok)
    candidate = (majority or ok[0]).output.text
    signals.update(await verify(ctx, base, candidate, ok, layer=layer, seed=seed))
    agg = reference_messages(base, references)
    stage = Stage(
        name="aggregate", kind="aggregate", signals=signals, can_skip=majority is not None
    )
    stage.costs = {t: ctx.estimate(t, agg, _mean_completion(ok)) for t in ("cheap", "strong")}
    decision = ctx.route(stage, agg)
    if decision.choice == "skip" and majority is not None:
        if ctx.config.refine_loops == 0:
            ctx.emit_final(majority.output.text)
        return _Answer(majority.output.text, majority)
    fallback = _Answer(majority.output.text if majority else ok[0].output.text, majority or ok[0])
    tier = "strong" if decision.choice == "strong" else "cheap"
    return await _aggregate_call(
        ctx, agg, tier, seed, layer=layer, final=ctx.config.refine_loops == 0, fallback=fallback
    )


async def _aggregate_call(
    ctx: RunContext,
    agg: list[Message],
    tier: str,
    seed: int | None,
    *,
    layer: int,
    final: bool,
    fallback: _Answer,
) -> _Answer:
    model = ctx.config.tier_model(tier)
    agent = AgentId(layer=layer, index=0, model=model, name=f"{tier} aggregator", final=final)
    reply = await ctx.call(
        agent,
        agg,
        temperature=ctx.config.aggregator_temperature,
        seed=stage_seed(seed, 100 + layer),
        final=final,
    )
    if not reply.ok:
        if final and ctx.final_text:
            raise AggregatorFailed(f"The {tier} aggregator failed mid-answer: {reply.output.error}")
        return fallback
    return _Answer(reply.output.text, reply)


class RoutedMixture:
    """Run a routed strategy (`mixture` or `evolve`) with the `Mixture`-like API."""

    def __init__(
        self,
        config: RoutingConfig | dict[str, Any] | str | Path,
        *,
        router: Router | None = None,
        registry: Registry | None = None,
        session: Ledger | None = None,
    ) -> None:
        self.config = load_routing(config, registry=registry)
        self.router = router or router_from_config(self.config.router)
        self.registry = self.config.registry(registry)
        self._owns_registry = registry is None or self.registry is not registry
        limit = self.config.session_budget
        self.session = (
            session
            if session is not None
            else (None if limit.unlimited else SessionBudget(usd=limit.usd, tokens=limit.tokens))
        )
        self._price = price_function(self.config.prices)

    async def _execute(
        self, messages: list[Message], seed: int | None, emit: Callable[[Event], None]
    ) -> None:
        guard = BudgetGuard(self._price, self.config.budget, self.session)
        ctx = RunContext(self.config, self.registry, self.router, guard, emit)
        strategy = self.config.strategy
        agents = [
            AgentId(layer=0, index=i, model=self.config.cheap) for i in range(self.config.proposers)
        ]
        emit(RunStarted(t=0.0, mixture=self.config.name, mode=f"routed-{strategy}", agents=agents))
        try:
            if strategy == "evolve":
                from moa.routing.evolve import run_evolve

                text = await run_evolve(ctx, messages, seed)
            else:
                text = await run_mixture(ctx, messages, seed)
        except MoaError as err:
            emit(
                RunFailed(
                    t=ctx.now(),
                    error=str(err),
                    result=ctx.result("".join(ctx.final_text), f"routed-{strategy}"),
                )
            )
            raise
        finally:
            guard.release()
        emit(RunFinished(t=ctx.now(), result=ctx.result(text, f"routed-{strategy}")))

    async def stream(
        self, messages: str | list[Message], *, seed: int | None = None
    ) -> AsyncIterator[Event]:
        """Events of one run, `RunStarted` to `RunFinished` (`RunFailed`, then the error)."""
        send, recv = anyio.create_memory_object_stream[Event](math.inf)
        failure: list[BaseException] = []

        async def drive() -> None:
            async with send:
                try:
                    await self._execute(as_messages(messages), seed, send.send_nowait)
                except MoaError as err:
                    failure.append(err)

        async with anyio.create_task_group() as tg:
            tg.start_soon(drive)
            try:
                async with recv:
                    async for event in recv:
                        yield event
            finally:
                tg.cancel_scope.cancel()
        if failure:
            raise failure[0]

    async def run(self, messages: str | list[Message], *, seed: int | None = None) -> RoutedResult:
        result: RoutedResult | None = None
        async for event in self.stream(messages, seed=seed):
            if isinstance(event, RunFinished):
                result = event.result  # type: ignore[assignment]
        assert result is not None
        return result

    def run_sync(self, messages: str | list[Message], *, seed: int | None = None) -> RoutedResult:
        """Run from plain code or from inside a running loop (a worker thread then runs it)."""

        async def once() -> RoutedResult:
            try:
                return await self.run(messages, seed=seed)
            finally:
                await self.aclose()

        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(once())
        with ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, once()).result()

    async def aclose(self) -> None:
        """Close the providers this object opened (a registry passed in stays open)."""
        if self._owns_registry:
            await self.registry.aclose()
