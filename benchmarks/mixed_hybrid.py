"""A plain chat request while a hybrid-loop request runs: how long it waits, on this checkout
and (optionally) on another one, in one run.

    python benchmarks/mixed_hybrid.py --artifact artifacts/smollm2-135m-instruct-int8 \
        --compare-dir /tmp/old-checkout --out results/mixed_hybrid.json

Per trial: a streamed hybrid request starts (2 loops x 3 CoT lines of up to 32 tokens, 64
answer tokens); when its first reasoning chunk arrives a streamed plain request starts (32
tokens). Recorded: the plain request's TTFT and latency, the hybrid request's latency, and
the plain request's TTFT with nothing else running. --compare-dir starts the server from
another checkout (`python -m server` with that directory first on sys.path), e.g. a `git
worktree` of the commit before a scheduler change.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from clients.bench import write_json  # noqa: E402
from clients.launch import ServerProcess  # noqa: E402

QUESTION = "Sam has 12 apples. He gives 5 to Ann and buys 8 more. How many apples does he have?"
HYBRID = {"loops": 2, "cot_groups": 3, "cot_group_tokens": 32, "condense_tokens": 48}


def stream(url: str, body: dict, first: threading.Event | None = None) -> dict:
    """A streamed chat request: TTFT (first content or reasoning chunk) and latency."""
    t0, ttft = time.perf_counter(), None
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=300) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            choices = json.loads(line[6:])["choices"]
            delta = choices[0]["delta"] if choices else {}
            if ttft is None and (delta.get("content") or delta.get("reasoning_content")):
                ttft = time.perf_counter() - t0
                if first is not None:
                    first.set()
    return {"ttft_s": ttft, "latency_s": time.perf_counter() - t0}


def trials(url: str, model: str, n: int) -> dict:
    plain = {"model": model, "messages": [{"role": "user", "content": "Name three colours."}],
             "max_tokens": 32, "ignore_eos": True, "temperature": 0, "stream": True}
    hybrid = {"model": model, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 64,
              "temperature": 0, "stream": True, "hybrid": HYBRID}
    stream(url, plain), stream(url, hybrid)  # warm-up
    out = {"plain_alone": [stream(url, plain) for _ in range(n)], "plain_during_hybrid": [], "hybrid": []}
    for _ in range(n):
        first, res = threading.Event(), {}
        t = threading.Thread(target=lambda: res.update(stream(url, hybrid, first)))
        t.start()
        first.wait(120)
        out["plain_during_hybrid"].append(stream(url, plain))
        t.join()
        out["hybrid"].append(res)
    return out


def medians(rows: dict) -> dict:
    return {k: {m: statistics.median(r[m] for r in v) for m in ("ttft_s", "latency_s")} for k, v in rows.items()}


def run(label: str, a, cwd: Path) -> dict:
    here = os.getcwd()
    os.chdir(cwd)  # `python -m server` imports the server package of this directory first
    try:
        with ServerProcess(["--artifact", f"m={a.artifact}", "--threads", str(a.threads)]) as srv:
            rows = trials(srv.url, "m", a.trials)
    finally:
        os.chdir(here)
    m = medians(rows)
    print(f"{label}: plain TTFT alone {m['plain_alone']['ttft_s'] * 1000:.0f} ms, during a hybrid request "
          f"{m['plain_during_hybrid']['ttft_s'] * 1000:.0f} ms (latency {m['plain_during_hybrid']['latency_s']:.2f} s); "
          f"hybrid latency {m['hybrid']['latency_s']:.2f} s", flush=True)
    return {"checkout": str(cwd), "medians": m, "trials": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--artifact", default="artifacts/smollm2-135m-instruct-int8")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--compare-dir", type=Path, help="another checkout to measure in the same run")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "mixed_hybrid.json")
    a = p.parse_args(argv)
    a.artifact = str(Path(a.artifact).resolve())  # the servers start in other directories
    res = {"settings": {k: str(v) for k, v in vars(a).items()}, "hybrid": HYBRID, "this": run("this checkout", a, ROOT)}
    if a.compare_dir:
        res["compare"] = run(f"{a.compare_dir}", a, a.compare_dir.resolve())
    write_json(res, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
