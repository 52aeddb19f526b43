"""What every HTTP provider shares: connection pool, limits, retries, deadlines, SSE.

`HttpTransport.stream()` sends one streaming POST and turns its server-sent events into
`Delta`s through a wire-specific `EventDecoder`. Until the first delta arrives, a failed
attempt is retried (connection errors, 408, 409, 429, 5xx) with exponential backoff and
jitter, honouring `Retry-After` / `retry-after-ms`. After it, a failure is never retried:
the caller gets `StreamInterrupted` with the text received so far.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import random
import ssl
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AsyncExitStack, aclosing, asynccontextmanager
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any, Protocol

import anyio
import anyio.lowlevel
from pydantic import SecretStr
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
)

from moa.errors import ConfigError, ProviderError, ProviderTimeout, StreamInterrupted, StreamTimeout

from ._lean import httpx
from .base import Delta, Provider
from .http1 import ByteChunks, body_chunks, lean_transport
from .registry import Limits, ProviderSpec
from .secrets import Secrets, excerpt, mask_url, redact, split_credentials
from .sse import SSEParser

if TYPE_CHECKING:
    from httpx_sse import ServerSentEvent

log = logging.getLogger("moa.providers")

RETRY_STATUSES = frozenset({408, 409, 429})
"""Retried besides every 5xx status."""
MAX_ERROR_BODY = 4096


class EventDecoder(Protocol):
    """Turns one stream's server-sent events into deltas (one instance per attempt)."""

    @property
    def complete(self) -> bool:
        """The stream said it is over (a finish reason, `[DONE]`, `message_stop`)."""
        ...

    def feed(self, event: ServerSentEvent) -> list[Delta]:
        """Deltas carried by `event`; raise `ProviderError` for an error event or bad data."""
        ...

    def end(self) -> list[Delta]:
        """Deltas still held back when the stream closes (e.g. the final usage)."""
        ...


def retryable_status(status: int) -> bool:
    return status in RETRY_STATUSES or status >= 500


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """The server's requested wait: `retry-after-ms`, or `Retry-After` (seconds or a date)."""
    lowered = {k.lower(): v for k, v in headers.items()}
    try:
        if "retry-after-ms" in lowered:
            return max(0.0, float(lowered["retry-after-ms"]) / 1000)
        if "retry-after" in lowered:
            return max(0.0, float(lowered["retry-after"]))
    except ValueError:
        pass
    value = lowered.get("retry-after")
    if value:
        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None
    return None


def header_option(options: Mapping[str, object]) -> dict[str, str]:
    """The `headers` option of a provider spec as a plain str -> str dict."""
    headers = options.get("headers") or {}
    if not isinstance(headers, Mapping):
        raise ConfigError("The provider option 'headers' must be a table of strings.")
    return {str(k): str(v) for k, v in headers.items()}


def error_detail(raw: bytes, *secrets: SecretStr | str | None) -> str:
    """The human part of an error body: `error.message` of a JSON error, else the text.

    The secrets are redacted from the whole body and again from the message (JSON escapes
    may hide one in the raw text) before either is cut to length."""
    text = redact(raw.decode("utf-8", "replace"), *secrets).strip()[:MAX_ERROR_BODY]
    try:
        payload = json.loads(text)
    except ValueError:
        return text[:200]
    if isinstance(payload, dict):
        error = payload.get("error", payload)
        if isinstance(error, dict) and error.get("message"):
            return excerpt(str(error["message"]), 300, *secrets)
        if isinstance(error, str):
            return excerpt(error, 300, *secrets)
    return text[:200]


@dataclass
class StreamCall:
    """One streaming POST: where, what, and how to read the reply."""

    url: str
    model: str
    body: dict[str, Any]
    headers: dict[str, str]
    decoder: Callable[[], EventDecoder]
    secrets: tuple[SecretStr | str | None, ...] = ()
    """The API key inside `headers` (and any URL password), scrubbed from every message."""
    on_retry: Callable[[int, str], None] | None = None
    """Called before each retried attempt with its number and the (scrubbed) reason of the
    last failure (a result's `calls` counts attempts)."""


@dataclass
class _OpenStream:
    stack: AsyncExitStack
    chunks: ByteChunks
    """The response body as it arrives (one item per network chunk)."""
    parser: SSEParser
    decoder: EventDecoder
    first: list[Delta] = field(default_factory=list)
    backlog: list[ServerSentEvent] = field(default_factory=list)
    """Events that came in the first delta's chunk after it, not yet decoded."""


