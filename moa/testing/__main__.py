"""Run a loopback server in its own process: `python -m moa.testing [--reply TEXT] ...`.

Every model name answers with the same behaviour. The base URL is printed on the first line of
stdout; the server stops when stdin closes or on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import sys

from .behavior import ECHO, ModelBehavior
from .server import LoopbackServer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m moa.testing", description=__doc__)
    parser.add_argument("--reply", default=ECHO, help="reply text, or 'echo' (the default)")
    parser.add_argument("--ttft", type=float, default=0.0, help="seconds to the first token")
    parser.add_argument("--tokens-per-s", type=float, default=None, help="streamed token rate")
    args = parser.parse_args(argv)
    behavior = ModelBehavior(reply=args.reply, ttft_s=args.ttft, tokens_per_s=args.tokens_per_s)
    with LoopbackServer(default=behavior) as server:
        print(server.base_url, flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            sys.stdin.read()


if __name__ == "__main__":
    main()
