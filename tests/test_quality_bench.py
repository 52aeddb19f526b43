"""`moa bench quality` and its shipped task set: loading, scoring, and the command's rows."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from moa.bench import quality, taskset
from moa.cli.main import run as moa
from moa.routing.evaluate import Outcome, Task
from moa.routing.signals import extract_answer, is_correct
from moa.testing import LoopbackServer, ModelBehavior

FIELDS = {"split", "config", "accuracy", "ci_low", "ci_high", "tasks", "errors", "calls",
          "tokens", "latency_s"}
ANSWERS = {t.question: t.answer for split in taskset.SPLITS for _, t in taskset.load(split)}


def test_shipped_files_are_what_the_seeded_generator_writes() -> None:
    generated = taskset.generate()
    for split in taskset.SPLITS:
        lines = taskset.path(split).read_text().splitlines()
        assert [json.loads(line) for line in lines] == generated[split]
    assert taskset.generate() == generated


def test_task_set_has_four_kinds_in_two_disjoint_splits() -> None:
    dev, held = taskset.load("dev"), taskset.load("heldout")
    assert len(dev) + len(held) >= 100
    assert Counter(k for k, _ in dev) == Counter(k for k, _ in held) == {
        "arithmetic": 20, "units": 20, "facts": 20, "choice": 20}
    assert not {t.question for _, t in dev} & {t.question for _, t in held}
    assert [k for k, _ in taskset.load("dev", limit=2)].count("units") == 2
    with pytest.raises(Exception, match="Unknown split 'test'"):
        taskset.load("test")


@pytest.mark.parametrize("task", [t for _, t in taskset.load("dev")], ids=lambda t: t.question)
def test_every_answer_is_what_the_routing_extractor_reads(task: Task) -> None:
    assert extract_answer(task.answer) == task.answer
    assert is_correct(f"The answer is {task.answer}.", task.answer)
    assert not is_correct(f"The answer is {int(task.answer) + 1}.", task.answer)


def test_score_uses_the_extractor_and_a_wilson_interval() -> None:
    tasks = [Task("What is 2 + 3?", "5"), Task("Which? 1) a 2) b", "2"), Task("x", "7")]
    outcomes = [Outcome("2 + 3 = 5", 1, 10, 4, None), Outcome("Option 2) b", 1, 10, 4, None),
                None]
    row = quality.score("dev", "r", tasks, [(o, 1.5) for o in outcomes])
    assert row["accuracy"] == round(2 / 3, 4) and row["errors"] == 1
    assert row["calls"] == round(2 / 3, 2) and row["latency_s"] == 1.5
    assert (row["ci_low"], row["ci_high"]) == (0.2077, 0.9385)
    assert quality.wilson(0, 10) == (0.0, pytest.approx(0.2775, abs=1e-4))
    low, high = quality.wilson(5, 10)
    assert low == pytest.approx(0.2366, abs=1e-4) and high == pytest.approx(0.7634, abs=1e-4)


def _solver(body: dict[str, Any]) -> str:
    """Greedy and seed-0 replies are right, other samples wrong; an aggregator (its responses in
    the system message or, in the cache layout, in a later user turn) repeats ref 1."""
    messages = body["messages"]
    for message in messages:
        if "\n1. " in message["content"]:
            return re.search(r"\n1\. (.*)", message["content"]).group(1)  # type: ignore[union-attr]
    right = int(ANSWERS[messages[0]["content"]])
    ok = not body.get("temperature") or body.get("seed") == 0
    return f"The answer is {right if ok else right + 1}."


def test_json_rows_on_the_loopback_server(tmp_path: Path, capsys: Any) -> None:
    with LoopbackServer({"solver": ModelBehavior(reply=_solver)}) as srv:
        config = tmp_path / "mix.toml"
        config.write_text(
            'name = "file"\n[[layers]]\nagents = [{model = "loop/solver", temperature = 0}]\n'
            '[aggregator]\nmodel = "loop/solver"\n'
            f'[providers.loop]\nbase_url = "{srv.base_url}"\nkey_required = false\n'
        )
        cache = tmp_path / "calls.jsonl"
        argv = ["bench", "quality", "--json", "--split", "dev", "--limit", "1", "-m",
                "loop/solver", "--providers", str(config), "-c", str(config),
                "--cache", str(cache)]
        assert moa(argv) == 0
        rows = {r["config"]: r for r in json.loads(capsys.readouterr().out)["rows"]}
        sent = len(srv.requests)
        assert moa(argv) == 0  # every composed call comes from the cache now
        again = {r["config"]: r for r in json.loads(capsys.readouterr().out)["rows"]}
        assert len(srv.requests) == sent + 2 * 4  # only the -c mixture calls again
    assert set(rows) == {*quality.ROWS, f"-c {config}"}
    for row in rows.values():
        assert set(row) == FIELDS and row["tasks"] == 4 and row["errors"] == 0
        assert row["ci_low"] <= row["accuracy"] <= row["ci_high"] and row["tokens"] > 0
    expected = {"alone greedy": (1.0, 1), "alone sampled": (1.0, 1), "vote 3 sampled": (0.0, 3),
                "vote greedy+2 sampled": (1.0, 3), "skip-on-agreement": (1.0, 4),
                "preset local": (1.0, 4), "preset local (cache layout)": (1.0, 4),
                "greedy+2 greedy aggregator": (1.0, 4),
                "short instruction": (1.0, 4), "extracted answers": (1.0, 4),
                f"-c {config}": (1.0, 2)}
    for name, (accuracy, calls) in expected.items():
        assert (rows[name]["accuracy"], rows[name]["calls"]) == (accuracy, calls), name
    for name in quality.ROWS:
        assert again[name] == rows[name]


def test_bad_input_is_one_sentence(capsys: Any, tmp_path: Path) -> None:
    assert moa(["bench", "quality", "--rows", "alone greedy,best"]) != 0
    assert "Unknown row 'best'" in capsys.readouterr().err
    cache = tmp_path / "calls.jsonl"
    cache.write_text("not json\n")
    assert moa(["bench", "quality", "--cache", str(cache)]) != 0
    err = capsys.readouterr().err
    assert "line 1 is not a recorded call" in err and "Traceback" not in err


@pytest.mark.slow
def test_greedy_row_on_the_bundled_model(capsys: Any) -> None:
    pytest.importorskip("llama_cpp", reason="llama-cpp-python (moa-stack[local]) missing")
    argv = ["bench", "quality", "--json", "--split", "heldout", "--limit", "1", "--rows",
            "alone greedy"]
    assert moa(argv) == 0
    [row] = json.loads(capsys.readouterr().out)["rows"]
    assert set(row) == FIELDS and row["config"] == "alone greedy"
    assert row["tasks"] == 4 and row["calls"] == 1 and row["errors"] == 0 and row["tokens"] > 0


def test_a_model_that_cannot_answer_fails_with_the_reason(capsys: Any, tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp", reason="llama-cpp-python (moa-stack[local]) missing")
    assert moa(["bench", "quality", "-m", "local/nope.gguf", "--split", "dev"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith("moa: ") and "nope.gguf" in err and "0 %" not in err
    with LoopbackServer({"down": ModelBehavior(reply="x", fail_status=401),
                         "flaky": ModelBehavior(reply="The answer is 1.", fail_status=401,
                                                fail_times=1)}) as srv:
        providers = tmp_path / "p.toml"
        providers.write_text(f'[providers.loop]\nbase_url = "{srv.base_url}"\n'
                             'key_required = false\n')
        argv = ["bench", "quality", "--split", "dev", "--limit", "1", "--providers",
                str(providers), "--rows", "alone greedy,alone sampled", "--json", "-m"]
        assert moa([*argv, "loop/down"]) == 1
        out, err = capsys.readouterr()
        assert out == "" and err.count("\n") == 1
        assert err.startswith("moa: Every task failed: ") and "HTTP 401" in err
        # One failed call: the table, with the reason in a note.
        assert moa([*argv, "loop/flaky"]) == 0
        notes = json.loads(capsys.readouterr().out)["notes"]
        assert [n for n in notes if "failed" in n] == [
            next(n for n in notes if n.startswith("dev alone greedy: 1 of 4 tasks failed: "))
        ]
