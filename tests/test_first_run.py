"""A first run that looks finished, and failures that lead with their cause: the `local`
preset ends on a finished answer, a shared cause is said once before any quorum arithmetic,
an empty answer is a failure that says so, a stalled stream fails after `stall_s` wherever it
stalls, and a bad GGUF file or llama.cpp option is a `ConfigError` when the mixture loads."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import moa
from moa.errors import ConfigError, NotEnoughProposers
from moa.providers.registry import Limits, ProviderSpec, Registry
from moa.testing import LoopbackServer, ModelBehavior

ANSWER = "Rayleigh scattering makes the sky blue."


@pytest.fixture
def upstream() -> Iterator[LoopbackServer]:
    with LoopbackServer({"good": ModelBehavior(reply=ANSWER),
                         "agg": ModelBehavior(reply=ANSWER)}) as server:
        yield server


def team(*proposers: str, quorum: int = 1, stall_s: float = 2.0) -> dict[str, object]:
    return {
        "name": "team", "mode": "layered",
        "layers": [{"agents": [{"model": f"loop/{p}"} for p in proposers],
                    "min_proposers": quorum}],
        "aggregator": {"model": "loop/agg"},
        "staircase": {"stall_s": stall_s},
    }


def registry(upstream: LoopbackServer) -> Registry:
    # A long read timeout: a stall must be caught by stall_s, never by the read timeout.
    return upstream.registry(limits=Limits(max_retries=0, read_timeout=60.0))


def test_a_shared_cause_is_said_once_and_leads(upstream: LoopbackServer) -> None:
    for name in ("k1", "k2"):
        upstream.set_behavior(name, ModelBehavior(fail_status=401))
    config = team("k1", "k2", "k1", "k2", "k1", "k2")
    with pytest.raises(NotEnoughProposers) as caught:
        moa.Mixture(config, registry=registry(upstream)).run_sync("Why is the sky blue?")
    message = str(caught.value)
    assert message.startswith("HTTP 401"), message
    assert message.count("HTTP 401") == 1 and "min_proposers" not in message
    assert "L1.1, L1.3, L1.5 on loop/k1; L1.2, L1.4, L1.6 on loop/k2" in message
    assert len(message) < 200


def test_quorum_arithmetic_only_when_some_agents_answered(upstream: LoopbackServer) -> None:
    upstream.set_behavior("bad", ModelBehavior(fail_status=500))
    with pytest.raises(NotEnoughProposers) as caught:
        moa.Mixture(team("good", "bad", "bad", quorum=2),
                    registry=registry(upstream)).run_sync("q")
    message = str(caught.value)
    assert message.startswith("HTTP 500") and message.count("HTTP 500") == 1
    assert message.endswith("Only 1 of the 3 agents of layer 1 can answer; min_proposers is 2.")


def test_an_empty_answer_is_a_failure_that_says_so(upstream: LoopbackServer) -> None:
    upstream.set_behavior("mute", ModelBehavior(reply=""))
    result = moa.Mixture(team("good", "mute"), registry=registry(upstream)).run_sync("q")
    assert result.text == ANSWER
    (mute,) = result.failed
    assert mute.agent.key == "L1.2" and "returned no text" in (mute.error or "")
    with pytest.raises(NotEnoughProposers, match=r"^Returned no text \(finish reason stop\) "
                                                 r"\(L1.1 on loop/mute\)\.$"):
        moa.Mixture(team("mute"), registry=registry(upstream)).run_sync("q")


def test_every_proposer_stalled_fails_after_stall_s_not_the_read_timeout(
    upstream: LoopbackServer,
) -> None:
    upstream.set_behavior("stuck", ModelBehavior(reply="word " * 50, stall_after=3))
    with pytest.raises(NotEnoughProposers, match=r"^Stalled, no token for 0.3 s"):
        moa.Mixture(team("stuck", "stuck", stall_s=0.3),
                    registry=registry(upstream)).run_sync("q")


def test_a_stalled_proposer_keeps_its_text_and_the_answer_comes(
    upstream: LoopbackServer,
) -> None:
    upstream.set_behavior("stuck", ModelBehavior(reply="word " * 50, stall_after=3))
    result = moa.Mixture(team("good", "stuck", stall_s=0.3),
                         registry=registry(upstream)).run_sync("q")
    assert result.text == ANSWER
    stuck = result.outputs[1]
    assert stuck.truncated and stuck.text.strip(), "left behind (or failed), its text kept"
    (final,) = [r.body for r in upstream.requests if r.model == "agg"]
    assert "word word word" in final["messages"][0]["content"], "its text was kept"


def test_a_bad_gguf_or_engine_option_fails_when_the_mixture_loads(tmp_path: Path) -> None:
    fake = tmp_path / "notes.gguf"
    fake.write_text("not a model")
    for ref, reason in ((f"local/{tmp_path}/missing.gguf", "does not exist"),
                        (f"local/{fake}", "is not a GGUF file")):
        with pytest.raises(ConfigError, match=reason):
            moa.Mixture({"name": "x", "layers": [{"agents": [{"model": ref}]}],
                         "aggregator": {"model": "local/smollm2"}})
    mine = Registry()
    mine.register(ProviderSpec(prefix="mine", kind="llamacpp", options={"n_ctxx": 512}))
    with pytest.raises(ConfigError, match=r"Unknown llama\.cpp option 'n_ctxx'"):
        moa.Mixture({"name": "x", "layers": [{"agents": [{"model": "mine/smollm2"}]}],
                     "aggregator": {"model": "mine/smollm2"}}, registry=mine)


def test_the_local_preset_ends_on_a_finished_answer() -> None:
    """The README's main command on the embedded default: no agent is cut."""
    pytest.importorskip("llama_cpp", reason="the local extra is not installed")
    result = moa.Mixture("local").run_sync("Why is the sky blue?", seed=1)
    assert result.text.strip() and result.finish_reason == "stop"
    assert [o.finish_reason for o in result.outputs] == ["stop"] * 4


def test_a_proposer_cancelled_while_retrying_keeps_why_it_failed(
    upstream: LoopbackServer,
) -> None:
    upstream.set_behavior("flaky", ModelBehavior(fail_status=500))
    slow_retries = upstream.registry(limits=Limits(max_retries=3, backoff_initial=30.0,
                                                   backoff_max=30.0, read_timeout=60.0))
    result = moa.Mixture(team("good", "flaky", stall_s=0.3),
                         registry=slow_retries).run_sync("q")
    assert result.text == ANSWER
    (flaky,) = result.failed
    assert flaky.error is not None and flaky.error.startswith("cancelled: the final answer")
    assert "while retrying after: " in flaky.error and "HTTP 500" in flaky.error
    (agent,) = [a for a in result.to_dict()["agents"] if a["id"] == "L1.2"]
    assert "HTTP 500" in agent["error"], "--json shows it too"
