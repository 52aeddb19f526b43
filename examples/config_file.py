"""Load a mixture from a TOML file and run it synchronously.

Uses `examples/mixture.toml` on Together when TOGETHER_API_KEY is set; otherwise (or with
MOA_EXAMPLE_LOOPBACK=1) the same file's shape against the bundled loopback test server.
"""

import os
from pathlib import Path

from moa import Mixture, load
from moa.testing import LoopbackServer, ModelBehavior

config = load(Path(__file__).with_name("mixture.toml"))

if os.environ.get("MOA_EXAMPLE_LOOPBACK") or not os.environ.get("TOGETHER_API_KEY"):
    with LoopbackServer(default=ModelBehavior(reply="Paris is the capital of France.")) as srv:
        for agent in config.agents():
            agent.model = "loop/" + agent.model.partition("/")[2]
        result = Mixture(config, registry=srv.registry()).run_sync("Capital of France?")
else:
    result = Mixture(config).run_sync("Capital of France?")

print(result.text)
for out in result.outputs:
    print(f"{out.agent.label}: ok={out.ok} calls={out.calls} tokens={out.usage.total_tokens}")
# The file's shape: three proposer calls (one model sampled twice) and the aggregator.
assert len(result.outputs) == 4 and not result.failed and "Paris" in result.text, result
