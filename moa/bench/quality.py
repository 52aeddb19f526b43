"""`moa bench quality`: answer accuracy of one model alone vs mixtures of it.

Runs on the shipped exact-answer task set (`moa.bench.taskset`: dev and held-out splits) and
scores a reply right when its extracted answer (`moa.routing.signals`) equals the reference.
Rows for the model `-m` (default `local/smollm2`), built from shared calls — a greedy reply and
samples at `--temperature` with seeds 0, 1, 2 per question — so that every row reusing a call
pays for it once in compute but counts it in its own calls, tokens and latency:

- `alone greedy`, `alone sampled`: one call;
- `vote 3 sampled`, `vote greedy+2 sampled`: majority of the extracted answers (ties go to the
  first reply, the greedy one where there is one); no aggregator call;
- `preset local`: the `local` preset's own graph and prompts (its proposers, then its
  aggregator reading them with the paper's prompt, as the executor builds it);
  `preset local (cache layout)`: the same, the aggregator's prompt in the cache layout (the
  question first, then the instruction and the replies as a user turn);
- `skip-on-agreement`: the preset, but its proposers' answer when they all agree (what a router
  that skips aggregation on agreement does);
- `debate local`: the `local-debate` preset (3 debaters x 2 rounds, then the vote; a tie or
  open-ended answers go to its aggregator; the debate stops when round 1 agrees) run by the
  real strategy (`moa.Mixture`), its calls through the shared ones (`CallsProvider`) with
  request seed 0 — so its round 1 is the `preset local` row's proposers; `debate local 3
  rounds`: the same with a third round;
- variants on greedy + 2 sampled replies: `greedy+2 greedy aggregator` (paper prompt,
  temperature 0), `short instruction` (`SMALL_MODEL_INSTRUCTION` in place of the paper's
  prompt) and `extracted answers` (the aggregator reads only each reply's extracted answer).

Each `-c FILE|PRESET` runs end to end through `moa.Mixture` (wall time as latency).
Latency of the other rows is the sum of the measured times of the calls a row makes, one after
another — what a CPU engine serving one generation at a time does anyway. `--cache FILE` keeps
the calls (with their times) so later runs reuse them.

JSON row fields: `split`, `config`, `accuracy`, `ci_low`/`ci_high` (95 % Wilson interval),
`tasks`, `errors`, `calls` and `tokens` (per task, mean), `latency_s` (per task, mean). A
failed task counts as wrong, its reason in a note; a `ConfigError` stops the bench, and so does
a run where every task failed (no table: the reason, exit status 1).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from moa.cli.progress import Bar
from moa.errors import ConfigError, MoaError
from moa.providers.base import Capabilities, ChatRequest, Delta, Message, Provider, Usage
from moa.providers.registry import Registry
from moa.routing.evaluate import Outcome, Task, failure_reason, outcome_of
from moa.routing.signals import agreement, extract_answer, is_correct
from moa.runtime.prompts import (
    AGGREGATE_PROMPT,
    SMALL_MODEL_INSTRUCTION,
    Layout,
    Reference,
    aggregate_messages,
    cache_messages,
    mark_duplicates,
    readable_block,
)

Z95 = 1.96


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-m", "--model", default="local/smollm2",
                        help="the model under test (default local/smollm2)")
    parser.add_argument("-c", "--config", action="append", default=[], metavar="FILE|PRESET",
                        help="also run this mixture end to end (repeatable)")
    parser.add_argument("--providers", metavar="FILE",
                        help="a config file whose [providers.*] tables add or replace prefixes")
    parser.add_argument("--split", choices=["dev", "heldout", "both"], default="both")
    parser.add_argument("--limit", type=int, metavar="N", help="first N tasks of each kind")
    parser.add_argument("--rows", metavar="NAMES",
                        help="comma-separated row names to run (default: all)")
    parser.add_argument("--max-tokens", type=int, default=16,
                        help="cap on every composed call's max_tokens (default 16)")
    parser.add_argument("--temperature", type=float, default=0.7,
                        help="temperature of the votes' and variants' samples (default 0.7; "
                        "the preset rows keep the preset's own)")
    parser.add_argument("--cache", metavar="FILE", help="JSONL of recorded calls to reuse/extend")


@dataclass
class Call:
    text: str
    prompt_tokens: int
    completion_tokens: int
    seconds: float


@dataclass
class Calls:
    """The model's calls for one run of the bench, memoised by request (and kept in `cache`)."""

    registry: Any
    ref: str
    cap: int
    cache: Path | None = None
    seen: dict[str, Call] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.cache and self.cache.exists():
            for number, line in enumerate(self.cache.read_text().splitlines(), 1):
                try:
                    key, call = json.loads(line)
                    self.seen[key] = Call(**call)
                except (ValueError, TypeError):
                    raise ConfigError(
                        f"Cache file {str(self.cache)!r} line {number} is not a recorded call."
                    ) from None

    async def get(
        self, messages: list[Message], temperature: float, max_tokens: int, seed: int,
        stop: list[str] | None = None,
    ) -> Call:
        max_tokens = min(max_tokens, self.cap)
        seed = 0 if temperature == 0 else seed
        key = json.dumps([self.ref, messages, temperature, max_tokens, seed, *([stop] if stop
                                                                              else [])])
        if key not in self.seen:
            provider, model = self.registry.resolve(self.ref)
            request = ChatRequest(model=model, messages=messages, temperature=temperature,
                                  max_tokens=max_tokens, seed=seed, stop=stop)
            started = time.perf_counter()
            done = (await provider.complete(request))[0]
            call = Call(done.text, done.usage.prompt_tokens, done.usage.completion_tokens,
                        time.perf_counter() - started)
            self.seen[key] = call
            if self.cache:
                with self.cache.open("a") as f:
                    f.write(json.dumps([key, call.__dict__]) + "\n")
        return self.seen[key]


