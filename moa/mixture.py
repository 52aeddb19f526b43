"""`Mixture`: the public API — async first, with sync wrappers for scripts and notebooks.

    m = Mixture("moa-lite")
    result = await m.run("Why is the sky blue?")
    async for event in m.stream(messages): ...
    result = m.run_sync("Why is the sky blue?")     # also inside a running event loop

`stream()` yields `RunStarted` first and `RunFinished` last; on failure it yields `RunFailed`
and raises the `MixtureError`, whose `.partial` holds the result assembled so far. Closing
the generator early cancels the run (use `contextlib.aclosing` when breaking out of it).

Strategies: the graph (`moa.strategies.graph`) or Squeeze Evolve (`moa.strategies.evolve`), both
on the one run core (`moa.runtime.run`); agents with a `strong` tier are routed by the
config's `[router]` (`moa.routing.router`), and every decision is a `RouteDecision` event.

Budgets (`moa.runtime.budget`): `budget=` limits every request (it replaces the config's `budget`;
`run(..., budget=...)` sets one request's), `session=` is a ledger shared by every request of
every mixture it is passed to; a call that could exceed either is refused before it starts.

State (`moa.state`): `state=` says where the session budget, the providers' rate windows and
their concurrency caps live — this process by default, or Redis (`RedisState`), where every
process using it shares one session budget (named after the mixture) and one set of limits.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import queue
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import aclosing
from pathlib import Path
from typing import Any, TypeVar

import anyio
from pydantic import ValidationError

from moa import pricing
from moa.config import MAX_SAMPLES, MixtureConfig, Mode, load
from moa.errors import ConfigError, UnsupportedRequest
from moa.events import Event, RunFinished
from moa.providers.base import Message, Tool
from moa.providers.registry import Registry
from moa.result import MixtureResult
from moa.routing.router import Router, ThresholdRouter, router_from_config
from moa.runtime.acting import acting_from
from moa.runtime.budget import Budget, BudgetGuard, Ledger, SessionBudget
from moa.runtime.prompts import as_messages
from moa.runtime.run import Overrides
from moa.state import State
from moa.strategies import strategy as strategy_of

T = TypeVar("T")
_OTEL_MODULES = ("moa.telemetry", "opentelemetry.trace", "opentelemetry.metrics")


def _subscriber(config: MixtureConfig, prompt: list[Message], router: Router | None) -> Any:
    """`moa.telemetry.subscriber`, without importing `moa.telemetry` while nothing could have
    configured OpenTelemetry: neither its API nor `telemetry.using()` was imported yet."""
    if not any(name in sys.modules for name in _OTEL_MODULES):
        return None
    from moa import telemetry

    return telemetry.subscriber(config, prompt, router)

EVOLVE_STRONG_SHARE = 0.25
"""Squeeze Evolve's default: groups in the least confident quarter of a loop go strong."""


