"""The `moa` command: option parsing and precedence, the dispatcher, and `moa chat` end to end
against the loopback server (in process, as a subprocess, and through a pseudo-terminal)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

import moa.bench
from moa.cli.main import COMMANDS, build_parser, run
from moa.cli.options import mixture_from_args
from moa.config import MixtureConfig
from moa.errors import ConfigError

ANSI = re.compile(r"\x1b[\[\]()#;?]*[0-9;?]*[A-Za-z]")


def mixture(*argv: str) -> MixtureConfig:
    """Parse `moa chat ARGV` and build the mixture the flags describe."""
    args = build_parser("chat").parse_args(["chat", *argv])
    return mixture_from_args(args)


def models(config: MixtureConfig) -> list[list[str]]:
    return [[a.model for a in layer.agents] for layer in config.layers]


# ---------------------------------------------------------------- options and precedence


def test_proposers_alone_make_one_layer_and_the_first_aggregates() -> None:
    config = mixture("-p", "openai/a", "-p", "groq/b")
    assert models(config) == [["openai/a", "groq/b"]]
    assert config.aggregator.model == "openai/a"
    assert config.call_count == 3


def test_layers_counts_the_aggregator() -> None:
    config = mixture("-p", "openai/a", "-p", "groq/b", "-a", "together/c", "-l", "3")
    assert models(config) == [["openai/a", "groq/b"]] * 2
    assert config.aggregator.model == "together/c"
    assert len(mixture("--preset", "moa", "-l", "2").layers) == 1
    assert len(mixture("--preset", "moa-lite", "-l", "4").layers) == 3


def test_no_flags_use_local_or_the_env_preset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MOA_PRESET", raising=False)
    assert mixture().name == "local"
    monkeypatch.setenv("MOA_PRESET", "moa-lite")
    assert mixture().name == "moa-lite"
    assert mixture("--preset", "self-moa").name == "self-moa"


def test_flags_override_the_preset() -> None:
    config = mixture("--preset", "moa", "--temperature", "0.1", "--max-tokens", "64")
    assert {a.temperature for a in config.agents()} == {0.1}
    # --max-tokens caps the final answer, as `Mixture.run(max_tokens=...)` does.
    assert config.aggregator.max_tokens == 64
    assert {a.max_tokens for layer in config.layers for a in layer.agents} == {512}
    assert len(config.layers) == 2
    config = mixture("--preset", "moa", "-p", "openai/x")
    assert models(config) == [["openai/x"], ["openai/x"]]
    assert config.name == "custom"
    assert config.aggregator.model.startswith("together/")
    config = mixture("--preset", "local", "-a", "openai/y", "--mode", "staircase",
                     "--deadline", "7.5")
    assert config.aggregator.model == "openai/y"
    assert (config.mode, config.deadline_s) == ("staircase", 7.5)


def write(tmp_path: Path, text: str, name: str = "mix.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_flags_override_the_config_file_which_overrides_its_preset(tmp_path: Path) -> None:
    path = write(tmp_path, """
preset = "moa-lite"
mode = "layered"
[[layers]]
agents = [{model = "openai/a", temperature = 0.9}, {model = "openai/b", temperature = 0.9}]
min_proposers = 2
[aggregator]
model = "openai/agg"
temperature = 0.9
""")
    config = mixture("-c", path)
    assert models(config) == [["openai/a", "openai/b"]]
    assert config.mode == "layered" and config.aggregator.temperature == 0.9
    config = mixture("-c", path, "--temperature", "0.2", "--mode", "auto")
    assert {a.temperature for a in config.agents()} == {0.2}
    assert config.mode == "auto"
    config = mixture("-c", path, "-p", "groq/x")
    assert models(config) == [["groq/x"]]
    assert config.layers[0].min_proposers == 1
    assert config.aggregator.model == "openai/agg"
    assert mixture("-c", path, "--preset", "moa").aggregator.model == "openai/agg"
    bad = write(tmp_path, "[aggregator]\nmodel = 'openai/x'\ncolour = 'red'\n", "bad.toml")
    with pytest.raises(ConfigError, match=r"bad\.toml' with the flags: field 'aggregator\.colour'"):
        mixture("-c", bad)


def test_a_config_file_may_hold_only_providers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MOA_PRESET", raising=False)
    path = write(tmp_path, """
