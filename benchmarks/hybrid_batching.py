"""Concurrent hybrid-loop requests: throughput and latency at several concurrency levels, on this
checkout and (optionally) another one, in one run.

    python benchmarks/hybrid_batching.py --artifact artifacts/smollm2-135m-svamp-int8 \
        --memory-model memory_model/checkpoints/svamp-70m --compare-dir /tmp/old-checkout \
        --out results/hybrid_batching.json

The first --limit SVAMP dev problems (held-out real data), each one hybrid request with one
loop (the `make reasoning-eval-70m` settings: 1 CoT group of up to 24 tokens, 100-token
condensation, "The answer is" opening a 12-token answer), greedy, streamed, sent by
--concurrency clients at once, each level on a freshly started server (warmed up on two other
problems), so no level reads another's prefix cache. Per level: wall time for all problems, problems per second,
median latency and time to the first answer token, accuracy; and whether every answer is the
one concurrency 1 gave (batched forwards must not change greedy outputs beyond float noise).
--compare-dir starts the server from another checkout (`python -m server` with that directory
first on sys.path), e.g. a `git worktree` of the commit before the hybrid stages joined the batch.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.reasoning_eval import ask  # noqa: E402
from clients.bench import write_json  # noqa: E402
from clients.launch import ServerProcess  # noqa: E402
from tasks.answers import is_correct  # noqa: E402
from tasks.cot import ANSWER_PREFIX  # noqa: E402
from tasks.data import load  # noqa: E402

HYBRID = {"loops": 1, "cot_groups": 1, "cot_group_tokens": 24, "condense_tokens": 100, "answer_prefix": ANSWER_PREFIX}
ANSWER_TOKENS = 12


def level(url: str, probs: list, concurrency: int) -> dict:
    """Every problem once, `concurrency` requests in flight."""
    extra = {"hybrid": HYBRID, "max_tokens": ANSWER_TOKENS}

    def one(pr) -> dict:
        with httpx.Client(base_url=url, timeout=600) as client:
            r = ask(client, "m", pr.question, extra)
        return {"id": pr.id, **r, "correct": is_correct(r["text"], pr.answer)}

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        rows = list(pool.map(one, probs))
    wall = time.perf_counter() - t0
    return {"concurrency": concurrency, "wall_s": wall, "problems_per_s": len(rows) / wall,
            "latency_median_s": statistics.median(r["latency_s"] for r in rows),
            "ttft_answer_median_s": statistics.median(r["ttft_answer_s"] for r in rows),
            "accuracy": sum(r["correct"] for r in rows) / len(rows), "rows": rows}


def run(label: str, a, cwd: Path) -> dict:
    here = os.getcwd()
    os.chdir(cwd)  # `python -m server` imports the server package of this directory first
    dev = load("svamp-dev")
    probs, spare = dev[: a.limit], dev[a.limit: a.limit + 2]
    args = ["--artifact", f"m={a.artifact}", "--memory-model", a.memory_model, "--threads", str(a.threads),
            "--max-num-seqs", str(max(a.concurrency))] + (["--compile"] if a.compile else [])
    levels = []
    try:
        for c in a.concurrency:  # a fresh server per level: no level reads another's prefix cache
            with ServerProcess(args, timeout=900) as srv:
                level(srv.url, spare, 2)  # warm-up on problems outside the measured ones
                levels.append(level(srv.url, probs, c))
    finally:
        os.chdir(here)
    base = [r["text"] for r in levels[0]["rows"]]
    for lv in levels:
        lv["same_answers_as_first_level"] = sum(r["text"] == b for r, b in zip(lv["rows"], base))
        print(f"{label} | concurrency {lv['concurrency']}: {lv['wall_s']:.1f} s for {len(probs)} problems "
              f"({lv['problems_per_s']:.2f}/s), median latency {lv['latency_median_s']:.2f} s, "
              f"TTFT answer {lv['ttft_answer_median_s']:.2f} s, accuracy {lv['accuracy']:.1%}, "
              f"{lv['same_answers_as_first_level']}/{len(probs)} answers as at concurrency {a.concurrency[0]}",
              flush=True)
    return {"checkout": str(cwd), "levels": levels}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--artifact", default="artifacts/smollm2-135m-svamp-int8")
    p.add_argument("--memory-model", default="memory_model/checkpoints/svamp-70m")
    p.add_argument("--limit", type=int, default=32, help="first N SVAMP dev problems")
    p.add_argument("--concurrency", type=int, action="append", help="levels (repeatable; default 1 and 4)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="serve with --compile")
    p.add_argument("--compare-dir", type=Path, help="another checkout to measure in the same run")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "hybrid_batching.json")
    a = p.parse_args(argv)
    a.concurrency = a.concurrency or [1, 4]
    a.artifact, a.memory_model = str(Path(a.artifact).resolve()), str(Path(a.memory_model).resolve())
    res = {"settings": {k: str(v) for k, v in vars(a).items()}, "hybrid": HYBRID, "this": run("this checkout", a, ROOT)}
    if a.compare_dir:
        res["compare"] = run(str(a.compare_dir), a, a.compare_dir.resolve())
    write_json(res, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
