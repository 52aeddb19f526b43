"""Score configurations on a task file with verifiable answers (`moa eval`).

A task file is JSON Lines, one object per task with `question` and `answer`. Every
configuration — a mixture, a single model, or a routed strategy under a router policy — runs
every task; a reply is right when its extracted final answer (`moa.routing.signals.extract_answer`)
equals the normalised reference. One row per configuration: accuracy, calls, tokens, cost and
latency.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from moa.errors import ConfigError, MixtureError, MoaError
from moa.pricing import cost as price_cost
from moa.providers.base import ChatRequest
from moa.providers.registry import Registry
from moa.result import MixtureResult
from moa.routing.signals import is_correct


@dataclass(frozen=True)
class Task:
    question: str
    answer: str


def load_tasks(path: str | Path, limit: int | None = None) -> list[Task]:
    """Read a JSONL task file; every line needs `question` and `answer`."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as err:
        raise ConfigError(f"Cannot read task file {str(path)!r}: {err.strerror}.") from None
    tasks = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            tasks.append(Task(str(item["question"]), str(item["answer"])))
        except (ValueError, KeyError, TypeError):
            raise ConfigError(
                f"Task file {str(path)!r} line {number} must be a JSON object "
                "with 'question' and 'answer'."
            ) from None
    if not tasks:
        raise ConfigError(f"Task file {str(path)!r} holds no tasks.")
    return tasks[:limit] if limit else tasks


@dataclass
class Outcome:
    text: str
    calls: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float | None


Runner = Callable[[str, int], Awaitable[Outcome]]
"""(question, seed) -> outcome of one task."""


def outcome_of(result: MixtureResult) -> Outcome:
    usage = result.usage
    return Outcome(
        result.text, result.calls, usage.prompt_tokens, usage.completion_tokens, result.cost_usd
    )


def single_model(
    registry: Registry,
    ref: str,
    *,
    max_tokens: int = 512,
    temperature: float = 0.0,
    prices: dict[str, tuple[float, float]] | None = None,
) -> Runner:
    """One call to one model per task."""
    from moa.pricing import with_overrides

    table = with_overrides(prices)

    async def run(question: str, seed: int) -> Outcome:
        provider, model = registry.resolve(ref)
        request = ChatRequest(
            model=model,
            messages=[{"role": "user", "content": question}],
            temperature=temperature,
            max_tokens=max_tokens,
            seed=seed,
        )
        completion = (await provider.complete(request))[0]
        usage = completion.usage
        return Outcome(
            completion.text,
            1,
            usage.prompt_tokens,
            usage.completion_tokens,
            price_cost(ref, usage, table),
        )

    return run


async def evaluate(
    name: str, runner: Runner, tasks: Sequence[Task], *, concurrency: int = 4, seed: int = 0
) -> dict[str, Any]:
    """Run one configuration over every task; one result row."""
    limiter = anyio.CapacityLimiter(concurrency)
    outcomes: list[tuple[Outcome | None, float, bool]] = []
    failures: dict[str, int] = {}

    async def one(i: int, task: Task) -> None:
        async with limiter:
            started = time.perf_counter()
            try:
                out: Outcome | None = await runner(task.question, seed + i)
            except MoaError as err:
                out = None
                reason = failure_reason(err)
                failures[reason] = failures.get(reason, 0) + 1
            latency = time.perf_counter() - started
        outcomes.append((out, latency, out is not None and is_correct(out.text, task.answer)))

    async with anyio.create_task_group() as tg:
        for i, task in enumerate(tasks):
            tg.start_soon(one, i, task)
    done = [o for o, _, _ in outcomes if o is not None]
    costs = [o.cost_usd for o in done if o.cost_usd is not None]
    latencies = sorted(lat for _, lat, _ in outcomes)
    return {
        "config": name,
        "accuracy": round(sum(ok for _, _, ok in outcomes) / len(tasks), 4),
        "tasks": len(tasks),
        "errors": len(tasks) - len(done),
        "calls": sum(o.calls for o in done),
        "prompt_tokens": sum(o.prompt_tokens for o in done),
        "completion_tokens": sum(o.completion_tokens for o in done),
        "cost_usd": round(sum(costs), 6) if costs else None,
        "latency_s": round(sum(latencies) / len(latencies), 3),
        "p90_latency_s": round(latencies[min(len(latencies) - 1, int(0.9 * len(latencies)))], 3),
        "failures": failures,
    }


def failure_reason(err: MoaError) -> str:
    """Why a task failed: the error, plus the failed agents' errors it does not already name."""
    message = str(err)
    partial = err.partial if isinstance(err, MixtureError) else None
    causes = [
        o.error if o.error.startswith(o.agent.model) else f"{o.agent.model}: {o.error}"
        for o in getattr(partial, "failed", [])
        if o.error and not o.error.startswith("cancelled:") and o.error not in message
    ]
    return " ".join([message, *dict.fromkeys(causes)])