[providers.mine]
base_url = "http://127.0.0.1:9/v1"
key_required = false
""")
    config = mixture("-c", path, "-p", "mine/a", "-p", "mine/b", "-a", "mine/agg")
    assert models(config) == [["mine/a", "mine/b"]]
    assert config.providers["mine"].key_required is False
    assert mixture("-c", path).name == "local"


@pytest.mark.parametrize(
    ("argv", "error", "words"),
    [
        (["--preset", "nope"], ConfigError, "Unknown preset 'nope'"),
        (["-p", "noslash"], ConfigError, "provider/model"),
        (["-p", "zzz/model"], ConfigError, "Unknown provider prefix 'zzz'"),
        (["-p", "openai/a", "-l", "1"], ConfigError, "--layers"),
        (["--temperature", "-1"], ConfigError, "temperature"),
        (["--max-tokens", "0"], ConfigError, "max_tokens"),
    ],
)
def test_bad_options_fail_with_a_clear_message(
    argv: list[str], error: type[Exception], words: str
) -> None:
    with pytest.raises(error, match=re.escape(words)):
        mixture(*argv)


# ---------------------------------------------------------------- the dispatcher


def test_help_works_when_a_command_module_is_missing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(COMMANDS, "ghost", ("moa.cli.ghost_missing", "not built"))
    with pytest.raises(SystemExit) as exit_info:
        run(["--help"])
    assert exit_info.value.code == 0
    assert "ghost" in capsys.readouterr().out
    assert run(["ghost", "--anything"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == "moa: Command 'moa ghost' is not part of this build."
    assert run(["models", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert {"local", "moa", "moa-lite", "self-moa"} <= {p["name"] for p in listing["presets"]}


def test_models_never_prints_a_key(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("GROQ_API_KEY", "sk-very-secret-123")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert run(["models", "--json"]) == 0
    out = capsys.readouterr().out
    rows = {p["prefix"]: p for p in json.loads(out)["providers"]}
    assert rows["groq"]["key"] == "set" and rows["openai"]["key"] == "missing"
    assert rows["groq"]["key_variable"] == "GROQ_API_KEY"
    assert run(["models"]) == 0
    out += capsys.readouterr().out
    assert "sk-very-secret" not in out and "GROQ_API_KEY" in out


def test_models_at_80_columns_keeps_key_variables_and_lists_preset_models() -> None:
    from moa.providers.registry import default_registry

    env = {**os.environ, "COLUMNS": "80"}
    proc = subprocess.run([sys.executable, "-m", "moa.cli", "models"], capture_output=True,
                          text=True, env=env, timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    assert max(len(line) for line in proc.stdout.splitlines()) <= 80
    words = set(re.findall(r"[A-Z_]+", proc.stdout))
    assert {spec.key_variable for spec in default_registry.specs()} <= words
    assert "…" not in proc.stdout
    assert "local/smollm2 ×4" in proc.stdout and "$ / request" in proc.stdout


def test_models_json_has_each_presets_models_and_estimated_cost(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from moa.cli.models import ANSWER_TOKENS, QUESTION_TOKENS, estimate_usd
    from moa.config import preset
    from moa.pricing import PRICES

    assert run(["models", "--json"]) == 0
    presets = {p["name"]: p for p in json.loads(capsys.readouterr().out)["presets"]}
    assert presets["local"]["models"] == {"local/smollm2": 4}
    assert presets["local"]["usd_per_request"] == 0.0
    self_moa = presets["self-moa"]
    assert self_moa["models"] == {"together/Qwen/Qwen2.5-72B-Instruct-Turbo": 7}
    # 6 samples of the question, then one aggregation reading the 6 answers.
    price_in, price_out = PRICES["together/Qwen/Qwen2.5-72B-Instruct-Turbo"]
    answers = 6 * (QUESTION_TOKENS * price_in + ANSWER_TOKENS * price_out)
    assert self_moa["usd_per_request"] > (answers + 6 * ANSWER_TOKENS * price_in) / 1e6
    lite, full = presets["moa-lite"]["usd_per_request"], presets["moa"]["usd_per_request"]
    assert 0 < lite < full
    unpriced = preset("moa-lite").model_copy(update={"prices": {}})
    unpriced.aggregator.model = "openai/not-in-the-table"
    assert estimate_usd(unpriced) is None


def test_bench_dispatch(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fake: Any = types.ModuleType("moa.bench.fake")
    fake.add_arguments = lambda p: p.add_argument("--size", type=int, default=1)
    fake.run = lambda a: ([{"size": a.size, "ms": 1.5}], ["a note"])
    monkeypatch.setitem(sys.modules, "moa.bench.fake", fake)
    monkeypatch.setitem(moa.bench.BENCHES, "fake", "a fake")
    monkeypatch.setitem(moa.bench.BENCHES, "ghost", "absent")

    assert run(["bench", "fake", "--size", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out == {"bench": "fake", "rows": [{"size": 3, "ms": 1.5}], "notes": ["a note"]}
    assert run(["bench"]) == 0
    listing = capsys.readouterr().out
    assert "fake" in listing and "ghost" in listing
    assert run(["bench", "ghost"]) == 1
    assert capsys.readouterr().err.strip() == "moa: Bench 'ghost' is not part of this build yet."
    assert run(["bench", "nope"]) == 1
    assert "Unknown bench 'nope'" in capsys.readouterr().err


# ---------------------------------------------------------------- moa chat, end to end

REPLIES = {"a": "Alpha thinks it is four.", "b": "Beta says 4.", "agg": "The answer is **4**."}
CHAT = ["chat", "-p", "loop/a", "-p", "loop/b", "-a", "loop/agg", "--mode", "layered"]


@pytest.fixture
def server() -> Iterator[Any]:
    from moa.testing import LoopbackServer, ModelBehavior

    behaviors = {name: ModelBehavior(reply=text) for name, text in REPLIES.items()}
    behaviors["bad"] = ModelBehavior(reply="never", fail_status=500, fail_times=1000)
    behaviors["slow"] = ModelBehavior(reply="one two three", stall_after=1)
    with LoopbackServer(behaviors) as srv:
        yield srv


@pytest.fixture
def config(server: Any, tmp_path: Path) -> str:
    """A config file pointing the prefix `loop` at the loopback server (no retries)."""
    return write(tmp_path, f"""
