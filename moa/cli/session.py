"""A mixture kept alive across the turns of `moa chat`.

The event loop runs in a background thread (an anyio blocking portal) for the whole session,
so provider connections and embedded engines survive between turns, while the main thread
keeps `input()` with line editing and gets Ctrl-C, which cancels the running turn.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from moa.events import RunFinished

if TYPE_CHECKING:
    from anyio.from_thread import BlockingPortal

    from moa.cli.views import View
    from moa.config import MixtureConfig
    from moa.mixture import Mixture
    from moa.result import MixtureResult

_CANCEL_WAIT_S = 10.0


class ChatSession:
    """Runs turns of one mixture on the session's event loop (made by `open_session`)."""

    def __init__(self, portal: BlockingPortal, mixture: Mixture) -> None:
        self._portal = portal
        self._mixture = mixture

    def ask(self, messages: str | list[dict[str, Any]], view: View) -> MixtureResult:
        """Run one turn, feeding its events to `view`. Ctrl-C cancels the turn and re-raises."""
        finished = threading.Event()

        async def turn() -> MixtureResult:
            try:
                result: MixtureResult | None = None
                async with contextlib.aclosing(self._mixture.stream(messages)) as events:
                    async for event in events:
                        view.on_event(event)
                        if isinstance(event, RunFinished):
                            result = event.result
                if result is None:
                    raise RuntimeError("the mixture stream ended without a result")
                return result
            finally:
                finished.set()

        view.start()
        future = self._portal.start_task_soon(turn)
        try:
            result = future.result()
        except KeyboardInterrupt:
            future.cancel()
            try:
                finished.wait(_CANCEL_WAIT_S)
            finally:  # a second Ctrl-C still closes the view
                view.abort()
            raise
        except BaseException:
            view.abort()
            raise
        view.finish(result)
        return result


@contextlib.contextmanager
def open_session(config: MixtureConfig) -> Iterator[ChatSession]:
    """Start the loop thread and the mixture; close both (and every connection) on exit."""
    from anyio.from_thread import start_blocking_portal

    from moa.mixture import Mixture
    from moa.providers.registry import Registry

    registry = Registry()
    with start_blocking_portal() as portal:
        mixture = portal.call(lambda: Mixture(config, registry=registry))
        try:
            yield ChatSession(portal, mixture)
        finally:
            portal.call(mixture.aclose)
            portal.call(registry.aclose)
