"""`moa serve`: serve mixtures over an OpenAI-compatible HTTP API.

The mixture built from the options (the same as `moa chat`'s) is served as model `moa`, and
every preset under its own name.
"""

from __future__ import annotations

import argparse
import sys

from moa.cli.options import add_mixture_arguments, mixture_from_args
from moa.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_mixture_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument(
        "--api-key", help="require this bearer token (default: $MOA_SERVER_API_KEY, else none)"
    )
    parser.add_argument("--max-concurrency", type=int, default=16, metavar="N",
                        help="mixtures run at once (default 16)")
    parser.add_argument("--max-queue", type=int, default=64, metavar="N",
                        help="requests that may wait for a slot; beyond it 429 (default 64)")
    parser.add_argument("--keepalive", type=float, default=15.0, metavar="SECONDS",
                        help="SSE comment after this much silence in a stream (default 15)")


def run(args: argparse.Namespace) -> int:
    try:
        from moa.openai.server import create_app, serve
    except ImportError as err:
        raise ConfigError(
            f"moa serve needs {err.name}: pip install 'moa-stack[server]'."
        ) from None
    from moa.config import PRESETS, preset

    mixtures = {name: preset(name) for name in PRESETS}
    mixtures["moa"] = mixture_from_args(args)
    app = create_app(mixtures, api_key=args.api_key, max_concurrency=args.max_concurrency,
                     max_queue=args.max_queue, keepalive_s=args.keepalive)
    print(f"moa: serving {', '.join(mixtures)} on http://{args.host}:{args.port}/v1",
          file=sys.stderr)
    serve(app, host=args.host, port=args.port)
    return 0
