"""A drop-in wrapper for the official `openai` client (extra `moa-stack[openai]`).

    client = moa.wrap(openai.OpenAI())            # or moa.OpenAI(...), moa.AsyncOpenAI(...)
    client.chat.completions.create(model="moa-lite", messages=[...])      # runs the mixture
    client.chat.completions.create(model="gpt-4o-mini", messages=[...])   # plain pass-through

A `model` names a mixture when it is registered with the wrapper (`mixtures=`), a preset, or
`moa/<name>`. Everything else — other models, other endpoints, attributes — goes to the wrapped
client untouched. Mixtures reach the wrapped client's server and key through the provider
prefix `client/` (e.g. `client/gpt-4o-mini` in a mixture config); other prefixes resolve as usual.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
from pydantic import SecretStr

from moa.config import PRESETS, MixtureConfig, load
from moa.errors import MoaError
from moa.events import Event
from moa.mixture import Mixture
from moa.openai.responses import ResponseEvents, parse_responses, response_object
from moa.openai.responses import new_id as new_response_id
from moa.openai.wire import (
    ChatCall,
    ChunkStream,
    Refused,
    RequestError,
    completion,
    failure,
    parse_request,
)
from moa.providers.registry import ProviderSpec, Registry

CLIENT_PREFIX = "client"
TRANSPORT_OPTIONS = ("extra_headers", "extra_query", "timeout")


def _given(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The arguments actually passed (the SDK's NOT_GIVEN / omit sentinels dropped)."""
    import openai

    return {k: v for k, v in kwargs.items() if not isinstance(v, openai.NotGiven | openai.Omit)}


class _Router:
    """Decides which `create` calls are mixtures, and runs them."""

    def __init__(self, client: Any, mixtures: dict[str, Any] | None) -> None:
        self.registry = Registry()
        key = getattr(client, "api_key", None)
        self.registry.register(ProviderSpec(
            prefix=CLIENT_PREFIX, base_url=str(client.base_url).rstrip("/"),
            key=SecretStr(key) if key else None, key_required=False,
        ))
        self.mixtures = {
            name: load(cfg, registry=self.registry) for name, cfg in (mixtures or {}).items()
        }
        self.running: dict[str, Mixture] = {}
        """One `Mixture` per name, shared by every call (its pools, its session budget)."""

    def config(self, model: Any) -> MixtureConfig | None:
        if not isinstance(model, str):
            return None
        name = model.removeprefix("moa/")
        if name in self.mixtures:
            return self.mixtures[name]
        if name in PRESETS:
            return load(name)
        if model.startswith("moa/"):
            raise RequestError(f"No mixture named {name!r}; presets: {', '.join(PRESETS)}.")
        return None

    def call(
        self, kwargs: dict[str, Any], parse: Callable[[Any], ChatCall] = parse_request
    ) -> ChatCall:
        """The SDK call's arguments as a checked request (chat completions by default)."""
        body = _given(kwargs)
        for name in TRANSPORT_OPTIONS:
            if body.pop(name, None) is not None:
                raise RequestError(f"'{name}' is not supported for a mixture call.", name)
        body.update(body.pop("extra_body", None) or {})
        return parse(body)

    def mixture(self, model: Any) -> Mixture | None:
        """The mixture `model` names, or None when it names none (a plain model)."""
        config = self.config(model)
        if config is None:
            return None
        name = model.removeprefix("moa/")
        if name not in self.running:
            self.running[name] = Mixture(config, registry=self.registry)
        return self.running[name]

    async def aclose(self) -> None:
        """Close this event loop's connections of every mixture used."""
        for mixture in list(self.running.values()):
            await mixture.aclose()
        await self.registry.aclose()


def _is_client(value: Any) -> bool:
    import openai

    return isinstance(value, openai.OpenAI | openai.AsyncOpenAI)