@dataclass
class Answer:
    """What one row did on one task."""

    text: str
    calls: list[Call]

    def outcome(self) -> Outcome:
        return Outcome(self.text, len(self.calls), sum(c.prompt_tokens for c in self.calls),
                       sum(c.completion_tokens for c in self.calls), None)


Row = Callable[["Composer", str], Awaitable[Answer]]


@dataclass
class Composer:
    """Builds each row's answer to a question from the shared calls."""

    calls: Calls
    temperature: float
    preset: Any  # MixtureConfig of the `local` preset, with `model` in every slot
    debates: dict[str, Any] = field(default_factory=dict)
    """Debate rows' `MixtureConfig`s by row name (the `local-debate` preset, `model` in every
    slot), run by `debate_answer`."""
    _mixtures: dict[str, Any] = field(default_factory=dict)
    _provider: CallsProvider | None = None

    def user(self, question: str) -> list[Message]:
        return [{"role": "user", "content": question}]

    async def greedy(self, question: str) -> Call:
        return await self.calls.get(self.user(question), 0.0, self.calls.cap, 0)

    async def sampled(self, question: str, k: int) -> Call:
        return await self.calls.get(self.user(question), self.temperature, self.calls.cap, k)

    async def proposals(self, question: str, greedy: bool) -> list[Call]:
        first = [await self.greedy(question)] if greedy else []
        rest = [await self.sampled(question, k) for k in range(3 - len(first))]
        return first + rest

    async def aggregate(
        self, question: str, replies: list[str], instruction: str, system: str | None,
        temperature: float, max_tokens: int, *, layout: Layout = "paper",
        stop: list[str] | None = None,
    ) -> Call:
        refs = mark_duplicates([Reference(r) for r in replies])
        block = readable_block(refs, instruction)
        if layout == "cache":
            messages = cache_messages(self.user(question), [block], "", system)
        else:
            messages = aggregate_messages(self.user(question), block, system=system)
        return await self.calls.get(messages, temperature, max_tokens, 0, stop)

    async def preset_answer(
        self, question: str, skip_on_agreement: bool = False, layout: Layout = "paper"
    ) -> Answer:
        """The preset's graph: its proposer slots, then its aggregator (in `layout`) — or,
        with `skip_on_agreement`, the proposers' common answer when they all agree."""
        layer, agg = self.preset.layers[0], self.preset.final
        props: list[Call] = []
        sampled = 0
        for agent in layer.agents:
            messages = self.user(question)
            if agent.system:
                messages = [{"role": "system", "content": agent.system}, *messages]
            for _ in range(agent.n):
                seed = sampled if agent.temperature else 0
                sampled += bool(agent.temperature)
                props.append(await self.calls.get(messages, agent.temperature,
                                                  agent.max_tokens, seed, agent.stop))
        if skip_on_agreement and agreement([p.text for p in props]).unanimous:
            return _vote(props)
        final = await self.aggregate(question, [p.text for p in props], AGGREGATE_PROMPT,
                                     agg.system, agg.temperature, agg.max_tokens,
                                     layout=layout, stop=agg.stop)
        return Answer(final.text, [*props, final])


    async def debate_answer(self, name: str, question: str) -> Answer:
        """The debate `name` run by the real strategy (`moa.Mixture`), every call of it through
        the shared calls (`CallsProvider`): round 1 with seeds 0, 1, 2 is the `preset local`
        row's proposers, so the two rows differ only in what follows them."""
        from moa.mixture import Mixture

        if self._provider is None:
            self._provider = CallsProvider(self.calls)
        if name not in self._mixtures:
            registry = _CallsRegistry(self.calls.registry, self.calls.ref, self._provider)
            self._mixtures[name] = Mixture(self.debates[name], registry=registry)
        trace = self._provider.trace = []
        result = await self._mixtures[name].run(question, seed=0)
        return Answer(result.text, trace)

    async def aclose(self) -> None:
        for mixture in self._mixtures.values():
            await mixture.aclose()


