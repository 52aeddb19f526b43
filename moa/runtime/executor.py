"""The one executor of a mixture graph, layered and staircase alike.

Every agent is a node; all nodes run concurrently in one anyio task group. A proposer makes one
call. An aggregating node waits for a start condition on its references (the previous layer's
feeds), then works in steps:

- layered: it starts when all references are done and makes one call — the paper's MoA;
- staircase: it starts once the first chunks are in (`moa.runtime.staircase.start_wait`) and
  proceeds in bounded steps, each prompt holding the references received so far and its own
  output so far as a continued assistant turn; once the references are done it finishes freely.

Events go to `emit`; failures of single agents are reported, not raised. Run-level failures
(quorum lost, final aggregator failed, deadline) end the run with `fatal` set.

Every call goes through a `moa.runtime.budget.BudgetGuard`: its worst case is reserved before it
starts (a call that could exceed a hard budget is refused, which fails that agent), and the reported
usage settles it when it ends.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio

from moa import pricing
from moa.config import AgentConfig, MixtureConfig
from moa.errors import (
    AggregatorFailed,
    AggregatorOverBudget,
    BudgetExceeded,
    ConfigError,
    DeadlineExceeded,
    MixtureError,
    NotEnoughProposers,
)
from moa.events import (
    AgentDelta,
    AgentFailed,
    AgentFinished,
    AgentId,
    AgentStarted,
    Event,
    FinalDelta,
    Notice,
    RunFailed,
    RunFinished,
    RunStarted,
    UsageReport,
)
from moa.providers.base import ChatRequest, Delta, Message, Provider, Usage
from moa.providers.registry import Registry
from moa.result import AgentOutput, MixtureResult
from moa.runtime.budget import BudgetGuard, Reservation
from moa.runtime.feed import Board, Feed
from moa.runtime.prompts import (
    AGGREGATE_PROMPT,
    Reference,
    aggregate_messages,
    fit_references,
    readable_block,
    with_system,
)
from moa.runtime.staircase import Pacer, ReferenceView, settle_wait, start_wait
from moa.tokens import count_messages, count_tokens, encoding

log = logging.getLogger("moa.runtime.executor")


@dataclass
class Overrides:
    """Per-request settings of the final aggregator (the answer the user sees)."""

    temperature: float | None = None
    max_tokens: int | None = None
    stop: list[str] | None = None
    seed: int | None = None


@dataclass
class Node:
    """One agent of the graph and everything it produced."""

    id: AgentId
    agent: AgentConfig
    provider: Provider
    model: str
    feed: Feed
    upstream: list[Node] = field(default_factory=list)
    quorum: int = 1
    """Answers the upstream layer must deliver (its `min_proposers`)."""
    stop: list[str] | None = None
    seed: int | None = None
    parts: list[str] = field(default_factory=list)
    started_at: float | None = None

    def __post_init__(self) -> None:
        self.output = AgentOutput(agent=self.id)

    @property
    def text(self) -> str:
        return "".join(self.parts)


@dataclass
class _Call:
    text: str
    finish_reason: str | None
    tokens: int


@asynccontextmanager
async def _closing(stream: AsyncIterator[Delta]) -> AsyncIterator[AsyncIterator[Delta]]:
    """Close a provider stream in this task, even when cancelled (frees its connection)."""
    try:
        yield stream
    finally:
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            with anyio.CancelScope(shield=True):
                await aclose()


class Execution:
    """One run of a mixture: build the graph, run it, assemble the result."""

    def __init__(
        self,
        config: MixtureConfig,
        registry: Registry,
        messages: list[Message],
        emit: Callable[[Event], None],
        overrides: Overrides | None = None,
        mode: str | None = None,
        guard: BudgetGuard | None = None,
    ) -> None:
        self.config = config
        self.messages = messages
        self.emit_raw = emit
        encoding()  # load the tokenizer now, not on the first delta inside the event loop
        self.guard = guard or BudgetGuard(pricing.price_function(config.prices), config.budget)
        self.board = Board()
        self.layers = self._build(registry, overrides or Overrides())
        self.final = self.layers[-1][0]
        requested = mode or config.mode
        self.mode, self.fallback = self._choose_mode(requested)
        # A fallback is news when staircase was asked for; under `auto` it is only traced.
        self.fallback_kind = "auto" if requested == "auto" else "fallback"
        self.notices = [self.fallback] if self.fallback and requested != "auto" else []
        if self.mode == "layered":
            for node in self.nodes:
                node.feed.chunk_size = None
        self.quorum_start = (
            config.staircase.start_k if self.fallback and self.mode == "layered" else None
        )
        self.fatal: MixtureError | None = None
        self.ttft: float | None = None
        self._scope = anyio.CancelScope()
        self.t0 = time.monotonic()

    @property
    def nodes(self) -> list[Node]:
        return [node for layer in self.layers for node in layer]

    # ---- graph ---------------------------------------------------------------------------

    def _build(self, registry: Registry, ov: Overrides) -> list[list[Node]]:
        final = self.config.aggregator.model_copy(
            update={
                k: v
                for k, v in (("temperature", ov.temperature), ("max_tokens", ov.max_tokens))
                if v is not None
            }
        )
        shapes = [(layer.agents, layer.min_proposers) for layer in self.config.layers]
        shapes.append(([final], 1))
        layers: list[list[Node]] = []
        for li, (agents, _) in enumerate(shapes):
            is_final = li == len(shapes) - 1
            nodes: list[Node] = []
            for agent in agents:
                provider, model = registry.resolve(agent.model)
                for _ in range(agent.n):
                    aid = AgentId(li, len(nodes), agent.model, agent.name or "", is_final)
                    nodes.append(
                        Node(
                            aid,
                            agent,
                            provider,
                            model,
                            Feed(self.board, self.config.staircase.chunk_size),
                            upstream=layers[-1] if layers else [],
                            quorum=shapes[li - 1][1] if li else 1,
                            stop=ov.stop if is_final else None,
                            seed=ov.seed if is_final else None,
                        )
                    )
            layers.append(nodes)
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

    # ---- events --------------------------------------------------------------------------

    def _now(self) -> float:
        return time.monotonic() - self.t0

    def emit(self, event: Event) -> None:
        with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
            self.emit_raw(event)

    # ---- the run -------------------------------------------------------------------------

    async def drive(self) -> MixtureResult:
        """Run the graph; never raises a run failure (sets `fatal` and emits `RunFailed`)."""
        self.t0 = time.monotonic()
        self.emit(RunStarted(self._now(), self.config.name, self.mode, [n.id for n in self.nodes]))
        if self.fallback:
            self.emit(Notice(self._now(), self.fallback, kind=self.fallback_kind))
        deadline = self.config.deadline_s
        with anyio.move_on_after(deadline) as timer:
            async with anyio.create_task_group() as tg:
                self._scope = tg.cancel_scope
                for node in self.nodes:
                    tg.start_soon(self._run_node, node)
        if timer.cancelled_caught and self.fatal is None:
            self.fatal = DeadlineExceeded(
                f"The mixture did not finish within its deadline of {deadline:g} s."
            )
        self._close_unfinished()
        self.guard.release()
        result = self.result()
        if self.fatal is not None:
            self.fatal.partial = result
            self.emit(RunFailed(self._now(), str(self.fatal), result))
        else:
            self.emit(RunFinished(self._now(), result))
        return result

    def _abort(self, error: MixtureError) -> None:
        if self.fatal is None:
            self.fatal = error
        self._scope.cancel()

    async def _run_node(self, node: Node) -> None:
        try:
            if node.upstream:
                await self._aggregate(node)
            else:
                await self._propose(node)
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
        self._started(node)
        call = await self._call(
            node, with_system(self.messages, node.agent.system), node.agent.max_tokens
        )
        self._finished(node, call.finish_reason)

    async def _aggregate(self, node: Node) -> None:
        sc = self.config.staircase
        feeds = [u.feed for u in node.upstream]
        continuing = self.mode == "staircase"
        view = ReferenceView(feeds, sc.layout if continuing else "readable")
        pacer = Pacer(feeds, sc.pacing, sc.stall_s)
        for u in node.upstream:
            u.feed.peers = [n.feed for n in self.nodes if n.provider is u.provider and n is not u]
        await self._wait_start(node, continuing)
        self._started(node)
        budget, used, step = node.agent.max_tokens, 0, 0
        while True:
            free = self._may_finish(node)
            settled = free or not (continuing or self.quorum_start)
            stragglers = frozenset(
                i for i, f in enumerate(feeds) if settled and sc.keep_truncated and not f.resolved
            )
            view.update(complete_only=not continuing, given_up=stragglers)
            if free or not continuing:
                self._check_quorum(node, view)
                finish = await self._free_call(node, view, budget - used)
                break
            limit = pacer.limit(min(sc.step_size(step), budget - used), count_tokens(node.text))
            if limit > 0:
                call = await self._call(
                    node, self._prompt(node, view, limit), limit, continue_final=bool(node.parts)
                )
                used += call.tokens
                if call.finish_reason != "length" or used >= budget:
                    finish = call.finish_reason
                    break
                step += 1
            await self._wait_news(node, view, pacer, min(sc.step_size(step), budget - used))
        self._finished(node, finish)

    # ---- start, steps and quorum -----------------------------------------------------------

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
            raise NotEnoughProposers(
                f"{failed} of the {len(node.upstream)} agents of layer {node.id.layer} failed, "
                f"so fewer than min_proposers={node.quorum} can answer. {_why(node.upstream)}"
            )

    def _check_quorum(self, node: Node, view: ReferenceView) -> None:
        done = sum(u.feed.state == "done" for u in node.upstream)
        if done < node.quorum or not view.order:
            raise NotEnoughProposers(
                f"Only {done} of the {len(node.upstream)} agents of layer {node.id.layer} "
                f"answered; min_proposers is {node.quorum}. {_why(node.upstream)}"
            )

    # ---- prompts ----------------------------------------------------------------------------

    def _messages(self, node: Node, block: str) -> list[Message]:
        return aggregate_messages(self.messages, block, system=node.agent.system, own=node.text)

    def _fits(self, messages: list[Message], max_tokens: int) -> bool:
        limit = self.config.aggregator_context_tokens
        return limit is None or count_messages(messages) + max_tokens <= limit

    def _prompt(self, node: Node, view: ReferenceView, max_tokens: int) -> list[Message]:
        """The step's prompt in the configured layout, trimmed if it would overflow."""
        messages = self._messages(node, view.block(AGGREGATE_PROMPT))
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
        messages = self._messages(node, view.block(AGGREGATE_PROMPT))
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

    # ---- calls ------------------------------------------------------------------------------

    async def _call(
        self,
        node: Node,
        messages: list[Message],
        max_tokens: int,
        *,
        continue_final: bool = False,
        visible: bool = True,
    ) -> _Call:
        """One provider call, streamed into the node (unless `visible` is False).

        Raises `BudgetExceeded` before sending anything when the call could exceed a budget.
        """
        reservation = self.guard.reserve(node.agent.model, messages, max_tokens)
        request = ChatRequest(
            model=node.model,
            messages=messages,
            temperature=node.agent.temperature,
            max_tokens=max_tokens,
            stop=node.stop,
            seed=node.seed,
            continue_final=continue_final,
        )
        parts: list[str] = []
        finish: str | None = None
        usage: Usage | None = None
        node.output.calls += 1
        try:
            async with _closing(node.provider.stream(request)) as deltas:
                async for delta in deltas:
                    if delta.text:
                        parts.append(delta.text)
                        if visible:
                            self._delta(node, delta.text)
                    finish = delta.finish_reason or finish
                    if delta.usage:
                        usage = delta.usage if usage is None else usage + delta.usage
        except BaseException:
            # A call stopped after it generated text was billed for that text.
            estimate = Usage(count_messages(messages), count_tokens("".join(parts)))
            self._settle(node, reservation, estimate if parts else None)
            raise
        text = "".join(parts)
        if usage is None:
            usage = Usage(count_messages(messages), count_tokens(text))
        self._settle(node, reservation, usage)
        return _Call(text, finish, usage.completion_tokens or count_tokens(text))

    def _settle(self, node: Node, reservation: Reservation, usage: Usage | None) -> None:
        """Replace the call's reservation by its usage; add usage and cost to the agent."""
        cost = self.guard.settle(reservation, usage)
        if usage is None:
            return
        out = node.output
        out.usage = out.usage + usage
        if cost is not None:
            out.cost_usd = (out.cost_usd or 0.0) + cost
        self.emit(UsageReport(self._now(), node.id, usage, cost))

    def _delta(self, node: Node, text: str) -> None:
        if not node.parts:
            node.output.ttft_s = time.monotonic() - (node.started_at or self.t0)
        node.parts.append(text)
        node.feed.push(text)
        self.emit(AgentDelta(self._now(), node.id, text))
        if node.id.final:
            if self.ttft is None:
                self.ttft = self._now()
            self.emit(FinalDelta(self._now(), text))

    # ---- agent bookkeeping ---------------------------------------------------------------------

    def _started(self, node: Node) -> None:
        node.started_at = time.monotonic()
        self.emit(AgentStarted(self._now(), node.id))

    def _latency(self, node: Node) -> float:
        return time.monotonic() - (node.started_at or self.t0)

    def _finished(self, node: Node, finish: str | None) -> None:
        out = node.output
        out.ok, out.text, out.finish_reason = True, node.text, finish
        out.latency_s = self._latency(node)
        node.feed.finish()
        self.emit(AgentFinished(self._now(), node.id, out.text, finish, out.ttft_s, out.latency_s))

    def _failed(self, node: Node, error: str) -> None:
        out = node.output
        out.ok, out.text, out.error = False, node.text, error
        out.truncated = bool(node.parts)
        out.latency_s = self._latency(node)
        node.feed.fail(keep=self.config.staircase.keep_truncated)
        self.emit(AgentFailed(self._now(), node.id, error, out.text))

    def _close_unfinished(self) -> None:
        """Mark agents stopped by the end of the run: complete answer, failure or deadline."""
        completed = self.fatal is None
        for node in self.nodes:
            if node.feed.resolved:
                continue
            if completed and node.parts:
                out = node.output
                out.ok, out.text, out.truncated = True, node.text, True
                out.finish_reason, out.latency_s = "cancelled", self._latency(node)
                node.feed.state = "done"
                self.emit(
                    AgentFinished(
                        self._now(), node.id, out.text, "cancelled", out.ttft_s, out.latency_s
                    )
                )
            else:
                why = "the final answer was complete first" if completed else "the run ended"
                self._failed(node, f"cancelled: {why}")

    def result(self) -> MixtureResult:
        for node in self.nodes:
            node.output.text = node.text
        return MixtureResult(
            text=self.final.text,
            outputs=[n.output for n in self.nodes],
            mixture=self.config.name,
            mode=self.mode,
            ttft_s=self.ttft,
            latency_s=self._now(),
            notices=list(self.notices),
            budget=self.guard.report(),
        )


def _why(nodes: list[Node]) -> str:
    """The distinct errors of the failed `nodes`, each with the agents that hit it."""
    by_error: dict[str, list[str]] = {}
    for node in nodes:
        if node.output.error:
            by_error.setdefault(node.output.error.rstrip("."), []).append(node.id.key)
    return " ".join(f"{', '.join(keys)}: {error}." for error, keys in by_error.items())