@functools.cache
def _ssl_context() -> ssl.SSLContext:
    """One TLS context for the process: loading the CA bundle takes ~25 ms, and every event loop
    (each `run_sync`) would otherwise pay it again. Honours SSL_CERT_FILE / SSL_CERT_DIR."""
    return httpx.create_ssl_context()


@functools.cache
def _no_ca_context() -> ssl.SSLContext:
    """The context of a provider reached over plain http (a local server): no CA bundle to
    load, and it verifies like any other, so a TLS connection through it would fail, not pass
    unchecked."""
    return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)


class _LoopState:
    """The connection pools and semaphores of one event loop (they cannot cross loops).

    Closing it closes idle pools at once and every other pool when its last call ends, so
    an owner closing its connections never cuts a call that is still running.
    """

    def __init__(self, limits: Limits, secure: bool = True) -> None:
        self.limits = limits
        self.secure = secure
        self.closed = False
        self.pools: list[httpx.AsyncClient] = []
        self.leases: list[int] = []
        self.provider_slots = anyio.Semaphore(limits.max_concurrency)
        self.model_slots: dict[str, anyio.Semaphore] = {}

    def _new_pool(self) -> httpx.AsyncClient:
        """An httpx client on the lean HTTP/1.1 transport (`http1`) where it can serve, else
        on httpx's own (trio, a proxy in the environment)."""
        limits = self.limits
        size = min(limits.pool_size, limits.max_concurrency)
        verify = _ssl_context() if self.secure else _no_ca_context()
        return httpx.AsyncClient(
            timeout=httpx.Timeout(
                connect=limits.connect_timeout,
                read=limits.read_timeout,
                write=limits.read_timeout,
                pool=None,
            ),
            limits=httpx.Limits(max_connections=size, max_keepalive_connections=size),
            verify=verify,
            transport=lean_transport(verify, size),
        )

    @asynccontextmanager
    async def lease(self) -> AsyncIterator[httpx.AsyncClient]:
        """The least busy pool (a new one when every pool is full) for one call.

        httpcore's pool bookkeeping (httpx's own transport: trio, a proxy) costs O(connections²)
        per request, so a provider with many open calls spreads them over several small pools.
        A call that waited for its slot while the state was closed gets a fresh pool, closed
        when it ends.
        """
        usable = [i for i, pool in enumerate(self.pools) if not pool.is_closed]
        index = min(usable, key=self.leases.__getitem__, default=-1)
        if index < 0 or self.leases[index] >= self.limits.pool_size:
            self.pools.append(self._new_pool())
            self.leases.append(0)
            index = len(self.pools) - 1
        self.leases[index] += 1
        try:
            yield self.pools[index]
        finally:
            self.leases[index] -= 1
            if self.closed and not self.leases[index]:
                with anyio.CancelScope(shield=True):
                    await self.pools[index].aclose()

    async def aclose(self) -> None:
        self.closed = True
        for pool, leases in zip(self.pools, self.leases, strict=True):
            if not leases:
                await pool.aclose()


