"""`moa bench debate` (layered vs staircase debate, the consensus stop) and the debate rows of
`moa bench quality`, through the real command: the rows' shape and the invariants that hold
whatever the machine's speed (never a timing threshold)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from moa.bench import debate, quality, taskset
from moa.cli.main import run as moa
from moa.runtime.prompts import IN_PROGRESS_LABEL
from moa.testing import LoopbackServer, ModelBehavior


def test_debate_quick_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert moa(["bench", "debate", "--quick", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["bench"] == "debate"
    rows = out["rows"]
    labels = list(dict.fromkeys(r["debate"] for r in rows))
    assert len(labels) == 2 and "consensus" in labels[1]
    for label in labels:
        pair = {r["mode"]: r for r in rows if r["debate"] == label}
        assert list(pair) == ["layered", "staircase", "ratio"]
        layered, stair, ratio = pair["layered"], pair["staircase"], pair["ratio"]
        assert layered["mode_run"] == "layered" and stair["mode_run"] == "staircase"
        for row in (layered, stair):
            assert 0 < row["final_ttft_s"] <= row["total_s"] + 1e-3
            assert 0 <= row["cached_tokens"] <= row["prompt_tokens"]
            assert row["cached"].endswith(" %")
            # calls count attempts, requests what reached the server (a call cut at the
            # consensus stop may never get there)
            assert row["calls"] >= row["requests"] > 0
        assert layered["margin"] is None, "pacing is a staircase column"
        assert stair["margin"] is None or stair["margin"] >= 0, "pacing kept"
        assert stair["requests"] >= layered["requests"], "staircase steps cost requests"
        for key in ("final_ttft_s", "total_s", "calls", "prompt_tokens"):
            assert ratio[key] == pytest.approx(stair[key] / layered[key], abs=1e-3)
    assert any(r["margin"] is not None for r in rows), "some step ran on partial answers"
    # 3 debaters x 3 rounds that keep disagreeing: every round runs in both modes
    full = {r["mode"]: r for r in rows if r["debate"] == labels[0]}
    assert full["layered"]["calls"] == 9 and full["layered"]["saved_calls"] == 0
    assert full["staircase"]["calls"] >= 9 and full["staircase"]["saved_calls"] == 0
    # agreeing after round 1: the layered debate stops and saves rounds 2 and 3
    stop = {r["mode"]: r for r in rows if r["debate"] == labels[1]}
    assert stop["layered"]["calls"] == 3 and stop["layered"]["saved_calls"] == 6
    assert stop["layered"]["calls"] < full["layered"]["calls"]
    assert stop["staircase"]["saved_calls"] <= 6
    assert len(out["notes"]) == 4 and all("pacing kept" in n for n in out["notes"][2:])
    assert out["notes"][1] == "staircase schedule: chunk_tokens = step_tokens = [16, 128, 512]."


def test_debate_steps_sets_the_schedule(capsys: pytest.CaptureFixture[str]) -> None:
    assert moa(["bench", "debate", "--quick", "--steps", "8,16", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["notes"][1] == "staircase schedule: chunk_tokens = step_tokens = [8, 16]."
    assert all(r["margin"] is None or r["margin"] >= 0 for r in out["rows"] if "margin" in r)
    assert any(r.get("margin") is not None for r in out["rows"]), "steps ran on partial answers"


def _body(mine: str, peers: list[str], own: str, max_tokens: int) -> dict[str, Any]:
    turn = "\n\n".join(f"One agent solution: ```{p}```" for p in peers)
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": mine},
                {"role": "user", "content": turn}]
    if own:
        messages.append({"role": "assistant", "content": own})
    return {"messages": messages, "max_tokens": max_tokens}


def test_the_margin_is_the_least_lead_of_an_unfinished_peer() -> None:
    done = "a b c d e f g h"
    bodies = [
        {"messages": [{"role": "user", "content": "q"}], "max_tokens": 99},  # round 1: no peers
        _body("a b c d", ["a b c d e" + IN_PROGRESS_LABEL, done], "", 3),  # 4 - 3, 5 - 3
        _body("a b c d e f", [done, "a b c d e f g" + IN_PROGRESS_LABEL], "x y", 3),  # 6 - 5
    ]
    assert debate.margin(bodies, {done}) == 1
    ahead = _body("a b", [done], "x", 4)  # writes up to 5 tokens on 2 shown
    assert debate.margin([*bodies, ahead], {done}) == -3
    assert debate.margin([_body(done, [done], "", 50)], {done}) is None


ANSWERS = {t.question: t.answer for split in taskset.SPLITS for _, t in taskset.load(split)}


def _debater(body: dict[str, Any]) -> str:
    """Round 1: the seed-0 (and greedy) reply is right, other samples wrong; a revision round
    (a second user turn) is right; an aggregator (numbered references) repeats ref 1."""
    messages = body["messages"]
    for message in messages:
        if "\n1. " in message["content"]:
            return re.search(r"\n1\. (.*)", message["content"]).group(1)  # type: ignore[union-attr]
    right = int(ANSWERS[next(m["content"] for m in messages if m["role"] == "user")])
    revising = sum(m["role"] == "user" for m in messages) > 1
    ok = revising or not body.get("temperature") or body.get("seed") == 0
    return f"The answer is {right if ok else right + 1}."


def test_quality_debate_rows_on_the_loopback_server(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert {"debate local", "debate local 3 rounds"} <= set(quality.ROWS)
    with LoopbackServer({"solver": ModelBehavior(reply=_debater)}) as srv:
        providers = tmp_path / "p.toml"
        providers.write_text(f'[providers.loop]\nbase_url = "{srv.base_url}"\n'
                             "key_required = false\n")
        cache = tmp_path / "calls.jsonl"
        argv = ["bench", "quality", "--json", "--split", "dev", "--limit", "1", "-m",
                "loop/solver", "--providers", str(providers), "--cache", str(cache), "--rows",
                "vote 3 sampled,preset local,debate local,debate local 3 rounds"]
        assert moa(argv) == 0
        rows = {r["config"]: r for r in json.loads(capsys.readouterr().out)["rows"]}
        # per task: 3 samples; the preset's 3 proposers + its aggregator; the debate's round 2
        # (round 1 is the preset's proposers; the 3-round debate agrees after round 2 and stops)
        assert len(srv.requests) == 4 * (3 + 4 + 3)
        rounds = [sum(m["role"] == "user" for m in r.body["messages"]) for r in srv.requests
                  if r.body and not any("\n1. " in m["content"] for m in r.body["messages"])]
        assert sorted(set(rounds)) == [1, 2], "no third round: the debaters agreed"
        sent = len(srv.requests)
        assert moa(argv) == 0  # every call of every row, debates included, is in the cache
        again = {r["config"]: r for r in json.loads(capsys.readouterr().out)["rows"]}
        assert len(srv.requests) == sent
    assert again == rows
    assert (rows["vote 3 sampled"]["accuracy"], rows["vote 3 sampled"]["calls"]) == (0.0, 3)
    for name in ("debate local", "debate local 3 rounds"):
        row = rows[name]
        assert (row["accuracy"], row["calls"], row["errors"], row["tasks"]) == (1.0, 6, 0, 4)
        assert row["tokens"] > rows["preset local"]["tokens"] > 0
