"""httpx without its command-line tool: what a cold start to the first request saves.

`import httpx` also imports `httpx._main`, the `httpx` command (click, pygments and rich's
console, progress and syntax modules) whenever click is installed, as it is beside uvicorn:
about 35 ms of a 0.3 s start on an idle machine, for a tool moa never runs. `import_httpx`
imports httpx with a stand-in for that module whose `main` loads the real one when called, and
removes the stand-in at once, so a later `import httpx._main` gets the real module.

The providers take `httpx` and httpx_sse's `ServerSentEvent` from here, so whichever of them is
imported first imports httpx this way.
"""

from __future__ import annotations

import sys
import types
from typing import Any


def _cli(*args: Any, **kwargs: Any) -> Any:
    """httpx.main, the `httpx` command: its module is imported on the first call."""
    from httpx._main import main

    return main(*args, **kwargs)


def import_httpx() -> types.ModuleType:
    if "httpx" not in sys.modules and "httpx._main" not in sys.modules:
        stand_in = types.ModuleType("httpx._main")
        stand_in.main = _cli  # type: ignore[attr-defined]
        sys.modules["httpx._main"] = stand_in
        try:
            import httpx
        finally:
            if sys.modules.get("httpx._main") is stand_in:
                del sys.modules["httpx._main"]
    import httpx

    return httpx


httpx = import_httpx()
from httpx_sse import ServerSentEvent  # noqa: E402  (it imports httpx: after the lean import)

__all__ = ["ServerSentEvent", "httpx", "import_httpx"]
