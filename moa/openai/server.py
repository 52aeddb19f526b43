"""An OpenAI-compatible HTTP server for mixtures (`moa serve`, extra `moa-stack[server]`).

Routes: `POST /v1/chat/completions` and `POST /v1/responses` (SSE streaming and not; both go
through one admission, run and stream path, and a `_Surface` says how each reads and writes),
`GET /v1/models`, `GET /v1/models/{id}`, `GET /health`. Every failure is an error in OpenAI's
JSON shape with its status (docs/openai.md has the table). Requests beyond `max_concurrency`
wait in a queue of `max_queue`; beyond that the answer is 429, and a request that waited
`queue_timeout_s` gets 503 — both with `Retry-After` and, for streams too, before any 200 is
sent. A client that disconnects cancels its mixture, and with it every upstream call. A stream
that has nothing to send for `keepalive_s` gets an SSE comment line (`: keep-alive`). On
shutdown the server stops accepting, gives open requests `shutdown_grace_s`, then ends each
(a stream with an error event and its end marker); a second signal exits at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import anyio
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from moa import telemetry
from moa.config import MixtureConfig
from moa.errors import ConfigError, MissingKeyError
from moa.events import Event
from moa.mixture import Mixture
from moa.openai.guards import (
    SHUTTING_DOWN,
    Drain,
    Gate,
    Slot,
    check_content_type,
    http_protocol,
    read_body,
)
from moa.openai.keys import Access, ClientKey, KeyRing
from moa.openai.responses import ResponseEvents, parse_responses, response_object
from moa.openai.responses import new_id as new_response_id
from moa.openai.wire import (
    ChatCall,
    ChunkStream,
    Refused,
    RequestError,
    completion,
    failure,
    load_json,
    parse_request,
)
from moa.providers.registry import Registry
from moa.result import MixtureResult
from moa.state import LocalState, State

if TYPE_CHECKING:
    import uvicorn
    from anyio.streams.memory import MemoryObjectSendStream
    from starlette.types import Receive, Scope, Send

log = logging.getLogger("moa.openai.server")
API_KEY_ENV = "MOA_SERVER_API_KEY"
KEEPALIVE = ": keep-alive\n\n"
SHUTDOWN_GRACE_S = 10.0
"""How long open requests may still run once a shutdown began (`moa serve --shutdown-grace`)."""


def _logged(refused: Refused, model: str | None, err: Exception | None = None) -> Refused:
    """Log one line per failed request (the client's mistakes at INFO, the server's at WARNING);
    a traceback only for an internal error or at DEBUG (`moa serve --debug`)."""
    where = f"{model}: " if model else ""
    if refused.status == 500:
        log.error("%sinternal error: %r", where, err, exc_info=err)
    else:
        level = logging.WARNING if refused.status >= 500 else logging.INFO
        log.log(level, "%sHTTP %d: %s", where, refused.status, err or refused,
                exc_info=err if err is not None and log.isEnabledFor(logging.DEBUG) else None)
    return refused


class _SlotStream(StreamingResponse):
    """A streaming response that gives its gate slot back when it ends, however it ends (the
    producer gives it back sooner: before the client can read the stream's last line)."""

    def __init__(self, content: AsyncIterator[str], slot: Slot,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"cache-control": "no-cache", **(headers or {})})
        self.slot = slot

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.slot.release()


class _Lines(Protocol):
    """One stream's SSE text: the lines of each run event, of a failure, and of the end."""

    def feed(self, event: Event) -> list[str]: ...
    def fail(self, refused: Refused) -> list[str]: ...
    def end(self) -> list[str]: ...


