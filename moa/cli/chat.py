"""`moa chat`: ask a mixture once, or chat with it turn by turn.

`moa chat "question"` answers once; with no question, piped stdin is the question, and on a
terminal a multi-turn chat opens (`/reset` clears the history, `/exit` or Ctrl-D quits).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import stat
import sys
from typing import Any

from moa.cli.options import add_mixture_arguments, check_keys, mixture_from_args
from moa.cli.session import ChatSession, open_session
from moa.cli.views import JsonView, PlainView, View
from moa.errors import MoaError

_PROMPT = "you> "
_HELP = "/reset clears the history, /exit quits"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "question", nargs="?",
        help="the question; omit it to read stdin when piped, or to chat turn by turn",
    )
    add_mixture_arguments(parser)
    output = parser.add_argument_group("output").add_mutually_exclusive_group()
    output.add_argument("-q", "--quiet", action="store_true", help="print the answer only")
    output.add_argument(
        "--json", action="store_true", help="print the result (answer, agents, usage) as JSON"
    )


def run(args: argparse.Namespace) -> int:
    config = mixture_from_args(args)
    check_keys(config)
    question = read_question(args.question)
    with open_session(config) as session:
        if question is not None:
            session.ask(question, make_view(args))
            return 0
        return _repl(session, args)


def read_question(arg: str | None) -> str | None:
    """The question to answer once, or None for a chat on a terminal.

    Piped stdin is the question; with a question argument too, it comes first (as context).
    An empty question or text that is not UTF-8 is refused before any call.
    """
    stdin = sys.stdin
    if arg is None:
        if stdin is None or stdin.isatty():
            return None
        text = _read_stdin()
        if not text:
            raise MoaError("No question: pass one as an argument or pipe it on stdin.")
        return text
    try:
        arg.encode("utf-8")
    except UnicodeEncodeError:
        raise MoaError("The question is not valid UTF-8 text.") from None
    piped = _piped_stdin()
    question = f"{piped}\n\n{arg}" if piped else arg
    if not question.strip():
        raise MoaError("The question is empty: ask something.")
    return question


def _read_stdin() -> str:
    """All of stdin as UTF-8 text, stripped."""
    raw = getattr(sys.stdin, "buffer", None)
    data = raw.read() if raw is not None else sys.stdin.read().encode("utf-8", "surrogateescape")
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError as err:
        raise MoaError(
            f"stdin is not valid UTF-8 text (byte {err.start}); convert it, e.g. with iconv."
        ) from None


def _piped_stdin() -> str:
    """The text of stdin when it is a pipe or a file (never blocks on a terminal)."""
    try:
        mode = os.fstat(sys.stdin.fileno()).st_mode
    except (AttributeError, OSError, ValueError):
        return ""
    if not (stat.S_ISFIFO(mode) or stat.S_ISREG(mode)):
        return ""
    return _read_stdin()


def make_view(args: argparse.Namespace) -> View:
    """JSON, plain text (pipes, files, `--quiet`) or the rich live view (a terminal)."""
    if args.json:
        return JsonView()
    if args.quiet or not sys.stdout.isatty():
        return PlainView(quiet=args.quiet)
    from moa.cli.live import LiveView

    return LiveView()


def _repl(session: ChatSession, args: argparse.Namespace) -> int:
    """Chat turn by turn; earlier turns are sent as history."""
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (line editing and history for input())
    print(f"moa chat — {_HELP}.", file=sys.stderr)
    history: list[dict[str, Any]] = []
    while True:
        try:
            line = input(_PROMPT).strip()
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            history.clear()
            print("(history cleared)", file=sys.stderr)
            continue
        if line.startswith("/"):
            print(f"Unknown command {line!r}: {_HELP}.", file=sys.stderr)
            continue
        turn = {"role": "user", "content": line}
        try:
            result = session.ask([*history, turn], make_view(args))
        except KeyboardInterrupt:
            print("moa: interrupted.", file=sys.stderr)
            continue
        except MoaError as err:
            if args.debug:
                raise
            print(f"moa: {err}", file=sys.stderr)
            continue
        history += [turn, {"role": "assistant", "content": result.text}]
