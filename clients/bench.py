"""Latency benchmark for OpenAI-compatible servers (streaming), tagged with the power source.

Run:
    python -m clients.bench --num-prompts 32 --concurrency 1,2,4 --out results/bench.json --plot results/bench.png
    python -m clients.bench --request-rate 2 --burstiness 1 --input-len 256 --output-len 64   # Poisson arrivals
    python -m clients.bench --profile battery --label battery --out results/battery.json        # server profile
    python -m clients.bench --compare results/plugged.json results/battery.json --plot results/cmp.png
Metrics (TTFT of any token and of the first answer content, TPOT, ITL, E2EL, throughputs) are
defined in clients/bench_stats.py as vLLM's `bench serve` defines them. Prompts are windows
of English text from Python's bundled pydoc topics, new ones for each concurrency/rate level
(a repeated prompt would hit a server's prefix cache), sized to --input-len tokens by measuring
the server's token counts on the warm-up requests (the measured lengths are reported);
outputs are forced to --output-len tokens with `ignore_eos` (a vLLM extension this server
supports; --no-ignore-eos for others).
`--profile` asks this project's server (POST /profile) to switch power profile first; every
result records the client's power source, the server's profile and its power source.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import math
import os
import platform
import random
import sys
import time
from pathlib import Path

import httpx

from .bench_stats import RequestResult, StreamTimer, arrivals, summarize
from .chat import error_message
from engine.power import detect_power


class BenchError(RuntimeError):
    pass


def corpus_words() -> list[str]:
    """English prose that ships with every CPython: the pydoc topics (~100k words)."""
    from pydoc_data.topics import topics

    return " ".join(topics[k] for k in sorted(topics)).split()


def make_prompts(n: int, n_words: int, seed: int, words: list[str]) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        start = rng.randrange(0, len(words) - n_words)
        out.append(" ".join(words[start:start + n_words]))
    return out


def request_body(a, prompt: str) -> dict:
    body = {"model": a.model, "max_tokens": a.output_len, "temperature": a.temperature, "stream": True,
            "stream_options": {"include_usage": True}}
    if a.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if a.ignore_eos:
        body["ignore_eos"] = True
    if a.extra_body:
        body.update(a.extra_body)
    return body


async def send(client: httpx.AsyncClient, path: str, body: dict, t0: float) -> RequestResult:
    sent = time.perf_counter()
    timer = StreamTimer(sent)
    try:
        async with client.stream("POST", path, json=body) as r:
            if r.status_code >= 400:
                await r.aread()
                timer.r.error = error_message(r)
            else:
                async for line in r.aiter_lines():
                    if not line.startswith("data:"):
                        continue  # blank separators, ': ping' keep-alives
                    payload = line[5:].strip()
                    if payload == "[DONE]":
                        break
                    timer.chunk(json.loads(payload), time.perf_counter())
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        timer.r.error = f"{type(e).__name__}: {e}"
    res = timer.finish(time.perf_counter())
    res.sent_at = sent - t0
    return res


async def run_one(client, a, prompts: list[str], concurrency: int, rate: float) -> dict:
    """One benchmark run: requests sent at their arrival times, at most `concurrency` in flight."""
    path = "/v1/chat/completions" if a.endpoint == "chat" else "/v1/completions"
    gate = asyncio.Semaphore(concurrency)
    offsets = arrivals(len(prompts), rate, a.burstiness, a.seed)
    t0 = time.perf_counter()

    async def one(prompt: str, at: float) -> RequestResult:
        await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
        async with gate:
            return await send(client, path, request_body(a, prompt), t0)

    results = await asyncio.gather(*(one(p, at) for p, at in zip(prompts, offsets)))
    duration = time.perf_counter() - t0
    return {"concurrency": concurrency, "request_rate": rate if math.isfinite(rate) else "inf",  # strict JSON
            "burstiness": a.burstiness,
            "summary": summarize(results, duration, a.percentiles),
            "requests": [r.to_dict() for r in results]}


async def server_info(client: httpx.AsyncClient, a) -> dict:
    """Models (and this project's power profile, where the server has one); switches profile if asked."""
    r = await client.get("/v1/models")
    if r.status_code >= 400:
        raise BenchError(f"/v1/models: {error_message(r)}")
    models = r.json().get("data", [])
    if not models:
        raise BenchError("the server lists no models")
    if a.model is None:
        a.model = models[0]["id"]
    if a.profile:
        r = await client.post("/profile", json={"mode": a.profile})
        if r.status_code == 404:
            raise BenchError("--profile needs this project's server (it has no /profile endpoint)")
        if r.status_code >= 400:
            raise BenchError(f"POST /profile: {error_message(r)}")
    r = await client.get("/profile")
    profile = r.json() if r.status_code == 200 else None
    card = next((m for m in models if m["id"] == a.model), None)
    if card is None:
        raise BenchError(f"model {a.model!r} is not served; available: {', '.join(m['id'] for m in models)}")
    return {"model_card": card, "profile": profile}


async def calibrate(client, a, words: list[str]) -> tuple[float, float]:
    """Warm-up requests (not counted): the first with a one-word prompt measures the fixed
    tokens (chat template, BOS), the others, `input_len // 8` words each (small enough for any
    tokenizer to fit), the server's tokens per word. Returns (tokens per word, fixed tokens)."""
    path = "/v1/chat/completions" if a.endpoint == "chat" else "/v1/completions"
    fixed, text_tokens, text_words = None, 0, 0
    for i in range(max(a.warmup, 2)):
        n = 1 if i == 0 else max(2, a.input_len // 4)
        (p,) = make_prompts(1, n, a.seed + 999 + i, words)
        res = await send(client, path, {**request_body(a, p), "max_tokens": min(a.output_len, 8)}, 0.0)
        if not res.ok:
            raise BenchError(f"warm-up request failed: {res.error}")
        if not res.prompt_tokens:
            return 1.3, 0.0  # the server reports no usage: a typical BPE ratio, no template
        if i == 0:
            fixed = max(0, res.prompt_tokens - 1)
        else:
            text_tokens, text_words = text_tokens + res.prompt_tokens - fixed, text_words + n
    return max(text_tokens / text_words, 0.1), float(fixed)


async def bench(a) -> dict:
    headers = {"Authorization": f"Bearer {a.api_key}"} if a.api_key else {}
    limits = httpx.Limits(max_connections=max(a.concurrency) + 4, max_keepalive_connections=max(a.concurrency) + 4)
    async with httpx.AsyncClient(base_url=a.url, headers=headers, limits=limits,
                                 timeout=httpx.Timeout(a.timeout, connect=5)) as client:
        try:
            info = await server_info(client, a)
        except httpx.HTTPError as e:
            raise BenchError(f"cannot reach {a.url}: {e}") from e
        words = corpus_words()
        per_word, overhead = await calibrate(client, a, words)
        n_words = max(1, round((a.input_len - overhead) / per_word))
        runs = []
        for concurrency in a.concurrency:
            for rate in a.request_rate:
                # new prompts for every level: a prompt sent before is a prefix-cache hit on servers
                # that keep one (this one, llama.cpp), which would measure the cache, not prefill
                seed = a.seed + len(runs)
                run = await run_one(client, a, make_prompts(a.num_prompts, n_words, seed, words), concurrency, rate)
                run["prompt_seed"] = seed
                s = run["summary"]
                print(f"concurrency {concurrency}, rate {rate}: {s['completed']}/{a.num_prompts} ok, "
                      f"TTFT median {_ms(s['ttft_s'].get('median'))}, TPOT median {_ms(s['tpot_s'].get('median'))}, "
                      f"output {s['output_throughput']:.1f} tok/s", flush=True)
                runs.append(run)
    return {"meta": {"label": a.label, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                     "url": a.url, "model": a.model, "endpoint": a.endpoint, "input_len": a.input_len,
                     "output_len": a.output_len, "num_prompts": a.num_prompts, "ignore_eos": a.ignore_eos,
                     "prompt_words": n_words, "prompt_tokens_per_word": per_word,
                     "prompt_fixed_tokens": overhead, "seed": a.seed,
                     "client_power": detect_power().to_dict(), "profile_requested": a.profile,
                     "server_profile": info["profile"], "model_card": info["model_card"],
                     "client_host": {"platform": platform.platform(), "cpus": os.cpu_count()}},
            "runs": runs}


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.1f} ms"


def tag(res: dict) -> str:
    m = res["meta"]
    prof = (m.get("server_profile") or {}).get("active", "n/a")
    return f"{m.get('label') or m['model']} (server profile {prof}, client power {m['client_power']['source']})"


COMPARED = [("request_throughput", "req/s", 1), ("output_throughput", "output tok/s", 1),
            ("total_token_throughput", "total tok/s", 1), ("ttft_s.median", "TTFT median ms", 1000),
            ("ttft_s.p99", "TTFT p99 ms", 1000), ("ttft_content_s.median", "TTFT(content) median ms", 1000),
            ("tpot_s.median", "TPOT median ms", 1000), ("tpot_s.p99", "TPOT p99 ms", 1000),
            ("itl_s.median", "ITL median ms", 1000), ("itl_s.p99", "ITL p99 ms", 1000),
            ("e2el_s.median", "E2EL median ms", 1000), ("e2el_s.p99", "E2EL p99 ms", 1000)]


def _get(summary: dict, key: str):
    for part in key.split("."):
        summary = summary.get(part) if isinstance(summary, dict) else None
    return summary


def compare_table(results: list[dict]) -> str:
    """Markdown: per (concurrency, rate) present in the first file, each metric per file and
    each later file's ratio to the first."""
    lines = [f"{chr(65 + i)} = {tag(r)}" for i, r in enumerate(results)]
    base = results[0]
    for run in base["runs"]:
        key = (run["concurrency"], run["request_rate"])
        others = [next((x for x in r["runs"] if (x["concurrency"], x["request_rate"]) == key), None)
                  for r in results[1:]]
        cols = ["A"] + [f"{chr(66 + i)} | {chr(66 + i)}/A" for i in range(len(others))]
        lines += ["", f"concurrency {key[0]}, request rate {key[1]}", "",
                  "| metric | " + " | ".join(cols) + " |", "|---" * (1 + 1 + 2 * len(others)) + "|"]
        for k, label, scale in COMPARED:
            a = _get(run["summary"], k)
            cells = ["-" if a is None else f"{a * scale:.2f}"]
            for o in others:
                b = _get(o["summary"], k) if o else None
                cells += ["-" if b is None else f"{b * scale:.2f}",
                          "-" if a in (None, 0) or b is None else f"{b / a:.2f}"]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json(obj: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)  # never a half-written result


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x]


