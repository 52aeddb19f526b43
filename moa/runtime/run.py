"""The shared core of every strategy: one run's lifecycle, its metered calls and its routing.

A strategy (`moa.strategies.graph.Execution`, the layered / staircase graph, or
`moa.strategies.evolve.Evolution`) subclasses `Run` and implements `body()`. `Run` gives it:

- the lifecycle (`drive`): `RunStarted`, a deadline, one task group whose cancellation stops
  every call, run-level failures (`fatal`, with the result so far as `.partial`), the agents
  still open closed as finished or failed, then `RunFinished` or `RunFailed`;
- the metered call (`_call`): the worst case reserved in the `BudgetGuard` before anything is
  sent (`BudgetExceeded` otherwise), then a permit from the state (`moa.state`: the provider's
  rpm / tpm window and concurrency caps, in process or shared), the reply streamed into its
  `Node`, usage summed over the stream, settled into the budget and priced (also for a call
  that fails mid-stream) and the permit given back;
- routing (`route`): the router's choice for a stage, downgraded or skipped when the strong
  tier does not fit the budget, recorded as a `RouteDecision` event.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import anyio

from moa.config import AgentConfig, MixtureConfig
from moa.errors import (
    DeadlineExceeded,
    MixtureError,
    QuotaExceeded,
    StateUnavailable,
    StreamTimeout,
    StructuredOutputError,
    UnsupportedRequest,
)
from moa.events import (
    AgentCall,
    AgentDelta,
    AgentFailed,
    AgentFinished,
    AgentId,
    AgentRetrying,
    AgentStarted,
    AgentWaiting,
    Event,
    FinalDelta,
    FinalToolCallDelta,
    Notice,
    RouteDecision,
    RunFailed,
    RunFinished,
    RunStarted,
    UsageReport,
)
from moa.providers.base import (
    ChatRequest,
    Delta,
    Message,
    Provider,
    TokenLogprob,
    Tool,
    ToolCallDelta,
    Usage,
    Waiting,
    assemble_tool_calls,
)
from moa.providers.registry import Registry, split_ref
from moa.result import AgentOutput, Choice, MixtureResult
from moa.routing.router import Decision, Router, Stage
from moa.runtime.acting import Acting, advisor_messages, check_structured
from moa.runtime.budget import BudgetGuard, Reservation
from moa.runtime.feed import Board, Feed
from moa.runtime.prompts import append_to_system
from moa.state import Permit, State
from moa.state.local import LOCAL
from moa.tokens import count_messages, count_tokens, preload


@dataclass
class Overrides:
    """Per-request settings of the final aggregator (the answer the user sees, the acting
    stage); `seed` also seeds every other agent (each its own seed derived from it)."""

    temperature: float | None = None
    max_tokens: int | None = None
    stop: list[str] | None = None
    seed: int | None = None
    tools: list[Tool] | None = None
    """Function tools; only the acting stage gets them, advisors see one line naming them."""
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    """Structured output of the final answer (json_object / json_schema)."""
    n: int = 1
    """Syntheses of one set of references (the final aggregator samples n times)."""
    logprobs: bool = False
    """The final aggregator's token logprobs, where its backend gives them."""
    top_logprobs: int | None = None


def stage_seed(seed: int | None, offset: int) -> int | None:
    """A distinct, reproducible seed per agent, derived from the request's seed."""
    return None if seed is None else seed * 10_007 + offset


@dataclass
class Sample:
    """One further synthesis of the final aggregator (choice `index` > 0 when n > 1)."""

    parts: list[str] = field(default_factory=list)
    tool_pieces: list[ToolCallDelta] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass(eq=False)
class Node:
    """One agent and everything it produced (compared by identity)."""

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
    kind: str = "propose"
    """Its stage kind: propose, aggregate, refine or recombine."""
    want_logprobs: bool = False
    """Ask for logprobs (a routed stage reads this agent's confidence)."""
    layered: bool = False
    """Wait for complete references even under staircase (its tier cannot continue a turn)."""
    parts: list[str] = field(default_factory=list)
    tool_pieces: list[ToolCallDelta] = field(default_factory=list)
    """The tool calls it made, as streamed (only the acting stage makes any)."""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    samples: dict[int, Sample] = field(default_factory=dict)
    """The final aggregator's further syntheses (n > 1), by choice index."""
    retry_reason: str = ""
    """Why its last attempt failed, when a call is being retried (kept if the run ends)."""
    started_at: float | None = None

    def __post_init__(self) -> None:
        self.output = AgentOutput(agent=self.id)

    @property
    def text(self) -> str:
        return "".join(self.parts)

    @property
    def routed(self) -> bool:
        return self.id.strong is not None


