"""An OpenAI-compatible HTTP server for mixtures (`moa serve`, extra `moa-stack[server]`).

Routes: `POST /v1/chat/completions` (SSE streaming and not), `GET /v1/models`, `GET /health`.
Errors use OpenAI's JSON shape. Requests beyond `max_concurrency` wait in a queue of
`max_queue`; beyond that the answer is 429, and a request that waited `queue_timeout_s` gets
503. A client that disconnects cancels its mixture, and with it every upstream call. A stream
that has nothing to send for `keepalive_s` gets an SSE comment line (`: keep-alive`).
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import math
import os
import socket
import threading
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from moa.config import MixtureConfig
from moa.errors import ConfigError, MoaError
from moa.mixture import Mixture
from moa.openai.wire import ChunkStream, RequestError, completion, parse_request
from moa.providers.registry import Registry

if TYPE_CHECKING:
    import uvicorn
    from anyio.streams.memory import MemoryObjectSendStream

log = logging.getLogger("moa.openai.server")
API_KEY_ENV = "MOA_SERVER_API_KEY"
KEEPALIVE = ": keep-alive\n\n"


def error(status: int, message: str, kind: str, code: str | None = None,
          param: str | None = None) -> JSONResponse:
    """An error in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


class Overloaded(Exception):
    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(message)


class Gate:
    """At most `limit` requests run; `queue` more may wait up to `timeout` seconds."""

    def __init__(self, limit: int, queue: int, timeout: float) -> None:
        self.slots = anyio.Semaphore(limit)
        self.queue, self.timeout = queue, timeout
        self.waiting = self.active = 0

    def check(self) -> None:
        if self.slots.value == 0 and self.waiting >= self.queue:
            raise Overloaded(429, "The server is at its concurrency limit; retry shortly.")

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        self.check()
        self.waiting += 1
        try:
            with anyio.move_on_after(self.timeout) as waited:
                await self.slots.acquire()
        finally:
            self.waiting -= 1
        if waited.cancelled_caught:
            raise Overloaded(503, "The server is overloaded: no slot freed in time.")
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1
            self.slots.release()


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise Overloaded(413, f"The request body is larger than {limit} bytes.")
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise Overloaded(413, f"The request body is larger than {limit} bytes.")
    return bytes(body)