class HttpTransport:
    """One provider's shared connection pool, concurrency limits, retry policy and deadlines.

    `sleep` is the coroutine used between attempts (tests may inject a recorder). `secure`:
    False for a base URL that is plain http, whose pools need no CA bundle (~40 ms to load).
    """

    def __init__(
        self, provider: str, limits: Limits, *, key_variable: str | None = None,
        secure: bool = True,
    ) -> None:
        self.provider = provider
        self.limits = limits
        self.secure = secure
        self.key_variable = key_variable
        self.sleep: Callable[[float], Any] = anyio.sleep
        self._states: dict[object, _LoopState] = {}
        """Per event loop (keyed by the native loop); a closed loop's entry is dropped."""

    def __repr__(self) -> str:
        return f"HttpTransport(provider={self.provider!r})"

    def _loop_state(self) -> _LoopState:
        loop = anyio.lowlevel.current_token().native_token
        state = self._states.get(loop)
        if state is None:
            for old in [k for k in list(self._states) if getattr(k, "is_closed", bool)()]:
                self._states.pop(old, None)  # other threads' loops may be here too
            state = self._states[loop] = _LoopState(self.limits, self.secure)
        return state

    @asynccontextmanager
    async def _slot(self, model: str) -> AsyncIterator[httpx.AsyncClient]:
        """Wait for the provider's (and model's) concurrency slot; yield a connection pool."""
        state = self._loop_state()
        per_model = self.limits.max_concurrency_per_model
        async with AsyncExitStack() as stack:
            if per_model is not None:
                slots = state.model_slots.setdefault(model, anyio.Semaphore(per_model))
                await stack.enter_async_context(slots)
            await stack.enter_async_context(state.provider_slots)
            yield await stack.enter_async_context(state.lease())

    async def aclose(self) -> None:
        """Close this event loop's connections (calls still running finish first)."""
        state = self._states.pop(anyio.lowlevel.current_token().native_token, None)
        if state is not None:
            await state.aclose()

    def backoff(self, attempt: int) -> float:
        """Exponential backoff with jitter after failed attempt number `attempt` (from 1)."""
        initial = self.limits.backoff_initial
        delay = initial * 2 ** (attempt - 1) + random.uniform(0, initial)
        return min(delay, self.limits.backoff_max)

    # -- streaming ------------------------------------------------------------------

    async def stream(self, call: StreamCall) -> AsyncIterator[Delta]:
        """Yield the call's deltas; retry before the first one, never after it.

        Every error message is scrubbed of the secrets, whatever the server echoed.
        """
        try:
            async with aclosing(self._stream(call)) as deltas:
                async for delta in deltas:
                    yield delta
        except ProviderError as exc:
            _scrub(exc, call.secrets)
            raise

    async def _stream(self, call: StreamCall) -> AsyncIterator[Delta]:
        who = f"{self.provider}/{call.model}"
        async with self._slot(call.model) as client:
            total = self.limits.total_timeout
            deadline = anyio.current_time() + total if total else math.inf
            opened = await self._open(call, client, who, deadline)
            received: dict[int, list[str]] = {}
            decoder, parser, chunks = opened.decoder, opened.parser, opened.chunks
            # Until `safe_until` (time.monotonic(): cheaper per chunk than anyio's clock) a
            # read ends before the deadline can pass (see `_next_chunk`).
            safe_until = time.monotonic() + (deadline - anyio.current_time())
            safe_until -= self.limits.read_timeout
            try:
                for delta in opened.first:
                    if delta.text:
                        received.setdefault(delta.index, []).append(delta.text)
                    yield delta
                backlog = opened.backlog
                while True:
                    for event in backlog:
                        for delta in decoder.feed(event):
                            if delta.text:
                                received.setdefault(delta.index, []).append(delta.text)
                            yield delta
                    chunk = await self._next_chunk(chunks, who, deadline, safe_until)
                    if chunk is None:
                        break
                    backlog = parser.feed(chunk)
                for delta in decoder.end():
                    yield delta
                if not opened.decoder.complete:
                    raise ProviderError(
                        f"{who}: the stream ended before the reply was complete.",
                        provider=self.provider, model=call.model, retryable=False,
                    )
            except ProviderError as exc:
                if not received:
                    raise
                first_choice = received.get(0) or next(iter(received.values()))
                raise _interrupted(exc, "".join(first_choice)) from exc
            finally:
                # Shielded: a cancelled caller must still close the response (its socket).
                with anyio.CancelScope(shield=True):
                    await opened.stack.aclose()

    async def _open(
        self, call: StreamCall, client: httpx.AsyncClient, who: str, deadline: float
    ) -> _OpenStream:
        """Send the request and read up to its first delta, retrying what may succeed.

        The first attempt runs bare (most calls need no other: tenacity's wrapper would be
        most of a call's own CPU); its retryable failure hands over to tenacity, which sees
        it as its own first attempt and goes on by the same rules."""
        try:
            return await self._attempt(call, client, who, deadline)
        except ProviderError as exc:
            if not exc.retryable:
                raise
            failed: list[ProviderError] = [exc]

        async def attempt() -> _OpenStream:
            if failed:
                raise failed.pop()
            return await self._attempt(call, client, who, deadline)

        def give_up(state: RetryCallState) -> bool:
            wait = state.upcoming_sleep
            return state.attempt_number > self.limits.max_retries or (
                anyio.current_time() + wait >= deadline
            )

        def wait(state: RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            hint = getattr(exc, "retry_after", None)
            return float(hint) if hint is not None else self.backoff(state.attempt_number)

        def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            reason = redact(str(exc), *call.secrets)
            log.info("%s: retrying in %.3f s after: %s", who, state.upcoming_sleep, reason)
            if call.on_retry is not None:
                call.on_retry(state.attempt_number + 1, reason)

        retrying = AsyncRetrying(
            stop=give_up,
            wait=wait,
            retry=retry_if_exception(lambda e: isinstance(e, ProviderError) and e.retryable),
            sleep=lambda seconds: self.sleep(seconds),
            before_sleep=before_sleep,
            reraise=True,
        )
        return await retrying(attempt)

    async def _attempt(
        self, call: StreamCall, client: httpx.AsyncClient, who: str, deadline: float
    ) -> _OpenStream:
        log.debug("%s: POST %s", who, mask_url(call.url))
        stack = AsyncExitStack()
        try:
            with anyio.CancelScope(deadline=deadline) as scope:
                response = await stack.enter_async_context(
                    client.stream(
                        "POST", call.url, json=call.body,
                        headers={**call.headers, "accept": "text/event-stream"},
                    )
                )
                if response.status_code >= 400:
                    raw = await response.aread()
                    raise self._status_error(response, raw, call)
                content_type = response.headers.get("content-type", "").partition(";")[0]
                if "text/event-stream" not in content_type:
                    raise ProviderError(
                        f"{who}: the server did not answer with an event stream: Expected "
                        "response header Content-Type to contain 'text/event-stream', got "
                        f"{content_type!r}",
                        provider=self.provider, model=call.model,
                    )
                chunks = body_chunks(response)
                stack.push_async_callback(chunks.aclose)
                parser, decoder = SSEParser(), call.decoder()
                first: list[Delta] = []
                backlog: list[ServerSentEvent] = []
                while not first:
                    # This whole phase is under the attempt's deadline scope: no other.
                    chunk = await self._next_chunk(chunks, who, math.inf, math.inf)
                    if chunk is None:
                        first = decoder.end()
                        if not first and not decoder.complete:
                            raise ProviderError(
                                f"{who}: the stream ended before any reply.",
                                provider=self.provider, model=call.model, retryable=True,
                            )
                        break
                    backlog = parser.feed(chunk)
                    while backlog and not first:
                        first = decoder.feed(backlog.pop(0))
            if scope.cancelled_caught:
                raise self._deadline_error(call)
            return _OpenStream(stack, chunks, parser, decoder, first, backlog)
        except ProviderError as exc:
            await stack.aclose()
            _scrub(exc, call.secrets)
            raise
        except httpx.TimeoutException as exc:
            await stack.aclose()
            raise ProviderTimeout(
                f"{who}: {_timeout_phase(exc, self.limits)}.",
                provider=self.provider, model=call.model,
            ) from exc
        except httpx.TransportError as exc:
            await stack.aclose()
            url = httpx.URL(call.url)
            where = mask_url(f"{url.scheme}://{url.netloc.decode()}")
            detail = redact(str(exc).rstrip("."), *call.secrets) or type(exc).__name__
            raise ProviderError(
                f"{who}: connection to {where} failed ({detail}).",
                provider=self.provider, model=call.model, retryable=True,
            ) from exc
        except BaseException:
            with anyio.CancelScope(shield=True):
                await stack.aclose()
            raise

    async def _next_chunk(
        self, chunks: ByteChunks, who: str, deadline: float, safe_until: float
    ) -> bytes | None:
        """The next piece of the body, None at its end; transport failures become
        `ProviderError`s, the whole-call `deadline` a `ProviderTimeout`.

        No cancel scope per read while the deadline is further away than the read timeout
        (before `safe_until`, in `time.monotonic()`): httpx then ends the read (data, end of
        stream or `ReadTimeout`) before the deadline can pass. Only a read that might outlast
        the deadline is put under one.
        """
        try:
            if time.monotonic() < safe_until:
                return await chunks.__anext__()
            with anyio.CancelScope(deadline=deadline) as scope:
                return await chunks.__anext__()
        except StopAsyncIteration:
            return None
        except httpx.TimeoutException as exc:
            raise ProviderTimeout(
                f"{who}: {_timeout_phase(exc, self.limits)}.",
                provider=self.provider, model=who.partition("/")[2],
            ) from exc
        except httpx.TransportError as exc:
            raise ProviderError(
                f"{who}: the connection was lost mid-stream ({type(exc).__name__}).",
                provider=self.provider, model=who.partition("/")[2], retryable=True,
            ) from exc
        assert scope.cancelled_caught
        raise ProviderTimeout(
            f"{who}: the whole-call deadline of {self.limits.total_timeout:g} s passed.",
            provider=self.provider, model=who.partition("/")[2], retryable=False,
        )

    def _deadline_error(self, call: StreamCall) -> ProviderTimeout:
        return ProviderTimeout(
            f"{self.provider}/{call.model}: the whole-call deadline of "
            f"{self.limits.total_timeout:g} s passed.",
            provider=self.provider, model=call.model, retryable=False,
        )

    def _status_error(
        self, response: httpx.Response, raw: bytes, call: StreamCall
    ) -> ProviderError:
        status = response.status_code
        detail = error_detail(raw, *call.secrets)
        message = f"{self.provider}/{call.model}: HTTP {status}"
        if detail:
            message += f": {detail}"
        if status in (401, 403) and self.key_variable:
            message += f" (check {self.key_variable})"
        return ProviderError(
            redact(message.rstrip("."), *call.secrets) + ".",
            provider=self.provider,
            model=call.model,
            status=status,
            retryable=retryable_status(status),
            retry_after=retry_after_seconds(response.headers),
        )


def _timeout_phase(exc: httpx.TimeoutException, limits: Limits) -> str:
    if isinstance(exc, httpx.ConnectTimeout):
        return f"could not connect within {limits.connect_timeout:g} s"
    if isinstance(exc, httpx.ReadTimeout):
        return f"no data for {limits.read_timeout:g} s (stalled stream)"
    return f"timed out ({type(exc).__name__})"


def _scrub(exc: BaseException, secrets: tuple[SecretStr | str | None, ...]) -> None:
    """Redact the secrets from `exc` and every exception chained to it."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        current.args = tuple(
            redact(arg, *secrets) if isinstance(arg, str) else arg for arg in current.args
        )
        current = current.__cause__ or current.__context__


def _interrupted(exc: ProviderError, received: str) -> StreamInterrupted:
    """The error to raise when `exc` ends a stream that had already delivered text."""
    kind = StreamTimeout if isinstance(exc, ProviderTimeout) else StreamInterrupted
    return kind(
        f"{exc} The stream had delivered {len(received)} characters and is not restarted.",
        received=received,
        provider=exc.provider,
        model=exc.model,
        status=exc.status,
        retryable=False,
    )


_CREDENTIALS_TOLD: set[tuple[str, str]] = set()


def _say_which_credentials(spec: ProviderSpec, base_url: str) -> None:
    """Warn, once per process and provider, that the API key replaces the URL's credentials
    (both would be the `authorization` header)."""
    if (spec.prefix, base_url) in _CREDENTIALS_TOLD:
        return
    _CREDENTIALS_TOLD.add((spec.prefix, base_url))
    key = "the given API key" if spec.key is not None else spec.key_variable
    url = spec.base_url_variable if os.environ.get(spec.base_url_variable) else "base_url"
    log.warning("%s: %s and the user:password@ in %s are both set; the key is sent and the "
                "URL's credentials are not.", spec.prefix, key, url)


class HttpProvider(Provider):
    """What the HTTP providers share: base URL, key, extra headers and one transport (pool)."""

    def __init__(self, spec: ProviderSpec, api_key: SecretStr | None) -> None:
        base_url = spec.resolved_base_url()
        if not base_url:
            raise ConfigError(
                f"Provider {spec.prefix!r} has no base URL: set {spec.base_url_variable} "
                "or base_url in its config."
            )
        self.name = spec.prefix
        base_url, password, basic = split_credentials(base_url)
        self.base_url = base_url.rstrip("/")
        self._extra_headers = header_option(spec.options)
        if basic:  # `user:password@` in the URL: a header, so no logged URL holds the password
            self._extra_headers = {"authorization": basic, **self._extra_headers}
        self._secrets = (api_key, password, *self._extra_headers.values())
        """Scrubbed from every message: the key, a URL password, extra header values."""
        self._api_key = api_key
        self._transport = HttpTransport(
            spec.prefix, spec.limits, key_variable=spec.key_variable,
            secure=not self.base_url.lower().startswith("http://"),
        )
        key_headers = map(str.lower, self.auth_headers("key"))
        if basic and api_key is not None and "authorization" in key_headers:
            _say_which_credentials(spec, self.base_url)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(prefix={self.name!r}, base_url={self.base_url!r})"

    @property
    def secrets(self) -> Secrets:
        """What every message about this provider is scrubbed of."""
        return self._secrets

    @property
    def transport(self) -> HttpTransport:
        return self._transport

    def auth_headers(self, key: str) -> dict[str, str]:
        """The headers that carry the API key (and any other per-vendor headers)."""
        raise NotImplementedError

    async def post_stream(
        self, path: str, model: str, body: dict[str, Any], decoder: Callable[[], EventDecoder],
        on_retry: Callable[[int, str], None] | None = None,
    ) -> AsyncIterator[Delta]:
        """POST `body` to `path` and yield the decoded deltas (retries, limits, timeouts)."""
        key = self._api_key.get_secret_value() if self._api_key is not None else ""
        call = StreamCall(
            url=f"{self.base_url}{path}",
            model=model,
            body=body,
            headers={**self._extra_headers, **self.auth_headers(key)},
            decoder=decoder,
            secrets=self._secrets,
            on_retry=on_retry,
        )
        async with aclosing(self._transport.stream(call)) as deltas:
            async for delta in deltas:
                yield delta

    async def aclose(self) -> None:
        await self._transport.aclose()
