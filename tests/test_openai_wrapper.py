"""`moa.wrap` around the official `openai` client, against the loopback server."""

from __future__ import annotations

from collections.abc import Iterator

import anyio
import openai
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

import moa
from moa.openai.wire import RequestError
from moa.testing import LoopbackServer, ModelBehavior

AGG = "All three agree: it is blue."
HI = [{"role": "user", "content": "Sky colour?"}]
KEY = "sk-wrapped-client-key-123"
TEAM = {
    "mode": "layered",
    "layers": [{"agents": [{"model": "client/a"}, {"model": "client/b"}]}],
    "aggregator": {"model": "client/agg"},
}


@pytest.fixture
def srv() -> Iterator[LoopbackServer]:
    behaviors = {
        "a": ModelBehavior(reply="Blue."),
        "b": ModelBehavior(reply="Blue, by Rayleigh scattering."),
        "agg": ModelBehavior(reply=AGG),
        "plain": ModelBehavior(reply="Just one model."),
    }
    with LoopbackServer(behaviors) as server:
        yield server


def wrapped(srv: LoopbackServer) -> moa.openai.client.WrappedClient:
    return moa.OpenAI(base_url=srv.base_url, api_key=KEY, max_retries=0,
                      mixtures={"team": TEAM})


def test_mixture_call_returns_a_chat_completion(srv: LoopbackServer) -> None:
    client = wrapped(srv)
    response = client.chat.completions.create(
        model="team", messages=HI, temperature=0.1, max_tokens=50, seed=7,  # type: ignore[arg-type]
    )
    assert isinstance(response, ChatCompletion)
    assert response.choices[0].message.content == AGG
    assert response.usage is not None and response.usage.total_tokens > 0
    assert sorted(r.model for r in srv.requests) == ["a", "agg", "b"]
    final = next(r for r in srv.requests if r.model == "agg")
    assert final.body["temperature"] == 0.1 and final.body["max_tokens"] == 50
    assert final.body["seed"] == 7
    assert all(r.headers.get("authorization") == f"Bearer {KEY}" for r in srv.requests)


