"""`moa serve`: serve mixtures over an OpenAI-compatible HTTP API.

The mixture built from the options (the same as `moa chat`'s) is served as model `mixture`
(`--name` changes it), and every preset under its own name, so none is hidden; `moa/NAME`
works too. Keys, the port and the limits are checked before the server starts.
"""

from __future__ import annotations

import argparse
import logging
import sys

from moa.cli.options import add_mixture_arguments, mixture_from_args
from moa.errors import ConfigError

DEFAULT_NAME = "mixture"
DEFAULT_PORT = 8400
"""Not 8000: that is vLLM's (and `hosted_vllm/`'s) default."""


def _bounded(kind: type, low: float, high: float | None = None):
    """An argparse type: a `kind` number from `low` (to `high`), else one clear error."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value < low or (high is not None and value > high):
            span = f"from {low:g} to {high:g}" if high is not None else f"at least {low:g}"
            raise argparse.ArgumentTypeError(f"must be {span}, not {text}")
        return value

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_mixture_arguments(parser)
    parser.add_argument("--name", default=DEFAULT_NAME,
                        help=f"model name of the options' mixture (default {DEFAULT_NAME!r})")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=_bounded(int, 1, 65535), default=DEFAULT_PORT,
                        help=f"port (default {DEFAULT_PORT})")
    parser.add_argument(
        "--api-key", help="require this bearer token (default: $MOA_SERVER_API_KEY, else none)"
    )
    parser.add_argument("--max-concurrency", type=_bounded(int, 1, 4096), default=16,
                        metavar="N", help="mixtures run at once (default 16)")
    parser.add_argument("--max-queue", type=_bounded(int, 0, 100_000), default=64, metavar="N",
                        help="requests that may wait for a slot; beyond it 429 (default 64)")
    parser.add_argument("--keepalive", type=_bounded(float, 0.1, 3600), default=15.0,
                        metavar="SECONDS",
                        help="SSE comment after this much silence in a stream (default 15)")


def run(args: argparse.Namespace) -> int:
    try:
        from moa.openai.server import bind, create_app, not_ready, serve
    except ImportError as err:
        raise ConfigError(
            f"moa serve needs {err.name}: pip install -e '.[server]' in a checkout."
        ) from None
    from moa.config import PRESETS, preset
    from moa.providers.registry import Registry

    if args.name in PRESETS:
        raise ConfigError(f"--name {args.name!r} would hide the preset of that name; pick another.")
    mixtures = {args.name: mixture_from_args(args), **{name: preset(name) for name in PRESETS}}
    registry = Registry()
    missing = not_ready(mixtures, registry)
    if args.name in missing:
        raise ConfigError(missing[args.name])
    sock = bind(args.host, args.port)
    if not args.debug:
        logging.basicConfig(level=logging.WARNING, format="moa serve: %(message)s")
    app = create_app(mixtures, api_key=args.api_key, max_concurrency=args.max_concurrency,
                     max_queue=args.max_queue, keepalive_s=args.keepalive, registry=registry)
    ready = [name for name in mixtures if name not in missing]
    print(f"moa: serving {', '.join(ready)} on http://{args.host}:{args.port}/v1",
          file=sys.stderr)
    for name, why in missing.items():
        print(f"moa: {name!r} answers 503 until restarted with its key: {why}", file=sys.stderr)
    serve(app, sock)
    return 0
