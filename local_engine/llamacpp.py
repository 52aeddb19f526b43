"""The embedded CPU engine: llama.cpp in-process through llama-cpp-python.

- One model is loaded once per process and shared by every agent that names it.
- A request holds one llama.cpp instance for its whole generation (one context cannot
  interleave requests). Option `parallel` (default 1: requests are queued) keeps up to that
  many instances of the model; `moa bench local` measures which is faster (docs/local.md).
- The prompt is evaluated, then tokens are pulled one at a time, in a worker thread. A cancel
  (or deadline) sets the instance's abort flag, which llama.cpp polls between the steps of a
  prompt evaluation (its abort callback), so even a long prefill stops at once; during
  generation it takes effect after the current token. The instance is then free.
- Greedy output depends on the request alone, not on what the instance ran before: llama.cpp's
  numbers for a token depend on the batch it is evaluated in (alone, as generation does, or
  among others), so the prompt is always evaluated in slices of two or more tokens and only
  the KV of an earlier *prompt* evaluation is reused, never that of generated tokens. The
  usage counts the reused prompt tokens as `cached_tokens`.
- Saved prompts: an instance holds the KV of one prompt, so before a prompt's KV is dropped
  (the next prompt diverges from it) it is saved (llama.cpp's sequence state, the KV only) in
  the pool's `PromptStates`, least recently used first out, within `prompt_cache_bytes`
  (option; default 512 MiB, 0 turns it off). A prompt whose longest prefix is in a saved
  state loads that state and evaluates only the rest, so an aggregator that extends its
  advisors' prompt, a staircase step that extends the previous step, or a conversation's next
  turn reuse their prefix even when other prompts ran in between, on any of the instances.
- Logprobs need `logits_all=True`, which costs several times the speed: a second instance of
  the model is loaded lazily, only for requests that ask for logprobs.
- Continuation (staircase streaming): the chat template is rendered over the messages before
  the final assistant message, with the generation prompt, and the assistant's text so far is
  appended; a raw completion then continues it.
- Tools and response formats (`tools.py` has the text convention): the reply is constrained by
  a llama.cpp grammar (`reply_grammar`): a forced call must be `<tool_call>{"name": one of the
  tools, "arguments": its parameters}</tool_call>`; with "auto" the reply is such calls or an
  answer that does not start with "<"; the answer is the response format's JSON when one is
  asked for. With continuation the grammar resumes after the assistant's text so far.
"""

from __future__ import annotations

import copy
import ctypes
import inspect
import itertools
import logging
import math
import os
import re
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from functools import cache
from itertools import pairwise
from pathlib import Path
from typing import Any

import anyio
from pydantic import SecretStr

from moa.errors import ConfigError, ProviderError
from moa.providers.base import (
    Capabilities,
    ChatRequest,
    Delta,
    Message,
    Provider,
    TokenLogprob,
    Usage,
    Waiting,
)
from moa.providers.registry import ProviderSpec

from .model_files import resolve_model_path
from .tools import (
    TOOL_CLOSE,
    TOOL_OPEN,
    ToolCallSplitter,
    ToolPlan,
    call_schema,
    format_schema,
    render_tool_turns,
    text_of,
    tool_plan,
)

DEFAULT_CTX = 4096
DEFAULT_PROMPT_CACHE_BYTES = 512 * 2**20
MIN_SAVED_TOKENS = 32
"""Shorter prompts are not saved: their KV costs less to evaluate than to keep track of."""
MIN_RESTORE_GAIN = 16
"""A saved state is loaded only when it reuses this many more tokens than the live KV."""
_DONE = object()
log = logging.getLogger("moa.local_engine.llama_cpp")


