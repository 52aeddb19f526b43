"""`RedisServer`: a real `redis-server` on a free loopback port, for tests and benchmarks.

    with RedisServer() as redis:
        state = RedisState(redis.url)
        redis.kill(); redis.start()            # an outage, then the same server back

It runs in a temporary directory with an append-only file, synced on every write by default
(`fsync="always"`: a killed server restarts with all it held; benchmarks pass "everysec", as a
production Redis runs). `redis-server` comes from the system's package manager
(`apt-get install redis-server`); without it `start()` raises, it never skips.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

MISSING = (
    "redis-server is not installed: the shared-state tests need a real one "
    "(apt-get install redis-server, as .ci/run and README.md's test set-up do)."
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def ping(port: int, timeout: float = 0.5) -> bool:
    """Whether a Redis answers PING on 127.0.0.1:`port`."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One `redis-server` process; `start()` again after `kill()` brings the same one back."""

    def __init__(self, fsync: str = "always") -> None:
        self.fsync = fsync
        self.executable = shutil.which("redis-server")
        self.port = free_port()
        self._dir = tempfile.TemporaryDirectory(prefix="moa-redis-")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Start (or restart) the server; return once it answers PING."""
        if self.executable is None:
            raise RuntimeError(MISSING)
        log = Path(self._dir.name) / "redis.log"
        self.process = subprocess.Popen(
            [self.executable, "--port", str(self.port), "--bind", "127.0.0.1",
             "--dir", self._dir.name, "--save", "", "--appendonly", "yes",
             "--appendfsync", self.fsync, "--logfile", str(log)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while not ping(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                why = log.read_text(errors="replace")[-500:] if log.exists() else ""
                raise RuntimeError(f"redis-server did not start: {why}")
            time.sleep(0.01)
        return self

    def kill(self) -> None:
        """SIGKILL the server (an outage; `start()` brings it back with its data)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.process = None

    def stop(self) -> None:
        self.kill()
        self._dir.cleanup()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
