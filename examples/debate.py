"""Multi-agent debate: three debaters answer, read each other's answers, revise, then vote.

Runs offline against the loopback server, staircase-streamed: round 2 starts on the partial
round-1 answers. On the first question one debater starts wrong and corrects itself once it
has read the others; on the second all agree in round 1, so the debate stops there and the
calls of round 3 are saved. With real models, name them (e.g. `openai/gpt-4o-mini`,
`anthropic/claude-3-5-haiku-latest`) and drop the server; on the CPU, `moa chat --preset
local-debate "..."` runs the bundled model.

    python examples/debate.py
"""

from __future__ import annotations

import asyncio
from typing import Any

from moa import Mixture
from moa.events import AgentFinished, FinalDelta, Notice, RunFinished
from moa.testing import LoopbackServer, ModelBehavior

CONFIG: dict[str, Any] = {
    "name": "debate",
    "strategy": "debate",
    "mode": "staircase",
    "debate": {
        "agents": [{"model": f"sim/d{i}", "max_tokens": 96} for i in (1, 2, 3)],
        "rounds": 3,
        "final": "vote",  # ties and open-ended answers go to the [aggregator]
    },
    "aggregator": {"model": "sim/judge", "max_tokens": 96},
}

QUESTIONS = {
    "What is 17 * 23?": [[401, 391, 391], [391, 391, 391]],  # d1 is wrong in round 1
    "What is 2 + 2?": [[4, 4, 4]],
}
"""Each round's answers per debater (the last row repeats)."""


def debater(i: int) -> ModelBehavior:
    def reply(body: dict[str, Any]) -> str:
        question = body["messages"][0]["content"]
        n = sum(m["role"] == "user" for m in body["messages"])
        rounds = QUESTIONS[question]
        answer = rounds[min(n, len(rounds)) - 1][i]
        lead = "Having read the other solutions, " if n > 1 else ""
        return f"{lead}I multiply step by step and check the result. The answer is {answer}."

    return ModelBehavior(reply=reply, tokens_per_s=300 - 80 * i)


BEHAVIORS = {
    **{f"d{i + 1}": debater(i) for i in range(3)},
    "judge": ModelBehavior(reply="Weighing the solutions, the answer is 391."),
}


async def main() -> None:
    async with LoopbackServer(BEHAVIORS) as server:
        mixture = Mixture(CONFIG, registry=server.registry("sim"))
        for question in QUESTIONS:
            print(question)
            answer = ""
            async for event in mixture.stream(question):
                if isinstance(event, AgentFinished) and event.finish_reason != "consensus":
                    print(f"  {event.agent.key}: {event.text}")
                elif isinstance(event, Notice):
                    print(f"  [{event.message}]")
                elif isinstance(event, FinalDelta):
                    answer += event.text
                elif isinstance(event, RunFinished):
                    r = event.result
                    print(f"  answer: {answer}\n  mode {r.mode}, {r.calls} calls, "
                          f"{r.saved_calls} saved, TTFT {r.ttft_s:.2f} s\n")
                    assert answer.endswith(str(QUESTIONS[question][-1][0]) + ".")
        await mixture.aclose()


if __name__ == "__main__":
    asyncio.run(main())