class PromptStates:
    """Saved KV states of earlier prompts of one model, keyed by their tokens, shared by the
    instances of a pool, least recently used first out within `limit` bytes.

    A state is llama.cpp's sequence state (`llama_state_seq_get_data`: the KV cells of
    sequence 0, no logits), about 23 kB per token on SmolLM2-135M; saving or loading 2,000
    tokens' state took 51 / 32 ms here, against 12 s to evaluate them (docs/local.md).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.size = 0
        self.entries: OrderedDict[tuple[int, ...], Any] = OrderedDict()
        self.lock = threading.Lock()

    def longest(self, tokens: list[int]) -> tuple[tuple[int, ...] | None, int]:
        """The saved prompt that shares the longest prefix with `tokens`, and its length."""
        best: tuple[tuple[int, ...] | None, int] = (None, 0)
        with self.lock:
            for key in self.entries:
                common = _common_prefix(key, tokens)
                if common > best[1]:
                    best = (key, common)
        return best

    def covers(self, tokens: list[int]) -> bool:
        """Whether a saved prompt starts with all of `tokens` (saving them adds nothing)."""
        with self.lock:
            return any(
                len(key) >= len(tokens) and _common_prefix(key, tokens) == len(tokens)
                for key in self.entries
            )

    def get(self, key: tuple[int, ...]) -> Any:
        with self.lock:
            self.entries.move_to_end(key)
            return self.entries[key]

    def put(self, key: tuple[int, ...], data: Any) -> None:
        size = ctypes.sizeof(data)
        if size > self.limit:
            return
        with self.lock:
            if key in self.entries:
                self.size -= ctypes.sizeof(self.entries.pop(key))
            while self.entries and self.size + size > self.limit:
                self.size -= ctypes.sizeof(self.entries.popitem(last=False)[1])
            self.entries[key] = data
            self.size += size


@dataclass
class LoadedModel:
    """One llama.cpp instance of a model and its chat formatter."""

    llm: Any
    formatter: Any
    busy: threading.Lock = field(default_factory=threading.Lock)
    abort: threading.Event = field(default_factory=threading.Event)
    """Set while a cancelled request waits for its worker: llama.cpp stops a prefill at once."""
    evaluated: list[int] = field(default_factory=list)
    """The tokens whose KV cache came from a prompt evaluation (reusable as a prefix)."""
    reused: int = 0
    """Prompt tokens of the last prefill whose KV was reused instead of evaluated."""
    on_abort: Any = None
    """The abort callback (a C function pointer) set on the context during a prefill."""
    states: PromptStates | None = None
    """The pool's saved prompt states (None: only the live KV is reused)."""

    def tokenize(self, text: str, *, bos: bool = False) -> list[int]:
        return list(self.llm.tokenize(text.encode(), add_bos=bos, special=True))

    def count(self, text: str) -> int:
        return len(self.tokenize(text))

    def prefill(self, tokens: list[int]) -> None:
        """Evaluate the prompt `tokens` so its KV cache and last logits are those of a fresh
        evaluation (see the module notes), reusing the longest prefix of the previous prompt
        or of a saved one (`reused` says how many tokens)."""
        import llama_cpp

        llm = self.llm
        live = _common_prefix(self.evaluated, tokens)
        if self.states is not None:
            key, hit = self.states.longest(tokens)
            if key is not None and hit >= live + MIN_RESTORE_GAIN:
                self._save_live()
                live = min(hit, self._restore(key))
            elif live < len(self.evaluated):
                self._save_live()
        keep = max(0, min(live, len(tokens) - 2))
        self.reused = keep
        llm.n_tokens = keep  # Llama.eval drops the cache from here on
        self.evaluated = tokens[:keep]
        # Only here: the callback takes the GIL at every step, too costly for single tokens.
        llama_cpp.llama_set_abort_callback(llm.ctx, self.on_abort, None)
        try:
            for start, end in prompt_slices(keep, len(tokens), llm.n_batch):
                llm.eval(tokens[start:end])  # RuntimeError when aborted
                self.evaluated = tokens[:end]
        finally:
            llama_cpp.llama_set_abort_callback(llm.ctx, llama_cpp.ggml_abort_callback(), None)

    def _save_live(self) -> None:
        """Save the live prompt's KV (without that of generated tokens) in `states`, unless
        it is short or a saved prompt already holds it."""
        import llama_cpp

        n, states = len(self.evaluated), self.states
        if states is None or n < MIN_SAVED_TOKENS or states.covers(self.evaluated):
            return
        ctx = self.llm.ctx
        self.llm._ctx.kv_cache_seq_rm(-1, n, -1)  # the generated tokens' KV
        self.llm.n_tokens = n
        size = llama_cpp.llama_state_seq_get_size(ctx, 0)
        data = (ctypes.c_uint8 * size)()
        if llama_cpp.llama_state_seq_get_data(ctx, data, size, 0) == size:
            states.put(tuple(self.evaluated), data)

    def _restore(self, key: tuple[int, ...]) -> int:
        """Load the saved state of prompt `key` into the context; how many of its tokens are
        now live (all, or none if llama.cpp refused the state)."""
        import llama_cpp

        assert self.states is not None
        data = self.states.get(key)
        llm = self.llm
        if not llama_cpp.llama_state_seq_set_data(llm.ctx, data, ctypes.sizeof(data), 0):
            llm.n_tokens, self.evaluated = 0, []  # llama.cpp cleared the sequence
            return 0
        llm.n_tokens = len(key)
        llm.input_ids[: len(key)] = key
        self.evaluated = list(key)
        return len(key)


