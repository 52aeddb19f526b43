"""`moa bench debate`: multi-agent debate layered vs staircase, and the consensus stop.

Loopback backend, paper-like settings (Du et al. 2023: 3 agents × 2 rounds, answers of a few
hundred words): three debaters with different speeds — TTFT 0.3 / 0.6 / 0.9 s and 80 / 50 /
30 tokens/s — each answering `--tokens` words (300 by default; every word one tiktoken token)
that end "The answer is X.". A debater's answer depends on its round (the user turns it was
sent), never on how much of its peers it saw, so the layered and staircase runs write the same
texts. The simulated models behave as a real backend: they honour `max_tokens` (a staircase
step stops where it is told to), continue an assistant prefix where they left off (never
restart), pay their TTFT again on every request (a continued step included), and report
`cached_tokens` as the longest prompt prefix shared with one of their earlier requests (the
loopback prompt cache, `Usage.cached_tokens`). Each row runs on a fresh server, so no run
reads another's cache.

Rows, side by side in one run: 3 debaters × 2 and × 3 rounds that keep disagreeing (every round
runs), layered, staircase and their ratio (staircase / layered); then the same 3 rounds with
debaters that agree from round 1 and `stop_at_consensus` on (the calls the stop saved).

Columns: `final_ttft_s` (first token of the answer: the vote's, when the last round is over),
`total_s`, `calls`, `saved_calls`, `prompt_tokens`, `cached` (share of prompt tokens read from
the prefix cache), `requests` and `margin`: the least (tokens a still-unfinished peer of the
previous round had shown − tokens the debater could have written by the end of the request,
its answer so far plus the request's `max_tokens`) over every staircase request and peer —
the pacing invariant holds when it is >= 0 (empty: every request saw complete answers).
"""

from __future__ import annotations

import argparse
import random
import re
import time
from typing import Any

from moa.bench.staircase import schedule
from moa.config import StaircaseConfig

