"""`loads` for stream chunks: orjson where it is installed (about 4x faster on a chunk), with
the standard library's results: whatever orjson refuses (NaN, lone surrogates, bad JSON) is
parsed again by `json.loads`, which decides. One difference is left: an integer beyond 64 bits
comes back as a float (no field that a decoder reads holds one)."""

from __future__ import annotations

import json
from typing import Any

try:
    from orjson import loads as _fast
except ImportError:  # pragma: no cover - orjson is a dependency; a bare install still works
    _fast = json.loads


def loads(data: str | bytes) -> Any:
    try:
        return _fast(data)
    except ValueError:  # orjson.JSONDecodeError is a ValueError
        return json.loads(data)
