"""`moa chat`: ask a mixture once, or chat with it turn by turn.

`moa chat "question"` answers once; with no question, piped stdin is the question, and on a
terminal a multi-turn chat opens (`moa.cli.repl`).
"""

from __future__ import annotations

import argparse
import os
import stat
import sys

from moa.cli.options import add_mixture_arguments, check_keys, mixture_from_args
from moa.cli.session import open_session
from moa.cli.views import JsonView, PlainView, View
from moa.errors import MoaError
from moa.timeline import TimelineView, check_output_path


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
    parser.add_argument(
        "--timeline", metavar="PATH",
        help="also draw each agent's tokens over time as an SVG (in a chat: the last answer's)",
    )
    parser.add_argument(
        "--otel", action="store_true",
        help="export OpenTelemetry traces and metrics of the run (OTLP as the OTEL_* variables "
             "say, default http://localhost:4318; needs the otel extra); set OTEL_* variables "
             "export too",
    )


def run(args: argparse.Namespace) -> int:
    config = mixture_from_args(args)
    check_keys(config)
    if args.timeline:
        check_output_path(args.timeline, "--timeline")
    question = read_question(args.question)
    from moa import telemetry

    exporting = telemetry.configure_cli(force=args.otel)
    try:
        with open_session(config) as session:
            if question is not None:
                session.ask(question, make_view(args))
                return 0
            from moa.cli.repl import chat

            return chat(session, args, lambda: make_view(args))
    finally:
        if exporting is not None:
            exporting.shutdown()  # the run's spans and metrics are sent before exiting


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
    """The output view, drawing the run's timeline too with `--timeline`."""
    view = _output_view(args)
    if getattr(args, "timeline", None):
        return TimelineView(view, args.timeline, quiet=args.quiet)
    return view


def _output_view(args: argparse.Namespace) -> View:
    """JSON, plain text (pipes, files, `--quiet`) or the rich live view (a terminal)."""
    if args.json:
        return JsonView()
    if args.quiet or not sys.stdout.isatty():
        return PlainView(quiet=args.quiet)
    from moa.cli.live import LiveView

    return LiveView()
