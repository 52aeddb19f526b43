"""`moa bench ...` through the real command in quick modes: the rows' shape and the invariants
that hold whatever the machine's speed (never a timing threshold), and the table printer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from moa.bench import print_rows
from moa.cli.main import run as moa


def bench(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    assert moa(["bench", *argv, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["bench"] == argv[0] and out["rows"] and out["notes"]
    return out


def test_table_printer(capsys: pytest.CaptureFixture[str]) -> None:
    rows = [{"name": "a", "ms": 1.23456, "n": 3}, {"name": "b", "ms": None, "extra": 0.5}]
    print_rows("demo", rows, as_json=False, notes=["a note"])
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = next(line for line in lines if "name" in line)
    # Columns: the union of keys in first-seen order; floats to 4 significant digits.
    assert [c.strip() for c in header.strip("┃").split("┃")] == ["name", "ms", "n", "extra"]
    assert "moa bench demo" in out and "1.235" in out and "1.23456" not in out
    row_b = next(line for line in lines if " b " in line)
    assert "None" not in row_b and "0.5" in row_b
    assert lines[-1] == "a note" and "\x1b" not in out
    print_rows("demo", rows, as_json=True, notes=["a note"])
    assert json.loads(capsys.readouterr().out) == {"bench": "demo", "rows": rows,
                                                   "notes": ["a note"]}


def test_overhead_quick(capsys: pytest.CaptureFixture[str]) -> None:
    out = bench(capsys, "overhead", "--repeats", "1", "--tokens", "4", "--pairs", "2")
    rows = [r for r in out["rows"] if "overhead_ms" in r]
    assert [r["api"] for r in rows] == ["async", "async+otel", "run_sync"]
    for r in rows:
        assert r["calls"] == 13  # 6 proposers, 6 refiners, 1 aggregator
        assert r["overhead_ms"] == pytest.approx(1000 * (r["measured_s"] - r["critical_path_s"]),
                                                 abs=0.2)
        assert r["per_layer_ms"] == pytest.approx(r["overhead_ms"] / 3, abs=0.1)
    assert any(("met" in n) for n in out["notes"])
    # traced with an in-memory SDK: 1 workflow + 13 agent + 13 client spans a run
    assert any("(27 spans a run)" in n for n in out["notes"])
    # Beside the same calls made by hand with httpx: interleaved pairs, then the cold start.
    pairs = [r for r in out["rows"] if r["api"] == "moa vs httpx"]
    assert [r["run"] for r in pairs] == [1, 2] and out["rows"][-1]["api"] == "cold start"
    for r in pairs:
        assert r["calls"] == 13 and r["moa_ms"] > 0 and r["httpx_ms"] > 0
        assert r["per_layer_ms"] == pytest.approx((r["moa_ms"] - r["httpx_ms"]) / 3, abs=0.1)
        assert r["cpu_ratio"] == pytest.approx(r["cpu_moa_ms"] / r["cpu_httpx_ms"], rel=0.01)
    assert out["rows"][-1]["cold_start_s"] > 0
    assert any("ms per layer (target <= 2:" in n and "client CPU x" in n for n in out["notes"])
    assert any("to the first upstream request" in n for n in out["notes"])


def test_staircase_quick(capsys: pytest.CaptureFixture[str]) -> None:
    rows = bench(capsys, "staircase", "--quick", "--tokens", "8")["rows"]
    mixtures = list(dict.fromkeys(r["mixture"] for r in rows))
    assert mixtures
    for name in mixtures:
        by_mode = {r["mode"]: r for r in rows if r["mixture"] == name}
        assert set(by_mode) == {"layered", "staircase", "staircase/eager", "ratio"}
        layered, stair, ratio = by_mode["layered"], by_mode["staircase"], by_mode["ratio"]
        assert layered["mode_run"] == "layered"
        assert ratio["total_s"] == pytest.approx(stair["total_s"] / layered["total_s"], abs=1e-3)
        assert stair["agg_calls"] >= layered["agg_calls"]  # steps are extra calls, never fewer
        assert stair["margin"] is None or stair["margin"] >= 0  # lockstep never writes ahead
        for r in (layered, stair, by_mode["staircase/eager"]):
            assert 0 < r["ttft_s"] <= r["total_s"] and r["answer_tokens"] > 0


def test_staircase_steps_sets_the_schedule(capsys: pytest.CaptureFixture[str]) -> None:
    out = bench(capsys, "staircase", "--quick", "--tokens", "8", "--layout", "cache",
                "--pacing", "lockstep", "--steps", "4,8")
    assert "staircase schedule: chunk_tokens = step_tokens = [4, 8]." in out["notes"]
    stair = [r for r in out["rows"] if r["mode"] == "staircase"]
    assert stair and all(r["layout"] == "cache" for r in stair)
    assert all(r["margin"] is None or r["margin"] >= 0 for r in stair)


def test_serve_quick(capsys: pytest.CaptureFixture[str]) -> None:
    rows = bench(capsys, "serve", "--clients", "1,2", "--rounds", "1")["rows"]
    assert {(r["clients"], r["path"]) for r in rows} == {
        (n, p) for n in (1, 2) for p in ("direct", "direct-one-pool", "by hand", "server")
    }
    for r in rows:
        assert r["bad_streams"] == 0 and r["requests_per_s"] > 0
        assert r["ttft_p50_ms"] <= r["ttft_p95_ms"] <= r["ttft_p99_ms"]
        assert ("overhead_p50_ms" in r) == (r["path"] == "server")
        if r["path"] == "server":  # against the same three calls made by hand with httpx
            hand = next(h for h in rows if h["clients"] == r["clients"] and h["path"] == "by hand")
            assert r["p50_ratio"] == pytest.approx(r["ttft_p50_ms"] / hand["ttft_p50_ms"], abs=1e-3)
            assert r["p95_ratio"] == pytest.approx(r["ttft_p95_ms"] / hand["ttft_p95_ms"], abs=1e-3)


def test_serve_replicas_quick(capsys: pytest.CaptureFixture[str], redis_server) -> None:
    rows = bench(capsys, "serve", "--replicas", "2", "--redis", redis_server.url,
                 "--clients", "1,2", "--rounds", "1")["rows"]
    paths = ("1 replica, state in process", "2 replicas, state in Redis")
    assert [(r["clients"], r["path"]) for r in rows] == [(n, p) for n in (1, 2) for p in paths]
    for r in rows:
        assert r["bad_streams"] == 0 and r["requests_per_s"] > 0
        assert r["ttft_p50_ms"] <= r["ttft_p95_ms"]
        assert ("added_p50_ms" in r) == (r["path"] == paths[1])


def test_routing_quick_writes_its_plot_only_where_asked(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    plot = tmp_path / "out" / "curve.png"
    out = bench(capsys, "routing", "--questions", "12", "--calibration", "12", "--plot", str(plot))
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(tmp_path.iterdir()) == [plot.parent]  # nothing else in the current folder
    assert f"Cost-accuracy curve saved to {plot}." in out["notes"]
    rows = {r["policy"]: r for r in out["rows"]}
    cheap, strong = rows["always-cheap"], rows["always-strong"]
    assert cheap["strong_calls"] == 0 and strong["strong_calls"] > 0
    assert cheap["cost_usd"] < strong["cost_usd"] and strong["cost_share"] == 1.0
    for r in rows.values():
        assert 0 <= r["accuracy"] <= 1 and r["calls"] >= r["strong_calls"]
    assert {"cal thr agree", "cal mu", "evolve"} <= set(rows)


def test_routing_help_says_where_the_plot_goes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        moa(["bench", "routing", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--plot PATH" in text and "nothing is written without it" in text
    assert moa(["bench", "routing", "--backend", "local", "--plot", "x.png"]) == 1
    assert "--plot draws the sim backend's curve" in capsys.readouterr().err


@pytest.mark.slow
def test_local_quick(capsys: pytest.CaptureFixture[str]) -> None:
    rows = bench(capsys, "local", "--case", "mixture", "--tokens", "4", "--repeats", "1")["rows"]
    assert rows[0]["workload"] == "engine alone" and rows[0]["calls"] == 1
    for r in rows:
        assert r["tokens"] > 0 and r["tokens_per_s"] > 0 and r["calls"] >= 1
    args = ("--long-tokens", "120", "--repeats", "1", "--cancel-after", "0.05")
    long = {r["dispatch"]: r for r in bench(capsys, "local", "--case", "long", *args)["rows"]}
    raw, mixture = long["raw llama-cpp prefill"], long["moa chat -p -a, 1 token"]
    assert raw["calls"] == 1 and raw["prompt_tokens"] >= 100
    # Two prefills: the proposer's prompt and the aggregator's, which holds the question again.
    assert mixture["calls"] == 2 and mixture["prompt_tokens"] > raw["prompt_tokens"]
    # The aggregator extends the first proposer's prompt, whose KV was saved when the second
    # proposer's replaced it; without saved states only the template's head is reused.
    saved = long["2 proposers, 1 with system prompt, cache layout"]
    assert saved["cached_tokens"] > long["same, prompt_cache_bytes = 0"]["cached_tokens"] + 90
    (cancel,) = bench(capsys, "local", "--case", "cancel", *args)["rows"]
    assert cancel["dispatch"] == "cancel at 0.05 s" and cancel["total_s"] > 0