def _ints(s: str) -> list[int]:
    vals = [int(x) for x in s.split(",") if x]
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError("concurrency values must be >= 1")
    return vals


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m clients.bench", description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--model", help="model id (default: the server's first)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    p.add_argument("--endpoint", choices=["chat", "completions"], default="chat")
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--input-len", type=int, default=128, help="prompt tokens (approximately; measured ones reported)")
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--concurrency", type=_ints, default=[1], help="max requests in flight; comma list = sweep")
    p.add_argument("--request-rate", type=_floats, default=[math.inf],
                   help="requests/s (Poisson by default; inf = all at once); comma list = sweep")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the arrival gaps (1 = Poisson)")
    p.add_argument("--warmup", type=int, default=4,
                   help="uncounted requests first (at least 2; they also size the prompts)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                   help="do not send ignore_eos (servers that reject it; outputs may then be shorter)")
    p.add_argument("--extra-body", type=json.loads, help="JSON merged into every request body")
    p.add_argument("--percentiles", type=_floats, default=[50.0, 90.0, 99.0])
    p.add_argument("--profile", choices=["plugged", "battery", "auto"], help="switch the server's power profile first")
    p.add_argument("--label", default="", help="name for this result in comparisons")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0, help="per-request seconds")
    p.add_argument("--out", type=Path, help="JSON results")
    p.add_argument("--plot", type=Path, help="PNG: latency distributions, throughput vs concurrency")
    p.add_argument("--compare", type=Path, nargs="+", metavar="RESULT.json",
                   help="compare saved results (first = baseline) instead of running")
    a = p.parse_args(argv)
    if a.compare is None and (a.num_prompts < 1 or a.input_len < 1 or a.output_len < 1):
        p.error("--num-prompts, --input-len and --output-len must be >= 1")
    if a.extra_body is not None and not isinstance(a.extra_body, dict):
        p.error("--extra-body must be a JSON object")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    try:
        if a.compare:
            results = []
            for f in a.compare:
                try:
                    results.append(json.loads(f.read_text()))
                except (OSError, ValueError) as e:
                    raise BenchError(f"cannot read {f}: {e}") from e
                if "runs" not in results[-1]:
                    raise BenchError(f"{f} is not a clients.bench result")
            print(compare_table(results))
        else:
            results = [asyncio.run(bench(a))]
            if a.out:
                write_json(results[0], a.out)
                print(f"wrote {a.out}")
            if all(r["summary"]["completed"] == 0 for r in results[0]["runs"]):
                errs = results[0]["runs"][0]["summary"]["errors"]
                raise BenchError(f"every request failed: {next(iter(errs), '?')}")
        if a.plot:
            from .bench_plot import plot

            plot(results, a.plot)
            print(f"wrote {a.plot}")
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
