"""Staircase streaming and its pacing rule: lockstep (the default) against eager.

Three proposers of different speeds stream into one aggregator over the bundled loopback
server (offline). For each pacing rule it prints the answer's time to first token, the total
time, the aggregator's calls and how much of the references it had read: lockstep never writes
its n-th token before every live reference has shown n tokens; eager writes ahead.
"""

import anyio

from moa import Mixture
from moa.bench.staircase_coverage import FINAL_PREFIX, RecordingRegistry, coverage
from moa.testing import LoopbackServer, ModelBehavior

WORDS = [
    "light",
    "of",
    "short",
    "wavelength",
    "is",
    "scattered",
    "more",
    "by",
    "the",
    "air",
    "so",
    "the",
    "sky",
    "looks",
    "blue",
]


def reply(shift: int) -> str:
    return " ".join((WORDS[shift:] + WORDS[:shift]) * 4)


async def main(srv: LoopbackServer) -> None:
    for pacing in ("lockstep", "eager"):
        registry = RecordingRegistry(srv.registry(), "loop")
        config = {
            "layers": [{"agents": [{"model": f"loop/p{i}"} for i in range(3)]}],
            "aggregator": {"model": f"{FINAL_PREFIX}/agg", "max_tokens": 120},
            "mode": "staircase",
            "staircase": {"pacing": pacing, "chunk_tokens": [8, 16], "step_tokens": [8, 16]},
        }
        mixture = Mixture(config, registry=registry)
        result = await mixture.run("Why is the sky blue?")
        await mixture.aclose()
        refs = [(o.text, o.finish_reason == "stop", 4 * len(WORDS)) for o in result.outputs[:3]]
        cover = coverage(registry.calls, refs, result.text)
        print(
            f"{pacing:9} TTFT {result.ttft_s:.2f} s, total {result.latency_s:.2f} s, "
            f"{result.outputs[-1].calls} aggregator calls, read {100 * cover.share:.0f} % of "
            f"every reference, lead over its own output >= {cover.margin} tokens"
        )


if __name__ == "__main__":
    models = {
        f"p{i}": ModelBehavior(reply=reply(i), tokens_per_s=rate, ttft_s=0.05 * i)
        for i, rate in enumerate((200.0, 120.0, 80.0))
    }
    models["agg"] = ModelBehavior(reply=reply(5) + " " + reply(7), tokens_per_s=400)
    with LoopbackServer(models) as server:
        anyio.run(main, server)