[providers.loop]
kind = "openai"
base_url = "{server.base_url}"
key_required = false
[providers.loop.limits]
max_retries = 0

[providers.locked]
kind = "openai"
base_url = "{server.base_url}"
key_env = "MOA_TEST_UNSET_KEY"
""")


def bodies(server: Any, model: str) -> list[dict[str, Any]]:
    return [r.body for r in server.requests if r.model == model]


def texts(body: dict[str, Any]) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in body["messages"]]


def test_one_shot_streams_plain_text_when_stdout_is_not_a_terminal(
    server: Any, config: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run([*CHAT, "-c", config, "What is 2+2?"]) == 0
    out, err = capsys.readouterr()
    assert out == REPLIES["agg"] + "\n"
    assert "3 calls" in err and "TTFT" in err
    assert not ANSI.search(out + err)
    [agg] = bodies(server, "agg")
    sent = json.dumps(agg["messages"])
    assert REPLIES["a"] in sent and REPLIES["b"] in sent and "What is 2+2?" in sent


def test_json_prints_the_result(
    server: Any, config: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run([*CHAT, "-c", config, "--json", "What is 2+2?"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["text"] == REPLIES["agg"]
    assert result["calls"] == 3
    assert {a["id"]: a["text"] for a in result["agents"]} == {
        "L1.1": REPLIES["a"], "L1.2": REPLIES["b"], "final": REPLIES["agg"]
    }


def test_quiet_prints_the_answer_only(
    server: Any, config: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run([*CHAT, "-c", config, "-q", "What is 2+2?"]) == 0
    assert capsys.readouterr() == (REPLIES["agg"] + "\n", "")


def test_a_failed_proposer_is_reported_and_the_run_goes_on(
    server: Any, config: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["chat", "-c", config, "-p", "loop/a", "-p", "loop/bad", "-a", "loop/agg", "Hi"]
    assert run(argv) == 0
    out, err = capsys.readouterr()
    assert out == REPLIES["agg"] + "\n"
    assert "L1.2 loop/bad failed" in err


def test_all_proposers_failing_is_one_line_and_exit_1(
    server: Any, config: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(["chat", "-c", config, "-p", "loop/bad", "-a", "loop/agg", "Hi"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("moa: ")
    assert not bodies(server, "agg")


def test_no_question_on_an_empty_stdin(
    monkeypatch: pytest.MonkeyPatch, config: str, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert run([*CHAT, "-c", config]) == 1
    assert capsys.readouterr().err == (
        "moa: No question: pass one as an argument or pipe it on stdin.\n"
    )


def moa_cli(*argv: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run `python -m moa.cli ARGV` as a real process with a pipe for stdout and stderr."""
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "NO_COLOR")}
    env.update(TERM="xterm-256color", COLUMNS="120")
    env.pop("MOA_TEST_UNSET_KEY", None)
    return subprocess.run(
        [sys.executable, "-m", "moa.cli", *argv], input=stdin, capture_output=True, text=True,
        stdin=None if stdin is not None else subprocess.DEVNULL, env=env, timeout=60,
    )