class CallsProvider(Provider):
    """The model under test as a provider whose every call goes through `Calls` (memoised,
    kept in `--cache`, timed), one call at a time — what the CPU engine does anyway, so each
    call's time is its own; `trace` collects the calls a run made."""

    name = "bench"
    capabilities = Capabilities(queued=True)

    def __init__(self, calls: Calls) -> None:
        self.calls = calls
        self.trace: list[Call] = []
        self._lock: anyio.Lock | None = None

    async def stream(self, request: ChatRequest) -> AsyncIterator[Delta]:  # type: ignore[override]
        if self._lock is None:
            self._lock = anyio.Lock()
        cap = min(request.max_tokens or self.calls.cap, self.calls.cap)
        async with self._lock:
            call = await self.calls.get(request.messages, request.temperature or 0.0, cap,
                                        request.seed or 0, request.stop)
        self.trace.append(call)
        yield Delta(text=call.text)
        yield Delta(finish_reason="length" if call.completion_tokens >= cap else "stop",
                    usage=Usage(call.prompt_tokens, call.completion_tokens))


class _CallsRegistry(Registry):
    """`base`, with the model under test resolved to a `CallsProvider`."""

    def __init__(self, base: Registry, ref: str, provider: CallsProvider) -> None:
        super().__init__(base.specs())
        self.ref, self.provider = ref, provider

    def resolve(self, ref: str) -> tuple[Provider, str]:
        if ref == self.ref:
            return self.provider, ref.partition("/")[2]
        return super().resolve(ref)


def _vote(props: list[Call]) -> Answer:
    votes = agreement([p.text for p in props])
    winner = next((p for p, a in zip(props, votes.answers, strict=True)
                   if a is not None and a == votes.majority), props[0])
    return Answer(winner.text, props)


async def _alone_greedy(c: Composer, q: str) -> Answer:
    return Answer((call := await c.greedy(q)).text, [call])


async def _alone_sampled(c: Composer, q: str) -> Answer:
    return Answer((call := await c.sampled(q, 0)).text, [call])


async def _vote_sampled(c: Composer, q: str) -> Answer:
    return _vote(await c.proposals(q, greedy=False))


async def _vote_greedy(c: Composer, q: str) -> Answer:
    return _vote(await c.proposals(q, greedy=True))


async def _preset(c: Composer, q: str) -> Answer:
    return await c.preset_answer(q)


async def _preset_cache(c: Composer, q: str) -> Answer:
    return await c.preset_answer(q, layout="cache")


