"""Routed stages of the graph: what the router sees, and what a skip leaves behind.

- A routed proposer is decided when it starts: no reference signals yet, only the prior of the
  policy (its proposer tier) and the budget left.
- A routed aggregator is decided once its start condition holds (all references done when
  layered; the first chunks under staircase), from its references' signals then: agreement of
  their final answers, DeepConf confidence over their (possibly partial) token logprobs, and
  the optional verifier's score of the candidate answer. `references_done` and
  `references_partial` in the decision's signals say what it had. It may be skipped when every
  reference is done and a majority answer exists: the most confident reply holding it stands.
- A refinement round of the final aggregator sees the last answer's confidence and its agreement
  with the proposals; skip ends the rounds (the last answer stands).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from moa.events import AgentId
from moa.providers.base import Message
from moa.routing.router import Decision, Stage
from moa.routing.verifier import judge_messages, verdict
from moa.runtime.prompts import AGGREGATE_PROMPT, Reference, aggregate_messages, readable_block

if TYPE_CHECKING:
    from moa.runtime.run import Node, Run


def tiers(node: Node) -> dict[str, str]:
    assert node.agent.strong is not None
    return {"cheap": node.agent.model, "strong": node.agent.strong}


def route_proposer(run: Run, node: Node, messages: list[Message]) -> None:
    """Decide a routed proposer's tier at its start."""
    stage = Stage(name=f"propose.{node.id.key}", kind="propose")
    decision = run.route(stage, tiers(node), messages, node.agent.max_tokens, agent=node.id)
    run.set_tier(node, "cheap" if decision.choice == "skip" else decision.choice)


def best_supporter(nodes: list[Node]) -> Node | None:
    """The most confident node holding the majority answer (the first one without logprobs)."""
    from moa.routing.signals import agreement, confidence  # routed stages only: not at start

    votes = agreement([n.text for n in nodes])
    if votes.majority is None:
        return None
    supporters = [nodes[i] for i in votes.supporters()]

    def score(node: Node) -> float:
        conf = confidence(node.logprobs or None)
        return conf.bottom10 if conf is not None else -math.inf

    return max(supporters, key=score)


def _agreement_with(text: str, others: list[Node]) -> float:
    """Share of `others` whose final answer equals the answer of `text`."""
    from moa.routing.signals import agreement

    votes = agreement([text, *(n.text for n in others)])
    mine = votes.answers[0]
    if mine is None:
        return 0.0
    return sum(a == mine for a in votes.answers[1:]) / max(len(others), 1)


async def route_aggregator(run: Run, node: Node) -> str:
    """Decide a routed aggregating stage now; apply the tier, or fill in the skip's answer."""
    from moa.routing.signals import group_signals

    refs = [u for u in node.upstream if u.parts]
    done = [u for u in node.upstream if u.feed.state == "done"]
    complete = all(u.feed.resolved for u in node.upstream)
    acting = node.id.final and run.request_specific  # never skipped: the request's own asks
    if node.kind == "refine":
        last, proposals = node.upstream[0], [u for u in node.upstream[1:] if u.parts]
        if last.kind == "refine" and last.output.finish_reason == "skip" and not acting:
            stood = Decision("skip", "the previous round stood, so the refinement ended")
            run.record(stood, f"refine.{node.id.key}", node.id)
            return _skip(run, node, last)
        signals: dict[str, Any] = group_signals([last.text], [last.logprobs or None])
        signals["agreement"] = round(_agreement_with(last.text, proposals), 4)
        candidate: Node | None = last if last.feed.state == "done" else None
    else:
        signals = group_signals([u.text for u in refs], [u.logprobs or None for u in refs])
        candidate = best_supporter(done) if complete else None
    signals["references_done"] = len(done)
    signals["references_partial"] = sum(u.feed.state != "done" for u in refs)
    messages = aggregate_messages(
        run.conversation(node),
        readable_block([Reference(u.text) for u in refs], AGGREGATE_PROMPT),
        system=node.agent.system,
    )
    verifier = run.config.router.verifier if run.config.router else None
    if verifier is not None:
        signals.update(await verify(run, node, candidate, refs))
    stage = Stage(
        name=f"{node.kind}.{node.id.key}", kind=node.kind, signals=signals,  # type: ignore[arg-type]
        can_skip=candidate is not None and complete and not acting,
    )
    completions = [u.output.usage.completion_tokens for u in done] or [node.agent.max_tokens]
    decision = run.route(
        stage,
        tiers(node),
        messages,
        node.agent.max_tokens,
        completion=max(1, sum(completions) // len(completions)),
        agent=node.id,
    )
    if decision.choice == "skip" and candidate is not None:
        return _skip(run, node, candidate)
    run.set_tier(node, "strong" if decision.choice == "strong" else "cheap")
    return decision.choice


def _skip(run: Run, node: Node, source: Node) -> str:
    """The stage makes no call: `source`'s answer (and confidence) stands as its output."""
    run.set_tier(node, "cheap")
    run._started(node)
    node.logprobs = list(source.logprobs)
    if source.text:
        run._delta(node, source.text)
    run._finished(node, "skip")
    return "skip"


async def verify(
    run: Run,
    node: Node,
    candidate: Node | None,
    replies: list[Node],
) -> dict[str, Any]:
    """The verifier's signals on `candidate` (a judge call that counts in calls, cost and budget).

    Pairwise, the rival is the most confident reply holding another final answer; without one
    the judge scores pointwise. No complete candidate, a refused or a failed call leave
    `verifier` None, with `verifier_error` saying why.
    """
    cfg = run.config.router.verifier if run.config.router else None
    assert cfg is not None
    if candidate is None:
        return {"verifier": None, "verifier_error": "no complete candidate answer yet"}
    rival = rival_of(candidate.text, replies) if cfg.mode == "pairwise" else None
    signals: dict[str, Any] = {
        "verifier": None,
        "verifier_mode": "pointwise" if rival is None else "pairwise",
    }
    model = cfg.model or node.agent.model
    judge = run.node(
        AgentId(node.id.layer, node.id.index, model, "verifier"),
        node.agent.model_copy(update={"temperature": cfg.temperature, "strong": None}),
        seed=None if node.seed is None else node.seed + 1,
    )
    run._started(judge)
    try:
        reply = await run._call(
            judge, judge_messages(run.advice, candidate.text, rival), cfg.max_tokens
        )
    except Exception as err:  # a refused or failed judge is a missing signal, not a failure
        run._failed(judge, str(err) or type(err).__name__)
        signals["verifier_error"] = judge.output.error
        return signals
    run._finished(judge, reply.finish_reason)
    signals["verifier"] = verdict(reply.text, pairwise=rival is not None)
    if signals["verifier"] is None:
        signals["verifier_error"] = "the judge's reply holds no score"
    return signals


def rival_of(candidate: str, replies: list[Node]) -> str | None:
    """The most confident reply whose final answer (or, without one, text) differs."""
    from moa.routing.signals import agreement, confidence

    mine = agreement([candidate]).answers[0]

    def differs(text: str) -> bool:
        if mine is None:
            return text.strip() != candidate.strip()
        return agreement([text]).answers[0] != mine

    def score(node: Node) -> float:
        conf = confidence(node.logprobs or None)
        return conf.bottom10 if conf is not None else -math.inf

    others = [n for n in replies if differs(n.text)]
    return max(others, key=score).text if others else None