def test_subprocess_one_shot_has_no_control_codes(server: Any, config: str) -> None:
    proc = moa_cli(*CHAT, "-c", config, "What is 2+2?")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == REPLIES["agg"] + "\n"
    assert "3 calls" in proc.stderr
    assert "\x1b" not in proc.stdout + proc.stderr


def test_subprocess_reads_the_question_from_piped_stdin(server: Any, config: str) -> None:
    proc = moa_cli(*CHAT, "-c", config, "--quiet", stdin="What is 2+2?\n")
    assert (proc.returncode, proc.stdout) == (0, REPLIES["agg"] + "\n"), proc.stderr
    assert texts(bodies(server, "a")[0])[-1] == ("user", "What is 2+2?")
    proc = moa_cli(*CHAT, "-c", config, "--quiet", "Summarize it.", stdin="Some notes.\n")
    assert proc.returncode == 0, proc.stderr
    assert texts(bodies(server, "a")[1])[-1] == ("user", "Some notes.\n\nSummarize it.")


def test_subprocess_missing_key_is_one_line(server: Any, config: str) -> None:
    proc = moa_cli("chat", "-c", config, "-p", "locked/x", "Hi")
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        "moa: Provider 'locked' needs an API key: set the MOA_TEST_UNSET_KEY variable."
    ]
    assert not server.requests
    debug = moa_cli("chat", "-c", config, "-p", "locked/x", "--debug", "Hi")
    assert debug.returncode == 1 and "Traceback" in debug.stderr


def test_subprocess_unknown_preset_is_one_line() -> None:
    proc = moa_cli("chat", "--preset", "nope", "Hi")
    assert proc.returncode == 1
    assert len(proc.stderr.splitlines()) == 1
    assert proc.stderr.startswith("moa: Unknown preset 'nope'; presets: ")


def wait_until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    """Poll `condition` every few milliseconds (an anti-hang bound, not a timing assertion)."""
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.005)


