"""Start `python -m server` as a child process on a free loopback port and wait until it
is healthy: for the load test and the benchmarks, which talk to it over HTTP only (as
llama.cpp's test `ServerProcess` does), so none of them imports the server package.

    with ServerProcess(["--artifact", "artifacts/x", "--memory-model", "none"]) as srv:
        httpx.get(srv.url + "/health")
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx


def free_port() -> int:
    # a port the OS just handed out on loopback (the server binds it right after)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m server ARGS` (subclasses start another server with `command`)."""

    def __init__(self, args: list[str], timeout: float = 300.0, log_level: str = "warning", quiet: bool = False,
                 env: dict[str, str] | None = None):
        """env: variables set for the server on top of this process's environment."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        out = subprocess.DEVNULL if quiet else None
        self.proc = subprocess.Popen(self.command(args, log_level), stdout=out, stderr=out,
                                     env={**os.environ, **(env or {})})
        self._wait(timeout)

    def command(self, args: list[str], log_level: str) -> list[str]:
        return [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", str(self.port),
                "--log-level", log_level, *args]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _wait(self, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.close()
        raise RuntimeError(f"the server did not become healthy in {timeout:.0f} s")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