class Mixture:
    """A configured mixture of agents, ready to answer."""

    def __init__(
        self,
        config: str | Path | dict[str, Any] | MixtureConfig = "local",
        *,
        registry: Registry | None = None,
        mode: Mode | None = None,
        budget: Budget | dict[str, Any] | None = None,
        session: Ledger | None = None,
        router: Router | None = None,
        state: State | None = None,
    ) -> None:
        """`router` replaces the config's `[router]` policy (e.g. a custom `Router` subclass);
        `state` holds the session budget and the providers' limits (default: this process)."""
        base = load(config, registry=registry)
        update: dict[str, Any] = {"mode": mode} if mode else {}
        if budget is not None:
            update["budget"] = as_budget(budget)
        self.config = base.model_copy(update=update) if update else base
        self.registry = self.config.registry(registry)
        self.config.check_models(self.registry)
        self.state = state
        limit = self.config.session_budget
        if session is None and not limit.unlimited:
            session = (
                SessionBudget(usd=limit.usd, tokens=limit.tokens)
                if state is None
                else state.ledger(f"session:{self.config.name}", limit)
            )
        self.session: Ledger | None = session
        """The ledger every request of this mixture settles into (None: no session budget)."""
        self._price = pricing.price_function(self.config.prices)
        self._check_prices(self.config.budget)
        self.router = router or _router(self.config)
        """Decides the routed stages (None when no stage is routed)."""

    def __repr__(self) -> str:
        c = self.config
        return f"Mixture({c.name!r}, mode={c.mode!r}, calls={c.call_count})"

    async def stream(
        self,
        messages: str | list[Message],
        *,
        temperature: float | None = None,
        max_tokens: int | None = None,
        stop: list[str] | None = None,
        seed: int | None = None,
        budget: Budget | dict[str, Any] | None = None,
        tools: list[Tool] | None = None,
        tool_choice: str | dict[str, Any] | None = None,
        parallel_tool_calls: bool | None = None,
        response_format: dict[str, Any] | None = None,
        n: int = 1,
        logprobs: bool = False,
        top_logprobs: int | None = None,
        ledgers: Sequence[Ledger] = (),
        coalesce: float = 0.0,
    ) -> AsyncIterator[Event]:
        """Run the mixture and yield its events; the overrides apply to the final aggregator.

        `budget` replaces the mixture's per-request budget for this request; `ledgers` are
        charged every call too (e.g. a client key's, `State.ledger`). `tools`,
        `tool_choice`, `parallel_tool_calls` and `response_format` go to the acting stage (the
        final aggregator) only; `n`, `logprobs` and `top_logprobs` are its sampling options.

        `coalesce`: for a consumer that does not need every agent token, the seconds over
        which an agent's consecutive tokens are gathered into one `AgentDelta` (with the first
        token's time); `math.inf` gathers everything between the agent's other events. The
        default 0 gives one `AgentDelta` per token. `FinalDelta`s (the answer) are never
        gathered, and every other event keeps its place.
        """
        acting = acting_from(tools, tool_choice, parallel_tool_calls, response_format)
        if not 1 <= n <= MAX_SAMPLES:
            raise ConfigError(f"n must be from 1 to {MAX_SAMPLES}, not {n}.")
        if top_logprobs is not None and not (logprobs and 0 <= top_logprobs <= 20):
            raise ConfigError("top_logprobs must be from 0 to 20, and needs logprobs=True.")
        if self.config.strategy != "graph" and (acting.active or n > 1 or logprobs):
            raise UnsupportedRequest(
                f"The {self.config.strategy} strategy cannot act with tools or a response "
                "format, sample n > 1 answers or give logprobs; use the graph strategy."
            )
        strategy = strategy_of(self.config.strategy)
        limit = self.config.budget if budget is None else as_budget(budget)
        self._check_prices(limit, ledgers)
        send, receive = anyio.create_memory_object_stream[Event](math.inf)
        prompt = as_messages(messages)
        execution = strategy(
            self.config,
            self.registry,
            prompt,
            send.send_nowait,
            BudgetGuard(self._price, limit, self.session, ledgers),
            self.router,
            Overrides(
                temperature,
                max_tokens,
                stop,
                seed,
                acting.tools,
                acting.tool_choice,
                acting.parallel_tool_calls,
                acting.response_format,
                n,
                logprobs,
                top_logprobs,
            ),
            state=self.state,
        )
        trace = _subscriber(self.config, prompt, self.router)  # None: OpenTelemetry is off
        if trace is not None:  # each call starts a client span (with its prompt when captured)
            execution.trace_calls, execution.trace_prompts = True, trace.content
        execution.coalesce_s = coalesce

        async def drive() -> None:
            async with send:
                await execution.drive()

        # Entered by hand: a `yield` inside `async with` would turn the GeneratorExit of an
        # early `aclose()` into an exception group.
        tg = anyio.create_task_group()
        await tg.__aenter__()
        try:
            tg.start_soon(drive)
            async with receive:
                while True:
                    # What is queued is taken without a checkpoint each (`receive()` has one:
                    # an event-loop turn per token); waiting, when the queue is empty, has one.
                    try:
                        event = receive.receive_nowait()
                    except anyio.WouldBlock:
                        try:
                            event = await receive.receive()
                        except anyio.EndOfStream:
                            break
                    except anyio.EndOfStream:
                        break
                    if trace is not None:
                        trace.on(event)
                    yield event
        finally:
            if trace is not None:
                trace.close()
            tg.cancel_scope.cancel()
            await tg.__aexit__(None, None, None)
        if execution.fatal is not None:
            raise execution.fatal

    def _check_prices(self, request: Budget, ledgers: Sequence[Ledger] = ()) -> None:
        """A dollar budget needs a price for every model; fail before any call without one."""
        held = [self.session, *ledgers]
        if request.usd is None and all(ledger is None or ledger.limit.usd is None
                                       for ledger in held):
            return
        table = pricing.with_overrides(self.config.prices)
        for _, model in self.config.model_refs():
            if pricing.price_of(model, table) is None:
                raise ConfigError(
                    f"A dollar budget needs a price for {model!r}; "
                    "add it under [prices] in the config."
                )

    async def run(
        self,
        messages: str | list[Message],
        *,
        temperature: float | None = None,
        max_tokens: int | None = None,
        stop: list[str] | None = None,
        seed: int | None = None,
        budget: Budget | dict[str, Any] | None = None,
        tools: list[Tool] | None = None,
        tool_choice: str | dict[str, Any] | None = None,
        parallel_tool_calls: bool | None = None,
        response_format: dict[str, Any] | None = None,
        n: int = 1,
        logprobs: bool = False,
        top_logprobs: int | None = None,
        ledgers: Sequence[Ledger] = (),
    ) -> MixtureResult:
        """Run the mixture to the end and return its result (raises `MixtureError` on failure)."""
        result: MixtureResult | None = None
        events = self.stream(
            messages,
            temperature=temperature,
            max_tokens=max_tokens,
            stop=stop,
            seed=seed,
            budget=budget,
            tools=tools,
            tool_choice=tool_choice,
            parallel_tool_calls=parallel_tool_calls,
            response_format=response_format,
            n=n,
            logprobs=logprobs,
            top_logprobs=top_logprobs,
            ledgers=ledgers,
            coalesce=math.inf,  # nobody here reads the agents' tokens one by one
        )
        async with aclosing(events):
            async for event in events:
                if isinstance(event, RunFinished):
                    result = event.result
        assert result is not None
        return result

    def run_sync(self, messages: str | list[Message], **overrides: Any) -> MixtureResult:
        """`run()` for synchronous code; inside a running loop it runs in a worker thread."""
        return _blocking(lambda: self._released(self.run(messages, **overrides)))

    def stream_sync(self, messages: str | list[Message], **overrides: Any) -> Iterator[Event]:
        """`stream()` for synchronous code: events arrive from a worker thread's event loop.

        Closing the iterator (or breaking out of a `for` loop over it) cancels the run.
        """
        items: queue.Queue[tuple[str, Any]] = queue.Queue()
        ready = threading.Event()
        task: dict[str, Any] = {}

        async def consume() -> None:
            events = self.stream(messages, **overrides)
            async with aclosing(events):
                async for event in events:
                    items.put(("event", event))

        async def pump() -> None:
            # The run is a child task, so cancelling it leaves this task free to close the
            # providers' connections on its own loop.
            inner = asyncio.ensure_future(consume())
            task["loop"], task["task"] = asyncio.get_running_loop(), inner
            ready.set()
            try:
                await inner
            except BaseException as err:  # handed to the consuming thread
                items.put(("error", err))
            finally:
                await self.aclose()
                items.put(("end", None))

        thread = threading.Thread(target=asyncio.run, args=(pump(),), daemon=True)
        thread.start()
        ready.wait()
        try:
            while True:
                kind, value = items.get()
                if kind == "event":
                    yield value
                elif kind == "error":
                    if not isinstance(value, asyncio.CancelledError):
                        raise value
                else:
                    return
        finally:
            if thread.is_alive():
                # The loop may be closing on its own already; then there is nothing to cancel.
                with contextlib.suppress(RuntimeError):
                    task["loop"].call_soon_threadsafe(task["task"].cancel)
            thread.join()

    async def aclose(self) -> None:
        """Close this event loop's provider (and shared-state) connections."""
        await self.registry.aclose()
        if self.state is not None:
            await self.state.aclose()

    async def _released(self, work: Awaitable[T]) -> T:
        """Await `work`, then close providers: their connections belong to this event loop."""
        try:
            return await work
        finally:
            await self.aclose()

    async def __aenter__(self) -> Mixture:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _router(config: MixtureConfig) -> Router | None:
    """The config's router; the default one when stages are routed without a `[router]`."""
    if config.router is not None:
        return router_from_config(config.router)
    if config.strategy == "evolve":
        return ThresholdRouter("rank", EVOLVE_STRONG_SHARE)
    if any(agent.strong for agent in config.agents()):
        return router_from_config({"policy": "marginal"})
    return None


def as_budget(value: Budget | dict[str, Any]) -> Budget:
    """A `Budget` from itself or a dict such as {"usd": 0.05, "tokens": 20000}."""
    try:
        return Budget.model_validate(value)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise ConfigError(f"Invalid budget: field '{where}': {first['msg']}.") from None


def _blocking(make: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine to completion from sync code, in a worker thread if a loop is running."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(_awaited(make))
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            box["value"] = asyncio.run(_awaited(make))
        except BaseException as err:  # re-raised in the caller's thread
            box["error"] = err

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


async def _awaited(make: Callable[[], Awaitable[T]]) -> T:
    return await make()