def default_sigint() -> None:
    """Give the child Python's Ctrl-C handler even when pytest runs with SIGINT ignored (a CI
    script that backgrounds it): a process started with SIGINT ignored keeps it ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_subprocess_ctrl_c_is_one_line_and_closes_the_streams(server: Any, config: str) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "NO_COLOR")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "moa.cli", "chat", "-c", config, "-p", "loop/slow", "Hi"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=env, preexec_fn=default_sigint,
    )
    try:
        # The slow model's request arrived: the run is under way, past any input.
        wait_until(lambda: bodies(server, "slow") or proc.poll() is not None)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (proc.returncode, err) == (130, "moa: interrupted.\n")
    wait_until(lambda: server.active_streams == 0)


class Pty:
    """The terminal side of a pseudo-terminal: read what the child writes, type lines."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.output = b""

    def expect(self, text: str, count: int, timeout: float = 30.0) -> None:
        """Read until `text` has appeared `count` times in all (or fail after `timeout`)."""
        self.read_until(lambda: self.text.count(text) >= count, text, timeout)

    def expect_after(self, marker: str, text: str) -> None:
        """Read until `text` has appeared after the last `marker` (which must have appeared)."""
        self.read_until(lambda: text in self.text.rsplit(marker, 1)[-1], text)

    def read_until(self, done: Callable[[], bool], text: str, timeout: float = 30.0) -> None:
        end = time.monotonic() + timeout
        while not done():
            left = end - time.monotonic()
            assert left > 0, f"timed out waiting for {text!r}; got:\n{self.output[-2000:]!r}"
            if select.select([self.fd], [], [], left)[0]:
                try:
                    chunk = os.read(self.fd, 65536)
                except OSError:  # EIO: the child closed the terminal
                    chunk = b""
                assert chunk, f"the child exited; got:\n{self.output[-2000:]!r}"
                self.output += chunk

    def read_to_end(self, timeout: float = 60.0) -> str:
        """Read until the child closes the terminal (it exited); returns all of the output."""
        end = time.monotonic() + timeout
        while select.select([self.fd], [], [], max(end - time.monotonic(), 0))[0]:
            try:
                chunk = os.read(self.fd, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            self.output += chunk
        return self.text

    def type(self, line: str) -> None:
        os.write(self.fd, line.encode() + b"\n")

    @property
    def text(self) -> str:
        return self.output.decode(errors="replace")

    def frame(self, *markers: str) -> str:
        """The latest complete frame of the live view that holds every marker (control codes
        removed): waits for the markers, then for the next redraw, which ends that frame."""
        for marker in markers:
            self.expect(marker, 1)
        self.expect(REDRAW, self.text.count(REDRAW) + 1)
        frames = [f for f in FRAME.split(self.text)[:-1] if all(m in f for m in markers)]
        assert frames, f"no complete frame holds {markers!r}"
        return ANSI.sub("", frames[-1])

    def after_live(self) -> str:
        """What was printed after the live view last erased itself (control codes removed)."""
        return ANSI.sub("", self.text.rsplit(ERASE_LINE, 1)[-1])


ERASE_LINE = "\x1b[2K"
REDRAW = "\x1b[1A\x1b[2K"
FRAME = re.compile(r"\r\x1b\[2K(?:\x1b\[1A\x1b\[2K)*")
"""rich.live moves back over its last frame (cursor up, erase line) before it draws the next."""


@contextlib.contextmanager
def chat_in_pty(
    args: list[str], columns: int, lines: int = 40
) -> Iterator[tuple[subprocess.Popen[bytes], Pty]]:
    """`moa` with `args` on a pseudo-terminal of `columns` x `lines`, with the default Ctrl-C;
    the child is killed if it is still running when the block ends."""
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", lines, columns, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "NO_COLOR")}
    env.update(TERM="xterm-256color", COLUMNS=str(columns), LINES=str(lines))
    proc = subprocess.Popen(
        [sys.executable, "-m", "moa.cli", *args],
        stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True,
        preexec_fn=default_sigint,
    )
    os.close(slave)
    try:
        yield proc, Pty(master)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)


def test_repl_through_a_pseudo_terminal_keeps_history(server: Any, config: str) -> None:
    from moa.testing import ModelBehavior

    with chat_in_pty([*CHAT, "-c", config], 120) as (proc, term):
        term.expect("you> ", 1)
        term.type("What is 2+2?")
        term.expect("you> ", 2)
        term.type("And 3+3?")
        term.expect("you> ", 3)
        term.type("/reset")
        term.expect("you> ", 4)
        term.type("Fresh start")
        term.expect("you> ", 5)
        server.set_behavior("a", ModelBehavior(reply="stuck here", stall_after=1))
        term.type("Will you hang?")
        # Wait for this turn's own request (an earlier turn's stream may still be closing).
        wait_until(lambda: len(bodies(server, "a")) == 4)
        proc.send_signal(signal.SIGINT)  # Ctrl-C cancels the turn, the chat goes on
        term.expect("you> ", 6)
        wait_until(lambda: server.active_streams == 0)
        term.type("/exit")
        assert proc.wait(timeout=30) == 0
    screen = term.output.decode(errors="replace")
    assert "3 calls" in screen and "done" in screen and "moa: interrupted." in screen
    first, second, third, _stuck = (texts(b) for b in bodies(server, "a"))
    assert first == [("user", "What is 2+2?")]
    assert second == [
        ("user", "What is 2+2?"), ("assistant", REPLIES["agg"]), ("user", "And 3+3?")
    ]
    assert third == [("user", "Fresh start")]


