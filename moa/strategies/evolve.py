"""Squeeze Evolve (arXiv 2604.07725): evolutionary multi-model test-time scaling, a strategy on
the run core (`moa.runtime.run`).

Loop 0: the agents of the mixture's one layer (e.g. the strong model with `n = 8`) write the
population of N candidates. Each loop then scores every candidate by its DeepConf confidence
(from logprobs; the vote share of its final answer in the population when logprobs are
missing), draws N groups of K distinct candidates, asks the configured router for each group's
tier — the signals are the group's `confidence`, `agreement` and `rank` (the share of this
loop's groups that are less confident) — and recombines every group in parallel into one child
on the aggregator's cheap (`model`) or `strong` tier. Without a `[router]` the rule is the
paper's percentile: the least confident quarter of this problem's groups go strong (a
threshold router on `rank` at 0.25). It stops after T loops or as soon as the population
agrees; the answer is the most confident candidate holding the majority answer.
"""

from __future__ import annotations

import random

import anyio

from moa.config import EvolveConfig
from moa.errors import NotEnoughProposers
from moa.events import AgentId
from moa.providers.base import Message
from moa.routing.router import Decision, Stage
from moa.routing.signals import agreement, confidence, ngram_cosine
from moa.runtime.prompts import Reference, aggregate_messages, readable_block
from moa.runtime.run import Node, Run, stage_seed
from moa.strategies.stages import best_supporter, route_proposer, tiers

RECOMBINE_PROMPT = (
    "You are given several candidate solutions to the latest user query. Some of them may be "
    "wrong. Compare their reasoning, keep what is correct, fix what is not, and write one "
    "improved, complete solution that ends with the final answer.\n\nCandidate solutions:"
)


def score_population(population: list[Node]) -> tuple[list[float], str]:
    """Confidence of each candidate and its source ('confidence' or 'diversity')."""
    confs = [confidence(n.logprobs or None) for n in population]
    if all(c is not None for c in confs):
        return [c.bottom10 for c in confs if c is not None], "confidence"
    texts = [n.text for n in population]
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


class Evolution(Run):
    """One Squeeze Evolve run."""

    mode = "evolve"

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.evolve = self.config.evolve or EvolveConfig()
        self.rng = random.Random(self.overrides.seed)
        self.seeds: list[Node] = []
        for agent in self.config.layers[0].agents:
            for _ in range(agent.n):
                i = len(self.seeds)
                aid = AgentId(0, i, agent.model, agent.name or "", strong=agent.strong)
                self.seeds.append(
                    self.node(aid, agent, seed=stage_seed(self.overrides.seed, 1000 + i),
                              want_logprobs=True)
                )

    async def body(self, tg: anyio.abc.TaskGroup) -> None:
        population = [n for n in await self._gather(self.seeds) if n.output.ok]
        if not population:
            self._abort(NotEnoughProposers("Every seed candidate failed."))
            return
        for loop in range(1, self.evolve.loops + 1):
            votes = agreement([n.text for n in population])
            if votes.majority is not None and votes.share >= self.evolve.stop_agreement:
                stop = Decision(
                    "skip", f"population agrees ({votes.share:.2f})", {"agreement": votes.share}
                )
                self.record(stop, f"evolve.{loop}")
                break
            children = await self._loop(population, loop)
            if not children:
                break
            population = children
        best = best_supporter(population)
        if best is None:
            scores, _ = score_population(population)
            best = population[max(range(len(population)), key=lambda i: scores[i])]
        self.answer = best.text
        self._final_delta(best.text)

    async def _loop(self, population: list[Node], loop: int) -> list[Node]:
        """Score, group, route and recombine; [] when the budget allows no call."""
        scores, source = score_population(population)
        k = min(self.evolve.group_size, len(population))
        groups = [self.rng.sample(range(len(population)), k) for _ in population]
        group_scores = [sum(scores[i] for i in g) / k for g in groups]
        order = sorted(range(len(groups)), key=lambda g: (group_scores[g], g))
        agent = self.config.final
        children: list[Node] = []
        prompts: dict[int, list[Message]] = {}
        for g, members in enumerate(groups):
            prompt = aggregate_messages(
                self.messages,
                readable_block([Reference(population[i].text) for i in members], RECOMBINE_PROMPT),
            )
            node = self.node(
                AgentId(loop, g, agent.model, agent.name or "recombiner", strong=agent.strong),
                agent,
                seed=stage_seed(self.overrides.seed, 1000 * (loop + 1) + g),
                kind="recombine",
                want_logprobs=True,
            )
            group = [population[i] for i in members]
            signals = {
                "confidence": round(group_scores[g], 4),
                "agreement": round(agreement([n.text for n in group]).share, 4),
                "rank": round(order.index(g) / len(groups), 4),
                "source": source,
                "members": members,
            }
            stage = Stage(name=f"evolve.{loop}.{g + 1}", kind="recombine", signals=signals)
            decision = self.route(stage, tiers(node), prompt, agent.max_tokens, agent=node.id)
            tier = "strong" if decision.choice == "strong" else "cheap"
            if self.guard.why_not(tiers(node)[tier], prompt, agent.max_tokens):
                self.nodes.remove(node)
                return []
            self.set_tier(node, tier)
            node.upstream = group
            prompts[id(node)] = prompt
            children.append(node)
        best_parent = {id(c): max(c.upstream, key=lambda n: scores[population.index(n)])
                       for c in children}
        done = await self._gather(children, prompts)
        return [child if child.output.ok else best_parent[id(child)] for child in done]

    async def _gather(
        self, nodes: list[Node], prompts: dict[int, list[Message]] | None = None
    ) -> list[Node]:
        """Run one call per node concurrently; a failed call is a failed agent."""

        async def one(node: Node) -> None:
            messages = (prompts or {}).get(id(node)) or self.messages
            try:
                if node.routed:
                    route_proposer(self, node, messages)
                self._started(node)
                call = await self._call(node, messages, node.agent.max_tokens)
            except Exception as err:
                self._failed(node, str(err) or type(err).__name__)
            else:
                self._finished(node, call.finish_reason)

        async with anyio.create_task_group() as tg:
            for node in nodes:
                tg.start_soon(one, node)
        return nodes