def _data(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


class _ChatLines:
    """`chat.completion.chunk` data lines; an error as `data: {"error": ...}`; `[DONE]`."""

    def __init__(self, call: ChatCall) -> None:
        self.chunks = ChunkStream(call.model, call.include_usage)

    def feed(self, event: Event) -> list[str]:
        return [_data(chunk) for chunk in self.chunks.feed(event)]

    def fail(self, refused: Refused) -> list[str]:
        return [_data(refused.body())]

    def end(self) -> list[str]:
        return ["data: [DONE]\n\n"]


class _ResponseLines:
    """Responses events, each named in an `event:` line; a failure as `response.failed`."""

    def __init__(self, call: ChatCall) -> None:
        self.events = ResponseEvents(call, new_response_id())

    @staticmethod
    def _lines(events: list[dict[str, Any]]) -> list[str]:
        return [f"event: {event['type']}\n{_data(event)}" for event in events]

    def feed(self, event: Event) -> list[str]:
        return self._lines(self.events.feed(event))

    def fail(self, refused: Refused) -> list[str]:
        return self._lines(self.events.fail(refused.code, str(refused)))

    def end(self) -> list[str]:
        return []


@dataclass(frozen=True)
class _Surface:
    """How one API reads a request and writes a run's answer, whole or streamed."""

    parse: Callable[[Any], ChatCall]
    answer: Callable[[MixtureResult, ChatCall], dict[str, Any]]
    lines: Callable[[ChatCall], _Lines]


CHAT = _Surface(parse_request, lambda result, call: completion(result, call.model), _ChatLines)
RESPONSES = _Surface(parse_responses,
                     lambda result, call: response_object(result, call, new_response_id()),
                     _ResponseLines)


def create_app(
    mixtures: dict[str, MixtureConfig],
    *,
    api_key: str | None = None,
    max_concurrency: int = 64,  # by measurement: 16 slots queued 64 streams, p95 x3.9
    max_queue: int = 64,
    queue_timeout_s: float = 30.0,
    max_body_bytes: int = 2_000_000,
    keepalive_s: float = 15.0,
    registry: Registry | None = None,
    state: State | None = None,
    keys: KeyRing | None = None,
) -> Starlette:
    """The Starlette app serving `mixtures` (model name -> config; `moa/NAME` works too).

    `state` (`moa.state`) holds the session budgets (ledger `session:NAME`), the providers'
    limits and the client keys' spend: with a `RedisState` every replica shares them. `keys`
    (`moa serve --keys`) replaces the single `api_key` by per-client keys, each with its
    mixtures, rate and budget (`GET /v1/moa/keys/{name}/usage` reads its spend).

    A stream with nothing to send for `keepalive_s` (proposers still working) gets an SSE
    comment line, so proxies and clients with idle timeouts keep the connection. A mixture
    whose provider keys are missing is listed but answers 503 (see `not_ready`). The app's
    `state.drain` (a `Drain`) ends open requests when the server's shutdown grace is over.
    """
    if keys is not None and api_key:
        raise ConfigError("Use either an API key or a keys file, not both.")
    api_key = None if keys is not None else api_key or os.environ.get(API_KEY_ENV) or None
    access = Access(keys, state or LocalState()) if keys is not None else None
    shared = registry or Registry()
    gate = Gate(max_concurrency, max_queue, queue_timeout_s)
    drain = Drain()
    running = {name: _mixture(name, config, shared, state) for name, config in mixtures.items()}
    unready = not_ready(mixtures, shared)

    def authorize(request: Request) -> ClientKey | None:
        if access is not None:
            return access.authorize(request)
        if not api_key:
            return None
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if not (scheme.lower() == "bearer"
                and hmac.compare_digest(token.encode(), api_key.encode())):
            raise Refused(401, "Invalid or missing API key.", "authentication_error",
                          "invalid_api_key")
        return None

    def named(model: str) -> str:
        for name in (model, model.removeprefix("moa/")):
            if name in running:
                if name in unready:
                    raise Refused(503, f"The server cannot run {name!r}: {unready[name]}",
                                  "server_error", "not_ready")
                return name
        raise Refused(404, f"The model {model!r} does not exist; see /v1/models.",
                      code="model_not_found", param="model")

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "active": gate.active, "queued": gate.waiting})

    def card(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": 0, "owned_by": "moa"}

    async def models(request: Request) -> Response:
        try:
            authorize(request)
        except Refused as err:
            return _logged(err, None).response()
        return JSONResponse({"object": "list", "data": [card(name) for name in mixtures]})

    async def model(request: Request) -> Response:
        model_id = request.path_params["model_id"]
        try:
            authorize(request)
            if model_id.removeprefix("moa/") not in mixtures and model_id not in mixtures:
                raise Refused(404, f"The model {model_id!r} does not exist; see /v1/models.",
                              code="model_not_found", param="model")
        except Refused as err:
            return _logged(err, None).response()
        return JSONResponse(card(model_id))

    async def answer(request: Request, surface: _Surface) -> Response:
        """`admit_and_run`, answered 503 when the shutdown's grace ends it first."""
        with drain.open() as scope:
            return await admit_and_run(request, surface)
        assert scope.cancelled_caught
        return SHUTTING_DOWN.response()

    async def admit_and_run(request: Request, surface: _Surface) -> Response:
        """Admit the request (auth, content type, body, model, a gate slot), run the mixture
        and answer as `surface` writes it: whole, or as a stream that a disconnect cancels."""
        try:
            client = authorize(request)
            check_content_type(request)
            call = surface.parse(load_json(await read_body(request, max_body_bytes)))
            name = named(call.model)
            if access is not None and client is not None:  # charged to the key's ledger too
                call.overrides["ledgers"] = await access.admit(client, name)
            slot = await gate.enter()
        except RequestError as err:
            return _logged(Refused(400, str(err), param=err.param), None).response()
        except Refused as err:
            return _logged(err, None).response()
        except ClientDisconnect:  # gone while sending the body; nobody reads an answer
            return Response(status_code=499)
        # The run's spans continue the client's `traceparent` (no-op without OpenTelemetry).
        served = telemetry.serving(request.method, request.url.path, request.headers)
        if call.stream:
            lines = surface.lines(call)
            return _SlotStream(_stream(name, call, lines, slot, served), slot, served.headers)
        try:
            with served.active():
                result = await _until_disconnect(
                    request, running[name].run(call.messages, **call.overrides)
                )
        except Exception as err:
            refused = _logged(failure(name, err), name, err)
            served.fail(refused.status, str(refused))
            answer = refused.response()
            answer.headers.update(served.headers)
            return answer
        finally:
            slot.release()
            served.end()
        if result is None:  # the client went away; nobody reads this
            return Response(status_code=499)
        return JSONResponse(surface.answer(result, call), headers=served.headers)

    async def chat(request: Request) -> Response:
        return await answer(request, CHAT)

    async def responses(request: Request) -> Response:
        return await answer(request, RESPONSES)

    async def _stream(name: str, call: ChatCall, lines: _Lines, slot: Slot,
                      served: telemetry.ServedRequest) -> AsyncIterator[str]:
        """The SSE body, produced by a task that a client disconnect cancels."""
        send, receive = anyio.create_memory_object_stream[str](math.inf)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(_produce, name, call, lines, send, slot, served)
                try:
                    async with receive:
                        async for line in receive:
                            yield line
                finally:
                    tg.cancel_scope.cancel()  # the client went away: cancel the mixture
        finally:
            served.end()

    async def _produce(name: str, call: ChatCall, lines: _Lines,
                       send: MemoryObjectSendStream[str], slot: Slot,
                       served: telemetry.ServedRequest) -> None:
        """Run the mixture into `send`: its events, a failure, or the shutdown's error, then
        the end; the slot is given back before the end can reach the client."""
        last_sent = anyio.current_time()

        def put(text: list[str]) -> None:
            nonlocal last_sent
            for line in text:
                last_sent = anyio.current_time()
                send.send_nowait(line)

        async def keep_alive() -> None:
            while True:
                await anyio.sleep(max(0.0, last_sent + keepalive_s - anyio.current_time()))
                if anyio.current_time() - last_sent >= keepalive_s:
                    put([KEEPALIVE])

        async with send, anyio.create_task_group() as tg:
            tg.start_soon(keep_alive)
            with drain.open() as cut, served.active():
                try:
                    # The wire carries the answer only: agents' tokens are gathered.
                    events = running[name].stream(call.messages, coalesce=math.inf,
                                                  **call.overrides)
                    async with contextlib.aclosing(events):
                        async for event in events:
                            put(lines.feed(event))
                except Exception as err:
                    refused = _logged(failure(name, err), name, err)
                    served.fail(refused.status, str(refused))
                    put(lines.fail(refused))
            if cut.cancelled_caught:
                put(lines.fail(SHUTTING_DOWN))
            put(lines.end())
            slot.release()
            tg.cancel_scope.cancel()

    async def key_usage(request: Request) -> Response:
        try:
            if access is None:
                raise Refused(404, "This server has no client keys (moa serve --keys FILE).",
                              code="no_keys")
            client = access.authorize(request)
            return JSONResponse(await access.usage(client, request.path_params["name"]))
        except Refused as err:
            return _logged(err, None).response()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await shared.aclose()
        if state is not None:
            await state.aclose()

    app = Starlette(
        routes=[
            Route("/health", health),
            Route("/v1/models", models),
            Route("/v1/models/{model_id:path}", model),
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/v1/responses", responses, methods=["POST"]),
            Route("/v1/moa/keys/{name}/usage", key_usage),
        ],
        exception_handlers={404: _not_found, 405: _not_allowed},
        lifespan=lifespan,
    )
    app.state.drain = drain
    return app


def _mixture(name: str, config: MixtureConfig, registry: Registry, state: State | None) -> Mixture:
    """A served mixture; with a state, its session budget is that state's `session:NAME`."""
    if state is None:
        return Mixture(config, registry=registry)
    limit = config.session_budget
    session = None if limit.unlimited else state.ledger(f"session:{name}", limit)
    return Mixture(config, registry=registry, state=state, session=session)


def not_ready(mixtures: dict[str, MixtureConfig], registry: Registry) -> dict[str, str]:
    """Mixture name -> why it cannot run (a provider key that is not set), for those that can't."""
    from moa.cli.options import check_keys

    missing: dict[str, str] = {}
    for name, config in mixtures.items():
        try:
            check_keys(config, registry)
        except MissingKeyError as err:
            missing[name] = str(err)
    return missing


async def _not_found(request: Request, exc: Exception) -> Response:
    return Refused(404, f"No route {request.url.path!r}.").response()


async def _not_allowed(request: Request, exc: Exception) -> Response:
    return Refused(405, f"Method {request.method} is not allowed here.").response()


async def _until_disconnect(request: Request, work: Any) -> Any:
    """Await `work`, cancelling it if the client disconnects first (then return None).

    The work's own exception is re-raised as itself, not inside an exception group.
    """
    box: dict[str, Any] = {}

    async def run(scope: anyio.CancelScope) -> None:
        try:
            box["value"] = await work
        except Exception as err:
            box["error"] = err
        scope.cancel()

    async def watch(scope: anyio.CancelScope) -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        scope.cancel()

    async with anyio.create_task_group() as tg:
        tg.start_soon(run, tg.cancel_scope)
        tg.start_soon(watch, tg.cancel_scope)
    if "error" in box:
        raise box["error"]
    return box.get("value")




def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or a `ConfigError` saying in one sentence why not.

    It listens at once: a client that connects once `moa serve` said it serves waits in the
    backlog until uvicorn accepts, instead of being refused."""
    sock: socket.socket | None = None
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except (OSError, UnicodeError) as err:
        if sock is not None:
            sock.close()
        why = getattr(err, "strerror", None) or str(err)
        raise ConfigError(f"Cannot serve on {host}:{port}: {why}.") from None
    return sock


def _server(app: Starlette, shutdown_grace_s: float = SHUTDOWN_GRACE_S,
            log_level: str = "warning") -> uvicorn.Server:
    """uvicorn's server for `app`, with a bounded shutdown: open requests get
    `shutdown_grace_s`, then the app's drain ends them; a second signal exits at once."""
    import uvicorn

    drain: Drain | None = getattr(app.state, "drain", None)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            if self.should_exit:  # the second signal: exit now, without draining
                os.write(2, b"moa: a second signal: exiting now.\n")
                os._exit(128 + sig)
            super().handle_exit(sig, frame)

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            for server in self.servers:  # stop accepting first (uvicorn does it again)
                server.close()
            for sock in sockets or []:
                sock.close()
            if drain is None:
                return await super().shutdown(sockets)
            if drain.open_requests:
                log.warning("shutting down: %d open request(s) get up to %g s to finish "
                            "(a second signal exits at once).", drain.open_requests,
                            shutdown_grace_s)
            timer = asyncio.get_running_loop().call_later(shutdown_grace_s, _expire,
                                                          drain, shutdown_grace_s)
            try:
                await super().shutdown(sockets)
            finally:
                timer.cancel()

    # The drain ends streams in their own shape; uvicorn's own cut (cancelling the tasks) is
    # only a backstop for a client that stopped reading.
    config = uvicorn.Config(app, log_level=log_level, lifespan="on", http=http_protocol(),
                            timeout_graceful_shutdown=shutdown_grace_s + 5)  # type: ignore[arg-type]
    return Server(config)


def _expire(drain: Drain, grace_s: float) -> None:
    if drain.open_requests:
        log.warning("shutdown grace of %g s passed: ending %d open request(s) with an error.",
                    grace_s, drain.open_requests)
    drain.expire()


def serve(app: Starlette, sock: socket.socket,
          shutdown_grace_s: float = SHUTDOWN_GRACE_S) -> None:
    """Run `app` with uvicorn on the bound `sock` until SIGTERM / SIGINT (then drain)."""
    _server(app, shutdown_grace_s).run(sockets=[sock])


class ServerThread:
    """`app` served by uvicorn on 127.0.0.1 (ephemeral port) in a background thread."""

    def __init__(self, app: Starlette, host: str = "127.0.0.1", port: int = 0,
                 shutdown_grace_s: float = SHUTDOWN_GRACE_S) -> None:
        self.app, self.shutdown_grace_s = app, shutdown_grace_s
        self.sock = bind(host, port)
        self.host, self.port = self.sock.getsockname()[:2]
        self.server: uvicorn.Server | None = None
        self.thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def __enter__(self) -> ServerThread:
        self.server = _server(self.app, self.shutdown_grace_s)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started and self.thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not self.server.started:
            raise RuntimeError("The server did not start.")
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.server is not None and self.thread is not None
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()

