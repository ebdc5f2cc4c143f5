"""A server in a background thread of this process, on a free loopback port: for tests,
benchmarks and scripts that want a real HTTP endpoint without a subprocess."""

from __future__ import annotations

import socket
import threading
import time

import httpx

from server.config import ServerConfig


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn in a daemon thread; `wait()` blocks until /health answers, `close()` stops it."""

    def __init__(self, cfg: ServerConfig):
        import uvicorn

        from server.app import create_app

        cfg.host, cfg.port = "127.0.0.1", free_port()
        self.app = create_app(cfg)
        self.url = f"http://127.0.0.1:{cfg.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=cfg.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()

    def wait(self, status: int = 200, timeout: float = 60.0) -> "LiveServer":
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == status:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"server did not reach /health {status}")

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def client(self, timeout: float = 60.0, api_key: str = "unused"):
        """The official `openai` client pointed at this server (no retries: tests see every error)."""
        from openai import OpenAI

        return OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=timeout)
