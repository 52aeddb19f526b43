"""`moa eval` and `moa calibrate` end to end on the loopback server."""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from moa.cli.main import run as moa
from moa.testing import LoopbackServer, ModelBehavior

QUESTIONS = [(2, 3), (5, 4), (8, 1), (7, 7), (4, 6), (9, 2)]


def _question(body: dict[str, Any]) -> tuple[int, int]:
    user = [m for m in body["messages"] if m["role"] == "user"][-1]["content"]
    a, b = map(int, re.findall(r"\d+", user)[:2])
    return a, b


def cheap(body: dict[str, Any]) -> str:
    """Right on questions whose first number is even; otherwise wrong, and seed-dependent."""
    a, b = _question(body)
    wrong = a + b + 1 + (body.get("seed") or 0) % 3
    return f"I think the answer is {a + b if a % 2 == 0 else wrong}."


def strong(body: dict[str, Any]) -> str:
    a, b = _question(body)
    return f"Carefully: the answer is {a + b}."


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[LoopbackServer, Path, Path]]:
    behaviors = {
        "cheap": ModelBehavior(reply=cheap),
        "strong": ModelBehavior(reply=strong),
        "bad": ModelBehavior(reply="never", fail_status=400),
    }
    with LoopbackServer(behaviors) as srv:
        tasks = tmp_path / "tasks.jsonl"
        tasks.write_text(
            "\n".join(
                json.dumps({"question": f"What is {a} + {b}?", "answer": str(a + b)})
                for a, b in QUESTIONS
            )
            + "\n"
        )
        config = tmp_path / "routed.toml"
        config.write_text(
            'name = "file"\nmode = "layered"\n'
            '[[layers]]\nagents = [{model = "loop/cheap", n = 3, max_tokens = 32}]\n'
            '[aggregator]\nmodel = "loop/cheap"\nstrong = "loop/strong"\nmax_tokens = 32\n'
            f'[providers.loop]\nbase_url = "{srv.base_url}"\nkey_required = false\n'
            f'[providers.locked]\nbase_url = "{srv.base_url}"\nkey_env = "MOA_TEST_UNSET_KEY"\n'
            '[prices]\n"loop/cheap" = [1.0, 2.0]\n"loop/strong" = [10.0, 30.0]\n'
            '[router]\npolicy = "fixed"\ntier = "cheap"\ntop_logprobs = 3\n'
        )
        yield srv, tasks, config


def test_eval_json_rows(setup: tuple[LoopbackServer, Path, Path], capsys: Any) -> None:
    _, tasks, config = setup
    rc = moa(
        [
            "eval",
            str(tasks),
            "-c",
            str(config),
            "-m",
            "loop/strong",
            "--policy",
            "always-cheap",
            "--policy",
            "always-strong",
            "--json",
        ]
    )
    assert rc == 0
    rows = {r["config"]: r for r in json.loads(capsys.readouterr().out)["rows"]}
    assert set(rows) == {
        "mixture file",
        "model loop/strong",
        "file fixed:tier=cheap",
        "file fixed:tier=strong",
    }
    assert rows["model loop/strong"]["accuracy"] == 1.0
    assert rows["model loop/strong"]["calls"] == len(QUESTIONS)
    assert rows["file fixed:tier=strong"]["accuracy"] == 1.0
    assert rows["file fixed:tier=cheap"]["accuracy"] == 0.5
    assert rows["mixture file"]["calls"] == 4 * len(QUESTIONS)
    cheap_cost = rows["file fixed:tier=cheap"]["cost_usd"]
    assert 0 < cheap_cost < rows["file fixed:tier=strong"]["cost_usd"]
    for row in rows.values():
        assert row["errors"] == 0 and row["prompt_tokens"] > 0 and row["latency_s"] >= 0


def test_eval_table_and_errors(
    setup: tuple[LoopbackServer, Path, Path], capsys: Any, tmp_path: Path
) -> None:
    _, tasks, config = setup
    assert moa(["eval", str(tasks), "-c", str(config), "--limit", "2"]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "mixture file" in out and "\x1b[" not in out
    assert moa(["eval", str(tasks), "--policy", "marginal"]) == 1
    assert "--policy needs a routed mixture" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "x"}\n')
    assert moa(["eval", str(bad), "-m", "loop/strong"]) == 1
    assert "line 1" in capsys.readouterr().err


