"""`moa serve`: serve mixtures over an OpenAI-compatible HTTP API.

The mixture built from the options (the same as `moa chat`'s) is served as model `mixture`
(`--name` changes it), and every preset under its own name, so none is hidden; `moa/NAME`
works too. Keys, the port and the limits are checked before the server starts, and an
embedded engine (a model run in this process) is served without an API key only on a
loopback address or with `--allow-unauthenticated`. SIGTERM / SIGINT drain open requests for
`--shutdown-grace` seconds; a second signal exits at once. `--redis URL` (or $MOA_REDIS_URL)
shares budgets, limits and client keys' spend with every replica on that Redis; `--keys FILE`
gives each client its own key, mixtures, rate and budget (docs/deploy.md). With the `otel` extra,
the standard OTEL_* variables export traces and metrics over OTLP (docs/observability.md).
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import logging
import os
import sys
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import anyio

if TYPE_CHECKING:
    from starlette.applications import Starlette

    from moa.config import MixtureConfig
    from moa.openai.keys import KeyRing
    from moa.providers.registry import Registry
    from moa.state import State

from moa.cli.options import add_mixture_arguments, mixture_from_args
from moa.errors import ConfigError

DEFAULT_NAME = "mixture"
DEFAULT_PORT = 8400
"""Not 8000: that is vLLM's (and `hosted_vllm/`'s) default."""
EMBEDDED_KINDS = ("llamacpp", "vllm")
"""Provider kinds that run the model inside this process (`local/`, `vllm/`)."""


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
    parser.add_argument("--max-concurrency", type=_bounded(int, 1, 4096), default=64,
                        metavar="N", help="mixtures run at once (default 64)")
    parser.add_argument("--max-queue", type=_bounded(int, 0, 100_000), default=64, metavar="N",
                        help="requests that may wait for a slot; beyond it 429 (default 64)")
    parser.add_argument("--keepalive", type=_bounded(float, 0.1, 3600), default=15.0,
                        metavar="SECONDS",
                        help="SSE comment after this much silence in a stream (default 15)")
    parser.add_argument("--shutdown-grace", type=_bounded(float, 0, 3600), default=10.0,
                        metavar="SECONDS",
                        help="on SIGTERM / SIGINT, let open requests finish this long, then end "
                             "them with an error (default 10); a second signal exits at once")
    parser.add_argument("--allow-unauthenticated", action="store_true",
                        help="serve embedded engines (local/, vllm/) without --api-key on a "
                             "non-loopback host")
    parser.add_argument("--redis", metavar="URL",
                        help="keep budgets, limits and key spend in this Redis, shared by every "
                             "replica (redis:// or rediss:// with password; default "
                             "$MOA_REDIS_URL, else in this process)")
    parser.add_argument("--lease-ttl", type=_bounded(float, 0.1, 3600), default=30.0,
                        metavar="SECONDS",
                        help="with --redis: how long a dead replica's reservations and slots "
                             "outlive it (default 30)")
    parser.add_argument("--keys", metavar="FILE",
                        help="client API keys (TOML, hashed) with their mixtures, rate limits "
                             "and budgets; replaces --api-key")


def _keys(args: argparse.Namespace) -> KeyRing | None:
    if not args.keys:
        return None
    from moa.openai.keys import KeyRing

    if args.api_key:
        raise ConfigError("Use --api-key or --keys, not both.")
    return KeyRing.load(args.keys)


def _state(args: argparse.Namespace) -> State | None:
    """The Redis state of --redis / $MOA_REDIS_URL (warned about if unreachable now), or None."""
    from moa.state import REDIS_URL_ENV

    url = args.redis or os.environ.get(REDIS_URL_ENV)
    if not url:
        return None
    from moa.providers.secrets import mask_url
    from moa.state.redis import RedisState

    state = RedisState(url, lease_ttl_s=args.lease_ttl)
    try:
        import redis

        redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2).ping()
    except Exception as err:  # reported, not fatal: the down policy applies until it is back
        print(f"moa: Redis at {mask_url(url)} cannot be reached now ({type(err).__name__}): "
              "shared budgets answer 503 until it is.", file=sys.stderr)
    return state


def embedded(mixtures: dict[str, MixtureConfig], registry: Registry) -> list[str]:
    """The names of the mixtures that run a model in this process (an embedded engine)."""
    names = []
    for name, config in mixtures.items():
        specs = config.registry(registry)
        refs = [ref for agent in config.agents() for ref in (agent.model, agent.strong) if ref]
        if any(specs.check(ref)[0].kind in EMBEDDED_KINDS for ref in refs):
            names.append(name)
    return names


def _loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.partition("%")[0]).is_loopback
    except ValueError:
        return False


def run(args: argparse.Namespace) -> int:
    try:
        from moa.openai.server import API_KEY_ENV, bind, create_app, not_ready, serve
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
    keys, state = _keys(args), _state(args)
    sock = bind(args.host, args.port)
    api_key = None if keys else args.api_key or os.environ.get(API_KEY_ENV) or None
    engines = [] if api_key or keys else embedded(mixtures, registry)
    local_only = _loopback(sock.getsockname()[0])
    if engines and not (local_only or args.allow_unauthenticated):
        sock.close()
        raise ConfigError(
            f"Serving the embedded engine of {', '.join(map(repr, engines))} on {args.host} "
            f"without an API key would let anyone who reaches it run the engine: set --api-key "
            f"(or {API_KEY_ENV}), or pass --allow-unauthenticated."
        )
    if not args.debug:
        logging.basicConfig(level=logging.WARNING, format="moa serve: %(message)s")
    from moa import telemetry

    exporting = telemetry.configure_cli()  # OTLP export when the OTEL_* variables ask for it
    app = create_app(mixtures, api_key=api_key, max_concurrency=args.max_concurrency,
                     max_queue=args.max_queue, keepalive_s=args.keepalive, registry=registry,
                     state=state, keys=keys)
    ready = [name for name in mixtures if name not in missing]
    print(f"moa: serving {', '.join(ready)} on http://{args.host}:{args.port}/v1",
          file=sys.stderr)
    for name, why in missing.items():
        print(f"moa: {name!r} answers 503 until restarted with its key: {why}", file=sys.stderr)
    if engines:
        who = "any process on this machine" if local_only else "anyone who can reach it"
        print(f"moa: no API key: {who} can run the embedded engine of "
              f"{', '.join(map(repr, engines))}.", file=sys.stderr)
    if exporting is not None:
        _flush_at_shutdown(app, exporting.shutdown)
    serve(app, sock, shutdown_grace_s=args.shutdown_grace)
    return 0


def _flush_at_shutdown(app: Starlette, flush: Callable[[], None]) -> None:
    """Run `flush` (in a thread) at the end of the app's shutdown, once the open requests are
    done: uvicorn then re-raises the signal that stopped it, which ends the process at once."""
    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[Any]:
        try:
            async with inner(app) as state:
                yield state
        finally:
            await anyio.to_thread.run_sync(flush)

    app.router.lifespan_context = lifespan
