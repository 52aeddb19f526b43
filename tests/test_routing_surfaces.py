"""A routed mixture on every surface: config files, `moa chat -c`, `moa serve -c` with the
official SDK, and `moa.wrap` — all through the one executor, on the loopback server."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

import moa
from moa.cli.main import run as moa_main
from moa.cli.options import add_mixture_arguments, mixture_from_args
from moa.config import load
from moa.errors import ConfigError
from moa.openai.server import ServerThread, create_app
from moa.testing import LoopbackServer, ModelBehavior

QUESTION = [{"role": "user", "content": "What is 2 + 2?"}]


def _seeded(body: dict[str, Any]) -> str:
    """Proposers that disagree when the request carries a seed (each agent gets its own)."""
    seed = body.get("seed")
    answer = 4 if seed is None else 4 + seed % 3
    return f"Step by step: the answer is {answer}."


@pytest.fixture
def upstream() -> Iterator[LoopbackServer]:
    behaviors = {
        "p": ModelBehavior(reply=_seeded),
        "small": ModelBehavior(reply="Small says the answer is 4."),
        "large": ModelBehavior(reply="Large checked: the answer is 4."),
    }
    with LoopbackServer(behaviors) as srv:
        yield srv


def routed_toml(srv: LoopbackServer, tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "routed.toml"
    path.write_text(
        'name = "routed"\nmode = "layered"\n'
        '[[layers]]\nagents = [{ model = "loop/p", n = 3 }]\n'
        '[aggregator]\nmodel = "loop/small"\nstrong = "loop/large"\n'
        '[router]\npolicy = "threshold"\nsignal = "agreement"\nthreshold = 0.9\n'
        f"{extra}"
        f'[providers.loop]\nbase_url = "{srv.base_url}"\nkey_required = false\n'
        "[providers.loop.limits]\nmax_retries = 0\n"
    )
    return path


def models(srv: LoopbackServer) -> list[str]:
    return [r.model for r in srv.requests if r.model]


# ---- config: every key honoured or rejected -------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"router": {"policy": "threshold", "treshold": 0.5}}, r"router\.threshold\.treshold"),
        ({"routing": {"cheap": "loop/a"}}, "routing tables are gone: put `strong"),
        ({"cheap": "loop/a", "strong": "loop/b"}, "routing tables are gone"),
        ({"aggregator": {"model": "loop/a"}}, r"the \[router\] routes no stage"),
        ({"strategy": "evolve", "layers": [{"agents": [{"model": "loop/a"}]}] * 2},
         "evolve needs one layer"),
        ({"evolve": {"loops": 2}}, "needs strategy"),
        ({"aggregator": {"model": "loop/a", "strong": "gpt-4o"}}, "must look like 'provider/"),
        ({"aggregator": {"model": "loop/a", "strong": "nowhere/x"}}, r"aggregator\.strong"),
    ],
)
def test_a_key_the_executor_does_not_honour_fails(change: dict[str, Any], message: str) -> None:
    base: dict[str, Any] = {
        "layers": [{"agents": [{"model": "loop/a"}, {"model": "loop/b"}]}],
        "aggregator": {"model": "loop/a", "strong": "loop/b"},
        "router": {"policy": "fixed"},
        "providers": {"loop": {"base_url": "http://127.0.0.1:9", "key_required": False}},
    }
    with pytest.raises(ConfigError, match=message) as err:
        load({**base, **change})
    assert str(err.value).count("\n") == 0


def test_refine_loops_need_a_routed_aggregator() -> None:
    config = {
        "layers": [{"agents": [{"model": "openai/a", "strong": "openai/b"}]}],
        "aggregator": {"model": "openai/a"},
        "router": {"policy": "fixed", "refine_loops": 1},
    }
    with pytest.raises(ConfigError, match="refine_loops needs a routed aggregator"):
        load(config)


# ---- surfaces --------------------------------------------------------------------------------


def test_moa_chat_runs_the_routed_mixture(
    upstream: LoopbackServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = routed_toml(upstream, tmp_path)
    assert moa_main(["chat", "-c", str(path), "--json", "What is 2 + 2?"]) == 0
    result = json.loads(capsys.readouterr().out)
    (decision,) = result["routing"]
    assert decision["stage"] == "aggregate.final" and decision["choice"] == "cheap"
    assert decision["signals"]["agreement"] == 1.0
    assert result["text"] == "Small says the answer is 4."
    assert models(upstream) == ["p", "p", "p", "small"]
    assert moa_main(["chat", "-c", str(path), "What is 2 + 2?"]) == 0
    out, err = capsys.readouterr()
    assert out == "Small says the answer is 4.\n"
    assert "moa: routed aggregate.final: cheap (agreement 1 >= 0.9)" in err


def test_moa_serve_c_serves_the_routed_mixture_to_the_sdk(
    upstream: LoopbackServer, tmp_path: Path
) -> None:
    parser = argparse.ArgumentParser()
    add_mixture_arguments(parser)
    config = mixture_from_args(parser.parse_args(["-c", str(routed_toml(upstream, tmp_path))]))
    app = create_app({"moa": config, "moa-lite": moa.preset("moa-lite")})
    with ServerThread(app) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list()] == ["moa", "moa-lite"]
        response = client.chat.completions.create(model="moa", messages=QUESTION, seed=1)  # type: ignore[arg-type]
        stream = client.chat.completions.create(model="moa", messages=QUESTION, stream=True)  # type: ignore[arg-type]
        with stream:
            chunks = list(stream)
    assert response.choices[0].message.content == "Large checked: the answer is 4."
    (decision,) = (response.model_extra or {})["moa"]["routing"]
    assert decision["choice"] == "strong" and decision["agent"] == "final"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == "Small says the answer is 4."
    (decision,) = (chunks[-1].model_extra or {})["moa"]["routing"]
    assert decision["choice"] == "cheap"


def test_the_wrapper_runs_the_routed_mixture(upstream: LoopbackServer, tmp_path: Path) -> None:
    config = load(routed_toml(upstream, tmp_path)).model_dump(exclude={"providers"})
    for agent in [*config["layers"][0]["agents"], config["aggregator"]]:
        for key in ("model", "strong"):
            if agent.get(key):
                agent[key] = agent[key].replace("loop/", "client/")
    client = moa.OpenAI(base_url=upstream.base_url, api_key="k", max_retries=0,
                        mixtures={"routed": config})
    agree = client.chat.completions.create(model="routed", messages=QUESTION)  # type: ignore[arg-type]
    disagree = client.chat.completions.create(model="moa/routed", messages=QUESTION, seed=2)  # type: ignore[arg-type]
    assert agree.choices[0].message.content == "Small says the answer is 4."
    assert disagree.choices[0].message.content == "Large checked: the answer is 4."
    assert models(upstream) == ["p"] * 3 + ["small"] + ["p"] * 3 + ["large"]
    routing = (disagree.model_extra or {})["moa"]["routing"]
    assert routing[0]["signals"]["agreement"] < 0.9