def test_streaming_like_the_sdk_stream(srv: LoopbackServer) -> None:
    client = wrapped(srv)
    with client.chat.completions.create(
        model="moa/team", messages=HI, stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True},
    ) as stream:
        chunks = list(stream)
    assert all(isinstance(c, ChatCompletionChunk) for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == AGG
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_async_client(srv: LoopbackServer) -> None:
    async def main() -> tuple[str, str]:
        client = moa.AsyncOpenAI(base_url=srv.base_url, api_key=KEY, mixtures={"team": TEAM})
        response = await client.chat.completions.create(model="team", messages=HI)  # type: ignore[arg-type]
        stream = await client.chat.completions.create(model="team", messages=HI, stream=True)  # type: ignore[arg-type]
        parts = []
        async with stream:
            async for chunk in stream:
                parts.append(chunk.choices[0].delta.content or "" if chunk.choices else "")
        await client.close()
        return response.choices[0].message.content or "", "".join(parts)

    assert anyio.run(main) == (AGG, AGG)


def test_other_models_and_attributes_pass_through(srv: LoopbackServer) -> None:
    client = wrapped(srv)
    response = client.chat.completions.create(model="plain", messages=HI)  # type: ignore[arg-type]
    assert response.choices[0].message.content == "Just one model."
    assert [r.model for r in srv.requests] == ["plain"]
    assert client.models.list().data  # an endpoint the wrapper does not touch
    assert client.base_url == openai.OpenAI(base_url=srv.base_url, api_key="x").base_url


@pytest.mark.parametrize(
    ("extra", "needle"),
    [({"n": 129}, "'n' must be an integer from 1 to 128"),
     ({"tools": [{"type": "function"}]}, "tools must be a list"),
     ({"top_logprobs": 2}, "'top_logprobs' needs 'logprobs'"),
     ({"extra_headers": {"x": "1"}}, "extra_headers")],
)
def test_unsupported_fields_are_rejected_not_dropped(
    srv: LoopbackServer, extra: dict, needle: str
) -> None:
    with pytest.raises(RequestError, match=needle):
        wrapped(srv).chat.completions.create(model="team", messages=HI, **extra)  # type: ignore[arg-type]
    assert not srv.requests


def test_unknown_moa_name_is_a_clear_error(srv: LoopbackServer) -> None:
    with pytest.raises(RequestError, match="No mixture named 'nope'"):
        wrapped(srv).chat.completions.create(model="moa/nope", messages=HI)  # type: ignore[arg-type]


def test_the_key_never_shows(srv: LoopbackServer) -> None:
    client = wrapped(srv)
    spec = client.registry.spec("client")
    assert KEY not in repr(client) and KEY not in repr(spec) and KEY not in str(spec)
    assert KEY not in spec.model_dump_json()


def _sdk_methods(resource: object, path: str) -> list[str]:
    """Dotted paths of the public methods of `resource` (an SDK object) that take `model`,
    with those of its raw / streaming response views."""
    import inspect

    found = []
    for name in dir(resource):
        if name.startswith("_"):
            continue
        value = getattr(resource, name)
        if name in ("with_raw_response", "with_streaming_response"):
            found += _sdk_methods(value, f"{path}.{name}")
        elif callable(value) and not isinstance(value, type):
            try:
                params = inspect.signature(value).parameters
            except (TypeError, ValueError):
                continue
            if "model" in params or name in ("post", "request"):
                found.append(f"{path}.{name}")
    return found


def _resolve(root: object, path: str) -> object:
    for part in path.split(".")[1:]:
        root = getattr(root, part)
    return root


def _sdk_paths(plain: object) -> list[str]:
    """Every SDK method that can address a mixture: on the client, chat, completions,
    responses and beta (with their raw / streaming response views)."""
    paths = _sdk_methods(plain, "client")
    for name in ("chat", "completions", "responses", "beta"):
        resource = getattr(plain, name, None)
        paths += _sdk_methods(resource, f"client.{name}") if resource is not None else []
        chat = getattr(getattr(resource, "chat", None), "completions", None)
        paths += _sdk_methods(chat, f"client.{name}.chat.completions") if chat else []
    paths += _sdk_methods(plain.chat.completions, "client.chat.completions")  # type: ignore[attr-defined]
    return sorted(set(paths))


def _arguments(path: str) -> tuple[tuple[object, ...], dict[str, object]]:
    kwargs = {"input": "Sky colour?"} if ".responses." in path else {"messages": HI}
    if path.endswith((".post", ".request")):
        return ("/chat/completions",), {"body": {"model": "team", **kwargs}, "cast_to": object}
    return (), {"model": "team", **kwargs}


def _check_sdk_coverage(srv: LoopbackServer, ran: list[str], refused: list[str]) -> None:
    assert {"client.chat.completions.create", "client.chat.completions.parse",
            "client.chat.completions.stream", "client.responses.create"} <= set(ran)
    assert "client.chat.completions.with_raw_response.create" in refused
    assert "client.post" in refused and len(refused) >= 6
    assert not [r for r in srv.requests if r.model == "team"]
    assert len([r for r in srv.requests if r.model == "agg"]) == len(ran), "each one ran"


def test_no_sdk_method_bypasses_a_mixture(srv: LoopbackServer) -> None:
    """Enumerates the SDK: every method that takes `model` either runs the mixture or refuses
    with the SDK's BadRequestError; nothing ever reaches the upstream as model "team"."""
    plain, client = openai.OpenAI(api_key="x", base_url=srv.base_url), wrapped(srv)
    ran, refused = [], []
    for path in _sdk_paths(plain):
        args, kwargs = _arguments(path)
        try:
            out = _resolve(client, path)(*args, **kwargs)  # type: ignore[operator]
            if hasattr(out, "__enter__"):  # a stream or a stream manager: read it to the end
                with out as stream:
                    list(stream)
        except openai.BadRequestError as err:
            assert "cannot run the mixture" in str(err) or "Unsupported" in str(err), path
            refused.append(path)
        else:
            ran.append(path)
    _check_sdk_coverage(srv, ran, refused)
    if hasattr(plain, "beta") and hasattr(plain.beta, "chat"):
        assert "client.beta.chat.completions.parse" in ran
    # with_options() returns a client that is wrapped alike.
    other = client.with_options(timeout=5)
    assert other.chat.completions.create(model="team", messages=HI).choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="cannot run the mixture"):
        other.chat.completions.with_raw_response.create(model="team", messages=HI)


def test_no_async_sdk_method_bypasses_a_mixture(srv: LoopbackServer) -> None:
    """The same enumeration on a wrapped `AsyncOpenAI`: every method runs or refuses."""
    plain = openai.AsyncOpenAI(api_key="x", base_url=srv.base_url)
    client = moa.AsyncOpenAI(base_url=srv.base_url, api_key=KEY, max_retries=0,
                             mixtures={"team": TEAM})

    async def main() -> tuple[list[str], list[str]]:
        ran, refused = [], []
        for path in _sdk_paths(plain):
            args, kwargs = _arguments(path)
            try:
                out = _resolve(client, path)(*args, **kwargs)  # type: ignore[operator]
                if hasattr(out, "__await__"):
                    out = await out
                if hasattr(out, "__aenter__"):
                    async with out as stream:
                        async for _ in stream:
                            pass
            except openai.BadRequestError as err:
                assert "cannot run the mixture" in str(err) or "Unsupported" in str(err), path
                refused.append(path)
            else:
                ran.append(path)
        await client.close()
        await plain.close()
        return ran, refused

    ran, refused = anyio.run(main)
    _check_sdk_coverage(srv, ran, refused)


def test_refusals_are_the_sdks_exception_classes(srv: LoopbackServer) -> None:
    from moa.errors import AggregatorFailed

    client = wrapped(srv)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="team", messages=HI, n=0)
    assert caught.value.status_code == 400 and caught.value.body["param"] == "n"
    srv.set_behavior("agg", ModelBehavior(fail_status=400))
    with pytest.raises(openai.InternalServerError) as failed:
        client.chat.completions.create(model="team", messages=HI)
    assert failed.value.status_code == 502 and isinstance(failed.value, AggregatorFailed)
    assert failed.value.partial is not None and failed.value.partial.outputs[0].text == "Blue."
