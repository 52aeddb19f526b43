"""What a cold start loads before the first request: not the tokenizer (it loads on a thread once
a reply streams), not httpx's command-line tool. Checked in a fresh interpreter, by what it has
imported and when the encoding loaded (never by timing)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent("""
    import json, sys
    from moa import Mixture
    from moa.config import MixtureConfig
    import moa.providers.openai_compat
    from moa.testing import LoopbackServer, ModelBehavior
    import moa.tokens as tokens
    import tiktoken

    real, seen = tiktoken.get_encoding, []

    def spy(name):
        seen.append(len(srv.requests))  # requests the upstream had read when the load began
        return real(name)

    tiktoken.get_encoding = spy
    config = MixtureConfig.model_validate({
        "name": "cold", "layers": [{"agents": [{"model": "loop/a"}, {"model": "loop/b"}]}],
        "aggregator": {"model": "loop/agg"}})
    with LoopbackServer(default=ModelBehavior(reply="one two three")) as srv:
        mixture = Mixture(config, registry=srv.registry())
        before = tokens._encoding is None
        result = mixture.run_sync("Cold?")
        if tokens._preloading is not None:
            tokens._preloading.join()
    cli = sorted(m for m in ("click", "pygments", "rich", "httpx._main") if m in sys.modules)
    import httpx
    import httpx._main
    print(json.dumps({"text": result.text, "unloaded_before": before, "seen": seen,
                      "cli_modules": cli, "real_cli": hasattr(httpx._main, "print_help"),
                      "main": callable(httpx.main)}))
""")


def test_first_request_goes_out_before_the_tokenizer_loads_and_without_httpx_cli() -> None:
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                         timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["text"] == "one two three" and got["unloaded_before"]
    assert len(got["seen"]) == 1 and got["seen"][0] >= 1  # loaded once, after a request
    # httpx's CLI stays unloaded until someone imports it; then it is the real module.
    assert got["cli_modules"] == [] and got["real_cli"] and got["main"]


UNNEEDED = textwrap.dedent("""
    import json, sys
    from moa import Mixture
    from moa.testing import LoopbackServer, ModelBehavior

    with LoopbackServer(default=ModelBehavior(reply="one two")) as srv:
        mixture = Mixture({"name": "cold", "layers": [{"agents": [{"model": "loop/a"}]}],
                           "aggregator": {"model": "loop/agg"}}, registry=srv.registry())
        text = mixture.run_sync("Cold?").text
    unneeded = ("moa.telemetry", "opentelemetry", "moa.routing.signals",
                "moa.bench", "moa.openai", "moa.state.redis", "redis", "rich")
    print(json.dumps({"text": text, "loaded": [m for m in unneeded if m in sys.modules]}))
""")


def test_a_plain_run_imports_no_tracing_or_routing_signals() -> None:
    """Telemetry loads only once OpenTelemetry (or `telemetry.using`) is imported, and routing
    signals load for routed stages only."""
    out = subprocess.run([sys.executable, "-c", UNNEEDED], capture_output=True, text=True,
                         timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {"text": "one two", "loaded": []}
