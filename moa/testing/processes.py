"""The loopback server and `moa serve` in child processes, for tests and benchmarks that need
them outside the current process (its event loop and its CPU)."""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def loopback_process(*options: str) -> Iterator[str]:
    """`python -m moa.testing OPTIONS` in a child process; yields its base URL."""
    process = subprocess.Popen(
        [sys.executable, "-m", "moa.testing", *options],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    assert process.stdin is not None and process.stdout is not None
    try:
        url = process.stdout.readline().strip()
        if not url:
            raise RuntimeError("The loopback server process did not start.")
        yield url
    finally:
        process.stdin.close()
        process.wait(10)


@contextmanager
def serve_process(*options: str, timeout: float = 30.0) -> Iterator[str]:
    """`moa serve OPTIONS` on a free port in a child process; yields its `/v1` base URL."""
    import httpx

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # A file, not a pipe: nobody reads it while the server runs.
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "moa.cli", "serve", *options, "--port", str(port)],
            stdout=subprocess.DEVNULL, stderr=log, text=True,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    httpx.get(f"{url}/health").raise_for_status()
                    break
                except httpx.TransportError as err:
                    if process.poll() is not None or time.monotonic() > deadline:
                        process.kill()
                        process.wait()
                        log.seek(0)
                        why = log.read().strip()
                        raise RuntimeError(f"moa serve did not start: {why}") from err
                    time.sleep(0.05)
            yield f"{url}/v1"
        finally:
            process.terminate()
            process.wait(10)
