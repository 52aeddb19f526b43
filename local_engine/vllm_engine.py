"""The embedded GPU engine: vLLM's in-process async engine (`vllm/<hf-model-or-path>`).

- One engine per model and engine options, loaded once per process and shared by every agent
  that names it. It lives on its own event-loop thread: vLLM's engine binds its output loop to
  the loop it starts on, while callers (`Mixture.run_sync`, notebooks) may come from many loops.
- The chat template is the model tokenizer's (`apply_chat_template`); with `continue_final`
  the last assistant message is continued (`continue_final_message=True`), which staircase
  streaming needs.
- Tools: a chat template that knows tools (its source mentions `tools`: Qwen2.5, Llama 3.1,
  Hermes, ...) gets them natively (`tools=`, assistant `tool_calls` with arguments as objects,
  `tool` turns); any other template gets the text convention of `tools.py`. A forced call
  (tool_choice "required" or named) is constrained by structured outputs to a bare JSON call
  `{"name", "arguments"}`; with "auto" a reply that starts with `<tool_call>` (the Qwen/Hermes
  convention) is parsed into calls; with "none" the tools are not given to the template.
- `response_format` becomes a structured-outputs constraint (`StructuredOutputsParams`, or
  `GuidedDecodingParams` in releases before 0.10.2), which then rules out an "auto" call.
  vLLM starts a constraint at the first generated token, so a continued reply cannot have one.
- `n > 1` is one request: vLLM samples the choices from one prompt (prefix caching shares its
  KV cache); each choice streams under its own index with its own finish reason and usage.
- Outputs are cumulative; the deltas are their new suffixes per choice index.
- Closing the stream (cancellation, client disconnect) aborts the request in the engine.
- Engine options (`ProviderSpec.options`) go to `AsyncEngineArgs`: `gpu_memory_utilization`,
  `max_model_len`, `tensor_parallel_size`, `dtype`, ...; `enable_prefix_caching` is on.
- Every failure ends in one sentence naming the cause and the next step (`load_failure`,
  `request_failure`): no GPU, a model missing from an offline cache, a rejected option, and
  the cause behind vLLM's message-less `EngineGenerateError`.

The adapter logic is in plain functions (`render_prompt`, `sampling_kwargs`, `constraint`,
`ChoiceTracker`, `to_logprobs`) so it is tested on the CPU; vllm and torch are imported only
by `load_vllm`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import inspect
import json
import os
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
from pydantic import SecretStr

from moa.errors import ConfigError, MoaError, ProviderError
from moa.providers.base import (
    Capabilities,
    ChatRequest,
    Delta,
    Message,
    Provider,
    TokenLogprob,
    Usage,
)
from moa.providers.registry import ProviderSpec

from .tools import (
    ToolCallSplitter,
    ToolPlan,
    call_schema,
    format_schema,
    render_tool_turns,
    text_of,
    tool_plan,
)

ENGINE_DEFAULTS: dict[str, Any] = {"enable_prefix_caching": True, "disable_log_stats": True}
NO_GPU = (
    "vLLM needs a CUDA GPU and found none on this machine; `local/` models run on the CPU "
    'instead, e.g. moa chat -p local/smollm2 -a local/smollm2 "Hello"'
)
OFFLINE_NAMES = {"LocalEntryNotFoundError", "OfflineModeIsEnabled"}
"""huggingface_hub's exceptions for a file that offline mode keeps it from downloading."""
VALIDATION_NAMES = {"VLLMValidationError", "VLLMClientError"}
"""vLLM's exceptions for a request it refuses (newer releases no longer derive them from
ValueError)."""


@dataclass
class VLLMBackend:
    """A loaded engine and what the adapter needs from it."""

    engine: Any
    """`vllm.v1.engine.async_llm.AsyncLLM` (or anything with `generate` and `abort`)."""
    tokenizer: Any
    max_model_len: int
    sampling_params: Callable[..., Any]
    """`vllm.SamplingParams`."""
    structured: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    """`SamplingParams` keywords for a `constraint` (see `structured_outputs`)."""


Loader = Callable[[str, dict[str, Any]], Coroutine[Any, Any, VLLMBackend]]


async def load_vllm(model: str, options: dict[str, Any]) -> VLLMBackend:
    """Start vLLM's async engine for `model` (a Hugging Face id or a local path)."""
    from vllm import AsyncEngineArgs, SamplingParams
    from vllm.platforms import current_platform
    from vllm.v1.engine.async_llm import AsyncLLM

    if not current_platform.device_type:
        # No device found: torch would fail later with "Device string must not be empty".
        raise ConfigError(f"{NO_GPU}.")
    try:
        args = AsyncEngineArgs(model=model, **{**ENGINE_DEFAULTS, **options})
    except TypeError as err:
        raise ConfigError(f"Unknown vLLM engine option: {_sentence(err)}.") from None
    engine = AsyncLLM.from_engine_args(args)
    tokenizer = engine.get_tokenizer()
    if inspect.isawaitable(tokenizer):  # a coroutine in older vLLM releases
        tokenizer = await tokenizer
    return VLLMBackend(
        engine, tokenizer, engine.model_config.max_model_len, SamplingParams, structured_outputs()
    )