def test_one_shot_live_view_marks_a_cut_answer_and_an_unknown_cost(
    server: Any, config: str
) -> None:
    with chat_in_pty([*CHAT, "-c", config, "--max-tokens", "2", "Hi"], 160) as (proc, term):
        term.expect("TTFT", 1)
        assert proc.wait(timeout=30) == 0
    screen = ANSI.sub("", term.output.decode(errors="replace"))
    assert "[truncated: the answer was cut at its max_tokens limit" in screen
    assert "cost unknown (no price for loop/a, loop/agg, loop/b)" in screen
    assert re.search(r"final loop/agg\s+cut", screen)
    assert "$0.0000" not in screen
    [agg] = bodies(server, "agg")
    assert agg["max_tokens"] == 2 and bodies(server, "a")[0]["max_tokens"] == 512


def test_plain_output_notes_a_cut_answer(server: Any, config: str) -> None:
    proc = moa_cli(*CHAT, "-c", config, "--max-tokens", "2", "Hi")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "The answer\n"
    assert "moa: the answer was cut at its max_tokens limit" in proc.stderr


def test_live_view_shows_a_started_agent_without_tokens_as_waiting(server: Any) -> None:
    from rich.console import Console

    from moa.cli.live import LiveView
    from moa.events import AgentDelta, AgentStarted
    from moa.mixture import Mixture
    from moa.testing import ModelBehavior

    server.set_behavior("slow", ModelBehavior(reply="late", ttft_s=30))
    mixture = Mixture({"mode": "layered", "layers": [{"agents": [{"model": "loop/slow"}]}],
                       "aggregator": {"model": "loop/agg"}}, registry=server.registry("loop"))
    view = LiveView(Console(width=120, record=True, force_terminal=False))
    seen: list[str] = []

    async def watch() -> None:
        async with contextlib.aclosing(mixture.stream("Hi")) as events:
            async for event in events:
                view.on_event(event)
                if isinstance(event, AgentStarted):
                    with view.console.capture() as capture:
                        view.console.print(view)
                    seen.append(capture.get())
                    break
        await mixture.aclose()

    anyio.run(watch)
    [screen] = seen
    assert re.search(r"L1\.1 loop/slow\s+waiting\s+0", screen), screen
    assert "streaming" not in screen
    view.on_event(AgentDelta(0.1, next(iter(view._agents)), "la"))
    with view.console.capture() as capture:
        view.console.print(view)
    assert re.search(r"L1\.1 loop/slow\s+streaming\s+1", capture.get())


# ---------------------------------------------------------------- the live view and the chat


def test_ctrl_c_mid_answer_keeps_the_streamed_text(server: Any, config: str) -> None:
    from moa.testing import ModelBehavior

    server.set_behavior("agg", ModelBehavior(reply="Kept Streamed Words never", stall_after=3))
    with chat_in_pty([*CHAT, "-c", config, "Hi"], 120) as (proc, term):
        term.expect("Words", 1)  # on screen, inside the live view
        proc.send_signal(signal.SIGINT)
        term.expect("moa: interrupted.", 1)
        assert proc.wait(timeout=30) == 130
    kept = term.after_live()
    assert "Kept Streamed Words" in kept and "[interrupted]" in kept, kept
    assert re.search(r"final loop/agg\s+streaming", kept), kept
    assert kept.rstrip().endswith("moa: interrupted.")
    wait_until(lambda: server.active_streams == 0)


def test_80x30_folds_the_proposers_and_keeps_the_answer_in_view(server: Any, config: str) -> None:
    from moa.testing import ModelBehavior

    long_answer = "\n\n".join(f"Para{i:02d}" for i in range(40))
    server.set_behavior("agg", ModelBehavior(reply=long_answer, stall_after=30))
    with chat_in_pty([*CHAT, "-c", config, "Hi"], 80, lines=30) as (proc, term):
        frame = term.frame("Para29")
        proc.send_signal(signal.SIGINT)
        term.expect("moa: interrupted.", 1)
        assert proc.wait(timeout=30) == 130
    lines = frame.splitlines()
    assert len(lines) < 30, frame
    assert max(len(line) for line in lines) <= 80
    # Each proposer is one line; the status table, the totals and the answer's tail stay.
    assert "╭─ L1.1" not in frame and re.search(r"^L1\.1 loop/a +Alpha thinks", frame, re.M)
    assert re.search(r"final loop/agg\s+streaming", frame) and "answer" in frame
    assert "Para28" in frame and "Para00" not in frame
    # After Ctrl-C the whole answer so far is on screen, not only what fitted.
    kept = term.after_live()
    assert "Para00" in kept and "Para29" in kept and "Para30" not in kept