def test_calibrate_writes_thresholds(setup: tuple[LoopbackServer, Path, Path], capsys: Any) -> None:
    srv, tasks, config = setup
    rc = moa(
        [
            "calibrate",
            str(tasks),
            "-c",
            str(config),
            "--policy",
            "threshold",
            "--signal",
            "agreement",
            "--strong-share",
            "0.5",
            "--write",
            "--json",
        ]
    )
    assert rc == 0
    fit = json.loads(capsys.readouterr().out)
    assert fit["strong_share"] == 0.5 and fit["accuracy"] == 1.0
    stored = tomllib.loads(config.read_text())["router"]
    assert stored == {
        "policy": "threshold",
        "signal": "agreement",
        "threshold": 1.0,
        "skip_above": 1.0,
        "top_logprobs": 3,
    }, "the policy is replaced; the table's other keys stay"
    assert tomllib.loads(config.read_text())["name"] == "file"
    srv.requests.clear()
    assert moa(["eval", str(tasks), "--routing", str(config), "--json"]) == 0
    row = json.loads(capsys.readouterr().out)["rows"][0]
    assert row["config"] == "mixture file"
    assert row["accuracy"] == 1.0
    strong_calls = sum(r.body["model"] == "strong" for r in srv.requests if r.body)
    assert strong_calls == 3  # only the odd questions, where the cheap proposers disagree
    rc = moa(
        [
            "calibrate",
            str(tasks),
            "-c",
            str(config),
            "--policy",
            "marginal",
            "--target-cost",
            "1e-9",
        ]
    )
    assert rc == 0 and "strong share 0.0%" in capsys.readouterr().out


def test_eval_checks_keys_before_the_first_call(
    setup: tuple[LoopbackServer, Path, Path], capsys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    srv, tasks, config = setup
    monkeypatch.delenv("MOA_TEST_UNSET_KEY", raising=False)
    assert moa(["eval", str(tasks), "-c", str(config), "-m", "locked/x"]) == 1
    err = capsys.readouterr().err
    assert err == "moa: Provider 'locked' needs an API key: set the MOA_TEST_UNSET_KEY variable.\n"
    assert not srv.requests


def test_eval_reports_each_failure_reason_and_exits_1_when_all_fail(
    setup: tuple[LoopbackServer, Path, Path], capsys: Any
) -> None:
    _, tasks, config = setup
    argv = ["eval", str(tasks), "-c", str(config), "-m", "loop/strong", "-m", "loop/bad"]
    assert moa([*argv, "--json"]) == 1
    out, err = capsys.readouterr()
    rows = {r["config"]: r for r in json.loads(out)["rows"]}
    assert rows["model loop/strong"]["failures"] == {}
    [(reason, count)] = rows["model loop/bad"]["failures"].items()
    assert count == len(QUESTIONS) and "400" in reason
    assert f"moa: model loop/bad: {len(QUESTIONS)} of {len(QUESTIONS)} tasks failed: " in err
    assert err.splitlines()[-1] == "moa: every task failed for model loop/bad."
    # The text table and --debug report the same reasons.
    for extra in ([], ["--debug"]):
        assert moa([*argv, *extra]) == 1
        out, err = capsys.readouterr()
        assert "model loop/bad" in out and reason in err


def test_eval_names_the_failed_agents_behind_a_mixture_failure(
    setup: tuple[LoopbackServer, Path, Path], capsys: Any, tmp_path: Path
) -> None:
    srv, tasks, _ = setup
    config = tmp_path / "bad.toml"
    config.write_text(
        'name = "broken"\n[[layers]]\nagents = [{model = "loop/bad"}]\n'
        '[aggregator]\nmodel = "loop/strong"\n'
        f'[providers.loop]\nbase_url = "{srv.base_url}"\nkey_required = false\n'
    )
    assert moa(["eval", str(tasks), "-c", str(config), "--limit", "2", "--json"]) == 1
    [row] = json.loads(capsys.readouterr().out)["rows"]
    [(reason, count)] = row["failures"].items()
    assert "loop/bad: HTTP 400" in reason and count == 2 and "cancelled" not in reason


def test_calibrate_checks_keys_and_names_the_cause(
    setup: tuple[LoopbackServer, Path, Path], capsys: Any, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    srv, tasks, config = setup
    monkeypatch.delenv("MOA_TEST_UNSET_KEY", raising=False)
    argv = ["calibrate", str(tasks), "--strong-share", "0.5", "-c"]
    locked = tmp_path / "locked.toml"
    locked.write_text(config.read_text().replace('strong = "loop/strong"', 'strong = "locked/x"'))
    assert moa([*argv, str(locked)]) == 1
    assert capsys.readouterr().err == (
        "moa: Provider 'locked' needs an API key: set the MOA_TEST_UNSET_KEY variable.\n"
    )
    assert not srv.requests
    broken = tmp_path / "broken.toml"
    broken.write_text(config.read_text().replace('"loop/cheap"', '"loop/bad"'))
    assert moa([*argv, str(broken)]) == 1
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("moa: Calibration stopped: ") and "loop/bad: " in line and "400" in line
