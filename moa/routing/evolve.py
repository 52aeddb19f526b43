"""Squeeze Evolve: evolutionary multi-model test-time scaling (arXiv 2604.07725).

Loop 0: the seed tier (strong by default) writes N candidates. Each loop then scores every
candidate by its DeepConf confidence (from top-k logprobs; the vote share of its final answer
in the population when logprobs are missing), draws N groups of K distinct candidates, sends
the least confident groups (a per-problem percentile of group confidence) to the strong tier
and the rest to the cheap tier, recombines every group in parallel into one child, and replaces
the population by the children. It stops after T loops or as soon as the population agrees.
The answer is the most confident candidate holding the majority answer.

Every routing choice is a `RouteDecision` event; calls, budget and events come from the
shared `moa.routing.strategy.RunContext`.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

import anyio

from moa.errors import NotEnoughProposers
from moa.events import AgentId
from moa.providers.base import Message
from moa.routing.router import Decision
from moa.routing.signals import agreement, confidence, ngram_cosine
from moa.routing.strategy import Reply, RunContext, best_supporter, reference_messages, stage_seed
from moa.runtime.prompts import with_system

RECOMBINE_PROMPT = (
    "You are given several candidate solutions to the latest user query. Some of them may be "
    "wrong. Compare their reasoning, keep what is correct, fix what is not, and write one "
    "improved, complete solution that ends with the final answer.\n\nCandidate solutions:"
)


@dataclass
class Scored:
    reply: Reply
    score: float


def score_population(population: list[Reply]) -> tuple[list[float], str]:
    """Confidence of each candidate and its source ('confidence' or 'diversity')."""
    confs = [confidence(r.logprobs) for r in population]
    if all(c is not None for c in confs):
        return [c.bottom10 for c in confs if c is not None], "confidence"
    texts = [r.output.text for r in population]
    votes = agreement(texts)
    if votes.majority is not None:
        n = len(texts)
        return [
            (votes.counts.get(a, 0) / n) if a is not None else 0.0 for a in votes.answers
        ], "diversity"
    return [
        sum(ngram_cosine(t, o) for j, o in enumerate(texts) if j != i) / max(len(texts) - 1, 1)
        for i, t in enumerate(texts)
    ], "diversity"


def strong_groups(group_scores: list[float], percentile: float) -> tuple[set[int], float | None]:
    """Indices of the groups at or below the percentile (by rank; ties by index) and the
    threshold value."""
    count = math.ceil(len(group_scores) * percentile / 100)
    if count == 0:
        return set(), None
    order = sorted(range(len(group_scores)), key=lambda g: (group_scores[g], g))
    chosen = order[:count]
    return set(chosen), group_scores[chosen[-1]]


async def run_evolve(ctx: RunContext, messages: list[Message], seed: int | None) -> str:
    """Run Squeeze Evolve in `ctx` and return the answer (also emitted as `FinalDelta`)."""
    cfg, evo = ctx.config, ctx.config.evolve
    base = with_system(messages, cfg.system)
    rng = random.Random(seed)
    seed_model = cfg.tier_model(evo.seed_tier)
    ctx.decisions.append(
        ev := Decision(evo.seed_tier, f"evolve seeds {evo.population} candidates", {}).event(
            "evolve.seed", ctx.now()
        )
    )
    ctx.emit(ev)
    reservations = [
        ctx.guard.reserve(seed_model, base, cfg.max_tokens) for _ in range(evo.population)
    ]
    population = await _gather(
        ctx,
        [
            (
                AgentId(0, i, seed_model, f"{evo.seed_tier} seed"),
                base,
                res,
                stage_seed(seed, 1000 + i),
            )
            for i, res in enumerate(reservations)
        ],
    )
    population = [r for r in population if r.ok]
    if not population:
        raise NotEnoughProposers("Every seed candidate failed.", ctx.result("", "routed-evolve"))

    for loop in range(1, evo.loops + 1):
        votes = agreement([r.output.text for r in population])
        if votes.majority is not None and votes.share >= evo.stop_agreement:
            stop = Decision(
                "skip", f"population agrees ({votes.share:.2f})", {"agreement": votes.share}
            )
            ctx.decisions.append(ev := stop.event(f"evolve.{loop}", ctx.now()))
            ctx.emit(ev)
            break
        children = await _evolve_loop(ctx, base, population, loop, rng, seed)
        if children is None:
            break
        population = children

    best = best_supporter(population)
    if best is None:
        scores, _ = score_population(population)
        best = population[max(range(len(population)), key=lambda i: scores[i])]
    ctx.emit_final(best.output.text)
    return best.output.text


async def _evolve_loop(
    ctx: RunContext,
    base: list[Message],
    population: list[Reply],
    loop: int,
    rng: random.Random,
    seed: int | None,
) -> list[Reply] | None:
    """One loop: score, group, route, recombine; None when the budget allows no call."""
    cfg, evo = ctx.config, ctx.config.evolve
    scores, source = score_population(population)
    k = min(evo.group_size, len(population))
    groups = [rng.sample(range(len(population)), k) for _ in range(evo.population)]
    group_scores = [sum(scores[i] for i in g) / k for g in groups]
    strong, threshold = strong_groups(group_scores, evo.strong_percentile)
    jobs: list[tuple[AgentId, list[Message], Any, int | None]] = []
    for g, members in enumerate(groups):
        prompt = reference_messages(
            base, [population[i].output.text for i in members], RECOMBINE_PROMPT
        )
        tier = "strong" if g in strong else "cheap"
        reason = (
            f"group {source} {group_scores[g]:.3g} <= p{evo.strong_percentile:g} {threshold:.3g}"
            if tier == "strong" and threshold is not None
            else f"group {source} {group_scores[g]:.3g} above p{evo.strong_percentile:g}"
        )
        for option in ("strong", "cheap") if tier == "strong" else ("cheap",):
            if ctx.guard.why_not(cfg.tier_model(option), prompt, cfg.max_tokens) is None:
                if option != tier:
                    reason += "; strong over budget"
                tier = option
                break
        else:
            return None
        signals = {
            "group_score": round(group_scores[g], 4),
            "threshold": None if threshold is None else round(threshold, 4),
            "source": source,
            "members": members,
        }
        ctx.decisions.append(
            ev := Decision(tier, reason, signals).event(f"evolve.{loop}.{g + 1}", ctx.now())
        )  # type: ignore[arg-type]
        ctx.emit(ev)
        model = cfg.tier_model(tier)
        reservation = ctx.guard.reserve(model, prompt, cfg.max_tokens)
        agent = AgentId(loop, g, model, f"{tier} recombiner")
        jobs.append((agent, prompt, reservation, stage_seed(seed, 1000 * (loop + 1) + g)))
    children = await _gather(ctx, jobs, temperature=cfg.aggregator_temperature)
    return [
        child if child.ok else population[max(groups[g], key=lambda i: scores[i])]
        for g, child in enumerate(children)
    ]


async def _gather(
    ctx: RunContext,
    jobs: list[tuple[AgentId, list[Message], Any, int | None]],
    temperature: float | None = None,
) -> list[Reply]:
    """Run reserved calls concurrently, in order."""
    replies: list[Reply] = [None] * len(jobs)  # type: ignore[list-item]
    temp = ctx.config.temperature if temperature is None else temperature

    async def one(i: int) -> None:
        agent, prompt, reservation, call_seed = jobs[i]
        replies[i] = await ctx.run_reserved(
            agent, prompt, reservation, temperature=temp, seed=call_seed
        )

    async with anyio.create_task_group() as tg:
        for i in range(len(jobs)):
            tg.start_soon(one, i)
    return replies