def test_live_view_shows_retries_and_the_running_cost(
    server: Any, config: str, tmp_path: Path
) -> None:
    from moa.testing import ModelBehavior

    server.set_behavior("x", ModelBehavior(reply="late", fail_status=503, fail_times=1,
                                           retry_after=60))
    server.set_behavior("agg", ModelBehavior(reply="never", stall_after=0))
    flaky = write(tmp_path, Path(config).read_text() + f"""
[providers.flaky]
kind = "openai"
base_url = "{server.base_url}"
key_required = false
[providers.flaky.limits]
max_retries = 1

[prices]
"loop/b" = [10000.0, 20000.0]
""", "flaky.toml")
    argv = ["chat", "-c", flaky, "-p", "flaky/x", "-p", "loop/b", "-a", "loop/agg",
            "--mode", "layered", "Hi"]
    with chat_in_pty(argv, 160) as (proc, term):
        # flaky/x waits for its second attempt; loop/b has answered and reported its usage.
        frame = term.frame("retrying (attempt 2)", "so far")
        assert re.search(r"L1\.1 flaky/x\s+waiting\s+0\s+[\d.]+\s+retrying \(attempt 2\): "
                         r".*503", frame), frame
        assert re.search(r"L1\.2 loop/b\s+done", frame)
        assert re.search(r"\$(?!0\.0000)\d+\.\d{4} so far", frame), frame
        proc.send_signal(signal.SIGINT)
        term.expect("moa: interrupted.", 1)
        assert proc.wait(timeout=30) == 130
    assert "retrying (attempt 2)" in term.after_live()


@pytest.mark.slow  # the real model (two 2-token answers)
def test_live_view_says_when_an_agent_is_queued_or_evaluating_its_prompt(server: Any) -> None:
    pytest.importorskip("llama_cpp", reason="llama-cpp-python (moa-stack[local]) missing")
    from rich.console import Console

    from moa.cli.live import LiveView
    from moa.events import AgentDelta, AgentWaiting
    from moa.mixture import Mixture

    agents = [{"model": "local/smollm2", "max_tokens": 2, "temperature": 0}] * 2
    mixture = Mixture({
        "mode": "layered", "layers": [{"agents": agents}], "aggregator": {"model": "loop/agg"},
        "providers": {"loop": {"base_url": server.base_url, "key_required": False}},
    })
    view = LiveView(Console(width=120, record=True, force_terminal=False))
    waits: list[tuple[str, str]] = []
    screens: list[str] = []

    async def watch() -> None:
        async with contextlib.aclosing(mixture.stream("Hi")) as events:
            async for event in events:
                view.on_event(event)
                if isinstance(event, AgentWaiting):
                    waits.append((event.agent.key, event.why))
                    with view.console.capture() as capture:
                        view.console.print(view)
                    screens.append(capture.get())
                if isinstance(event, AgentDelta):  # its first token ends the wait
                    assert view._agents[event.agent].why == ""
        await mixture.aclose()

    anyio.run(watch)
    # One engine instance: one proposer evaluates its prompt while the other waits its turn.
    [(queued, _)] = [w for w in waits if w[1] == "queued"]
    prompts = [key for key, why in waits if why == "prompt"]
    assert sorted(prompts) == ["L1.1", "L1.2"] and prompts[-1] == queued
    assert waits.index((queued, "queued")) < waits.index((queued, "prompt"))
    text = "\n".join(screens)
    assert re.search(rf"{queued} local/smollm2\s+waiting\s+0\s+[\d.]*\s+queued for the engine",
                     text), text
    assert "evaluating the prompt" in text


def interrupt_at_the_prompt(proc: subprocess.Popen[bytes], term: Pty) -> None:
    """Ctrl-C at the prompt, until a fresh prompt shows: CPython's readline misses a SIGINT
    that lands between drawing the prompt and waiting for input (it waits on)."""
    prompts = term.text.count("you> ")
    end = time.monotonic() + 30
    while time.monotonic() < end:
        proc.send_signal(signal.SIGINT)
        with contextlib.suppress(AssertionError):
            term.expect("you> ", prompts + 1, timeout=2)
            return
    raise AssertionError("Ctrl-C at the prompt did not give a fresh prompt")


