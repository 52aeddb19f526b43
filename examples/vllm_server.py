"""A staircase mixture on a vLLM server (`hosted_vllm/`), the aggregator continuing its answer.

With a server started by `vllm serve Qwen/Qwen2.5-1.5B-Instruct` (port 8000, moa's default for
`hosted_vllm/`; set HOSTED_VLLM_BASE_URL for another), run:

    MOA_VLLM_MODEL=Qwen/Qwen2.5-1.5B-Instruct python examples/vllm_server.py

Without MOA_VLLM_MODEL (or with MOA_EXAMPLE_LOOPBACK=1) the same code runs against the bundled
loopback server, which speaks vLLM's `continue_final_message` the same way.
"""

import contextlib
import os

from moa import Mixture
from moa.testing import LoopbackServer, ModelBehavior

ANSWER = "Paged attention stores the KV cache in fixed-size blocks, so memory is not wasted."


def mixture(model: str) -> Mixture:
    return Mixture({
        "name": "vllm-staircase",
        "mode": "staircase",
        "layers": [{"agents": [{"model": f"hosted_vllm/{model}", "n": 3, "temperature": 0.8,
                                "max_tokens": 200}]}],
        "aggregator": {"model": f"hosted_vllm/{model}", "max_tokens": 200},
    })


def main(model: str) -> None:
    result = mixture(model).run_sync("What does paged attention do, in one sentence?")
    final = next(o for o in result.outputs if o.agent.final)
    print(result.text)
    print(f"{result.mode}: {result.calls} calls, the aggregator in {final.calls} steps, "
          f"TTFT {result.ttft_s:.2f} s, total {result.latency_s:.2f} s")
    assert result.mode == "staircase" and final.ok and result.text.strip(), result


if __name__ == "__main__":
    model = os.environ.get("MOA_VLLM_MODEL")
    with contextlib.ExitStack() as stack:
        if os.environ.get("MOA_EXAMPLE_LOOPBACK") or not model:
            model = "demo"
            # Proposers stream slowly, so the aggregator starts on their first chunks.
            srv = stack.enter_context(LoopbackServer(
                default=ModelBehavior(reply=" ".join([ANSWER] * 4), tokens_per_s=150)))
            os.environ["HOSTED_VLLM_BASE_URL"] = srv.base_url
            main(model)
            steps = [r.body for r in srv.requests
                     if r.body and r.body["messages"][-1]["role"] == "assistant"]
            # Every step after the first continues the aggregator's own answer, vLLM style.
            assert steps and all(b.get("continue_final_message") for b in steps), steps
            assert all(b.get("add_generation_prompt") is False for b in steps)
            print(f"{len(steps)} continuation requests sent with continue_final_message")
        else:
            main(model)
