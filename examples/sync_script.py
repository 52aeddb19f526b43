"""The sync API from a plain script: one answer, then a streamed one.

Runs the `local` preset (SmolLM2 on the CPU) when llama-cpp-python is installed and
MOA_EXAMPLE_LOOPBACK is unset; otherwise a three-agent mixture on the loopback test server.
"""

import contextlib
import importlib.util
import os

from moa import Mixture, preset
from moa.events import FinalDelta
from moa.testing import LoopbackServer, ModelBehavior


def demo(mixture: Mixture) -> None:
    result = mixture.run_sync("Name one use of a mixture of agents.", max_tokens=32)
    print(result.text)
    print(f"{result.calls} calls, {result.usage.total_tokens} tokens, {result.latency_s:.2f} s")
    streamed = ""
    for event in mixture.stream_sync("And another one?", max_tokens=32):
        if isinstance(event, FinalDelta):
            streamed += event.text
            print(event.text, end="", flush=True)
    print()
    final = next(o for o in result.outputs if o.agent.final)
    # max_tokens caps the final answer; both calls produced one.
    assert result.text.strip() and streamed.strip() and final.usage.completion_tokens <= 32


if __name__ == "__main__":
    local = importlib.util.find_spec("llama_cpp") and not os.environ.get("MOA_EXAMPLE_LOOPBACK")
    with contextlib.ExitStack() as stack:
        if local:
            config = preset("local")
            for agent in config.agents():
                agent.max_tokens = 32
            demo(Mixture(config))
        else:
            srv = stack.enter_context(LoopbackServer(default=ModelBehavior(
                reply="Answering hard questions by consensus.", tokens_per_s=200)))
            demo(Mixture({"layers": [{"agents": [{"model": "loop/a"}, {"model": "loop/b"}]}],
                          "aggregator": {"model": "loop/agg"}}, registry=srv.registry()))