def _sdk_error(err: Exception, model: str = "") -> Exception:
    """`err` as the SDK's own exception class for the status `moa serve` would answer (e.g.
    `openai.BadRequestError` for a 400), still an instance of `err`'s class (`.partial` kept)."""
    if isinstance(err, RequestError):
        refused = Refused(400, str(err), param=err.param)
    else:
        refused = failure(model, err)
    body = refused.body()
    request = httpx.Request("POST", "http://moa.invalid/v1/chat/completions")
    response = httpx.Response(refused.status, json=body, request=request)
    error = _sdk_class(refused.status, type(err))(str(err), response=response, body=body["error"])
    error.partial = getattr(err, "partial", None)  # type: ignore[attr-defined]
    error.param = refused.param  # type: ignore[attr-defined]
    return error


@functools.cache
def _sdk_class(status: int, kind: type[Exception]) -> type[Exception]:
    """The SDK's class for `status`, also a `kind` (so `except MixtureError` still works)."""
    import openai

    base = {400: openai.BadRequestError, 401: openai.AuthenticationError,
            403: openai.PermissionDeniedError, 404: openai.NotFoundError,
            429: openai.RateLimitError}.get(status)
    if base is None:
        base = openai.InternalServerError if status >= 500 else openai.APIStatusError
    return type(base.__name__, (base, kind), {"__module__": __name__})


def _chunk(data: dict[str, Any]) -> Any:
    from openai.types.chat import ChatCompletionChunk

    return ChatCompletionChunk.model_validate(data)


Translate = Callable[[Event], list[dict[str, Any]]]


