"""The graph strategy: layers of agents, then the final aggregator, layered or staircase.

Every agent is a node; all nodes run concurrently in one anyio task group of the run
(`moa.runtime.run.Run`: lifecycle, metered calls, budget, routing). A proposer makes one
call. An aggregating node waits for a start condition on its references (the previous layer's
feeds), then works in steps:

- layered: it starts when all references are done and makes one call — the paper's MoA;
- staircase: it starts once the first chunks are in (`moa.runtime.staircase.start_wait`) and
  proceeds in bounded steps, each prompt holding the references received so far and its own
  output so far as a continued assistant turn; once the references are done it finishes freely.

A node whose agent names a `strong` tier is a routed stage (`moa.strategies.stages`): a proposer's
tier is decided when it starts, an aggregator's once its start condition holds, from the
signals of the references it has then; the router may also skip an aggregation (the majority
answer stands). `[router] refine_loops` adds routed rounds of the final aggregator.

Failures of single agents are reported, not raised. Run-level failures (quorum lost, final
aggregator failed, deadline) end the run with `fatal` set.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import anyio

from moa.config import MixtureConfig
from moa.errors import (
    AggregatorFailed,
    AggregatorOverBudget,
    BudgetExceeded,
    ConfigError,
    NotEnoughProposers,
    ProviderError,
)
from moa.events import AgentId, Event, Notice, StaircaseStep
from moa.providers.base import Message
from moa.providers.registry import Registry
from moa.routing.router import Router
from moa.runtime.budget import BudgetGuard
from moa.runtime.prompts import (
    AGGREGATE_PROMPT,
    Reference,
    aggregate_messages,
    cache_messages,
    fit_references,
    readable_block,
    with_system,
)
from moa.runtime.run import Node, Overrides, Run, stage_seed
from moa.runtime.staircase import Pacer, ReferenceView, settle_wait, start_wait
from moa.state import State
from moa.strategies import stages
from moa.tokens import count_messages, count_tokens

log = logging.getLogger("moa.strategies.graph")


class Execution(Run):
    """One run of the mixture graph: build it, run every node, assemble the result."""

    def __init__(
        self,
        config: MixtureConfig,
        registry: Registry,
        messages: list[Message],
        emit: Callable[[Event], None],
        guard: BudgetGuard,
        router: Router | None = None,
        overrides: Overrides | None = None,
        state: State | None = None,
    ) -> None:
        super().__init__(config, registry, messages, emit, guard, router, overrides, state)
        self.layers = self._build()
        requested = config.mode
        self.mode, self.fallback = self._choose_mode(requested)
        # A fallback is news when staircase was asked for; under `auto` it is only traced.
        self.fallback_kind = "auto" if requested == "auto" else "fallback"
        if self.fallback and requested != "auto":
            self.notices.append(self.fallback)
        if self.mode == "layered":
            for node in self.nodes:
                node.feed.chunk_size = None
        self.quorum_start = (
            config.staircase.start_k if self.fallback and self.mode == "layered" else None
        )
        final = self.layers[-1][0]
        self.check_final(final.agent)
        self.acting_notice = ""
        if self.mode == "staircase" and (self.acting.active or self.overrides.n > 1):
            final.layered = True
            why = "acts (tools or a response format)" if self.acting.active else "samples n > 1"
            self.acting_notice = (
                f"The final aggregator {why}, so it waits for complete references (layered); "
                "the stages before it still stream."
            )

    # ---- graph ---------------------------------------------------------------------------

    def _build(self) -> list[list[Node]]:
        ov, config = self.overrides, self.config
        final = config.final.model_copy(
            update={
                k: v
                for k, v in (("temperature", ov.temperature), ("max_tokens", ov.max_tokens))
                if v is not None
            }
        )
        loops = config.router.refine_loops if config.router else 0
        shapes = [(layer.agents, layer.min_proposers) for layer in config.layers]
        shapes += [([config.final], 1)] * loops + [([final], 1)]
        proposers = len(config.layers)
        layers: list[list[Node]] = []
        for li, (agents, _) in enumerate(shapes):
            is_final = li == len(shapes) - 1
            upstream = layers[-1] if layers else []
            if li > proposers:  # a refinement: the last answer, then the last proposals
                upstream = [layers[-1][0], *layers[proposers - 1]]
            kind = "propose" if not li else "refine" if li > proposers else "aggregate"
            nodes: list[Node] = []
            for agent in agents:
                for _ in range(agent.n):
                    aid = AgentId(
                        li, len(nodes), agent.model, agent.name or "", is_final, agent.strong
                    )
                    nodes.append(
                        self.node(
                            aid,
                            agent,
                            chunk_size=config.staircase.chunk_size,
                            upstream=upstream,
                            quorum=shapes[min(li, proposers) - 1][1] if li else 1,
                            stop=ov.stop if is_final else None,
                            seed=ov.seed if is_final else stage_seed(ov.seed, 100 * li + aid.index),
                            kind=kind,
                        )
                    )
            layers.append(nodes)
        for node in self.nodes:
            if node.routed:
                for ref in node.upstream:
                    ref.want_logprobs = True
        return layers

    def _choose_mode(self, requested: str) -> tuple[str, str]:
        """The mode this run uses, and why it is not staircase when that was possible."""
        if requested == "layered":
            return "layered", ""
        blockers = sorted(
            {
                n.agent.model
                for layer in self.layers[1:]
                for n in layer
                if not n.provider.capabilities.continuation
            }
        )
        if not blockers:
            return "staircase", ""
        k = self.config.staircase.start_k
        how = f"a quorum start (the fastest {k} references)" if k else "layered mode"
        return "layered", (
            f"Staircase streaming needs backends that can continue an assistant turn; "
            f"{', '.join(blockers)} cannot, so this run uses {how}."
        )

    # ---- the run -------------------------------------------------------------------------

    def started_notices(self) -> list[Notice]:
        return [
            Notice(self._now(), text, kind=self.fallback_kind)
            for text in (self.fallback, self.acting_notice)
            if text
        ]

    async def body(self, tg: anyio.abc.TaskGroup) -> None:
        for node in self.nodes:
            tg.start_soon(self._run_node, node)

    async def _run_node(self, node: Node) -> None:
        try:
            if not node.upstream:
                await self._propose(node)
            elif not node.routed or not await self._route_aggregate(node):
                await self._aggregate(node)
        except NotEnoughProposers as err:
            self._abort(err)
        except Exception as err:
            log.debug("agent %s failed", node.id.label, exc_info=True)
            message = str(err) or type(err).__name__
            self._failed(node, message)
            if node.id.final and isinstance(err, BudgetExceeded):
                self._abort(AggregatorOverBudget(message))
            elif node.id.final:
                self._abort(AggregatorFailed(f"The final aggregator failed: {message}"))
        else:
            if node.id.final:
                self._scope.cancel()

    async def _propose(self, node: Node) -> None:
        messages = with_system(self.conversation(node), node.agent.system)
        if node.routed:
            stages.route_proposer(self, node, messages)
        self._started(node)
        call = await self._call(node, messages, node.agent.max_tokens)
        _check_answered(node, call.finish_reason)
        self._finished(node, call.finish_reason)

    async def _route_aggregate(self, node: Node) -> bool:
        """Decide a routed aggregating stage once it may start; True when it was skipped."""
        await self._wait_start(node, self.mode == "staircase")
        choice = await stages.route_aggregator(self, node)
        if choice == "skip":
            return True
        if self.mode == "staircase" and not node.provider.capabilities.continuation:
            node.layered = True
            self.notice(
                f"{node.id.key}: the {choice} tier {node.id.model} cannot continue an assistant "
                "turn, so this stage waits for complete references (layered)."
            )
        return False

    async def _aggregate(self, node: Node) -> None:
        sc = self.config.staircase
        feeds = [u.feed for u in node.upstream]
        continuing = self.mode == "staircase" and not node.layered
        view = ReferenceView(feeds, sc.layout)
        pacer = Pacer(feeds, sc.pacing, sc.stall_s)
        for u in node.upstream:
            u.feed.peers = [n.feed for n in self.nodes if n.provider is u.provider and n is not u]
            u.feed.queued = u.provider.capabilities.queued
        await self._wait_start(node, continuing)
        self._started(node)
        budget, used, step = node.agent.max_tokens, 0, 0
        while True:
            free = self._may_finish(node)
            settled = free or not (continuing or self.quorum_start)
            stragglers = frozenset(
                i for i, f in enumerate(feeds) if settled and sc.keep_truncated and not f.resolved
            )
            view.update(complete_only=not continuing, given_up=stragglers,
                        instruction=AGGREGATE_PROMPT)
            if free or not continuing:
                self._check_quorum(node, view)
                if continuing:
                    self._step(node, pacer, step, budget - used, count_tokens(node.text), True)
                finish = await self._free_call(node, view, budget - used)
                break
            written = count_tokens(node.text)
            limit = pacer.limit(sc.step_size(step), written, budget - used)
            if limit > 0:
                self._step(node, pacer, step, limit, written)
                call = await self._call(
                    node, self._prompt(node, view, limit), limit, continue_final=bool(node.parts)
                )
                used += call.tokens
                if call.finish_reason != "length" or used >= budget:
                    finish = call.finish_reason
                    break
                step += 1
            await self._wait_news(node, view, pacer, min(sc.step_size(step), budget - used))
        _check_answered(node, finish)
        self._finished(node, finish)

    # ---- start, steps and quorum -----------------------------------------------------------

    def _step(self, node: Node, pacer: Pacer, step: int, limit: int, written: int,
              last: bool = False) -> None:
        """Emit the `StaircaseStep` of the call `node` makes next (after `step` full steps)."""
        shown = {u.id.key: pacer.shown(i) for i, u in enumerate(node.upstream)}
        self.emit(StaircaseStep(self._now(), node.id, step + 1, limit, written, shown,
                                pacer.lead(written), last))

    async def _wait_start(self, node: Node, continuing: bool) -> None:
        feeds = [u.feed for u in node.upstream]
        sc = self.config.staircase
        node.feed.hold(True)
        try:
            while True:
                self._check_possible(node)
                if continuing:
                    k = min(max(sc.start_k or 1, node.quorum), len(feeds))
                    wait = start_wait(feeds, k, sc.grace_s, sc.stall_s)
                elif self.quorum_start:
                    k = min(max(self.quorum_start, node.quorum), len(feeds))
                    wait = start_wait(feeds, k, sc.grace_s, complete=True)
                else:
                    wait = settle_wait(feeds, node.quorum, sc.stall_s)
                if wait == 0.0:
                    return
                await self.board.wait(wait)
        finally:
            node.feed.hold(False)

    def _may_finish(self, node: Node) -> bool:
        """All references resolved, or the quorum is in and the rest have gone silent."""
        feeds = [u.feed for u in node.upstream]
        return settle_wait(feeds, node.quorum, self.config.staircase.stall_s) == 0.0

    async def _wait_news(self, node: Node, view: ReferenceView, pacer: Pacer, want: int) -> None:
        """Wait until the next step may be taken (lockstep: the references are `want` tokens
        ahead; eager: any news, at most `stall_s`) or the last call may be made."""
        stall_s = self.config.staircase.stall_s
        until = time.monotonic() + stall_s
        node.feed.hold(True)
        try:
            while not self._may_finish(node):
                self._check_possible(node)
                if pacer.pacing == "lockstep":
                    wait = pacer.wait(want, count_tokens(node.text))
                    if wait == 0.0:
                        return
                    settle = settle_wait([u.feed for u in node.upstream], node.quorum, stall_s)
                    wait = wait if settle is None else min(wait, settle)
                else:
                    if view.has_news():
                        return
                    wait = until - time.monotonic()
                    if wait <= 0:
                        return
                await self.board.wait(wait)
        finally:
            node.feed.hold(False)

    def _check_possible(self, node: Node) -> None:
        failed = sum(u.feed.state == "failed" for u in node.upstream)
        if len(node.upstream) - failed < node.quorum:
            raise NotEnoughProposers(_shortfall(node, len(node.upstream) - failed, "can answer"))

    def _check_quorum(self, node: Node, view: ReferenceView) -> None:
        done = sum(u.feed.state == "done" for u in node.upstream)
        if done < node.quorum or not view.order:
            raise NotEnoughProposers(_shortfall(node, done, "answered"))

    # ---- prompts ----------------------------------------------------------------------------

    def _messages(self, node: Node, block: str) -> list[Message]:
        return aggregate_messages(
            self.conversation(node), block, system=node.agent.system, own=node.text
        )

    def _laid_out(self, node: Node, view: ReferenceView) -> list[Message]:
        """The step's prompt in the configured layout (before any trimming)."""
        if view.layout == "cache":
            return cache_messages(self.conversation(node), view.rounds, node.text,
                                  node.agent.system)
        return self._messages(node, view.block(AGGREGATE_PROMPT))

    def _fits(self, messages: list[Message], max_tokens: int) -> bool:
        limit = self.config.aggregator_context_tokens
        return limit is None or count_messages(messages) + max_tokens <= limit

    def _prompt(self, node: Node, view: ReferenceView, max_tokens: int) -> list[Message]:
        """The step's prompt in the configured layout, trimmed if it would overflow."""
        messages = self._laid_out(node, view)
        if self._fits(messages, max_tokens):
            return messages
        return self._trimmed(node, view.references(), max_tokens)

    def _trimmed(self, node: Node, refs: list[Reference], max_tokens: int) -> list[Message]:
        """References trimmed (readable layout) so the prompt fits the aggregator's context."""
        limit = self.config.aggregator_context_tokens or 0
        base = count_messages(
            self._messages(
                node,
                readable_block(
                    [
                        Reference(
                            "",
                            complete=r.complete,
                            truncated=r.truncated,
                            trimmed=True,
                            same_as=r.same_as,
                        )
                        for r in refs
                    ]
                ),
            )
        )
        available = limit - max_tokens - base
        for _ in range(4):
            if available <= 0:
                break
            messages = self._messages(node, readable_block(fit_references(refs, available)))
            over = count_messages(messages) + max_tokens - limit
            if over <= 0:
                return messages
            available -= over
        raise ConfigError(
            f"The conversation does not fit aggregator_context_tokens={limit} with "
            f"max_tokens={max_tokens} for {node.agent.model}, even with the references cut."
        )

    async def _free_call(self, node: Node, view: ReferenceView, max_tokens: int) -> str | None:
        """The last call: all references known (or given up on); windows when they overflow."""
        messages = self._laid_out(node, view)
        if not self._fits(messages, max_tokens):
            if self.config.long_references == "window" and not node.parts:
                return await self._windows(node, view.references(), max_tokens)
            messages = self._trimmed(node, view.references(), max_tokens)
        call = await self._call(node, messages, max_tokens, continue_final=bool(node.parts))
        return call.finish_reason

    async def _windows(self, node: Node, refs: list[Reference], max_tokens: int) -> str | None:
        """Self-MoA-Seq: aggregate the references window by window, carrying the synthesis."""
        queue = [r for r in refs if r.same_as is None]
        carried: list[Reference] = []
        while True:
            window = list(carried)
            while queue and self._fits(
                self._messages(node, readable_block([*window, queue[0]])), max_tokens
            ):
                window.append(queue.pop(0))
            if len(window) == len(carried):
                window.append(queue.pop(0))
                messages = self._trimmed(node, window, max_tokens)
            else:
                messages = self._messages(node, readable_block(window))
            last = not queue
            call = await self._call(node, messages, max_tokens, visible=last)
            if last:
                return call.finish_reason
            carried = [Reference(call.text)]


