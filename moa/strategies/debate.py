"""Multi-agent debate (Du et al., 2023), a strategy on the run core, layered or staircase.

Round 1: every debater answers the conversation on its own. Each further round: every debater
reads the others' latest answers ("These are the solutions to the problem from other agents:
…") and revises. Each debater keeps one append-only history — its earlier answers as assistant
turns, the others' answers as user turns — so each round's prompt extends the prompt of its
previous round and a prefix cache reuses it.

The debate is the graph strategy's machinery with rounds for layers (`Execution`): round r+1's
debaters are aggregating nodes whose references are round r's answers. Under staircase a
debater of round r+1 starts on the partial answers of round r and obeys the same pacing rule
(it never writes more than the slowest live peer has shown it until every peer is complete);
a backend that cannot continue an assistant turn runs its debater's rounds layered, with a
notice. A debater whose answer failed without text leaves the debate (labelled); the rest go
on.

After a round in which every answering debater gave the same extracted answer, the debate
stops (`stop_at_consensus`); the calls it did not make are `saved_calls`. The answer is the
vote of the last round (the most confident supporter of the majority answer), or — for a tie,
for open-ended answers with an `[aggregator]`, and always with `final = "aggregate"` — the
aggregator's synthesis of the last round.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio

from moa.config import AgentConfig, DebateConfig
from moa.errors import ConfigError, NotEnoughProposers
from moa.events import AgentFinished, AgentId
from moa.providers.base import Message
from moa.routing.signals import Agreement, agreement, ngram_cosine
from moa.runtime.prompts import (
    DEBATE_SOLUTION,
    FAILED_LABEL,
    IN_PROGRESS_LABEL,
    TRUNCATED_LABEL,
    Reference,
    with_system,
)
from moa.runtime.run import Node, stage_seed
from moa.runtime.staircase import ReferenceView
from moa.strategies.graph import Execution, _causes
from moa.strategies.stages import best_supporter


class Debate(Execution):
    """One debate: rounds of debaters (`self.layers`), then a vote or the aggregator."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.debate: DebateConfig = args[0].debate  # read by _build, called by Execution
        self._sent: dict[Node, str] = {}
        """The revision turn each debater was last sent (its later rounds repeat it)."""
        self._scopes: dict[Node, anyio.CancelScope] = {}
        self._ended: dict[Node, anyio.Event] = {}
        super().__init__(*args, **kwargs)

    # ---- the rounds ------------------------------------------------------------------------

    def _build(self) -> list[list[Node]]:
        ov, config = self.overrides, self.config
        debaters = [a for a in self.debate.agents for _ in range(a.n)]
        rounds: list[list[Node]] = []
        for r in range(self.debate.rounds):
            nodes = []
            for i, agent in enumerate(debaters):
                agent = _with_overrides(agent, ov.temperature, ov.max_tokens)
                aid = AgentId(r, i, agent.model, agent.name or "", strong=agent.strong, prefix="R")
                nodes.append(
                    self.node(
                        aid,
                        agent,
                        chunk_size=config.staircase.chunk_size,
                        upstream=rounds[-1] if rounds else [],
                        stop=ov.stop,
                        seed=stage_seed(ov.seed, 100 * r + i),
                        kind="debate" if r else "propose",
                    )
                )
            rounds.append(nodes)
        return rounds

    def _choose_mode(self, requested: str) -> tuple[str, str]:
        """Staircase unless layered was asked for; a debater whose backend cannot continue an
        assistant turn runs its rounds layered (the notice says which)."""
        if requested == "layered":
            return "layered", ""
        revising = [n for round_ in self.layers[1:] for n in round_]
        blocked = [n for n in revising if not n.provider.capabilities.continuation]
        blockers = sorted({n.agent.model for n in blocked})
        if not blocked:
            return "staircase", ""
        if len(blocked) == len(revising):
            return "layered", (
                f"Staircase streaming needs backends that can continue an assistant turn; "
                f"{', '.join(blockers)} cannot, so this debate runs layered."
            )
        for node in blocked:
            node.layered = True
        return "staircase", (
            f"Staircase streaming needs backends that can continue an assistant turn; "
            f"{', '.join(blockers)} cannot, so its debaters wait for complete answers "
            "(layered); the others stream."
        )

    async def body(self, tg: anyio.abc.TaskGroup) -> None:
        self._scopes = {node: anyio.CancelScope() for node in self.nodes}
        self._ended = {node: anyio.Event() for node in self.nodes}
        for node in self.nodes:
            tg.start_soon(self._debater, node)
        last = await self._rounds()
        if last is not None:
            await self._conclude(last)

    async def _debater(self, node: Node) -> None:
        """One debater's round; stopped (not failed) when the debate ends before it."""
        scope = self._scopes[node]
        try:
            with scope:
                await self._run_node(node)
            if scope.cancel_called and not node.feed.resolved:
                self._stopped(node)
        finally:
            self._ended[node].set()

    async def _wait_start(self, node: Node, continuing: bool) -> None:
        """The start rule of the graph, after the round two before is over (at most one
        round runs ahead on partial answers, so a consensus stops at most one round's
        calls), and once this debater's previous answer has text (else it leaves)."""
        r = node.id.layer
        if not node.id.final and r >= 2:
            await self._until(lambda: all(n.feed.resolved for n in self.layers[r - 2]), node)
            if self._agreed(r - 2):
                await anyio.sleep_forever()  # the debate ends there: `_rounds` stops this one
        await super()._wait_start(node, continuing)
        if node.id.final:
            return
        own = node.upstream[node.id.index]  # this debater's previous round
        if self._agreed(r - 1):
            await anyio.sleep_forever()
        await self._until(lambda: own.feed.usable or own.feed.resolved, node)
        if not own.feed.usable:
            raise _Left(f"left the debate: its round {r} answer failed")

    async def _until(self, ready: Callable[[], bool], node: Node) -> None:
        """Wait for `ready()`, the node marked as waiting for its references meanwhile."""
        node.feed.hold(True)
        try:
            while not ready():
                await self.board.wait(None)
        finally:
            node.feed.hold(False)

    async def _run_node(self, node: Node) -> None:
        try:
            await super()._run_node(node)
        except _Left as err:
            self._failed(node, str(err))

    def _agreed(self, r: int) -> bool:
        """Round r is over and every debater that answered gave the same answer."""
        nodes = self.layers[r]
        if not self.debate.stop_at_consensus or r == len(self.layers) - 1:
            return False
        if not all(n.feed.resolved for n in nodes):
            return False
        answered = [n.text for n in nodes if n.output.ok]
        return len(answered) >= 2 and agreement(answered).unanimous

    async def _rounds(self) -> list[Node] | None:
        """Wait for each round; stop the later ones at consensus. The last round's answers, or
        None when the run was aborted."""
        for r, nodes in enumerate(self.layers):
            while not all(n.feed.resolved for n in nodes):
                await self.board.wait(None)
            answered = [n for n in nodes if n.output.ok]
            if not answered:
                why = _causes(nodes) or f"Every debater of round {r + 1} failed."
                self._abort(NotEnoughProposers(why))
                return None
            if self._agreed(r):
                later = [n for round_ in self.layers[r + 1 :] for n in round_]
                self.saved_calls = sum(not n.output.calls for n in later)
                running = len(later) - self.saved_calls
                for node in later:
                    self._scopes[node].cancel()
                for node in later:
                    await self._ended[node].wait()
                cut = f", {running} begun on partial answers cut short" if running else ""
                self.notice(
                    f"The debaters agreed after round {r + 1} of {len(self.layers)}: the debate "
                    f"stopped ({self.saved_calls} calls saved{cut})."
                )
                return answered
        return answered

    def _stopped(self, node: Node) -> None:
        """A debater of a round the debate no longer needs (stopped at consensus)."""
        out = node.output
        out.ok, out.text, out.finish_reason = True, node.text, "consensus"
        out.truncated = bool(node.parts)
        out.latency_s = self._latency(node) if node.started_at else 0.0
        node.feed.state = "done"
        self.emit(AgentFinished(self._now(), node.id, out.text, "consensus", out.ttft_s,
                                out.latency_s))

    # ---- the answer ------------------------------------------------------------------------

    async def _conclude(self, answered: list[Node]) -> None:
        votes = agreement([n.text for n in answered])
        why = _undecided(votes)
        agg = self.config.aggregator
        if self.debate.final == "vote" and why is None:
            best = best_supporter(answered)
            assert best is not None
            self.notice(
                f"Vote: {votes.counts[votes.majority or '']} of {len(answered)} debaters "
                f"answered {votes.majority}."
            )
            self._answer(best)
        elif agg is None:
            best = _medoid(answered, votes)
            self.notice(f"The vote was {why}; the answer is {best.id.key}'s, the one closest "
                        "to the others (no [aggregator] is configured).")
            self._answer(best)
        else:
            if self.debate.final == "vote":
                self.notice(f"The vote was {why}; the aggregator writes the answer.")
            await self._aggregate_last(answered[0].id.layer)
        self._scope.cancel()

    def _answer(self, node: Node) -> None:
        self.answer, self.answer_finish = node.text, node.output.finish_reason
        self._final_delta(node.text)

    async def _aggregate_last(self, r: int) -> None:
        """The aggregator synthesizes round r's answers (all complete by now)."""
        ov = self.overrides
        agent = _with_overrides(self.config.final, ov.temperature, ov.max_tokens)
        aid = AgentId(r + 1, 0, agent.model, agent.name or "", True, agent.strong)
        node = self.node(aid, agent, upstream=self.layers[r], stop=ov.stop, seed=ov.seed,
                         kind="aggregate")
        node.layered = True
        await self._run_node(node)

    # ---- prompts ---------------------------------------------------------------------------

    def _laid_out(self, node: Node, view: ReferenceView) -> list[Message]:
        if node.kind != "debate":
            return super()._laid_out(node, view)
        return self._history(node)

    def _trimmed(self, node: Node, refs: list[Reference], max_tokens: int) -> list[Message]:
        if node.kind != "debate":
            return super()._trimmed(node, refs, max_tokens)
        raise ConfigError(
            f"A debate round does not fit aggregator_context_tokens="
            f"{self.config.aggregator_context_tokens} for {node.agent.model}; debates are not "
            "trimmed (use fewer debaters or rounds, or shorter answers)."
        )

    def _history(self, node: Node) -> list[Message]:
        """The debater's chat: the conversation, then per earlier round its own answer (an
        assistant turn) and the others' answers (a user turn), then its answer so far."""
        chain = self._chain(node)
        messages = with_system(self.conversation(node), node.agent.system)
        for mine, later in zip(chain, [*chain[1:], node], strict=True):
            messages.append({"role": "assistant", "content": mine.feed.text})
            turn = self._sent.get(later) if later is not node else None
            messages.append({"role": "user", "content": turn or self._solutions(mine)})
        self._sent[node] = messages[-1]["content"]
        if node.parts:
            messages.append({"role": "assistant", "content": node.text})
        return messages

    def _chain(self, node: Node) -> list[Node]:
        """This debater's nodes of the rounds before `node`'s."""
        return [self.layers[r][node.id.index] for r in range(node.id.layer)]

    def _solutions(self, mine: Node) -> str:
        """The revision turn after `mine`: the other debaters' answers of that round."""
        lines = []
        for other in self.layers[mine.id.layer]:
            feed = other.feed
            if other is mine or not feed.chunks:
                continue
            label = (
                (TRUNCATED_LABEL if feed.truncated else FAILED_LABEL) if feed.state == "failed"
                else "" if feed.state == "done" else IN_PROGRESS_LABEL
            )
            lines.append(DEBATE_SOLUTION.format(text=feed.text) + label)
        return self.debate.prompt.replace("{solutions}", "\n\n".join(lines))


class _Left(Exception):
    """A debater whose previous answer failed without text leaves the debate."""


def _with_overrides(
    agent: AgentConfig, temperature: float | None, max_tokens: int | None
) -> AgentConfig:
    """A request's temperature / max_tokens apply to every agent that may write the answer."""
    update = {k: v for k, v in (("temperature", temperature), ("max_tokens", max_tokens))
              if v is not None}
    return agent.model_copy(update=update) if update else agent


def _undecided(votes: Agreement) -> str | None:
    """Why the vote decides nothing ("a tie", "open-ended"), or None."""
    if votes.majority is None or votes.extracted * 2 < len(votes.answers):
        return "open-ended (no final answer to count in most replies)"
    top = votes.counts[votes.majority]
    if sum(c == top for c in votes.counts.values()) > 1:
        return f"a tie ({', '.join(a for a, c in votes.counts.items() if c == top)})"
    return None


def _medoid(nodes: list[Node], votes: Agreement) -> Node:
    """The reply most like the others (a tie's first supporter when there are answers)."""
    if votes.majority is not None:
        return nodes[votes.supporters()[0]]
    texts = [n.text for n in nodes]
    return max(nodes, key=lambda n: sum(ngram_cosine(n.text, t) for t in texts))