def _common_prefix(a: list[int] | tuple[int, ...], b: list[int] | tuple[int, ...]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def prompt_slices(start: int, end: int, size: int) -> list[tuple[int, int]]:
    """[start, end) in slices of at most `size` tokens, none of them a single token when the
    range has two or more (a lone token is computed differently from one in a batch)."""
    bounds = [*range(start, end, size), end]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] == 1:
        bounds[-2] -= 1
    return list(pairwise(bounds))


@dataclass
class ModelPool:
    """`size` instances of one model; a request holds one instance for its whole generation.

    Size 1 queues the requests. The locks are plain thread locks polled from async code, so a
    pool is shared safely by every event loop of the process (sync wrappers start new ones).
    """

    path: Path
    logits_all: bool
    options: dict[str, Any]
    size: int
    states: PromptStates | None = None
    """Saved prompt states shared by the instances (None: `prompt_cache_bytes = 0`)."""
    instances: list[LoadedModel] = field(default_factory=list)
    grow: threading.Lock = field(default_factory=threading.Lock)
    queue: list[tuple[bool, int, int]] = field(default_factory=list)
    """Tickets of the requests waiting for an instance, the least served first:
    (continues an answer, -priority, arrival number)."""
    queue_lock: threading.Lock = field(default_factory=threading.Lock)
    arrivals: Iterator[int] = field(default_factory=itertools.count)

    def _idle(self) -> LoadedModel | None:
        """An idle instance, now claimed (never blocks)."""
        return next((m for m in self.instances if m.busy.acquire(blocking=False)), None)

    def _grow(self) -> LoadedModel | None:
        """A new instance, claimed, if the pool may grow (loads the model: run in a thread)."""
        with self.grow:
            if len(self.instances) >= self.size:
                return None
            model = _create(self.path, self.logits_all, self.options)
            model.states = self.states
            model.busy.acquire()
            self.instances.append(model)
            return model

    @asynccontextmanager
    async def claim(
        self,
        on_wait: Callable[[Waiting], None] | None = None,
        priority: int = 0,
        continues: bool = False,
    ) -> AsyncIterator[LoadedModel]:
        """Wait for an instance. A request that starts an answer goes before one that
        `continues` an answer (a staircase step), so every agent gets to speak — an agent not
        started yet binds no aggregator, which would otherwise write its whole answer without
        it; among continuations the highest `priority` (a mixture's deeper stage) goes first,
        so the final answer's steps wait behind no earlier stage's; then first come first
        served, so a request that keeps coming back never starves the ones of its rank queued
        before it. `on_wait` hears "queued" once if the request has to wait."""
        with self.queue_lock:
            ticket = (continues, -priority if continues else 0, next(self.arrivals))
            self.queue.append(ticket)
        try:
            while True:
                model = None
                with self.queue_lock:
                    first = min(self.queue) == ticket
                if first:
                    model = self._idle()
                    if model is None and len(self.instances) < self.size:
                        model = await anyio.to_thread.run_sync(self._grow)
                if model is not None:
                    break
                if on_wait is not None:
                    on_wait("queued")
                    on_wait = None
                await anyio.sleep(POLL_S)
        finally:
            with self.queue_lock:
                self.queue.remove(ticket)
        try:
            yield model
        finally:
            model.busy.release()


_POOLS: dict[tuple[str, bool, tuple[tuple[str, Any], ...], int], ModelPool] = {}
_POOLS_LOCK = threading.Lock()
POLL_S = 0.01


def model_pool(path: Path, logits_all: bool, options: dict[str, Any]) -> ModelPool:
    """The process-wide pool of the model at `path` with these options."""
    options = dict(options)
    size = int(options.pop("parallel", 1))
    cache_bytes = int(options.pop("prompt_cache_bytes", DEFAULT_PROMPT_CACHE_BYTES))
    key = (str(path), logits_all, tuple(sorted(options.items())), cache_bytes)
    with _POOLS_LOCK:
        pool = _POOLS.get(key)
        if pool is None:
            states = PromptStates(cache_bytes) if cache_bytes > 0 else None
            pool = _POOLS[key] = ModelPool(path, logits_all, options, max(1, size), states)
        return pool