def structured_outputs() -> Callable[[dict[str, Any]], dict[str, Any]]:
    """The installed vLLM's way to pass a constraint ({"json": schema} or {"json_object":
    True}) to `SamplingParams`: `structured_outputs=StructuredOutputsParams(...)` since 0.10.2,
    `guided_decoding=GuidedDecodingParams(...)` before."""
    from vllm import sampling_params

    if hasattr(sampling_params, "StructuredOutputsParams"):
        params = sampling_params.StructuredOutputsParams
        return lambda constraint: {"structured_outputs": params(**constraint)}
    guided = sampling_params.GuidedDecodingParams
    return lambda constraint: {"guided_decoding": guided(**constraint)}


class EngineHost:
    """A backend loaded and served on a dedicated event-loop thread."""

    def __init__(self, build: Coroutine[Any, Any, VLLMBackend]) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="moa-vllm", daemon=True)
        self.thread.start()
        self.ready: concurrent.futures.Future[VLLMBackend] = self.submit(build)

    def submit(self, coro: Coroutine[Any, Any, Any]) -> concurrent.futures.Future[Any]:
        """Run `coro` on the engine's loop."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self) -> None:
        """Shut the engine down and end the thread."""
        if self.ready.done() and self.ready.exception() is None:
            shutdown = getattr(self.ready.result().engine, "shutdown", None)
            if shutdown is not None:
                self.loop.call_soon_threadsafe(shutdown)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)


_HOSTS: dict[tuple[Any, ...], EngineHost] = {}
_HOSTS_LOCK = threading.Lock()


def engine_host(model: str, options: dict[str, Any], loader: Loader) -> EngineHost:
    """The process-wide host of `model` with these engine options (started on first use)."""
    key = (loader, model, repr(sorted(options.items())))  # option values may be unhashable
    with _HOSTS_LOCK:
        host = _HOSTS.get(key)
        if host is None:
            host = _HOSTS[key] = EngineHost(loader(model, dict(options)))
        return host


def shutdown_engines() -> None:
    """Release every engine of this process (GPU memory included)."""
    with _HOSTS_LOCK:
        hosts = list(_HOSTS.values())
        _HOSTS.clear()
    for host in hosts:
        host.stop()


def _sentence(err: BaseException | str) -> str:
    """An exception's text as the end of a sentence (no trailing period: one is added)."""
    return str(err).strip().rstrip(".").strip() or type(err).__name__


def _chain(err: BaseException) -> list[BaseException]:
    """`err` and the exceptions behind it (`__cause__`, else `__context__`), outermost first."""
    chain: list[BaseException] = []
    current: BaseException | None = err
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _root(err: BaseException) -> BaseException:
    """The first exception in the chain that says something (vLLM re-raises a request's
    failure as `EngineGenerateError()`, whose message is empty)."""
    return next((e for e in _chain(err) if str(e).strip()), err)


def load_failure(err: BaseException, model: str) -> ConfigError:
    """One sentence for an engine that could not start for `model`."""
    chain = _chain(err)
    offline = os.environ.get("HF_HUB_OFFLINE") and any(isinstance(e, OSError) for e in chain)
    if offline or {type(e).__name__ for e in chain} & OFFLINE_NAMES:
        return ConfigError(
            f"{model!r} is not in the Hugging Face cache and HF_HUB_OFFLINE is set: download it "
            f"once with network access (hf download {model}), unset HF_HUB_OFFLINE, or name a "
            "local model folder (vllm//path/to/model)."
        )
    root = _root(err)
    return ConfigError(f"vLLM could not load {model!r}: {type(root).__name__}: {_sentence(root)}.")


def request_failure(err: BaseException, model: str) -> MoaError:
    """One sentence for a request vLLM refused (a ConfigError) or failed on (ProviderError)."""
    root = _root(err)
    refused = isinstance(root, (TypeError, ValueError)) or any(
        c.__name__ in VALIDATION_NAMES for c in type(root).__mro__
    )
    if refused:
        return ConfigError(
            f"vLLM refused the sampling options for {model!r}: {_sentence(root)}; check the "
            "agent's temperature, top_p, max_tokens, logprobs and extra options."
        )
    return ProviderError(
        f"vLLM failed on {model!r}: {type(root).__name__}: {_sentence(root)}.",
        provider="vllm",
        model=model,
    )


