"""`moa.timeline`: each agent's tokens over time as an SVG, from a run's events, and the flags
that write it (`moa chat --timeline`, `moa bench staircase --plot`), against the loopback
server."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

from moa.cli.main import run as moa
from moa.events import RunFinished
from moa.mixture import Mixture
from moa.result import MixtureResult
from moa.testing import LoopbackServer, ModelBehavior
from moa.timeline import Timeline, render_svg

SVG = "{http://www.w3.org/2000/svg}"
WORDS = " ".join(["one", "two", "three", "four", "five", "six"] * 4)  # 24 single-token words
TEAM = {
    "layers": [{"agents": [{"model": "loop/a"}, {"model": "loop/b"}, {"model": "loop/bad"}]}],
    "aggregator": {"model": "loop/agg"},
    "staircase": {"chunk_tokens": [4], "step_tokens": [4]},
}


@pytest.fixture
def server() -> Iterator[LoopbackServer]:
    behaviors = {
        "a": ModelBehavior(reply=WORDS, tokens_per_s=400),
        "b": ModelBehavior(reply=WORDS, ttft_s=0.05, tokens_per_s=200),
        "agg": ModelBehavior(reply=WORDS, tokens_per_s=400),
        "bad": ModelBehavior(reply="never", fail_status=500, fail_times=1000),
    }
    with LoopbackServer(behaviors) as srv:
        yield srv


def recorded(server: LoopbackServer, mode: str) -> tuple[Timeline, MixtureResult]:
    """Run TEAM once in `mode`, feeding every event to a timeline."""
    registry = server.registry()
    mixture = Mixture({**TEAM, "mode": mode}, registry=registry)
    timeline = Timeline()
    result = None
    for event in mixture.stream_sync("Count."):
        timeline.on_event(event)
        if isinstance(event, RunFinished):
            result = event.result
    assert result is not None
    return timeline, result


def panels(svg: str) -> list[ET.Element]:
    root = ET.fromstring(svg)  # valid XML, or this raises
    assert root.tag == f"{SVG}svg"
    return [g for g in root.iter(f"{SVG}g") if g.get("class") == "panel"]


def lines(panel: ET.Element) -> dict[str, ET.Element]:
    return {p.get("data-agent", ""): p for p in panel.iter(f"{SVG}polyline")
            if p.get("class") == "agent"}


def plot_area(panel: ET.Element) -> ET.Element:
    (plot,) = [r for r in panel.iter(f"{SVG}rect") if r.get("class") == "plot"]
    return plot


def marker_t(panel: ET.Element) -> float:
    """The answer-start marker's time, checked against where it is drawn on the time axis."""
    plot = plot_area(panel)
    (line,) = [x for x in panel.iter(f"{SVG}line") if x.get("class") == "answer-start"]
    t = float(line.get("data-t", "nan"))
    left, width, t_max = (float(plot.get(k, "nan")) for k in ("x", "width", "data-t-max"))
    assert float(line.get("x1", "nan")) == pytest.approx(left + width * t / t_max, abs=0.01)
    assert line.get("x1") == line.get("x2")
    return t


def test_the_svg_has_one_line_per_agent_and_the_answer_start_at_the_ttft(
    server: LoopbackServer,
) -> None:
    timeline, result = recorded(server, "staircase")
    (panel,) = panels(render_svg([timeline]))
    drawn = lines(panel)
    assert set(drawn) == {o.agent.key for o in result.outputs} == {"L1.1", "L1.2", "L1.3",
                                                                    "final"}
    assert drawn["final"].get("data-tokens") == "24" == drawn["L1.1"].get("data-tokens")
    assert drawn["L1.3"].get("data-tokens") == "0"  # failed before its first token
    assert "×" in "".join(panel.itertext())  # ... and marked as failed
    assert result.ttft_s is not None
    assert marker_t(panel) == pytest.approx(result.ttft_s, abs=1e-6)
    assert "staircase" in (panel.get("data-title") or "")


def test_panels_share_their_axes(server: LoopbackServer) -> None:
    runs = [recorded(server, mode)[0] for mode in ("layered", "staircase")]
    drawn = panels(render_svg(runs))
    assert len(drawn) == 2
    plots = [plot_area(p) for p in drawn]
    assert {p.get("data-t-max") for p in plots} == {plots[0].get("data-t-max")}
    assert {p.get("data-tokens-max") for p in plots} == {plots[0].get("data-tokens-max")}


def test_a_run_without_an_answer_has_no_marker() -> None:
    (panel,) = panels(render_svg([Timeline("empty")]))
    assert not lines(panel)
    assert not [x for x in panel.iter(f"{SVG}line") if x.get("class") == "answer-start"]


@pytest.fixture
def config(server: LoopbackServer, tmp_path: Path) -> str:
    path = tmp_path / "loop.toml"
    path.write_text(f'[providers.loop]\nkind = "openai"\nbase_url = "{server.base_url}"\n'
                    "key_required = false\n")
    return str(path)


def test_chat_timeline_writes_the_svg(
    server: LoopbackServer, config: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run.svg"
    argv = ["chat", "-c", config, "-p", "loop/a", "-p", "loop/b", "-a", "loop/agg",
            "--mode", "staircase", "--max-tokens", "8", "--timeline", str(out), "--json", "Hi"]
    assert moa(argv) == 0
    result = json.loads(capsys.readouterr().out)
    (panel,) = panels(out.read_text())
    assert set(lines(panel)) == {"L1.1", "L1.2", "final"}
    assert marker_t(panel) == pytest.approx(result["ttft_s"], abs=1e-6)


def test_chat_timeline_in_a_missing_folder_fails_before_any_call(
    server: LoopbackServer, config: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["chat", "-c", config, "-p", "loop/a", "-a", "loop/agg",
            "--timeline", str(tmp_path / "nope" / "run.svg"), "Hi"]
    assert moa(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("moa: --timeline") and "does not exist" in err
    assert len(err.strip().splitlines()) == 1
    assert not server.requests


def test_bench_staircase_plot_draws_every_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "stair.svg"
    argv = ["bench", "staircase", "--quick", "--tokens", "8", "--pacing", "lockstep",
            "--plot", str(out), "--json"]
    assert moa(argv) == 0
    report = json.loads(capsys.readouterr().out)
    rows = [r for r in report["rows"] if r["mode"] != "ratio"]
    drawn = panels(out.read_text())
    assert [p.get("data-title") for p in drawn] == [
        f"{r['mixture']} · {r['layout']} · {r['mode']}" for r in rows
    ]
    for row, panel in zip(rows, drawn, strict=True):
        agents = 7 if row["mixture"] == "moa-lite" else 13
        assert len(lines(panel)) == agents
        assert marker_t(panel) == pytest.approx(row["ttft_s"], abs=1e-3)
    assert any(str(out) in note for note in report["notes"])