def create_app(
    mixtures: dict[str, MixtureConfig],
    *,
    api_key: str | None = None,
    max_concurrency: int = 16,
    max_queue: int = 64,
    queue_timeout_s: float = 30.0,
    max_body_bytes: int = 2_000_000,
    keepalive_s: float = 15.0,
    registry: Registry | None = None,
) -> Starlette:
    """The Starlette app serving `mixtures` (model name -> config).

    A stream with nothing to send for `keepalive_s` (queued, or proposers still working) gets
    an SSE comment line, so proxies and clients with idle timeouts keep the connection.
    """
    api_key = api_key or os.environ.get(API_KEY_ENV) or None
    shared = registry or Registry()
    gate = Gate(max_concurrency, max_queue, queue_timeout_s)
    running: dict[str, Mixture] = {}

    def mixture(name: str) -> Mixture:
        if name not in running:
            running[name] = Mixture(mixtures[name], registry=shared)
        return running[name]

    def authorized(request: Request) -> bool:
        if not api_key:
            return True
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.encode(), api_key.encode())

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "active": gate.active, "queued": gate.waiting})

    async def models(request: Request) -> Response:
        if not authorized(request):
            return error(401, "Invalid or missing API key.", "authentication_error",
                         "invalid_api_key")
        data = [{"id": name, "object": "model", "created": 0, "owned_by": "moa"}
                for name in mixtures]
        return JSONResponse({"object": "list", "data": data})

    async def chat(request: Request) -> Response:
        if not authorized(request):
            return error(401, "Invalid or missing API key.", "authentication_error",
                         "invalid_api_key")
        try:
            raw = await _read_body(request, max_body_bytes)
            try:
                body = json.loads(raw)
            except (ValueError, UnicodeDecodeError):
                raise RequestError("The request body is not valid JSON.") from None
            call = parse_request(body)
            if call.model not in mixtures:
                return error(404, f"The model {call.model!r} does not exist; see /v1/models.",
                             "invalid_request_error", "model_not_found", "model")
            gate.check()
        except RequestError as err:
            return error(400, str(err), "invalid_request_error", None, err.param)
        except Overloaded as err:
            return _overloaded(err)
        if call.stream:
            return StreamingResponse(_stream(call), media_type="text/event-stream",
                                     headers={"cache-control": "no-cache"})
        try:
            async with gate.slot():
                result = await _until_disconnect(
                    request, mixture(call.model).run(call.messages, **call.overrides)
                )
        except Overloaded as err:
            return _overloaded(err)
        except MoaError as err:
            return _failure(err)
        if result is None:  # the client went away; nobody reads this
            return Response(status_code=499)
        return JSONResponse(completion(result, call.model))

    async def _stream(call: Any) -> AsyncIterator[str]:
        """The SSE body, produced by a task that a client disconnect cancels."""
        send, receive = anyio.create_memory_object_stream[str](math.inf)
        async with anyio.create_task_group() as tg:
            tg.start_soon(_produce, call, send)
            try:
                async with receive:
                    async for line in receive:
                        yield line
            finally:
                tg.cancel_scope.cancel()  # the client went away: cancel the mixture

    async def _produce(call: Any, send: MemoryObjectSendStream[str]) -> None:
        chunks = ChunkStream(call.model, call.include_usage)
        last_sent = anyio.current_time()

        def put(line: str) -> None:
            nonlocal last_sent
            last_sent = anyio.current_time()
            send.send_nowait(line)

        async def keep_alive() -> None:
            while True:
                await anyio.sleep(max(0.0, last_sent + keepalive_s - anyio.current_time()))
                if anyio.current_time() - last_sent >= keepalive_s:
                    put(KEEPALIVE)

        async with send, anyio.create_task_group() as tg:
            tg.start_soon(keep_alive)
            try:
                async with gate.slot():
                    events = mixture(call.model).stream(call.messages, **call.overrides)
                    async with contextlib.aclosing(events):
                        async for event in events:
                            for chunk in chunks.feed(event):
                                put(f"data: {json.dumps(chunk)}\n\n")
            except Overloaded as err:
                put(_sse_error(str(err), "server_error", "overloaded"))
            except MoaError as err:
                kind = "server_error" if isinstance(err, ConfigError) else "upstream_error"
                put(_sse_error(str(err), kind, None))
            except Exception:
                log.exception("stream failed")
                put(_sse_error("Internal server error.", "server_error", None))
            put("data: [DONE]\n\n")
            tg.cancel_scope.cancel()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await shared.aclose()

    return Starlette(
        routes=[
            Route("/health", health),
            Route("/v1/models", models),
            Route("/v1/chat/completions", chat, methods=["POST"]),
        ],
        exception_handlers={Exception: _internal, 404: _not_found, 405: _not_allowed},
        lifespan=lifespan,
    )


def _overloaded(err: Overloaded) -> JSONResponse:
    kind = "invalid_request_error" if err.status == 413 else "server_error"
    return error(err.status, str(err), kind, "overloaded" if err.status != 413 else None)


def _failure(err: MoaError) -> JSONResponse:
    if isinstance(err, ConfigError):
        return error(500, f"The server cannot run this mixture: {err}", "server_error")
    return error(502, str(err), "upstream_error")


def _sse_error(message: str, kind: str, code: str | None) -> str:
    return f"data: {json.dumps({'error': {'message': message, 'type': kind, 'code': code}})}\n\n"


async def _internal(request: Request, exc: Exception) -> Response:
    log.exception("request failed", exc_info=exc)
    return error(500, "Internal server error.", "server_error")


async def _not_found(request: Request, exc: Exception) -> Response:
    return error(404, f"No route {request.url.path!r}.", "invalid_request_error")


async def _not_allowed(request: Request, exc: Exception) -> Response:
    return error(405, f"Method {request.method} is not allowed here.", "invalid_request_error")


async def _until_disconnect(request: Request, work: Any) -> Any:
    """Await `work`, cancelling it if the client disconnects first (then return None)."""
    box: dict[str, Any] = {}

    async def run(scope: anyio.CancelScope) -> None:
        box["value"] = await work
        scope.cancel()

    async def watch(scope: anyio.CancelScope) -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        scope.cancel()

    async with anyio.create_task_group() as tg:
        tg.start_soon(run, tg.cancel_scope)
        tg.start_soon(watch, tg.cancel_scope)
    return box.get("value")


def serve(app: Starlette, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run `app` with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="warning")


class ServerThread:
    """`app` served by uvicorn on 127.0.0.1 (ephemeral port) in a background thread."""

    def __init__(self, app: Starlette, host: str = "127.0.0.1", port: int = 0) -> None:
        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = self.sock.getsockname()[:2]
        self.server: uvicorn.Server | None = None
        self.thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def __enter__(self) -> ServerThread:
        import uvicorn

        config = uvicorn.Config(self.app, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
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

