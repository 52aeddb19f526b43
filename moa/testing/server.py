"""`LoopbackServer`: an OpenAI-compatible and Anthropic-compatible server on 127.0.0.1.

It runs its own event loop in a background thread, so synchronous code, any async
framework and other processes can talk to it over a real socket.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections import defaultdict, deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio

from .behavior import (
    PROMPT_HISTORY,
    ModelBehavior,
    PromptToken,
    ReplyPlan,
    cached_prefix,
    plan_reply,
    prompt_sequence,
)
from .http11 import BadRequest, Connection, Request
from .wire import AnthropicFrames, OpenAIFrames

if TYPE_CHECKING:
    from moa.providers.registry import Limits, Registry

    from .gate import Gate

log = logging.getLogger("moa.testing")

_ECHO = ModelBehavior()


@dataclass
class RecordedRequest:
    """One request the server received."""

    method: str
    path: str
    headers: dict[str, str]
    """Header names in lower case."""
    body: dict[str, Any] | None
    model: str | None
    time: float
    """`time.monotonic()` when the request was read."""


class _Dropped(Exception):
    """The server dropped the connection on purpose."""


class LoopbackServer:
    """Serve configurable fake models over HTTP on an ephemeral port.

    `models` maps model names to behaviours; other names get `default` (an echo model),
    or 404 when `default` is None. With `api_key`, requests must carry it as a bearer
    token or an `x-api-key` header.
    """

    def __init__(
        self,
        models: Mapping[str, ModelBehavior] | None = None,
        default: ModelBehavior | None = _ECHO,
        *,
        api_key: str | None = None,
    ) -> None:
        self._models: dict[str, ModelBehavior] = dict(models or {})
        self._default = default
        self._api_key = api_key
        self._served: dict[str, int] = {}
        self._prompts: defaultdict[str, deque[list[PromptToken]]] = defaultdict(
            lambda: deque(maxlen=PROMPT_HISTORY)
        )
        """Each model's recent prompts, for the cached tokens its usage reports."""
        self._serial = 0
        self._active = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self.port = 0
        self.requests: list[RecordedRequest] = []
        self._recorded = threading.Condition()

    # -- public surface -------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """The OpenAI-compatible base URL, ending in `/v1`."""
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def anthropic_base_url(self) -> str:
        """The Anthropic base URL (the provider appends `/v1/messages`)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def active_streams(self) -> int:
        """Streamed responses in progress right now."""
        return self._active

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """Wait until no stream is open (a reply's last bytes race the handler's cleanup)."""
        deadline = time.monotonic() + timeout
        while self.active_streams and time.monotonic() < deadline:
            time.sleep(0.005)
        return self.active_streams == 0

    def wait_requests(self, model: str, count: int, timeout: float = 10.0) -> list[RecordedRequest]:
        """Wait until `count` requests for `model` have been read; return them all.

        From async code: `await anyio.to_thread.run_sync(srv.wait_requests, model, count)`.
        """
        def seen() -> list[RecordedRequest]:
            return [r for r in self.requests if r.model == model]

        with self._recorded:
            if not self._recorded.wait_for(lambda: len(seen()) >= count, timeout):
                raise TimeoutError(f"{len(seen())} of {count} requests for {model!r} arrived.")
        return seen()

    async def open_in_steps(self, gates: list[Gate], opens: list[int], model: str) -> None:
        """Open `gates` to each count of `opens` in turn, the next only once `model` has been
        sent one more request, then fully: a staircase aggregator's steps paced by explicit
        gates, never by sleeping."""
        for n, tokens in enumerate(opens, 1):
            for gate in gates:
                gate.open(tokens)
            await anyio.to_thread.run_sync(self.wait_requests, model, n)
        for gate in gates:
            gate.open()

    def set_behavior(self, model: str, behavior: ModelBehavior) -> None:
        """Set a model's behaviour; its fault counter starts again."""
        self._models[model] = behavior
        self._served.pop(model, None)

    def behavior(self, model: str) -> ModelBehavior | None:
        return self._models.get(model, self._default)

    def forget_prompts(self) -> None:
        """Empty the simulated prompt cache (every model's recent prompts): the next requests
        are counted cold, as in a benchmark whose runs must not share a cache."""
        self._prompts.clear()

    def registry(
        self,
        prefix: str = "loop",
        *,
        limits: Limits | None = None,
        continuation: str | None = "vllm",
        anthropic_prefix: str | None = None,
    ) -> Registry:
        """A registry with the built-in prefixes plus `prefix` -> this server.

        Without `limits`, backoffs are a few milliseconds so fault tests stay fast.
        `anthropic_prefix` also registers this server's Messages endpoint.
        """
        from moa.providers.registry import Limits, ProviderSpec, Registry

        limits = limits or Limits(backoff_initial=0.005, backoff_max=0.05, read_timeout=30.0)
        registry = Registry()
        options: dict[str, object] = {"continuation": continuation} if continuation else {}
        registry.register(
            ProviderSpec(prefix=prefix, base_url=self.base_url, key_required=False,
                         limits=limits, options=options)
        )
        if anthropic_prefix:
            registry.register(
                ProviderSpec(prefix=anthropic_prefix, kind="anthropic",
                             base_url=self.anthropic_base_url, key_required=False, limits=limits)
            )
        return registry

    def start(self) -> LoopbackServer:
        """Start serving in a background thread (returns once the port is bound)."""
        if self._thread is not None:
            return self
        ready = threading.Event()
        self._thread = threading.Thread(
            target=lambda: asyncio.run(self._serve(ready)), name="moa-loopback", daemon=True
        )
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("The loopback server did not start within 10 s.")
        return self

    def stop(self) -> None:
        """Stop serving; open connections are closed."""
        thread, loop, stop = self._thread, self._loop, self._stop
        if thread is None or loop is None or stop is None:
            return
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
        self._thread = None

    def __enter__(self) -> LoopbackServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> LoopbackServer:
        import anyio

        return await anyio.to_thread.run_sync(self.start)

    async def __aexit__(self, *exc: object) -> None:
        import anyio

        await anyio.to_thread.run_sync(self.stop)

    # -- serving --------------------------------------------------------------------

    async def _serve(self, ready: threading.Event) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        ready.set()
        await self._stop.wait()
        server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        conn = Connection(reader, writer)
        try:
            while (request := await conn.read_request()) is not None:
                if not await self._dispatch(conn, request):
                    break
        except BadRequest as exc:
            await conn.send_json(400, OpenAIFrames.error_document(400, str(exc)))
        except (ConnectionError, _Dropped, asyncio.CancelledError):
            pass  # the client went away, a fault dropped the socket, or the server stops
        except Exception:
            log.exception("The loopback server failed while answering; connection dropped.")
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _dispatch(self, conn: Connection, request: Request) -> bool:
        """Answer one request; False closes the connection."""
        if request.method == "GET" and request.path == "/v1/models":
            self._record(request, None)
            names = sorted(self._models)
            await conn.send_json(200, {"object": "list", "data": [
                {"id": n, "object": "model", "created": 0, "owned_by": "moa-testing"}
                for n in names
            ]})
            return True
        if request.method == "POST" and request.path == "/v1/chat/completions":
            return await self._chat(conn, request, OpenAIFrames)
        if request.method == "POST" and request.path == "/v1/messages":
            return await self._chat(conn, request, AnthropicFrames)
        self._record(request, None)
        message = f"No route for {request.method} {request.path}."
        await conn.send_json(404, OpenAIFrames.error_document(404, message))
        return True

    def _record(self, request: Request, body: dict[str, Any] | None) -> None:
        model = body.get("model") if body else None
        with self._recorded:
            self.requests.append(
                RecordedRequest(request.method, request.path, request.headers, body,
                                str(model) if model is not None else None, time.monotonic())
            )
            self._recorded.notify_all()

    def _authorized(self, request: Request) -> bool:
        if self._api_key is None:
            return True
        headers = request.headers
        return (
            headers.get("authorization") == f"Bearer {self._api_key}"
            or headers.get("x-api-key") == self._api_key
        )

    async def _chat(
        self, conn: Connection, request: Request,
        frames_type: type[OpenAIFrames] | type[AnthropicFrames],
    ) -> bool:
        try:
            body = json.loads(request.body or b"null")
            if not isinstance(body, dict):
                raise ValueError("body is not a JSON object")
        except ValueError as exc:
            self._record(request, None)
            await conn.send_json(400, frames_type.error_document(400, f"Invalid JSON: {exc}"))
            return True
        self._record(request, body)
        if not self._authorized(request):
            await conn.send_json(401, frames_type.error_document(401, "Invalid API key."))
            return True
        model = str(body.get("model", ""))
        behavior = self.behavior(model)
        if behavior is None:
            await conn.send_json(404, frames_type.error_document(404, f"No model {model!r}."))
            return True
        served = self._served.get(model, 0)
        self._served[model] = served + 1
        self._serial += 1
        faulty = behavior.fail_times is None or served < behavior.fail_times
        echoed = _echoed_credentials(behavior, request)
        if behavior.fail_status is not None and faulty:
            await conn.send_json(
                behavior.fail_status,
                frames_type.error_document(behavior.fail_status,
                                           f"loopback injected failure{echoed}"),
                headers=_retry_headers(behavior.retry_after),
            )
            return True
        anthropic = frames_type is AnthropicFrames
        plan = plan_reply(behavior, body, anthropic=anthropic, serial=self._serial)
        self._count_cache(model, behavior, body, plan, anthropic)
        frames = frames_type(body, behavior, plan, self._serial)
        frames.error_message += echoed
        frames.malformed_call = faulty and behavior.malformed_tool_call
        if body.get("stream"):
            return await self._stream(conn, frames, faulty)
        return await self._document(conn, frames, faulty)

    def _count_cache(self, model: str, behavior: ModelBehavior, body: dict[str, Any],
                     plan: ReplyPlan, anthropic: bool) -> None:
        """Fill in the plan's cached tokens (the longest prefix shared with the model's recent
        prompts) and, on Anthropic, its cache writes (the rest up to the last breakpoint)."""
        sequence, marked = prompt_sequence(body, anthropic)
        history = self._prompts[model]
        cached = cached_prefix(sequence, history, behavior.cache_min_tokens)
        plan.cached_tokens = min(cached, plan.prompt_tokens)
        if anthropic and marked >= behavior.cache_min_tokens:
            plan.cache_write_tokens = max(0, min(marked, plan.prompt_tokens) - plan.cached_tokens)
        history.append(sequence)

    async def _document(self, conn: Connection, frames: OpenAIFrames | AnthropicFrames,
                        faulty: bool) -> bool:
        behavior = frames.behavior
        fault = _first_fault(behavior) if faulty else None
        if fault == "drop":
            conn.abort()
            return False
        if fault == "stall":
            await conn.run_until_disconnect(asyncio.Event().wait)
            return False
        if fault == "malformed":
            await conn.send(200, b'{"choices": [')
            return True
        if fault == "error":
            await conn.send_json(500, frames.error_document(500, frames.error_message))
            return True
        count = max(frames.plan.steps(i) for i in range(len(frames.plan.tokens)))
        rate = behavior.tokens_per_s
        await asyncio.sleep(behavior.ttft_s + (count / rate if rate else 0.0))
        await conn.send_json(200, frames.document())
        return True

    async def _stream(self, conn: Connection, frames: OpenAIFrames | AnthropicFrames,
                      faulty: bool) -> bool:
        self._active += 1
        try:
            return await conn.run_until_disconnect(
                lambda: _send_stream(conn, frames, faulty)
            )
        finally:
            self._active -= 1


