"""A routed, staircase mixture: the aggregator picks a cheap or a strong model per question.

Runs offline against the loopback server: three proposers whose answers depend on the seed
(so they agree on one question and disagree on another), a small and a large aggregator. The
aggregator starts under staircase as soon as the proposers' first chunks are in; the router
decides its tier then, from the signals it has (the decision says how many references were
complete). With real models, name them (e.g. `openai/gpt-4o-mini`, `openai/gpt-4o`) and drop
the server.

    python examples/routing.py
"""

from __future__ import annotations

import asyncio
from typing import Any

from moa import Mixture
from moa.errors import MixtureError
from moa.events import FinalDelta, RouteDecision, RunFinished
from moa.testing import LoopbackServer, ModelBehavior

CONFIG: dict[str, Any] = {
    "name": "routed-staircase",
    "mode": "staircase",
    "layers": [{"agents": [{"model": f"sim/p{i}", "max_tokens": 64} for i in (1, 2, 3)]}],
    "aggregator": {"model": "sim/agg-small", "strong": "sim/agg-large", "max_tokens": 64},
    # Agreeing proposers: the small aggregator. Disagreeing ones: the large one.
    "router": {"policy": "threshold", "signal": "agreement", "threshold": 0.9},
    "budget": {"usd": 0.01},
    "prices": {
        **{f"sim/p{i}": (0.15, 0.60) for i in (1, 2, 3)},
        "sim/agg-small": (0.15, 0.60),
        "sim/agg-large": (2.50, 10.00),
    },
}


QUESTIONS = {"What is 2 + 2?": [4, 4, 4], "What is 17 * 23?": [391, 401, 381]}
"""What each proposer answers: they agree on the first question and not on the second."""


def _question(body: dict[str, Any]) -> str:
    return next(m["content"] for m in reversed(body["messages"]) if m["role"] == "user")


def proposer(i: int) -> ModelBehavior:
    def reply(body: dict[str, Any]) -> str:
        answer = QUESTIONS[_question(body)][i]
        return f"Working it out step by step gives {answer}. The answer is {answer}."

    return ModelBehavior(reply=reply, tokens_per_s=400)


def aggregator(lead: str) -> ModelBehavior:
    def reply(body: dict[str, Any]) -> str:
        return f"{lead} The answer is {QUESTIONS[_question(body)][0]}."

    return ModelBehavior(reply=reply, tokens_per_s=400)


BEHAVIORS = {
    **{f"p{i + 1}": proposer(i) for i in range(3)},
    "agg-small": aggregator("The proposers agree."),
    "agg-large": aggregator("Checking each proposal against the arithmetic:"),
}


async def main() -> None:
    choices: dict[str, str] = {}
    refused = False
    async with LoopbackServer(BEHAVIORS) as server:
        mixture = Mixture(CONFIG, registry=server.registry("sim"))
        for question in QUESTIONS:
            answer = ""
            async for event in mixture.stream(question):
                if isinstance(event, RouteDecision):
                    choices[question] = event.choice
                    s = event.signals
                    print(
                        f"{question} {event.stage} -> {event.choice} ({event.reason}; "
                        f"{s['references_done']} references complete, "
                        f"{s['references_partial']} partial)"
                    )
                elif isinstance(event, FinalDelta):
                    answer += event.text
                elif isinstance(event, RunFinished):
                    r = event.result
                    print(f"  {answer!r}  mode {r.mode}, {r.calls} calls, ${r.cost_usd:.6f}")
        tight = Mixture({**CONFIG, "budget": {"usd": 1e-7}}, registry=server.registry("sim"))
        try:
            await tight.run("What is 2 + 2?")
        except MixtureError as err:
            refused = True
            print(f"Over budget: {err}")
    # Agreement -> the small aggregator, disagreement -> the large one; the tight budget refuses.
    assert list(choices.values()) == ["cheap", "strong"] and refused, (choices, refused)


if __name__ == "__main__":
    asyncio.run(main())