def _create(path: Path, logits_all: bool, options: dict[str, Any]) -> LoadedModel:
    import llama_cpp

    _route_llama_logs()
    settings = {"n_ctx": DEFAULT_CTX, "n_threads": os.cpu_count() or 1, "verbose": False}
    settings.update(options)
    chat_format = settings.pop("chat_format", None)
    try:
        llm = llama_cpp.Llama(model_path=str(path), logits_all=logits_all, **settings)
    except (ValueError, RuntimeError) as err:
        reason = str(err).rstrip(".")
        raise ConfigError(f"llama.cpp could not load {str(path)!r}: {reason}.") from None
    model = LoadedModel(llm, _formatter(llm, path, chat_format))
    model.on_abort = llama_cpp.ggml_abort_callback(lambda _data: model.abort.is_set())
    return model


def _formatter(llm: Any, path: Path, chat_format: str | None) -> Any:
    """The file's own chat template, or the llama-cpp-python chat format named in options."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    if chat_format is not None:
        formats = chat_formats()
        if chat_format not in formats:
            raise ConfigError(
                f"Unknown chat_format {chat_format!r}; llama-cpp-python's chat formats are: "
                f"{', '.join(sorted(formats))}."
            )
        return formats[chat_format]
    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        raise ConfigError(
            f"Model file {str(path)!r} holds no chat template: name one of llama-cpp-python's "
            'chat formats in the provider\'s options, e.g. options = { chat_format = "chatml" } '
            "(docs/local.md lists them)."
        )

    def text_of(token: int) -> str:
        return llm._model.token_get_text(token) if token != -1 else ""

    return Jinja2ChatFormatter(
        template=template, eos_token=text_of(llm.token_eos()), bos_token=text_of(llm.token_bos())
    )


def chat_formats() -> dict[str, Callable[..., Any]]:
    """llama-cpp-python's named chat formats that are plain prompt formatters (the others
    are whole chat handlers, e.g. for function calling or images, which moa cannot use)."""
    from llama_cpp.llama_chat_format import LlamaChatCompletionHandlerRegistry

    formats = {}
    for name, handler in LlamaChatCompletionHandlerRegistry()._chat_handlers.items():
        formatter = inspect.getclosurevars(handler).nonlocals.get("chat_formatter")
        if callable(formatter):
            formats[name] = formatter
    return formats


@cache
def _route_llama_logs() -> Any:
    """Send llama.cpp's own log lines to the `moa.local_engine.llama_cpp` logger at DEBUG
    (shown with --debug) instead of printing them on stderr. Returns the C callback, which
    the cache keeps alive."""
    import llama_cpp

    @llama_cpp.llama_log_callback
    def to_logger(_level: int, text: bytes, _data: Any) -> None:
        line = text.decode("utf-8", "replace").rstrip()
        if line:
            log.debug("%s", line)

    llama_cpp.llama_log_set(to_logger, None)
    return to_logger


def render_prompt(
    formatter: Any, messages: list[Message], continue_final: bool
) -> tuple[str, list[str]]:
    """The raw prompt for `messages` and the template's stop strings.

    With `continue_final`, the last (assistant) message is left open so the model continues it.
    """
    head = messages[:-1] if continue_final else messages
    rendered = formatter(messages=[dict(m) for m in head])
    prompt = rendered.prompt
    if continue_final:
        prompt += str(messages[-1].get("content") or "")
    stop = rendered.stop or []
    return prompt, [stop] if isinstance(stop, str) else list(stop)


def to_logprobs(raw: dict[str, Any] | None) -> list[TokenLogprob] | None:
    """llama-cpp-python's OpenAI-completions-style logprobs -> TokenLogprob list."""
    if not raw:
        return None
    tokens, values = raw.get("tokens") or [], raw.get("token_logprobs") or []
    tops = raw.get("top_logprobs") or [None] * len(tokens)
    return [
        TokenLogprob(token, float(lp or 0.0), [(t, float(v)) for t, v in (top or {}).items()])
        for token, lp, top in zip(tokens, values, tops, strict=False)
    ]


FREE_TEXT = r"[^<\x00] [^\x00]*"
"""A plain answer: any text that does not start with "<" (so it cannot be a tool call)."""
JSON_CHAR = r'char ::= [^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4})'
"""A JSON string character; llama-cpp-python's converter also allows raw control characters,
which JSON parsers refuse."""


