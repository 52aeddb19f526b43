"""A mixture of two Ollama models (`ollama/`), aggregated by the larger one.

With Ollama running (`ollama serve`, port 11434; set OLLAMA_BASE_URL for another) and the models
pulled (`ollama pull llama3.2:1b && ollama pull qwen2.5:1.5b`), run:

    MOA_OLLAMA=1 python examples/ollama.py

Ollama's OpenAI-compatible API cannot continue an assistant turn, so `mode = "auto"` runs the
layered mode. Without MOA_OLLAMA (or with MOA_EXAMPLE_LOOPBACK=1) the
same code runs against the bundled loopback server.
"""

import contextlib
import os

from moa import Mixture
from moa.testing import LoopbackServer, ModelBehavior

CONFIG = {
    "name": "ollama-pair",
    "layers": [{"agents": [{"model": "ollama/llama3.2:1b"}, {"model": "ollama/qwen2.5:1.5b"}]}],
    "aggregator": {"model": "ollama/qwen2.5:1.5b", "temperature": 0.2},
}


def main() -> None:
    result = Mixture(CONFIG).run_sync("Name two uses of a hash map, one line each.")
    print(result.text)
    for notice in result.notices:
        print(f"note: {notice}")
    print(f"{result.mode}: {result.calls} calls, {result.usage.total_tokens} tokens, "
          f"total {result.latency_s:.2f} s, cost {result.cost_usd}")
    assert result.mode == "layered" and result.calls == 3 and not result.failed, result
    assert result.cost_usd == 0.0 or result.cost_usd is None


if __name__ == "__main__":
    with contextlib.ExitStack() as stack:
        if os.environ.get("MOA_EXAMPLE_LOOPBACK") or not os.environ.get("MOA_OLLAMA"):
            srv = stack.enter_context(LoopbackServer(default=ModelBehavior(
                reply="Counting words in a text; caching results by key.")))
            os.environ["OLLAMA_BASE_URL"] = srv.base_url
            main()
            assert {r.body["model"] for r in srv.requests if r.body} == {
                "llama3.2:1b", "qwen2.5:1.5b"}
        else:
            main()
