"""Bounded load test: N concurrent streaming clients for a fixed time against one server.

Run:
    python -m clients.load --url http://127.0.0.1:8000 --clients 16 --seconds 60
    python -m clients.load --spawn artifacts/smollm2-135m-instruct-int8 --clients 16 --seconds 60 --max-queue 4
--spawn starts `python -m server` on a free loopback port as a child process (so its memory
can be sampled from /proc) and stops it afterwards. Each client loops: one streaming chat
request, read to `data: [DONE]`, repeat; a 429 is counted and retried after a short pause.
Every request ends as exactly one of: completed (finish_reason and [DONE] seen), rejected
(429 with Retry-After), or an error (any other status, a broken or truncated stream) -
"lost" counts requests that are none of these. Prints and optionally writes JSON with the
counts, latencies, server RSS over time and the server's state afterwards (health, queue).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from .bench_stats import describe
from .launch import ServerProcess


@dataclass
class Tally:
    sent: int = 0
    completed: int = 0
    rejected: int = 0
    errors: int = 0
    retry_after_missing: int = 0
    error_samples: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    tokens: int = 0

    def error(self, msg: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(msg[:200])


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


async def one_stream(client: httpx.AsyncClient, body: dict, t: Tally) -> None:
    t.sent += 1
    t0 = time.perf_counter()
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code == 429:
                t.rejected += 1
                t.retry_after_missing += "retry-after" not in r.headers
                await r.aread()
                return
            if r.status_code != 200:
                t.error(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
                return
            finished = done = False
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    t.error(f"stream error: {chunk['error'].get('message')}")
                    return
                for c in chunk.get("choices", []):
                    finished |= c.get("finish_reason") is not None
                if chunk.get("usage"):
                    t.tokens += chunk["usage"]["completion_tokens"]
            if finished and done:
                t.completed += 1
                t.latencies.append(time.perf_counter() - t0)
            else:
                t.error(f"truncated stream (finish_reason seen: {finished}, [DONE] seen: {done})")
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        t.error(f"{type(e).__name__}: {e}")


async def run_load(url: str, model: str | None, clients: int, seconds: float, max_tokens: int,
                   server_pid: int | None = None, api_key: str | None = None) -> dict:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=httpx.Timeout(120)) as c:
        if model is None:
            model = (await c.get("/v1/models")).json()["data"][0]["id"]
        body = {"model": model, "messages": [{"role": "user", "content": "Count from one to twenty."}],
                "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        await one_stream(c, body, Tally())  # warm-up, uncounted
        tally, rss = Tally(), []
        rss0 = rss_mb(server_pid) if server_pid else None
        stop_at = time.perf_counter() + seconds

        async def client_loop():
            while time.perf_counter() < stop_at:
                before = tally.rejected
                await one_stream(c, body, tally)
                if tally.rejected > before:
                    await asyncio.sleep(0.05)  # keep the pressure on, without spinning

        async def sampler():
            while time.perf_counter() < stop_at:
                if server_pid:
                    rss.append((round(seconds - (stop_at - time.perf_counter()), 2), rss_mb(server_pid)))
                await asyncio.sleep(0.5)

        t0 = time.perf_counter()
        await asyncio.gather(sampler(), *(client_loop() for _ in range(clients)))
        wall = time.perf_counter() - t0
        health = (await c.get("/health")).status_code
        queue = {}
        for line in (await c.get("/metrics")).text.splitlines():
            if line.startswith(("hybrid_requests_waiting ", "hybrid_requests_running ")):
                k, v = line.split()
                queue[k] = float(v)
    d = asdict(tally)
    lat = d.pop("latencies")
    values = [m for _, m in rss if m is not None]
    half = values[len(values) // 2:] or values
    return {"url": url, "model": model, "clients": clients, "seconds": seconds, "wall_s": wall, **d,
            "lost": tally.sent - tally.completed - tally.rejected - tally.errors,
            "requests_per_s": tally.completed / wall, "output_tokens_per_s": tally.tokens / wall,
            "latency_s": describe(lat, [50, 99]), "health_after": health, "queue_after": queue,
            "rss_mb": {"before": rss0, "first": values[0] if values else None, "last": values[-1] if values else None,
                       "max": max(values) if values else None,
                       "second_half_growth": (half[-1] - half[0]) if len(half) > 1 else None,
                       "samples": rss}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m clients.load", description=__doc__.splitlines()[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--url")
    g.add_argument("--spawn", metavar="ARTIFACT", help="start a server on this artifact (loopback) and test it")
    p.add_argument("--model")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-queue", type=int, default=4, help="with --spawn: the server's queue limit")
    p.add_argument("--max-num-seqs", type=int, help="with --spawn: the server's batch rows (default: its own)")
    p.add_argument("--threads", type=int, help="with --spawn: the server's torch threads")
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    if a.clients < 1 or a.seconds <= 0 or a.max_tokens < 1:
        p.error("--clients, --seconds and --max-tokens must be positive")
    srv = None
    try:
        if a.spawn:
            extra = ["--max-queue", str(a.max_queue)] + (["--threads", str(a.threads)] if a.threads else []) \
                + (["--max-num-seqs", str(a.max_num_seqs)] if a.max_num_seqs else [])
            srv = ServerProcess(["--artifact", a.spawn, "--memory-model", "none", *extra], timeout=180)
        url = srv.url if srv else a.url
        res = asyncio.run(run_load(url, a.model, a.clients, a.seconds, a.max_tokens,
                                   srv.pid if srv else None, a.api_key))
    except (RuntimeError, httpx.HTTPError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if srv is not None:
            srv.close()
    if srv is not None:
        res["server_exit_code"] = srv.proc.returncode
    lat = res["latency_s"]
    print(f"{res['clients']} clients x {res['seconds']:.0f}s: sent {res['sent']}, completed {res['completed']}, "
          f"429 {res['rejected']}, errors {res['errors']}, lost {res['lost']}; "
          f"{res['requests_per_s']:.2f} req/s, {res['output_tokens_per_s']:.1f} tok/s, "
          f"latency p50 {lat.get('median', 0):.2f}s p99 {lat.get('p99', 0):.2f}s; "
          f"server RSS {res['rss_mb']['first']} -> {res['rss_mb']['last']} MB (max {res['rss_mb']['max']}); "
          f"health after {res['health_after']}")
    if a.out:
        from .bench import write_json

        write_json(res, a.out)
    return 0 if res["errors"] == 0 and res["lost"] == 0 and res["health_after"] == 200 else 1


if __name__ == "__main__":
    sys.exit(main())