def test_repl_ctrl_c_at_the_prompt_help_and_multi_line_questions(
    server: Any, config: str
) -> None:
    with chat_in_pty([*CHAT, "-c", config], 120) as (proc, term):
        term.expect("you> ", 1)
        interrupt_at_the_prompt(proc, term)  # a fresh prompt, not the end of the chat
        term.type("/help")
        term.expect("Ctrl-C", 1)
        term.expect_after("Ctrl-C", "you> ")
        for command in ("/reset", "/exit", "Ctrl-D", '"""'):
            assert command in term.text.rsplit("/help", 1)[-1]
        term.type('"""First line,')  # a block: one question, not one mixture per line
        term.expect("...> ", 1)
        term.type("second line.")
        term.type('End."""')
        term.expect("TTFT", 1)
        term.expect_after("TTFT", "you> ")
        assert "\x1b[?2004h" in term.text  # readline asks the terminal for bracketed paste
        os.write(term.fd, b"\x1b[200~Pasted one.\nPasted two.\x1b[201~\n")
        term.expect("TTFT", 2)
        term.expect_after("TTFT", "you> ")
        os.write(term.fd, b"\x04")  # Ctrl-D leaves
        assert proc.wait(timeout=30) == 0
    first, second = (texts(b) for b in bodies(server, "a"))
    assert first == [("user", "First line,\nsecond line.\nEnd.")]
    assert second == [*first, ("assistant", REPLIES["agg"]), ("user", "Pasted one.\nPasted two.")]


def test_debug_is_accepted_before_the_command(server: Any, config: str) -> None:
    proc = moa_cli("--debug", "chat", "-c", config, "-p", "locked/x", "Hi")
    assert proc.returncode == 1 and "Traceback" in proc.stderr
    assert "MissingKeyError" in proc.stderr


# ---------------------------------------------------------------- progress of long commands

BAR = r"\s+\S+\s+{done}/{total}\s+\d+:\d\d:\d\d"
"""A progress bar's line after its description: the bar, done/total, the elapsed time."""


def test_long_commands_draw_a_progress_bar_on_a_terminal_only(
    server: Any, config: str, tmp_path: Path
) -> None:
    tasks = write(tmp_path, "".join(
        json.dumps({"question": f"What is {i} + 1?", "answer": str(i + 1)}) + "\n"
        for i in range(3)
    ), "tasks.jsonl")
    routed = write(tmp_path, Path(config).read_text() + """
[[layers]]
agents = [{model = "loop/a"}]
[aggregator]
model = "loop/agg"
strong = "loop/b"
""", "routed.toml")
    runs = {
        "model loop/a" + BAR.format(done=3, total=3): ["eval", tasks, "-c", routed, "-m", "loop/a"],
        "calibrate" + BAR.format(done=3, total=3):
            ["calibrate", tasks, "-c", routed, "--strong-share", "0.5"],
        "quality dev" + BAR.format(done=4, total=4):
            ["bench", "quality", "--providers", config, "-m", "loop/a", "--split", "dev",
             "--limit", "1", "--rows", "alone greedy"],
        "staircase" + BAR.format(done=r"(\d+)", total=r"\1"):  # every run done
            ["bench", "staircase", "--quick", "--tokens", "4", "--pacing", "lockstep"],
    }
    for bar, argv in runs.items():
        with chat_in_pty(argv, 120) as (proc, term):
            screen = ANSI.sub("", term.read_to_end())
            assert proc.wait(timeout=60) == 0, screen
        assert re.search(bar, screen), screen
    # Nothing extra with --json on a terminal, nor when piped.
    with chat_in_pty(["eval", tasks, "-c", routed, "--json"], 120) as (proc, term):
        screen = term.read_to_end()
        assert proc.wait(timeout=60) == 0, screen
    assert '"rows"' in screen and not re.search(r"\d+:\d\d:\d\d", screen), screen
    piped = moa_cli("eval", tasks, "-c", routed)
    assert piped.returncode == 0 and piped.stderr == ""
    assert not re.search(r"\d+:\d\d:\d\d", piped.stdout)