_FAULTS = ("drop", "malformed", "stall", "error")


def _first_fault(behavior: ModelBehavior) -> str | None:
    at = _fault_positions(behavior)
    return min(at, key=lambda kind: at[kind]) if at else None


def _fault_positions(behavior: ModelBehavior) -> dict[str, int]:
    positions = {
        kind: getattr(behavior, f"{kind}_after")
        for kind in _FAULTS
    }
    return {kind: at for kind, at in positions.items() if at is not None}


def _echoed_credentials(behavior: ModelBehavior, request: Request) -> str:
    if not behavior.echo_credentials:
        return ""
    headers = request.headers
    key = headers.get("x-api-key") or headers.get("authorization", "").removeprefix("Bearer ")
    return f" (request key: {key})"


def _retry_headers(retry_after: float | None) -> dict[str, str]:
    if retry_after is None:
        return {}
    return {"retry-after": f"{retry_after:g}", "retry-after-ms": str(round(retry_after * 1000))}


async def _send_stream(conn: Connection, frames: OpenAIFrames | AnthropicFrames,
                       faulty: bool) -> None:
    behavior, plan = frames.behavior, frames.plan
    await conn.start_stream()
    if behavior.raw_sse is not None:
        raw = behavior.raw_sse
        for i in range(0, len(raw), 7):  # small pieces: lines split across reads
            await conn.write_chunk(raw[i:i + 7])
        await conn.end_stream()
        return
    await conn.write_chunk(frames.start())
    steps = [plan.steps(index) for index in range(len(plan.tokens))]
    length = max(steps)
    faults = _fault_positions(behavior) if faulty else {}
    fault_at = {kind: min(at, length) for kind, at in faults.items()}
    step = 1.0 / behavior.tokens_per_s if behavior.tokens_per_s else 0.0
    start = time.monotonic() + behavior.ttft_s
    for position in range(length + 1):
        fault = next((k for k in _FAULTS if fault_at.get(k) == position), None)
        if fault is not None:
            await _inject(conn, frames, fault)
            return
        if position == length:
            break
        delay = start + position * step - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        if behavior.gate is not None:
            await behavior.gate.passage(plan.offset + position)
        for index, count in enumerate(steps):
            if position < count:
                await conn.write_chunk(frames.step(index, position))
    await conn.write_chunk(frames.finish())
    await conn.end_stream()


async def _inject(conn: Connection, frames: OpenAIFrames | AnthropicFrames, fault: str) -> None:
    if fault == "drop":
        conn.abort()
        raise _Dropped
    if fault == "stall":
        await asyncio.Event().wait()
    await conn.write_chunk(frames.malformed() if fault == "malformed" else frames.error())
    await conn.end_stream()