def reply_grammar(plan: ToolPlan, response_format: dict[str, Any] | None) -> str | None:
    """The GBNF grammar a reply must match (root rule `root`), or None for free text.

    `calls` is `<tool_call>` + a JSON call to a callable tool + `</tool_call>` (several,
    newline-separated, with parallel_tool_calls); `answer` is the response format's JSON, or
    FREE_TEXT. A forced call: `calls`; "auto": `calls | answer`; no callable tool: `answer`.
    """
    from llama_cpp.llama_grammar import SchemaConverter

    schema = format_schema(response_format)
    if not plan.callable and schema is None:
        return None
    converter = SchemaConverter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)

    def rule(schema: dict[str, Any], name: str) -> str:
        return str(converter.visit(converter.resolve_refs(copy.deepcopy(schema), name), name))

    try:
        root = answer = f"({FREE_TEXT})" if schema is None else rule(schema, "answer")
        if plan.callable:
            one = f'"{TOOL_OPEN}" {rule(call_schema(plan.callable), "call")} "{TOOL_CLOSE}"'
            calls = f'{one} ("\\n" {one})*' if plan.parallel else one
            root = calls if plan.forced else f"{calls} | {answer}"
    except (AssertionError, KeyError, TypeError, ValueError, RecursionError) as err:
        raise ConfigError(
            "llama.cpp cannot turn the JSON schema of the response_format or of a tool's "
            f"parameters into a grammar: {str(err).rstrip('.') or type(err).__name__}."
        ) from None
    rules = re.sub(r"^char ::= .*$", lambda _: JSON_CHAR, converter.format_grammar(), flags=re.M)
    return f"{rules}\nroot ::= {root}\n"


def grammar_prefix(llm: Any, grammar: str, prefix: str) -> list[int]:
    """Check `grammar` with llama.cpp's own parser (its sampler cannot take an invalid one)
    and return the tokens of the reply's `prefix` (continuation), checked to fit the grammar."""
    import llama_cpp

    sampler = llama_cpp.llama_sampler_init_grammar(llm._model.vocab, grammar.encode(), b"root")
    if not sampler:
        raise ConfigError("llama.cpp could not parse the grammar of the tools or response_format.")
    tokens = list(llm.tokenize(prefix.encode(), add_bos=False, special=False)) if prefix else []
    cell = llama_cpp.llama_token_data()
    candidates = llama_cpp.llama_token_data_array(ctypes.pointer(cell), 1, -1, False)
    try:
        for token in tokens:
            cell.id, cell.logit, cell.p = token, 0.0, 0.0
            llama_cpp.llama_sampler_apply(sampler, ctypes.byref(candidates))
            if cell.logit == -math.inf:  # accepting it would abort the process
                raise ConfigError(
                    "The assistant text to continue does not fit the tools or response_format "
                    f"of the request: {prefix[:60]!r}."
                )
            llama_cpp.llama_sampler_accept(sampler, token)
    finally:
        llama_cpp.llama_sampler_free(sampler)
    return tokens


@contextmanager
def primed_sampler(llm: Any, tokens: list[int]) -> Iterator[None]:
    """Let the next sampler chain llama-cpp-python builds (inside its generation) accept
    `tokens` first, so a grammar resumes after a continued reply's prefix instead of at its
    start. llama-cpp-python has no parameter for this: its `_init_sampler` is wrapped."""
    if not tokens:
        yield
        return
    import llama_cpp

    build = llm._init_sampler

    def init_sampler(*args: Any, **kwargs: Any) -> Any:
        del llm._init_sampler  # once
        sampler = build(*args, **kwargs)
        for token in tokens:
            llama_cpp.llama_sampler_accept(sampler.sampler, token)
        return sampler

    llm._init_sampler = init_sampler
    try:
        yield
    finally:
        llm.__dict__.pop("_init_sampler", None)