def _check_answered(node: Node, finish: str | None) -> None:
    """An agent that ends with no text (and no tool call) failed: it says "returned no text"."""
    if not node.text.strip() and not node.tool_pieces:
        raise ProviderError(
            f"{node.id.model}: returned no text (finish reason {finish or 'none'}).",
            model=node.id.model,
        )


def _shortfall(node: Node, left: int, how: str) -> str:
    """Why `node`'s layer cannot answer: the causes first, each once with the agents that hit
    it; the quorum arithmetic only when some agents of the layer did not fail."""
    upstream = node.upstream
    why = _causes(upstream)
    if all(u.output.error for u in upstream):
        return why
    count = f"{left} of the {len(upstream)} agents of layer {node.id.layer} {how}"
    return f"{why} Only {count}; min_proposers is {node.quorum}.".strip()


def _causes(nodes: list[Node]) -> str:
    """The distinct errors of the failed `nodes`, each once, then the agents that hit it (by
    model), e.g. "HTTP 401: bad key (L1.1, L1.2 on openai/gpt-4o-mini)."."""
    by_error: dict[str, dict[str, list[str]]] = {}
    for node in nodes:
        error = (node.output.error or "").rstrip(".")
        if not error:
            continue
        model = node.id.model
        error = error.removeprefix(f"{model}: ")
        error = error[:1].upper() + error[1:]
        by_error.setdefault(error, {}).setdefault(model, []).append(node.id.key)
    return " ".join(
        f"{error} ({'; '.join(', '.join(keys) + ' on ' + model for model, keys in who.items())})."
        for error, who in by_error.items()
    )
