"""Async library use: stream a mixture's events, then print the result's accounting.

Runs the `moa-lite` preset on Together when TOGETHER_API_KEY is set; otherwise (or with
MOA_EXAMPLE_LOOPBACK=1) against the bundled loopback test server.
"""

import contextlib
import os

import anyio

from moa import Mixture, preset
from moa.events import AgentFailed, AgentFinished, FinalDelta, Notice, RunFinished
from moa.testing import LoopbackServer, ModelBehavior


async def main(mixture: Mixture) -> None:
    streamed, finished = "", None
    async for event in mixture.stream("In one paragraph: why is the sky blue?"):
        if isinstance(event, Notice):
            print(f"[notice] {event.message}")
        elif isinstance(event, AgentFinished) and not event.agent.final:
            print(f"[{event.agent.label}] done in {event.latency_s:.2f} s")
        elif isinstance(event, AgentFailed):
            print(f"[{event.agent.label}] failed: {event.error}")
        elif isinstance(event, FinalDelta):
            streamed += event.text
            print(event.text, end="", flush=True)
        elif isinstance(event, RunFinished):
            r = finished = event.result
            print(f"\n{r.mode}: {r.calls} calls, {r.usage.total_tokens} tokens, "
                  f"TTFT {r.ttft_s:.2f} s, total {r.latency_s:.2f} s, cost {r.cost_usd}")
    await mixture.aclose()
    # The streamed answer is the result's answer; moa-lite makes 6 proposer calls + 1.
    assert finished is not None and finished.text == streamed and streamed.strip()
    assert finished.calls == 7, finished.calls


if __name__ == "__main__":
    config = preset("moa-lite")
    with contextlib.ExitStack() as stack:
        if os.environ.get("MOA_EXAMPLE_LOOPBACK") or not os.environ.get("TOGETHER_API_KEY"):
            srv = stack.enter_context(LoopbackServer(default=ModelBehavior(
                reply="Rayleigh scattering favours short wavelengths.", tokens_per_s=50)))
            for agent in config.agents():
                agent.model = "loop/" + agent.model.partition("/")[2]
            anyio.run(main, Mixture(config, registry=srv.registry()))
        else:
            anyio.run(main, Mixture(config))
