"""Model prices and the cost of a call.

`PRICES` maps a model reference to US dollars per million tokens: `(input, output)`,
`(input, output, cached_input)` or `(input, output, cached_input, cache_write)`. A missing
cached-input or cache-write rate is the input rate. Approximate public list prices, to be
overridden per mixture with `MixtureConfig.prices`. Embedded engines (`local/…`, `vllm/…`) cost
nothing; any other model without an entry has an unknown cost (None).

A call's prompt tokens are billed in three parts: those read from the backend's prompt cache
(`Usage.cached_tokens`) at the cached-input rate, those written to it (`cache_write_tokens`,
Anthropic) at the cache-write rate, and the rest at the input rate.
"""

from __future__ import annotations

from collections.abc import Callable

from moa.providers.base import Usage

Price = tuple[float, float] | tuple[float, float, float] | tuple[float, float, float, float]
"""(input, output[, cached_input[, cache_write]]) US dollars per million tokens."""

PRICES: dict[str, Price] = {
    # OpenAI: cached input at 50 % of input (gpt-4o, o3-mini) or 25 % (gpt-4.1, o4-mini).
    "openai/gpt-4o": (2.50, 10.00, 1.25),
    "openai/gpt-4o-mini": (0.15, 0.60, 0.075),
    "openai/gpt-4.1": (2.00, 8.00, 0.50),
    "openai/gpt-4.1-mini": (0.40, 1.60, 0.10),
    "openai/gpt-4.1-nano": (0.10, 0.40, 0.025),
    "openai/o3-mini": (1.10, 4.40, 0.55),
    "openai/o4-mini": (1.10, 4.40, 0.275),
    # Anthropic: cache reads at 10 % of input, cache writes (5-minute cache) at 125 %
    # (Claude 3 Haiku's list rates are $0.03 and $0.30).
    "anthropic/claude-opus-4-0": (15.00, 75.00, 1.50, 18.75),
    "anthropic/claude-sonnet-4-0": (3.00, 15.00, 0.30, 3.75),
    "anthropic/claude-3-7-sonnet-latest": (3.00, 15.00, 0.30, 3.75),
    "anthropic/claude-3-5-haiku-latest": (0.80, 4.00, 0.08, 1.00),
    "anthropic/claude-3-haiku-20240307": (0.25, 1.25, 0.03, 0.30),
    "together/Qwen/Qwen2.5-72B-Instruct-Turbo": (1.20, 1.20),
    "together/Qwen/Qwen2.5-7B-Instruct-Turbo": (0.30, 0.30),
    "together/meta-llama/Llama-3.3-70B-Instruct-Turbo": (0.88, 0.88),
    "together/meta-llama/Meta-Llama-3.1-8B-Instruct-Turbo": (0.18, 0.18),
    "together/deepseek-ai/DeepSeek-V3": (1.25, 1.25),
    "together/mistralai/Mixtral-8x22B-Instruct-v0.1": (1.20, 1.20),
    "together/google/gemma-2-27b-it": (0.80, 0.80),
    "groq/llama-3.3-70b-versatile": (0.59, 0.79),
    "groq/llama-3.1-8b-instant": (0.05, 0.08),
    "deepseek/deepseek-chat": (0.27, 1.10),
    "deepseek/deepseek-reasoner": (0.55, 2.19),
    "mistral/mistral-large-latest": (2.00, 6.00),
    "mistral/mistral-small-latest": (0.20, 0.60),
}

FREE_PREFIXES: frozenset[str] = frozenset({"local", "vllm"})
"""Embedded engines: no per-token price."""


def with_overrides(prices: dict[str, Price] | None = None) -> dict[str, Price]:
    """The built-in table with `prices` (model reference -> price) added or replacing entries."""
    return {**PRICES, **(prices or {})}


def price_of(model: str, table: dict[str, Price] | None = None) -> Price | None:
    """The price of a model reference; `router/vendor/model` also matches `vendor/model`."""
    table = PRICES if table is None else table
    if model in table:
        return table[model]
    prefix, _, rest = model.partition("/")
    if prefix in FREE_PREFIXES:
        return (0.0, 0.0)
    return table.get(rest) if "/" in rest else None


def rates(price: Price) -> tuple[float, float, float, float]:
    """(input, output, cached input, cache write); a missing rate is the input rate."""
    inp, out, *more = price
    cached = more[0] if more else inp
    write = more[1] if len(more) > 1 else inp
    return inp, out, cached, write


def cost(model: str, usage: Usage, table: dict[str, Price] | None = None) -> float | None:
    """US dollars of `usage` on `model`, or None when its price is unknown: cached prompt
    tokens at the cached-input rate, cache writes at the cache-write rate, the rest of the
    prompt at the input rate."""
    price = price_of(model, table)
    if price is None:
        return None
    inp, out, cached, write = rates(price)
    fresh = max(0, usage.prompt_tokens - usage.cached_tokens - usage.cache_write_tokens)
    return (fresh * inp + usage.cached_tokens * cached + usage.cache_write_tokens * write
            + usage.completion_tokens * out) / 1_000_000


def price_function(
    prices: dict[str, Price] | None = None,
) -> Callable[[str, Usage], float | None]:
    """(model, usage) -> US dollars from the built-in table plus `prices` overrides."""
    table = with_overrides(prices)

    def price(model: str, usage: Usage) -> float | None:
        return cost(model, usage, table)

    return price
