"""Shared fixtures. Keep this file small: put feature-specific fixtures in the test module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from moa.testing import LoopbackServer


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def loopback() -> Iterator[LoopbackServer]:
    """A started loopback server (echo model by default); use `set_behavior` per model."""
    with LoopbackServer() as server:
        yield server