@dataclass
class Call:
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


class Run:
    """One run of a mixture under some strategy; subclasses implement `body()`."""

    mode = "layered"
    trace_calls = False
    """Emit an `AgentCall` as each provider call starts (set while OpenTelemetry traces the
    run); `trace_prompts` adds the prompt it sends (the GenAI content switch)."""
    trace_prompts = False

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
        self.config = config
        self.registry = registry
        self.messages = messages
        self.emit_raw = emit
        self.guard = guard
        self.router = router
        self.state: State = state or LOCAL
        """Where the providers' rate windows and concurrency caps are held (`moa.state`)."""
        self._permits: dict[Reservation, Permit] = {}
        self.coalesce_s = 0.0
        """Gather each agent's tokens over this many seconds into one `AgentDelta` (0: one per
        token; inf: one per stretch between the agent's other events); see `emit`."""
        self._unsent: dict[Node, tuple[float, list[str]]] = {}
        """Per agent: the time of its first gathered token and the tokens not yet emitted."""
        self.overrides = ov = overrides or Overrides()
        self.acting = Acting(ov.tools, ov.tool_choice, ov.parallel_tool_calls, ov.response_format)
        """What the final aggregator acts with (tools, format); the other stages advise."""
        self.advice = advisor_messages(messages, self.acting, config.tool_result_chars)
        """The conversation as advisors see it (tool turns as short text, the acting note)."""
        self.board = Board()
        self.nodes: list[Node] = []
        self.notices: list[str] = []
        self.decisions: list[RouteDecision] = []
        self.answer: str | None = None
        """The answer when the strategy sets it directly; else the final agent's text."""
        self.answer_finish: str | None = None
        """The finish reason of `answer` when the strategy sets it directly."""
        self.saved_calls = 0
        """Calls the strategy chose not to make (a debate stopped at consensus)."""
        self.fatal: MixtureError | None = None
        self.ttft: float | None = None
        self._scope = anyio.CancelScope()
        self.t0 = time.monotonic()

    # ---- the lifecycle ---------------------------------------------------------------------

    async def body(self, tg: anyio.abc.TaskGroup) -> None:
        """Start the strategy's work in `tg` (its scope is cancelled when the answer is done)."""
        raise NotImplementedError

    def started_notices(self) -> list[Notice]:
        return []

    async def drive(self) -> MixtureResult:
        """Run the strategy; never raises a run failure (sets `fatal` and emits `RunFailed`)."""
        self.t0 = time.monotonic()
        self.emit(RunStarted(self._now(), self.config.name, self.mode, [n.id for n in self.nodes]))
        for notice in self.started_notices():
            self.emit(notice)
        deadline = self.config.deadline_s
        with anyio.move_on_after(deadline) as timer:
            async with anyio.create_task_group() as tg:
                self._scope = tg.cancel_scope
                await self.body(tg)
        if timer.cancelled_caught and self.fatal is None:
            self.fatal = DeadlineExceeded(
                f"The mixture did not finish within its deadline of {deadline:g} s."
            )
        self._close_unfinished()
        await self.guard.arelease()
        result = self.result()
        if self.fatal is None:
            self._check_structured(result)
        if self.fatal is not None:
            self.fatal.partial = result
            self.emit(RunFailed(self._now(), str(self.fatal), result))
        else:
            self.emit(RunFinished(self._now(), result))
        return result

    def _check_structured(self, result: MixtureResult) -> None:
        """Fail the run when an answer in text does not match the requested JSON format."""
        for choice in result.choices:
            if choice.tool_calls:
                continue
            try:
                check_structured(choice.text, self.acting)
            except StructuredOutputError as err:
                if choice.finish_reason == "length":
                    err.args = (f"{err} The answer was cut at its max_tokens limit.",)
                self.fatal = err
                return

    def _abort(self, error: MixtureError) -> None:
        if self.fatal is None:
            self.fatal = error
        self._scope.cancel()

    def _now(self) -> float:
        return time.monotonic() - self.t0

    def emit(self, event: Event) -> None:
        """Send `event`; gathered agent deltas go first, so every event but a `FinalDelta`
        keeps its place among the deltas (only consecutive deltas are merged)."""
        if self._unsent and not isinstance(event, FinalDelta | FinalToolCallDelta):
            for node in list(self._unsent):
                self._flush(node)
        self._send(event)

    def _flush(self, node: Node) -> None:
        t, parts = self._unsent.pop(node)
        self._send(AgentDelta(t, node.id, "".join(parts)))

    def _send(self, event: Event) -> None:
        # Not contextlib.suppress: a context manager per token costs more than the send.
        try:  # noqa: SIM105
            self.emit_raw(event)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            pass

    def notice(self, message: str, kind: str = "info") -> None:
        self.notices.append(message)
        self.emit(Notice(self._now(), message, kind=kind))

    # ---- agents ----------------------------------------------------------------------------

    def node(
        self,
        aid: AgentId,
        agent: AgentConfig,
        *,
        chunk_size: Callable[[int], int] | None = None,
        **kw: Any,
    ) -> Node:
        """A new agent of this run on `aid.model` (resolved in the registry); `kw` sets fields
        of the `Node`."""
        provider, model = self.registry.resolve(aid.model)
        node = Node(aid, agent, provider, model, Feed(self.board, chunk_size), **kw)
        node.stop = node.stop or agent.stop
        self.nodes.append(node)
        return node

    def conversation(self, node: Node) -> list[Message]:
        """The conversation `node` is sent: verbatim for the acting stage (with the format as
        an instruction when its backend has no native structured output), else the advice."""
        if not node.id.final:
            return self.advice
        if self.acting.schema is not None and not node.provider.capabilities.response_format:
            return append_to_system(self.messages, self.acting.format_instruction())
        return self.messages

    @property
    def request_specific(self) -> bool:
        """The request asks the final aggregator for its own output (tools, a format, n > 1
        syntheses or logprobs): a routed final stage is then never skipped."""
        ov = self.overrides
        return self.acting.active or ov.n > 1 or ov.logprobs

    def check_final(self, agent: AgentConfig) -> None:
        """Before any call: the final aggregator's models (each tier) must honour the tools and
        give the logprobs the request asks for."""
        tools = bool(self.acting.tools) and self.acting.tool_choice != "none"
        for model in filter(None, (agent.model, agent.strong)):
            caps = self.registry.resolve(model)[0].capabilities
            if tools and not caps.tools:
                raise UnsupportedRequest(
                    f"The request has tools, but the final aggregator's model {model} cannot "
                    "call tools (its backend does not support them)."
                )
            if self.overrides.logprobs and not caps.logprobs:
                raise UnsupportedRequest(
                    f"The request asks for logprobs, but the final aggregator's model {model} "
                    "does not give them (its backend has no logprobs)."
                )

    def set_tier(self, node: Node, tier: str) -> None:
        """Give a routed stage its decided tier's model; its id then names that model."""
        model = node.agent.strong if tier == "strong" else node.agent.model
        assert model is not None
        node.provider, node.model = self.registry.resolve(model)
        node.id = replace(node.id, model=model, strong=None)
        node.output.agent = node.id

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

    def _delta(
        self, node: Node, text: str, logprobs: list[TokenLogprob] | None = None
    ) -> None:
        if not node.parts:
            node.output.ttft_s = time.monotonic() - (node.started_at or self.t0)
            preload()  # the tokenizer loads on a thread once a reply streams, off the requests
        node.parts.append(text)
        node.feed.push(text)
        if not self.coalesce_s:
            self._send(AgentDelta(self._now(), node.id, text))
        elif (held := self._unsent.get(node)) is None:
            self._unsent[node] = (self._now(), [text])
        else:
            held[1].append(text)
            if self.coalesce_s != math.inf and self._now() - held[0] >= self.coalesce_s:
                self._flush(node)
        if node.id.final:
            self._final_delta(text, 0, logprobs if self.overrides.logprobs else None)

    def _final_delta(
        self, text: str, index: int = 0, logprobs: list[TokenLogprob] | None = None
    ) -> None:
        if self.ttft is None:
            self.ttft = self._now()
        self.emit(FinalDelta(self._now(), text, index, logprobs))

    def _tool_calls(self, node: Node, pieces: list[ToolCallDelta], index: int = 0) -> None:
        if index:
            node.samples[index].tool_pieces.extend(pieces)
        else:
            node.tool_pieces.extend(pieces)
        if node.id.final:
            if self.ttft is None:
                self.ttft = self._now()
            for piece in pieces:
                self.emit(FinalToolCallDelta(self._now(), piece, index))

    def _sample(self, node: Node, delta: Delta) -> None:
        """A delta of a further synthesis (choice > 0) of the final aggregator."""
        sample = node.samples.setdefault(delta.index, Sample())
        sample.finish_reason = delta.finish_reason or sample.finish_reason
        if delta.logprobs:
            sample.logprobs.extend(delta.logprobs)
        if delta.text:
            sample.parts.append(delta.text)
            self._final_delta(
                delta.text, delta.index, delta.logprobs if self.overrides.logprobs else None
            )
        if delta.tool_calls:
            self._tool_calls(node, delta.tool_calls, delta.index)

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
                after = f", while retrying after: {node.retry_reason}" if node.retry_reason else ""
                self._failed(node, f"cancelled: {why}{after}")

    def result(self) -> MixtureResult:
        for node in self.nodes:
            node.output.text = node.text
        final = next((n for n in self.nodes if n.id.final), None)
        text = self.answer if self.answer is not None else final.text if final else ""
        first = Choice(
            0,
            text,
            final.output.finish_reason if final else self.answer_finish,
            assemble_tool_calls(final.tool_pieces) if final else [],
            final.logprobs if final and self.overrides.logprobs else None,
        )
        more = [
            Choice(
                i,
                "".join(s.parts),
                s.finish_reason,
                assemble_tool_calls(s.tool_pieces),
                s.logprobs if self.overrides.logprobs else None,
            )
            for i, s in sorted(final.samples.items() if final else [])
        ]
        return MixtureResult(
            text=text,
            outputs=[n.output for n in self.nodes],
            mixture=self.config.name,
            mode=self.mode,
            ttft_s=self.ttft,
            latency_s=self._now(),
            notices=list(self.notices),
            budget=self.guard.report(),
            decisions=list(self.decisions),
            tool_calls=first.tool_calls,
            finish_reason=first.finish_reason,
            choices=[first, *more],
            saved_calls=self.saved_calls,
        )

    # ---- the metered call ------------------------------------------------------------------

    async def _call(
        self,
        node: Node,
        messages: list[Message],
        max_tokens: int,
        *,
        continue_final: bool = False,
        visible: bool = True,
    ) -> Call:
        """One provider call, streamed into the node (unless `visible` is False).

        Raises `BudgetExceeded` before sending anything when the call could exceed a budget.
        """
        acts = node.id.final and visible
        ov = self.overrides
        samples = ov.n if acts else 1
        reservation = await self._admit(node, messages, max_tokens, samples)
        router = self.config.router
        asked = acts and ov.logprobs  # check_final: the backend gives them
        logprobs = asked or (
            node.want_logprobs
            and node.provider.capabilities.logprobs
            and (router is None or router.logprobs)
        )
        top = ov.top_logprobs if asked else router.top_logprobs if router else 5

        def retried(attempt: int, reason: str) -> None:  # usage and cost stay per success
            node.output.calls += 1  # `calls` counts attempts
            node.retry_reason = reason
            if visible:
                self.emit(AgentRetrying(self._now(), node.id, attempt, reason))

        def waiting(why: Waiting) -> None:
            if visible:
                self.emit(AgentWaiting(self._now(), node.id, why))

        act = self.acting if acts else Acting()
        caps = node.provider.capabilities
        request = ChatRequest(
            tools=act.tools if caps.tools else None,  # none is left only with tool_choice none
            tool_choice=act.tool_choice if act.tools else None,
            parallel_tool_calls=act.parallel_tool_calls if act.tools else None,
            response_format=act.response_format if caps.response_format else None,
            model=node.model,
            messages=messages,
            temperature=node.agent.temperature,
            max_tokens=max_tokens,
            stop=node.stop,
            seed=node.seed,
            continue_final=continue_final,
            n=samples,
            priority=node.id.layer,
            logprobs=logprobs,
            top_logprobs=top if logprobs else None,
            on_retry=retried,
            on_wait=waiting,
        )
        parts: list[str] = []
        finish: str | None = None
        usage: Usage | None = None
        if self.trace_calls:
            prompt = list(messages) if self.trace_prompts else None
            self.emit(AgentCall(self._now(), node.id, max_tokens, prompt))
        node.output.calls += 1
        node.feed.calls_open += 1
        # A reference whose stream goes silent for stall_s after its first token has stalled
        # (a queued engine is busy, not silent); the deadline moves at most every stall_s / 2.
        stall = None if node.id.final or caps.queued else self.config.staircase.stall_s
        # anyio's clock read as time.monotonic() + offset: anyio.current_time() looks the
        # backend up on every call, and this runs per delta.
        offset = anyio.current_time() - time.monotonic()
        try:
            with anyio.CancelScope() as watch:
                async with _closing(node.provider.samples(request)) as deltas:
                    async for delta in deltas:
                        if stall is not None:
                            now = time.monotonic() + offset
                            if watch.deadline == math.inf or watch.deadline - now < stall:
                                watch.deadline = now + 1.5 * stall
                        self._take(node, delta, parts, visible)
                        if delta.usage:
                            usage = delta.usage if usage is None else usage + delta.usage
                        if not delta.index:
                            finish = delta.finish_reason or finish
            if watch.cancelled_caught:
                raise StreamTimeout(
                    f"{node.id.model}: stalled, no token for {stall:g} s.",
                    received="".join(parts),
                    model=node.id.model,
                )
        except BaseException:
            # A call stopped after it generated text was billed for that text.
            estimate = Usage(count_messages(messages), count_tokens("".join(parts)))
            await self._settle(node, reservation, estimate if parts else None)
            raise
        finally:
            node.feed.calls_open -= 1
        text = "".join(parts)
        if usage is None:
            usage = Usage(count_messages(messages), count_tokens(text))
        await self._settle(node, reservation, usage)
        return Call(text, finish, usage.completion_tokens or count_tokens(text))

    def _take(self, node: Node, delta: Delta, parts: list[str], visible: bool) -> None:
        """One delta of a call into its node (a further sample's into `node.samples`)."""
        if delta.index:
            self._sample(node, delta)
            return
        if delta.logprobs and visible:
            node.logprobs.extend(delta.logprobs)
        if delta.text:
            parts.append(delta.text)
            if visible:
                self._delta(node, delta.text, delta.logprobs)
        if delta.tool_calls and visible:
            self._tool_calls(node, delta.tool_calls)

    async def _admit(
        self, node: Node, messages: list[Message], max_tokens: int, samples: int
    ) -> Reservation:
        """Reserve the call's worst case in the budgets (`BudgetExceeded` otherwise), then wait
        for its provider's rate window and concurrency caps. A client's spent quota or an
        unreachable shared budget ends the whole run."""
        model = node.id.model
        try:
            reservation = await self.guard.areserve(model, messages, max_tokens, samples)
        except (QuotaExceeded, StateUnavailable) as err:
            self._abort(err)
            raise
        limits = self.registry.spec(split_ref(model)[0]).limits  # no file checks per call
        tokens = reservation.tokens
        if not tokens and limits.tpm is not None:
            tokens = (count_messages(messages) + max_tokens) * samples
        requests = 1 if node.provider.capabilities.multi_sample else samples
        try:
            self._permits[reservation] = await self.state.acquire(model, limits, tokens, requests)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.guard.asettle(reservation, None)
            raise
        return reservation

    async def _settle(self, node: Node, reservation: Reservation, usage: Usage | None) -> None:
        """Replace the call's reservation by its usage; add usage and cost to the agent."""
        cost = await self.guard.asettle(reservation, usage)
        permit = self._permits.pop(reservation, None)
        if permit is not None:
            await permit.close(usage.total_tokens if usage is not None else None)
        if usage is None:
            return
        out = node.output
        out.usage = out.usage + usage
        if cost is not None:
            out.cost_usd = (out.cost_usd or 0.0) + cost
        self.emit(UsageReport(self._now(), node.id, usage, cost))

    # ---- routing ---------------------------------------------------------------------------

    def route(
        self,
        stage: Stage,
        tiers: dict[str, str],
        messages: list[Message],
        max_tokens: int,
        *,
        completion: int | None = None,
        agent: AgentId | None = None,
    ) -> Decision:
        """Ask the router, fit its choice to the budget (downgrade or skip), record the event.

        `tiers` maps cheap / strong to model references; `completion` is the expected output
        length for the cost estimate (default `max_tokens`).
        """
        assert self.router is not None
        prompt = count_messages(messages)
        stage.costs = {
            t: self.guard.price(model, Usage(prompt, completion or max_tokens))
            for t, model in tiers.items()
        }
        stage.remaining = self.guard.remaining_fraction()
        decision = self.router.decide(stage)
        if decision.choice != "skip":
            order = ("strong", "cheap") if decision.choice == "strong" else ("cheap",)
            for tier in order:
                why = self.guard.why_not(tiers[tier], messages, max_tokens)
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
        return self.record(decision, stage.name, agent)

    def record(self, decision: Decision, stage: str, agent: AgentId | None = None) -> Decision:
        """Keep and emit a decision (`route` does it; a strategy deciding alone calls it)."""
        event = decision.event(stage, self._now(), agent)
        self.decisions.append(event)
        self.emit(event)
        return decision
