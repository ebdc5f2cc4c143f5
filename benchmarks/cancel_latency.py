"""How fast a client disconnect frees the generation worker, in tokens and milliseconds.

Run:
    python benchmarks/cancel_latency.py --artifact artifacts/smollm2-135m-instruct-int8 --trials 5
Starts the server in-process on loopback, streams a long greedy answer (ignore_eos), hangs up
after --after content chunks, then polls /metrics until no request is running. Reports the
tokens the server generated beyond what the client read, the milliseconds from hang-up to a
free worker, and that time divided by the measured time per output token (TPOT): below 1
means the worker was free within a token.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name):
            return float(line.split()[-1])
    return 0.0


def main() -> None:
    from clients.launch import ServerProcess

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--artifact", required=True)
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--after", type=int, default=8, help="content chunks read before hanging up")
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    name = Path(a.artifact).name
    srv = ServerProcess(["--artifact", a.artifact, "--max-model-len", "2048", "--memory-model", "none"])
    rows = []
    try:
        for _ in range(a.trials):
            before = metric(srv.url, f'hybrid_generation_tokens_total{{model="{name}"}}')
            body = {"model": name, "messages": [{"role": "user", "content": "Tell me a long story."}],
                    "max_tokens": 1000, "stream": True, "ignore_eos": True, "temperature": 0}
            n, stamps = 0, []
            with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {") and json.loads(line[6:])["choices"] and \
                            json.loads(line[6:])["choices"][0]["delta"].get("content"):
                        n += 1
                        stamps.append(time.perf_counter())
                        if n == a.after:
                            break
                hung_up = time.perf_counter()
            while metric(srv.url, "hybrid_requests_running") > 0:
                time.sleep(0.001)
            free_ms = (time.perf_counter() - hung_up) * 1000
            tpot_ms = (stamps[-1] - stamps[0]) / (len(stamps) - 1) * 1000
            extra = metric(srv.url, f'hybrid_generation_tokens_total{{model="{name}"}}') - before - n
            rows.append({"read": n, "extra_tokens": extra, "free_ms": free_ms, "tpot_ms": tpot_ms,
                         "free_in_tokens": free_ms / tpot_ms})
            print(f"read {n}, generated {extra:.0f} more, worker free {free_ms:.1f} ms after hang-up "
                  f"= {free_ms / tpot_ms:.2f} x TPOT ({tpot_ms:.1f} ms)")
    finally:
        srv.close()
    med = {k: statistics.median(r[k] for r in rows) for k in ("extra_tokens", "free_ms", "tpot_ms", "free_in_tokens")}
    print(f"median: {med['extra_tokens']:.0f} extra tokens, free after {med['free_ms']:.1f} ms "
          f"= {med['free_in_tokens']:.2f} x TPOT")
    if a.out:
        a.out.write_text(json.dumps({"artifact": a.artifact, "trials": rows, "median": med}, indent=1) + "\n")


if __name__ == "__main__":
    main()
