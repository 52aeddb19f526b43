"""Route each stage of a mixture to a cheap or a strong model, within a budget.

Runs offline: the cheap and strong models are the simulated pair of `moa bench routing`,
served by the loopback server. With real models, use e.g.
`{"cheap": "openai/gpt-4o-mini", "strong": "openai/gpt-4o"}` and drop the server.

    python examples/routing.py
"""

from __future__ import annotations

import asyncio

from moa.bench.routing_model import SimulatedModels
from moa.errors import BudgetExceeded
from moa.events import RouteDecision, RunFinished
from moa.routing.strategy import RoutedMixture
from moa.testing import LoopbackServer

CONFIG = {
    "cheap": "sim/cheap",
    "strong": "sim/strong",
    "proposers": 3,
    "max_tokens": 96,
    "top_logprobs": 0,
    # Skip the aggregation when every proposer is confident, else aggregate on the strong tier.
    "router": {
        "policy": "threshold",
        "signal": "min_confidence",
        "threshold": -0.3,
        "skip_above": -0.3,
    },
    "budget": {"usd": 0.01},
    "prices": {"sim/cheap": (0.15, 0.60), "sim/strong": (2.50, 10.00)},
}


async def main() -> None:
    sim = SimulatedModels()
    choices, refused = [], False
    async with LoopbackServer(sim.behaviors()) as server:
        mixture = RoutedMixture(CONFIG, registry=server.registry("sim"))
        for question in sim.questions[:4]:
            async for event in mixture.stream(question.prompt, seed=question.qid):
                if isinstance(event, RouteDecision) and event.stage == "aggregate":
                    choices.append(event.choice)
                    print(f"{question.prompt[:40]}…  {event.choice:6} ({event.reason})")
                elif isinstance(event, RunFinished):
                    result = event.result
                    print(
                        f"  -> {result.text[-22:]}  truth {question.answer}, "
                        f"{result.calls} calls, ${result.cost_usd:.6f}"
                    )
        tight = RoutedMixture({**CONFIG, "budget": {"usd": 1e-6}}, registry=server.registry("sim"))
        try:
            await tight.run(sim.questions[0].prompt)
        except BudgetExceeded as err:
            refused = True
            print(f"Refused before any call: {err}")
    # Every question got an aggregation decision, and the tight budget refused the request.
    assert len(choices) == 4 and refused, (choices, refused)


if __name__ == "__main__":
    asyncio.run(main())
