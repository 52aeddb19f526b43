'''The multi-turn chat of `moa chat` on a terminal.

Each turn is sent with the earlier turns as history. A question is one line, one paste
(bracketed paste is turned on where GNU readline has it, so a pasted block arrives whole), or
a block: a line starting with `"""` opens it, a line ending with `"""` closes it. Ctrl-C
cancels the answer being written (or the line being typed) and returns to the prompt with the
history kept; Ctrl-D or `/exit` leave with status 0.
'''

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from moa.errors import MoaError

if TYPE_CHECKING:
    from moa.cli.session import ChatSession
    from moa.cli.views import View

PROMPT = "you> "
MORE = "...> "
BLOCK = '"""'
HELP = f"""\
/help      list these commands
/reset     clear the history
/exit      leave the chat (also /quit, or Ctrl-D)
{BLOCK}        a line starting with {BLOCK} opens a multi-line question, a line ending with \
{BLOCK} closes it
Ctrl-C     cancel the answer being written (or the line being typed); the history stays"""


def chat(session: ChatSession, args: argparse.Namespace, view: Callable[[], View]) -> int:
    """Chat turn by turn until Ctrl-D or `/exit`; `view()` makes each turn's view."""
    _line_editing()
    print("moa chat — /help lists the commands, /exit or Ctrl-D leaves.", file=sys.stderr)
    history: list[dict[str, Any]] = []
    while True:
        try:
            if _step(session, args, view, history):
                return 0
        except KeyboardInterrupt:  # at the prompt: drop the line (or block) being typed
            print(file=sys.stderr)


def _step(
    session: ChatSession, args: argparse.Namespace, view: Callable[[], View],
    history: list[dict[str, Any]],
) -> bool:
    """Read one question or command and act on it; True when the chat ends."""
    try:
        text = read_question(input).strip()
    except EOFError:
        print(file=sys.stderr)
        return True
    if text in ("/exit", "/quit"):
        return True
    if text in ("/help", "/?"):
        print(HELP, file=sys.stderr)
    elif text == "/reset":
        history.clear()
        print("(history cleared)", file=sys.stderr)
    elif text.startswith("/") and "\n" not in text:
        print(f"Unknown command {text!r}; /help lists the commands.", file=sys.stderr)
    elif text:
        turn = {"role": "user", "content": text}
        try:
            result = session.ask([*history, turn], view())
        except KeyboardInterrupt:  # the answer is cancelled; the history stays as it was
            print("moa: interrupted.", file=sys.stderr)
            return False
        except MoaError as err:
            if args.debug:
                raise
            print(f"moa: {err}", file=sys.stderr)
            return False
        history += [turn, {"role": "assistant", "content": result.text}]
    return False


def read_question(read: Callable[[str], str]) -> str:
    """One question from `read(prompt)`: a line (a bracketed paste is one, newlines and
    all), or the lines of a `\"\"\"` block without the quotes."""
    line = read(PROMPT)
    if not line.lstrip().startswith(BLOCK):
        return line
    rest = line.lstrip()[len(BLOCK) :]
    lines = []
    while not rest.rstrip().endswith(BLOCK):
        lines.append(rest)
        rest = read(MORE)
    lines.append(rest.rstrip()[: -len(BLOCK)])
    return "\n".join(lines)


def _line_editing() -> None:
    """Line editing and history for input(), and bracketed paste with GNU readline (Python
    turns it off; libedit has none)."""
    try:
        import readline
    except ImportError:
        return
    if "libedit" not in (readline.__doc__ or ""):
        readline.parse_and_bind("set enable-bracketed-paste on")