async def _skip_on_agreement(c: Composer, q: str) -> Answer:
    return await c.preset_answer(q, skip_on_agreement=True)


async def _debate(c: Composer, q: str) -> Answer:
    return await c.debate_answer("debate local", q)


async def _debate_3(c: Composer, q: str) -> Answer:
    return await c.debate_answer("debate local 3 rounds", q)


async def _greedy_aggregator(c: Composer, q: str) -> Answer:
    props = await c.proposals(q, greedy=True)
    final = await c.aggregate(q, [p.text for p in props], AGGREGATE_PROMPT, None, 0.0, 192)
    return Answer(final.text, [*props, final])


async def _short_instruction(c: Composer, q: str) -> Answer:
    props = await c.proposals(q, greedy=True)
    final = await c.aggregate(q, [p.text for p in props], SMALL_MODEL_INSTRUCTION, None, 0.0, 64)
    return Answer(final.text, [*props, final])


async def _extracted(c: Composer, q: str) -> Answer:
    props = await c.proposals(q, greedy=True)
    answers = [extract_answer(p.text) or p.text for p in props]
    final = await c.aggregate(q, answers, SMALL_MODEL_INSTRUCTION, None, 0.0, 64)
    return Answer(final.text, [*props, final])


ROWS: dict[str, Row] = {
    "alone greedy": _alone_greedy,
    "alone sampled": _alone_sampled,
    "vote 3 sampled": _vote_sampled,
    "vote greedy+2 sampled": _vote_greedy,
    "preset local": _preset,
    "preset local (cache layout)": _preset_cache,
    "skip-on-agreement": _skip_on_agreement,
    "debate local": _debate,
    "debate local 3 rounds": _debate_3,
    "greedy+2 greedy aggregator": _greedy_aggregator,
    "short instruction": _short_instruction,
    "extracted answers": _extracted,
}


