"""Score a mixture against its model alone on the shipped exact-answer task set.

The library side of `moa bench quality`: load a split of the task set, run each configuration
with `moa.routing.evaluate`, and read the accuracy with its 95 % Wilson interval. By default it
runs the `local` preset and the bundled SmolLM2-135M on 8 held-out questions (a minute or two on
a CPU); `MOA_EXAMPLE_LOOPBACK=1` swaps the model for a simulated one on the loopback server.

    python examples/quality.py
"""

from __future__ import annotations

import asyncio
import os
import re
from typing import Any

from moa import Mixture
from moa.bench import taskset
from moa.bench.quality import wilson
from moa.config import LOCAL_MODEL, preset
from moa.providers.registry import default_registry
from moa.routing.evaluate import evaluate, outcome_of, single_model
from moa.testing import LoopbackServer, ModelBehavior


def simulated(body: dict[str, Any]) -> str:
    """Right on sums and differences, unsure about anything else."""
    sum_or_difference = re.search(r"(\d+) ([+-]) (\d+)", body["messages"][-1]["content"])
    if not sum_or_difference:
        return "I am not sure."
    a, op, b = sum_or_difference.groups()
    return f"The answer is {int(a) + int(b) if op == '+' else int(a) - int(b)}."


async def main(registry: Any, model: str) -> None:
    tasks = [task for _, task in taskset.load("heldout", limit=2)]
    config = preset("local")
    for agent in config.agents():
        agent.model = model
    mixture = Mixture(config, registry=registry)

    async def run_mixture(question: str, seed: int) -> Any:
        return outcome_of(await mixture.run(question, seed=seed))

    runners = [(f"{model} alone", single_model(registry, model, max_tokens=32)),
               ("preset local", run_mixture)]
    for name, runner in runners:
        row = await evaluate(name, runner, tasks, concurrency=1)
        low, high = wilson(round(row["accuracy"] * row["tasks"]), row["tasks"])
        print(f"{name:28} {row['accuracy']:6.1%}  [{low:.0%}, {high:.0%}]  "
              f"{row['calls']} calls  {row['latency_s']:.2f} s per task")
    await registry.aclose()


if __name__ == "__main__":
    if os.environ.get("MOA_EXAMPLE_LOOPBACK"):
        with LoopbackServer({"sim": ModelBehavior(reply=simulated)}) as server:
            asyncio.run(main(server.registry("loop"), "loop/sim"))
    else:
        asyncio.run(main(default_registry, LOCAL_MODEL))