class LlamaCppEngine(Provider):
    """`local/<model>`: a GGUF model run in this process by llama.cpp."""

    name = "local"
    capabilities = Capabilities(
        continuation=True,
        logprobs=True,
        multi_sample=True,  # n samples in turn; the prompt's KV cache is reused by each
        queued=True,
        tools=True,
        response_format=True,
    )

    def __init__(self, spec: ProviderSpec, api_key: SecretStr | None = None) -> None:
        import llama_cpp  # noqa: F401 - fail at resolve time when the extra is missing

        self.spec = spec
        self.options = dict(spec.options)

    def __repr__(self) -> str:
        return f"LlamaCppEngine(prefix={self.spec.prefix!r})"

    async def stream(self, request: ChatRequest) -> AsyncIterator[Delta]:
        plan = tool_plan(request)
        grammar = reply_grammar(plan, request.response_format)
        pool = model_pool(resolve_model_path(request.model), request.logprobs, self.options)
        claim = pool.claim(request.on_wait, request.priority, request.continue_final)
        async with claim as model:
            if request.on_wait is not None:
                request.on_wait("prompt")
            async for delta in self._stream_on(model, request, plan, grammar):
                yield delta

    async def _stream_on(
        self, model: LoadedModel, request: ChatRequest, plan: ToolPlan, grammar: str | None
    ) -> AsyncIterator[Delta]:
        messages = render_tool_turns(request.messages, plan)
        prompt, stop = render_prompt(model.formatter, messages, request.continue_final)
        prefix = text_of(messages[-1].get("content")) if request.continue_final else ""
        tokens = model.tokenize(prompt, bos=True)
        prompt_tokens = len(tokens)
        limit = model.llm.n_ctx() - prompt_tokens
        if limit <= 0:
            raise ProviderError(
                f"The prompt has {prompt_tokens} tokens, more than the context of "
                f"{model.llm.n_ctx()} tokens of {request.model}.",
                provider="local",
                model=request.model,
            )
        max_tokens = min(request.max_tokens or limit, limit)
        primed = grammar_prefix(model.llm, grammar, prefix) if grammar else []
        sampling = _Sampling(stop, max_tokens, grammar, primed)
        for index in range(request.n):
            parts: list[str] = []
            splitter = ToolCallSplitter(plan, prefix=prefix)
            async for delta in self._generate(model, tokens, sampling, request, index):
                parts.append(delta.text)
                for out in splitter.feed(delta):
                    yield out
            for out in splitter.flush():
                yield out
            completion = model.count("".join(parts))
            yield Delta(index=index,
                        usage=Usage(prompt_tokens, completion, cached_tokens=model.reused))

    async def _generate(
        self,
        model: LoadedModel,
        tokens: list[int],
        sampling: _Sampling,
        request: ChatRequest,
        index: int,
    ) -> AsyncIterator[Delta]:
        """Evaluate the prompt (a cancel aborts it inside llama.cpp), then pull tokens one by
        one (a cancel ends the call after the current token), in a worker thread."""
        import llama_cpp

        await _abortable(model, model.prefill, tokens)
        seed = None if request.seed is None else request.seed + index
        grammar = None
        if sampling.grammar:
            grammar = llama_cpp.LlamaGrammar.from_string(sampling.grammar, verbose=False)
        # The whole prompt is cached now: llama-cpp-python samples from it without re-evaluating.
        chunks: Iterator[dict[str, Any]] = model.llm.create_completion(
            tokens,
            max_tokens=sampling.max_tokens,
            temperature=request.temperature if request.temperature is not None else 0.7,
            top_p=request.top_p if request.top_p is not None else 0.95,
            stop=[*sampling.stop, *(request.stop or [])],
            seed=seed,
            logprobs=(request.top_logprobs or 1) if request.logprobs else None,
            grammar=grammar,
            stream=True,
        )
        try:
            with primed_sampler(model.llm, sampling.primed):
                while True:
                    chunk = await _abortable(model, next, chunks, _DONE)
                    if chunk is _DONE:
                        return
                    choice = chunk["choices"][0]
                    yield Delta(
                        text=choice.get("text") or "",
                        index=index,
                        finish_reason=choice.get("finish_reason"),
                        logprobs=to_logprobs(choice.get("logprobs")),
                    )
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(chunks.close)


@dataclass(frozen=True)
class _Sampling:
    """How one request samples: template stop strings, token limit, grammar (GBNF) and the
    continued prefix's tokens the grammar resumes after."""

    stop: list[str]
    max_tokens: int
    grammar: str | None = None
    primed: list[int] = field(default_factory=list)


async def _abortable(model: LoadedModel, fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)` in a worker thread. When cancelled, llama.cpp is told to abort the decode
    it is running and the thread is awaited, so the instance is idle when this returns."""
    gate, finished = threading.Lock(), threading.Event()
    started = cancelled = False

    def call() -> Any:
        nonlocal started
        with gate:
            if cancelled:  # the caller has gone before the thread started
                return None
            started = True
        try:
            return fn(*args)
        finally:
            finished.set()

    try:
        return await anyio.to_thread.run_sync(call, abandon_on_cancel=True)
    except anyio.get_cancelled_exc_class():
        with gate:
            cancelled, running = True, started
        if running:
            model.abort.set()
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(finished.wait)
            model.abort.clear()
        raise
