"""Shared fixtures. Keep this file small: put feature-specific fixtures in the test module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from moa.testing import LoopbackServer
from moa.testing.redis import RedisServer


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def loopback() -> Iterator[LoopbackServer]:
    """A started loopback server (echo model by default); use `set_behavior` per model."""
    with LoopbackServer() as server:
        yield server


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A real redis-server on a free port in a temporary directory (fails when not installed)."""
    with RedisServer() as server:
        yield server