def render_prompt(
    tokenizer: Any, messages: list[Message], continue_final: bool, plan: ToolPlan | None = None
) -> list[int]:
    """Prompt token ids from the model's chat template.

    With `continue_final` the last (assistant) message is left open for the model to continue;
    otherwise the generation prompt opens a new assistant turn. The template already holds
    the special tokens (BOS), so none are added again. Tools and tool turns go to a template
    that knows tools natively, to any other one as text (module notes).
    """
    plan = plan or ToolPlan()
    extra: dict[str, Any] = {}
    if knows_tools(tokenizer):
        messages = native_tool_turns(messages)
        if plan.callable:
            extra["tools"] = plan.offered
    else:
        messages = render_tool_turns(messages, plan)
    text = tokenizer.apply_chat_template(
        [dict(m) for m in messages],
        tokenize=False,
        add_generation_prompt=not continue_final,
        continue_final_message=continue_final,
        **extra,
    )
    return list(tokenizer.encode(text, add_special_tokens=False))


def knows_tools(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template renders tools itself."""
    return "tools" in str(getattr(tokenizer, "chat_template", None) or "")


def native_tool_turns(messages: list[Message]) -> list[Message]:
    """Messages for a template that knows tools: call arguments as objects, not JSON text
    (as vLLM's own server passes them; templates write them with `tojson`)."""
    out = []
    for message in messages:
        if message.get("tool_calls"):
            calls = []
            for call in message["tool_calls"]:
                function = dict(call.get("function") or {})
                if isinstance(function.get("arguments"), str):
                    with contextlib.suppress(ValueError):  # else the text as it is
                        function["arguments"] = json.loads(function["arguments"] or "{}")
                calls.append({**call, "function": function})
            message = {**message, "tool_calls": calls}
        out.append(message)
    return out


def constraint(request: ChatRequest, plan: ToolPlan) -> dict[str, Any] | None:
    """The structured-outputs constraint of a request: a forced call's JSON schema, else the
    response format's ({"json": schema} or {"json_object": True}), else None."""
    if plan.forced:
        found: dict[str, Any] | None = {"json": call_schema(plan.callable)}
    else:
        schema = format_schema(request.response_format)
        found = None if schema is None else {"json": schema}
        if (request.response_format or {}).get("type") == "json_object":
            found = {"json_object": True}
    if found is not None and request.continue_final:
        raise ConfigError(
            "vLLM cannot continue a reply under a forced tool call or a response_format (its "
            "constraint starts at the first generated token): send it without continuation."
        )
    return found


def sampling_kwargs(request: ChatRequest, prompt_tokens: int, max_model_len: int) -> dict[str, Any]:
    """`SamplingParams` arguments for a request whose prompt has `prompt_tokens` tokens."""
    room = max_model_len - prompt_tokens
    if room <= 0:
        raise ProviderError(
            f"The prompt has {prompt_tokens} tokens, more than the context of {max_model_len} "
            f"tokens of {request.model}.",
            provider="vllm",
            model=request.model,
        )
    kwargs: dict[str, Any] = {"n": request.n, "max_tokens": min(request.max_tokens or room, room)}
    for name in ("temperature", "top_p", "seed"):
        if (value := getattr(request, name)) is not None:
            kwargs[name] = value
    if request.stop:
        kwargs["stop"] = list(request.stop)
    if request.logprobs:
        kwargs["logprobs"] = request.top_logprobs or 1
    return {**kwargs, **request.extra}


def to_logprobs(
    positions: Sequence[dict[int, Any]], token_ids: Sequence[int], start: int, top: int
) -> list[TokenLogprob]:
    """vLLM sample logprobs (per position: token id -> `Logprob`) from `start` on.

    vLLM returns the sampled token plus the top-k; `top` keeps the k most likely.
    """
    out: list[TokenLogprob] = []
    for i in range(start, min(len(positions), len(token_ids))):
        position = positions[i]
        chosen = position[token_ids[i]]
        best = sorted(position.values(), key=lambda lp: -lp.logprob)[:top]
        out.append(
            TokenLogprob(
                chosen.decoded_token or "",
                float(chosen.logprob),
                [(lp.decoded_token or "", float(lp.logprob)) for lp in best],
            )
        )
    return out


@dataclass
class _Seen:
    chars: int = 0
    tokens: int = 0
    finished: bool = False


@dataclass
class ChoiceTracker:
    """Turns vLLM's cumulative `RequestOutput`s into `Delta`s, one stream per choice index.

    Each choice yields its new text (and logprobs), then its finish reason, then its usage:
    the choice's own completion tokens, with the shared prompt counted once (on index 0), its
    prefix-cache hits (`RequestOutput.num_cached_tokens`, where vLLM reports it) as cached.
    """

    logprobs: bool = False
    top_logprobs: int = 1
    seen: dict[int, _Seen] = field(default_factory=dict)

    def update(self, output: Any) -> list[Delta]:
        deltas: list[Delta] = []
        for choice in output.outputs:
            seen = self.seen.setdefault(choice.index, _Seen())
            if seen.finished:
                continue
            token_ids = list(choice.token_ids)
            text = choice.text[seen.chars :]
            logprobs = None
            if self.logprobs and choice.logprobs is not None:
                logprobs = to_logprobs(choice.logprobs, token_ids, seen.tokens, self.top_logprobs)
            seen.chars, seen.tokens = len(choice.text), len(token_ids)
            if text or logprobs or choice.finish_reason:
                deltas.append(
                    Delta(text, choice.index, choice.finish_reason, logprobs=logprobs or None)
                )
            if choice.finish_reason:
                seen.finished = True
                first = choice.index == 0
                prompt = len(output.prompt_token_ids or []) if first else 0
                cached = int(getattr(output, "num_cached_tokens", None) or 0) if first else 0
                usage = Usage(prompt, len(token_ids), cached_tokens=min(cached, prompt))
                deltas.append(Delta(index=choice.index, usage=usage))
        return deltas


_DONE = object()


class VLLMEngine(Provider):
    """`vllm/<model>`: a Hugging Face model (id or local path) run in this process by vLLM."""

    name = "vllm"
    capabilities = Capabilities(
        continuation=True, logprobs=True, multi_sample=True, tools=True, response_format=True
    )

    def __init__(
        self, spec: ProviderSpec, api_key: SecretStr | None = None, *, loader: Loader | None = None
    ) -> None:
        if loader is None:
            import vllm  # noqa: F401 - fail at resolve time when the extra is missing

        self.spec = spec
        self.options = dict(spec.options)
        self.loader: Loader = loader or load_vllm

    def __repr__(self) -> str:
        return f"VLLMEngine(prefix={self.spec.prefix!r})"

    async def stream(self, request: ChatRequest) -> AsyncIterator[Delta]:
        host = engine_host(request.model, self.options, self.loader)
        try:
            backend = await asyncio.wrap_future(host.ready)
        except MoaError:
            raise
        except Exception as err:
            raise load_failure(err, request.model) from None
        plan = tool_plan(request)
        wanted = constraint(request, plan)
        if wanted is not None and backend.structured is None:
            raise ConfigError(f"This vLLM backend of {request.model!r} has no structured outputs.")
        prompt = render_prompt(backend.tokenizer, request.messages, request.continue_final, plan)
        kwargs = sampling_kwargs(request, len(prompt), backend.max_model_len)
        try:
            if wanted is not None and backend.structured is not None:
                kwargs.update(backend.structured(wanted))
            params = backend.sampling_params(**kwargs)
        except Exception as err:
            raise request_failure(err, request.model) from None
        tracker = ChoiceTracker(request.logprobs, request.top_logprobs or 1)
        prefix = text_of(request.messages[-1].get("content")) if request.continue_final else ""
        splitters: dict[int, ToolCallSplitter] = {}
        request_id = f"moa-{uuid.uuid4().hex}"
        caller = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()

        def hand_over(item: Any) -> None:
            with contextlib.suppress(RuntimeError):  # the caller's loop has closed
                caller.call_soon_threadsafe(queue.put_nowait, item)

        async def pump() -> None:
            """Runs on the engine's loop: forwards each output to the caller's loop."""
            try:
                async for output in backend.engine.generate(
                    {"prompt_token_ids": prompt}, params, request_id
                ):
                    hand_over(output)
            except asyncio.CancelledError:
                raise
            except Exception as err:
                hand_over(err)
            else:
                hand_over(_DONE)

        pumping = host.submit(pump())
        finished = False
        try:
            while (item := await queue.get()) is not _DONE:
                if isinstance(item, Exception):
                    finished = True
                    raise request_failure(item, request.model)
                for delta in tracker.update(item):
                    splitter = splitters.setdefault(
                        delta.index, ToolCallSplitter(plan, bare=plan.forced, prefix=prefix)
                    )
                    for out in splitter.feed(delta):
                        yield out
            finished = True
            for splitter in splitters.values():
                for out in splitter.flush():
                    yield out
        finally:
            if not finished:
                pumping.cancel()
                abort = host.submit(backend.engine.abort(request_id))
                with anyio.CancelScope(shield=True):
                    await asyncio.wrap_future(abort)