def wilson(right: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion `right / n`."""
    if n == 0:
        return 0.0, 1.0
    p = right / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def score(split: str, name: str, tasks: list[Task],
          results: list[tuple[Outcome | None, float]]) -> dict[str, Any]:
    """One table row from each task's outcome (None: the run failed) and latency."""
    right = sum(o is not None and is_correct(o.text, t.answer)
                for (o, _), t in zip(results, tasks, strict=True))
    done = [o for o, _ in results if o is not None]
    low, high = wilson(right, len(tasks))
    n = len(tasks)
    return {
        "split": split, "config": name, "accuracy": round(right / n, 4),
        "ci_low": round(low, 4), "ci_high": round(high, 4), "tasks": n,
        "errors": n - len(done),
        "calls": round(sum(o.calls for o in done) / n, 2),
        "tokens": round(sum(o.prompt_tokens + o.completion_tokens for o in done) / n, 1),
        "latency_s": round(sum(lat for _, lat in results) / n, 3),
    }


Failures = dict[str, Counter[str]]
"""Per row, how many tasks failed for each reason."""


async def _composed(composer: Composer, rows: dict[str, Row], tasks: list[Task], bar: Bar,
                    failures: Failures) -> dict[str, list[tuple[Outcome | None, float]]]:
    """Every row on each task in turn (task by task, so a cut-short run cached whole tasks).
    A failed task counts as wrong (its reason in `failures`); a `ConfigError` (a missing
    model file, say) stops the bench, since no task can succeed."""
    out: dict[str, list[tuple[Outcome | None, float]]] = {name: [] for name in rows}
    for task in tasks:
        for name, row in rows.items():
            try:
                answer = await row(composer, task.question)
            except ConfigError:
                raise
            except MoaError as err:
                failures.setdefault(name, Counter())[failure_reason(err)] += 1
                out[name].append((None, 0.0))
                continue
            finally:
                bar.advance()
            out[name].append((answer.outcome(), sum(c.seconds for c in answer.calls)))
    return out


async def _mixture(mixture: Any, tasks: list[Task], name: str, bar: Bar, failures: Failures
                   ) -> list[tuple[Outcome | None, float]]:
    out: list[tuple[Outcome | None, float]] = []
    for i, task in enumerate(tasks):
        started = time.perf_counter()
        try:
            outcome: Outcome | None = outcome_of(await mixture.run(task.question, seed=i))
        except MoaError as err:
            failures.setdefault(name, Counter())[failure_reason(err)] += 1
            outcome = None
        bar.advance()
        out.append((outcome, time.perf_counter() - started))
    return out


def failure_notes(rows: list[dict[str, Any]], failures: dict[str, Failures]) -> list[str]:
    """One note per row and reason of failure (`failures` by split, then row); a `MoaError`
    with the reasons when every task of every row failed (the table would measure nothing)."""
    notes = []
    for row in rows:
        counts = failures.get(row["split"], {}).get(row["config"], Counter())
        notes += [f"{row['split']} {row['config']}: {count} of {row['tasks']} tasks failed: "
                  f"{reason}" for reason, count in counts.items()]
    if rows and all(row["errors"] == row["tasks"] for row in rows):
        reasons = [r for split in failures.values() for c in split.values() for r in c]
        raise MoaError(f"Every task failed: {' '.join(dict.fromkeys(reasons))}")
    return notes


def _registry(providers: str | None) -> Any:
    from moa.config import read_file
    from moa.providers.registry import ProviderSpec, Registry, default_registry

    registry = Registry(default_registry.specs())
    tables = read_file(providers).get("providers") or {} if providers else {}
    for prefix, spec in tables.items():
        registry.register(ProviderSpec.model_validate({"prefix": prefix, **spec}))
    return registry


def _preset_for(model: str) -> Any:
    from moa.config import LOCAL_MODEL, preset

    config = preset("local")
    for agent in config.agents():
        if agent.model == LOCAL_MODEL:
            agent.model = model
    return config


def _debates_for(model: str) -> dict[str, Any]:
    """The debate rows' configs: the `local-debate` preset with `model` in every slot (3
    debaters x 2 rounds, then the vote; a tie or open-ended answers go to its aggregator), and
    the same with a third round."""
    from moa.config import LOCAL_MODEL, preset

    config = preset("local-debate")
    for agent in config.agents():
        if agent.model == LOCAL_MODEL:
            agent.model = model
    three = config.model_copy(deep=True)
    assert three.debate is not None
    three.debate.rounds = 3
    return {"debate local": config, "debate local 3 rounds": three}


def _rows(names: str | None) -> dict[str, Row]:
    if not names:
        return ROWS
    chosen = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in ROWS]
    if unknown:
        raise MoaError(f"Unknown row {unknown[0]!r}; rows: {', '.join(ROWS)}.")
    return {n: ROWS[n] for n in chosen}


def run(args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[str]]:
    import anyio

    from moa.bench import taskset
    from moa.mixture import Mixture

    rows_to_run = _rows(args.rows)
    splits = taskset.SPLITS if args.split == "both" else (args.split,)
    registry = _registry(args.providers)
    registry.check(args.model)
    calls = Calls(registry, args.model, args.max_tokens,
                  Path(args.cache) if args.cache else None)
    composer = Composer(calls, args.temperature, _preset_for(args.model),
                        _debates_for(args.model))
    rows: list[dict[str, Any]] = []
    failures: dict[str, Failures] = {}

    async def main() -> None:
        try:
            for split in splits:
                tasks = [t for _, t in taskset.load(split, limit=args.limit)]
                bar = Bar(f"quality {split}", len(tasks) * (len(rows_to_run) + len(args.config)))
                failed = failures[split] = {}
                results = await _composed(composer, rows_to_run, tasks, bar, failed)
                rows.extend(score(split, name, tasks, results[name]) for name in rows_to_run)
                for source in args.config:
                    name = f"-c {source}"
                    async with Mixture(source, registry=registry) as mixture:
                        results = await _mixture(mixture, tasks, name, bar, failed)
                    rows.append(score(split, name, tasks, results))
        finally:
            await composer.aclose()
            await registry.aclose()

    anyio.run(main)
    notes = [f"model {args.model}; {args.max_tokens} max tokens per composed call; 95 % Wilson "
             "intervals; a row matches the model alone when its interval reaches "
             "`alone greedy`'s accuracy."]
    return rows, notes + failure_notes(rows, failures)