class MixtureStream:
    """A stream of SDK objects (`ChatCompletionChunk`s, or Responses stream events), used like
    the SDK's `Stream` (iterator, `with`)."""

    def __init__(self, mixture: Mixture, call: ChatCall, translate: Translate,
                 build: Callable[[dict[str, Any]], Any]) -> None:
        self._events = mixture.stream_sync(call.messages, **call.overrides)
        self._model, self._translate, self._build = call.model, translate, build

    def __iter__(self) -> Iterator[Any]:
        with _as_sdk_errors(self._model):
            for event in self._events:
                for data in self._translate(event):
                    yield self._build(data)

    def close(self) -> None:
        self._events.close()  # type: ignore[attr-defined]

    @property
    def response(self) -> MixtureStream:
        """What the SDK's stream helpers close when they are done (the stream itself)."""
        return self

    def __enter__(self) -> MixtureStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncMixtureStream:
    """The async `MixtureStream`, used like the SDK's `AsyncStream`."""

    def __init__(self, mixture: Mixture, call: ChatCall, translate: Translate,
                 build: Callable[[dict[str, Any]], Any]) -> None:
        self._events = mixture.stream(call.messages, **call.overrides)
        self._model, self._translate, self._build = call.model, translate, build

    async def __aiter__(self) -> AsyncIterator[Any]:
        with _as_sdk_errors(self._model):
            async for event in self._events:
                for data in self._translate(event):
                    yield self._build(data)

    async def close(self) -> None:
        await self._events.aclose()  # type: ignore[attr-defined]

    aclose = close

    @property
    def response(self) -> AsyncMixtureStream:
        """What the SDK's stream helpers close when they are done (the stream itself)."""
        return self

    async def __aenter__(self) -> AsyncMixtureStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _named_model(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The model a resource call addresses: `model=`, or `body={"model": ...}` (raw `post`)."""
    body = kwargs.get("body")
    return kwargs.get("model") or (body.get("model") if isinstance(body, dict) else None)


class _Proxy:
    """Forwards every attribute it does not define to `_target`; a call (at any depth: any
    resource, `with_raw_response`, `with_streaming_response`, `beta`, raw `post`) that names a
    mixture and is not served by a method defined here is refused, never sent upstream."""

    def __init__(self, target: Any, router: _Router) -> None:
        self._target, self._router = target, router

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._target, name)
        if not callable(value):
            if type(value).__module__.startswith("openai."):  # a sub-resource: guard it too
                return _Proxy(value, self._router)
            return value
        if isinstance(value, type):
            return value

        def guarded(*args: Any, **kwargs: Any) -> Any:
            model = _named_model(args, kwargs)
            if self._router.mixture(model) is not None:
                raise _sdk_error(RequestError(
                    f"{name}() cannot run the mixture {model!r}: use chat.completions.create, "
                    ".parse or .stream, or responses.create.", "model"))
            result = value(*args, **kwargs)
            if _is_client(result):  # with_options() / copy(): a new client, wrapped alike
                return WrappedClient(result, router=self._router)
            return result

        return guarded


class _Resource(_Proxy):
    """A guarded SDK resource whose mixture calls run here (sync or async like the client)."""

    def __init__(self, target: Any, router: _Router, is_async: bool) -> None:
        super().__init__(target, router)
        self._async = is_async

    def _stream(self, mixture: Mixture, call: ChatCall, translate: Translate,
                build: Callable[[dict[str, Any]], Any]) -> Any:
        if self._async:
            return _ready(AsyncMixtureStream(mixture, call, translate, build))
        return MixtureStream(mixture, call, translate, build)

    def _run(self, mixture: Mixture, call: ChatCall, finish: Callable[[Any], Any]) -> Any:
        """Run `call` to the end and return `finish(result)` (awaitable on an async client)."""
        if self._async:
            return self._arun(mixture, call, finish)
        with _as_sdk_errors(call.model):
            result = mixture.run_sync(call.messages, **call.overrides)
        return finish(result)

    async def _arun(self, mixture: Mixture, call: ChatCall, finish: Callable[[Any], Any]) -> Any:
        with _as_sdk_errors(call.model):
            result = await mixture.run(call.messages, **call.overrides)
        return finish(result)


class _Responses(_Resource):
    """`responses.create` on a mixture: the Responses API (`moa.openai.responses`)."""

    def create(self, **kwargs: Any) -> Any:
        from openai.types.responses import Response, ResponseStreamEvent
        from pydantic import TypeAdapter

        with _as_sdk_errors():
            mixture = self._router.mixture(kwargs.get("model"))
            if mixture is None:
                return self._target.create(**kwargs)
            call = self._router.call(kwargs, parse_responses)
        response_id = new_response_id()
        if call.stream:
            events = TypeAdapter(ResponseStreamEvent)
            return self._stream(mixture, call, ResponseEvents(call, response_id).feed,
                                events.validate_python)
        return self._run(mixture, call, lambda result: Response.model_validate(
            response_object(result, call, response_id)))


class _Completions(_Resource):

    def create(self, **kwargs: Any) -> Any:
        with _as_sdk_errors():
            mixture = self._router.mixture(kwargs.get("model"))
            if mixture is None:
                return self._target.create(**kwargs)
            call = self._router.call(kwargs)
        if call.stream:
            return self._stream(mixture, call,
                                ChunkStream(call.model, call.include_usage).feed, _chunk)
        return self._run(mixture, call, lambda result: _completion(result, call.model))

    def _typed(self, kwargs: dict[str, Any], stream: bool) -> tuple[ChatCall, Any, Any]:
        """The call of `parse` / `stream`, whose `response_format` may be a pydantic model;
        with the format and the tools as the SDK's parsing helpers want them."""
        from openai.lib._parsing import type_to_response_format_param, validate_input_tools

        body = _given(kwargs)
        response_format = body.get("response_format", _omit())
        tools = validate_input_tools(body["tools"]) if "tools" in body else _omit()
        if "response_format" in body:
            body["response_format"] = type_to_response_format_param(response_format)
        return self._router.call({**body, "stream": stream}), response_format, tools

    def parse(self, **kwargs: Any) -> Any:
        """`chat.completions.parse`: `response_format` may be a pydantic model; the answer
        comes back as a `ParsedChatCompletion` (its `message.parsed` a model instance)."""
        from openai.lib._parsing import parse_chat_completion

        with _as_sdk_errors():
            mixture = self._router.mixture(kwargs.get("model"))
            if mixture is None:
                return self._target.parse(**kwargs)
            call, response_format, tools = self._typed(kwargs, stream=False)

        def parsed(result: Any) -> Any:
            return parse_chat_completion(response_format=response_format, input_tools=tools,
                                         chat_completion=_completion(result, call.model))

        return self._run(mixture, call, parsed)

    def stream(self, **kwargs: Any) -> Any:
        """`chat.completions.stream`: the SDK's stream manager (content / tool-call events,
        `get_final_completion()` parsed like `parse`) over the mixture's chunks."""
        from openai.lib.streaming.chat import (
            AsyncChatCompletionStreamManager,
            ChatCompletionStreamManager,
        )

        with _as_sdk_errors():
            mixture = self._router.mixture(kwargs.get("model"))
            if mixture is None:
                return self._target.stream(**kwargs)
            call, response_format, tools = self._typed(kwargs, stream=True)
        chunks = ChunkStream(call.model, call.include_usage).feed
        if self._async:
            return AsyncChatCompletionStreamManager(
                self._stream(mixture, call, chunks, _chunk),
                response_format=response_format, input_tools=tools)
        return ChatCompletionStreamManager(
            lambda: self._stream(mixture, call, chunks, _chunk),
            response_format=response_format, input_tools=tools)


async def _ready(value: Any) -> Any:
    return value


@contextlib.contextmanager
def _as_sdk_errors(model: str = "") -> Iterator[None]:
    """Raise moa's refusals and failures as the SDK's exception classes."""
    try:
        yield
    except MoaError as err:
        raise _sdk_error(err, model) from err


def _omit() -> Any:
    import openai

    return openai.omit if hasattr(openai, "omit") else openai.NOT_GIVEN


def _completion(result: Any, model: str) -> Any:
    from openai.types.chat import ChatCompletion

    return ChatCompletion.model_validate(completion(result, model))


class _Chat(_Proxy):
    def __init__(self, target: Any, router: _Router, is_async: bool) -> None:
        super().__init__(target, router)
        self.completions = _Completions(target.completions, router, is_async)


class WrappedClient(_Proxy):
    """An `openai.OpenAI` / `openai.AsyncOpenAI` whose chat completions can run mixtures."""

    def __init__(
        self, client: Any, mixtures: dict[str, Any] | None = None, *, router: _Router | None = None
    ) -> None:
        import openai

        super().__init__(client, router or _Router(client, mixtures))
        self._async = isinstance(client, openai.AsyncOpenAI)
        self.chat = _Chat(client.chat, self._router, self._async)
        self.responses = _Responses(client.responses, self._router, self._async)
        beta = getattr(client, "beta", None)
        if beta is not None and hasattr(beta, "chat"):  # beta.chat.completions.parse, older SDKs
            self.beta = _Proxy(beta, self._router)
            self.beta.chat = _Chat(beta.chat, self._router, self._async)

    def __repr__(self) -> str:
        return f"moa.wrap({type(self._target).__name__}(base_url={str(self._target.base_url)!r}))"

    @property
    def registry(self) -> Registry:
        """The registry mixtures of this client use (with the `client/` prefix)."""
        return self._router.registry

    def close(self) -> Any:
        """Close the wrapped client and the mixtures' connections (await it on an async client).

        Concurrent calls share the mixtures' connection pools; they stay open until this.
        """
        if self._async:
            return self._aclose()
        self._target.close()  # a sync client's mixture calls close their own (per-call) pools
        return None

    async def _aclose(self) -> None:
        await self._router.aclose()
        await self._target.close()

    def __enter__(self) -> WrappedClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> WrappedClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._aclose()


def wrap(client: Any, mixtures: dict[str, Any] | None = None) -> WrappedClient:
    """Wrap an existing `openai.OpenAI` or `openai.AsyncOpenAI` client.

    `mixtures` maps extra model names to mixtures (a preset name, a file path, a dict or a
    `MixtureConfig`).
    """
    return WrappedClient(client, mixtures)


def OpenAI(*args: Any, mixtures: dict[str, Any] | None = None, **kwargs: Any) -> WrappedClient:
    """`openai.OpenAI(...)`, wrapped: same arguments, plus `mixtures`."""
    import openai

    return wrap(openai.OpenAI(*args, **kwargs), mixtures)


def AsyncOpenAI(*args: Any, mixtures: dict[str, Any] | None = None, **kwargs: Any) -> WrappedClient:
    """`openai.AsyncOpenAI(...)`, wrapped: same arguments, plus `mixtures`."""
    import openai

    return wrap(openai.AsyncOpenAI(*args, **kwargs), mixtures)