DEBATERS = (("d0", 0.3, 80.0), ("d1", 0.6, 50.0), ("d2", 0.9, 30.0))
"""(model, TTFT s, tokens/s) of each debater: different speeds, as a real panel has."""
QUESTION = (
    "A farmer has 17 sheep and buys 3 times as many goats as sheep, then sells 12 goats. How "
    "many animals does the farmer have now? Explain step by step."
)
VOCABULARY = (
    "the of and to in is that for it as was with be by on not this are or from at which but "
    "have an they you were there been one all we their has would when if so no will can more "
    "other its time also into only some what these two may first then any could like goats "
    "sheep farmer count total step answer reason number each so"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="small numbers for a smoke test")
    parser.add_argument("--tokens", type=int,
                        help="words (tokens) per answer (default 300; quick 40)")
    parser.add_argument(
        "--steps", metavar="N,N,...", type=schedule,
        help="staircase schedule, both chunk_tokens and step_tokens (default: StaircaseConfig's)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _words(seed: int, tokens: int) -> str:
    """`tokens` words, each one tiktoken token, different for every seed."""
    from moa.tokens import count_tokens

    vocabulary = [w for w in VOCABULARY.split() if count_tokens(f" {w}") == 1 == count_tokens(w)]
    return " ".join(random.Random(seed).choices(vocabulary, k=tokens))


class Panel:
    """The debaters' answers: per model and round, a fixed text ending in an answer."""

    def __init__(self, tokens: int, agree: bool) -> None:
        self.tokens, self.agree = tokens, agree

    def answer(self, index: int, round_: int) -> int:
        """Agreeing debaters say 65 from round 1; the others never all agree: d0 says 65, d1
        moves from 63 to 65 after round 1, d2 keeps 71 (the vote is 2 of 3, no judge)."""
        if self.agree:
            return 65
        return (65, 63 if round_ == 1 else 65, 71)[index]

    def text(self, index: int, round_: int) -> str:
        name = DEBATERS[index][0]
        body = _words(1000 * index + round_, max(self.tokens - 4, 1))
        return f"{name} {body} The answer is {self.answer(index, round_)}."

    def behaviors(self, scale: float) -> dict[str, Any]:
        from moa.testing import ModelBehavior

        def reply(index: int) -> Any:
            def text(body: dict[str, Any]) -> str:
                round_ = sum(m.get("role") == "user" for m in body.get("messages", []))
                return self.text(index, round_)
            return text

        return {
            name: ModelBehavior(reply=reply(i), ttft_s=ttft * scale, tokens_per_s=rate / scale)
            for i, (name, ttft, rate) in enumerate(DEBATERS)
        }

    def fulls(self, rounds: int) -> set[str]:
        return {self.text(i, r) for i in range(len(DEBATERS)) for r in range(1, rounds + 1)}


def _config(
    mode: str, rounds: int, tokens: int, stop: bool, steps: list[int] | None = None
) -> dict[str, Any]:
    return {
        **({"staircase": {"chunk_tokens": steps, "step_tokens": steps}} if steps else {}),
        "name": f"debate-{len(DEBATERS)}x{rounds}",
        "strategy": "debate",
        "mode": mode,
        "debate": {
            "agents": [{"model": f"loop/{name}", "max_tokens": tokens + 32}
                       for name, _, _ in DEBATERS],
            "rounds": rounds,
            "stop_at_consensus": stop,
        },
        # Only for a tie or open-ended answers: the panels here always have a majority.
        "aggregator": {"model": "loop/judge", "max_tokens": tokens + 32},
    }


def margin(bodies: list[dict[str, Any]], fulls: set[str]) -> int | None:
    """The least pacing margin over the revision requests `bodies` (see the module doc);
    None when every peer every request showed was complete."""
    from moa.runtime.prompts import IN_PROGRESS_LABEL
    from moa.tokens import count_tokens

    least: int | None = None
    for body in bodies:
        messages = body["messages"]
        if sum(m["role"] == "user" for m in messages) < 2:
            continue  # round 1: nothing to pace against
        own = messages[-1]["content"] if messages[-1]["role"] == "assistant" else ""
        turn = messages[-2 if own else -1]["content"]
        mine = messages[-3 if own else -2]["content"]
        shown = re.findall(r"One agent solution: ```(.*?)```", turn, re.DOTALL)
        after = count_tokens(own) + int(body.get("max_tokens") or 0)
        for text in [mine, *(s.removesuffix(IN_PROGRESS_LABEL) for s in shown)]:
            if text in fulls:
                continue  # a complete answer holds nothing back
            lead = count_tokens(text.rstrip()) - after
            least = lead if least is None else min(least, lead)
    return least


async def measure(mode: str, rounds: int, tokens: int, scale: float, agree: bool,
                  steps: list[int] | None = None) -> dict[str, Any]:
    """One debate on a fresh loopback server (an empty prompt cache)."""
    import anyio

    from moa.mixture import Mixture
    from moa.testing import LoopbackServer, ModelBehavior

    panel = Panel(tokens, agree)
    judge = ModelBehavior(reply=_words(99, tokens), ttft_s=0.3 * scale, tokens_per_s=60 / scale)
    with LoopbackServer({**panel.behaviors(scale), "judge": judge}) as srv:
        mixture = Mixture(_config(mode, rounds, tokens, stop=agree, steps=steps),
                          registry=srv.registry())
        start = time.perf_counter()
        async with mixture:
            result = await mixture.run(QUESTION)
        total = time.perf_counter() - start
        await anyio.to_thread.run_sync(srv.wait_idle)
        bodies = [r.body for r in srv.requests
                  if r.body and r.model in {n for n, _, _ in DEBATERS}]
    expected = {panel.text(i, rounds if not agree else 1) for i in range(len(DEBATERS))}
    written = [(o.text, panel.text(o.agent.index, o.agent.layer + 1))
               for o in result.outputs if not o.agent.final and o.finish_reason != "consensus"]
    if result.text not in expected or any(text != full for text, full in written):
        # a bench bug: a step restarted its answer instead of continuing it, say
        raise AssertionError(f"unexpected answers {[t[:40] for t, _ in written]!r}")
    usage = result.usage
    return {
        "final_ttft_s": round(result.ttft_s if result.ttft_s is not None else total, 3),
        "total_s": round(total, 3),
        "calls": result.calls,
        "saved_calls": result.saved_calls,
        "prompt_tokens": usage.prompt_tokens,
        "cached": f"{100 * usage.cached_tokens / max(usage.prompt_tokens, 1):.0f} %",
        "cached_tokens": usage.cached_tokens,
        "requests": len(bodies),
        "margin": margin(bodies, panel.fulls(rounds)) if mode == "staircase" else None,
        "mode_run": result.mode,
    }


def _plan(quick: bool) -> list[tuple[str, int, bool]]:
    """(debate label, rounds, agreeing debaters) of each pair of runs."""
    plan = [("3 agents x 2 rounds", 2, False), ("3 agents x 3 rounds", 3, False),
            ("3 x 3, agree in round 1, consensus stop", 3, True)]
    return plan[1:] if quick else plan


def run(args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[str]]:
    import anyio

    from moa.cli.progress import Bar

    tokens = args.tokens or (40 if args.quick else 300)
    scale = 0.25 if args.quick else 1.0
    plan = _plan(args.quick)
    rows: list[dict[str, Any]] = []
    bar = Bar("debate", 2 * len(plan))

    async def main() -> None:
        for label, rounds, agree in plan:
            for mode in ("layered", "staircase"):
                row = await measure(mode, rounds, tokens, scale, agree, args.steps)
                rows.append({"debate": label, "mode": mode, **row})
                bar.advance()

    anyio.run(main)
    notes = [
        f"loopback: 3 debaters x {tokens} tokens, TTFT "
        + "/".join(f"{t * scale:g}" for _, t, _ in DEBATERS) + " s, "
        + "/".join(f"{r / scale:g}" for _, _, r in DEBATERS) + " tokens/s; every request "
        "(a continued staircase step too) pays its TTFT again, however long its prompt; "
        "max_tokens and continuation honoured (every answer checked whole, never restarted); "
        "cached = longest prefix shared with an earlier request of the same model; "
        "the answer is the vote of the last round (final TTFT = when the last round ends).",
        f"staircase schedule: chunk_tokens = step_tokens = "
        f"{args.steps or StaircaseConfig().step_tokens}.",
    ]
    return _with_ratios(rows, notes), notes


def _with_ratios(rows: list[dict[str, Any]], notes: list[str]) -> list[dict[str, Any]]:
    """A ratio row (staircase / layered) after each pair, and a note per pair."""
    out: list[dict[str, Any]] = []
    for label in dict.fromkeys(r["debate"] for r in rows):
        pair = {r["mode"]: r for r in rows if r["debate"] == label}
        layered, stair = pair["layered"], pair["staircase"]
        out += [layered, stair]
        ratio = {k: round(stair[k] / layered[k], 3) if layered[k] else None
                 for k in ("final_ttft_s", "total_s", "calls", "prompt_tokens")}
        out.append({"debate": label, "mode": "ratio", **ratio})
        paced = stair["margin"] is None or stair["margin"] >= 0
        notes.append(
            f"{label}: staircase final TTFT x{ratio['final_ttft_s']}, end-to-end "
            f"x{ratio['total_s']}, prompt tokens x{ratio['prompt_tokens']} "
            f"({stair['cached']} cached vs {layered['cached']} layered), "
            f"{stair['requests']} requests vs {layered['requests']}; pacing "
            f"{'kept' if paced else 'VIOLATED'} (least margin {stair['margin']}); "
            f"saved calls {layered['saved_calls']} layered, {stair['saved_calls']} staircase; "
            f"staircase ran as {stair['mode_run']}."
        )
    return out
