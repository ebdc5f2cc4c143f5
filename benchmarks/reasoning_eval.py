"""The hybrid loop on real held-out problems, over HTTP, with the controls that could explain
it away: direct answer; full chain-of-thought (CoT) at the hybrid's total reasoning budget
(N_loops x G_max groups); the hybrid loop with 1 and N loops; the memory model alone
(empty CoT); truncation (the question + the CoT's tail, no memory model).

    python benchmarks/reasoning_eval.py --artifact artifacts/smollm2-135m-svamp-int8 \
        --memory-model memory_model/checkpoints/default --data svamp-dev --data gsm8k:100 \
        --json results/reasoning_eval.json
    # the 4-bit model + hybrid vs the int8 model + full CoT, one server, one run:
    ... --compare-artifact 4bit=artifacts/smollm2-135m-svamp-gptq --only "full CoT" --only "hybrid, 1" --only 4bit

Every condition is one chat request per problem to the same server (started here on
loopback unless --url is given), greedy, streamed, one at a time. Per condition: accuracy
with a 95% Wilson interval, median latency, median time to the first answer token, mean and
max peak large-model context, mean large-model tokens generated. "TTFT answer" is the time
until "The answer is" appears in the streamed content (the hybrid loop streams it as it opens
the answer turn; full CoT writes it after its reasoning); the end of the reply if never.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clients.bench import write_json  # noqa: E402
from clients.launch import ServerProcess  # noqa: E402
from tasks.answers import is_correct  # noqa: E402
from tasks.cot import ANSWER_PREFIX, cot_prompt  # noqa: E402
from tasks.data import load  # noqa: E402


def conditions(a) -> dict[str, dict]:
    """name -> request extras. Hybrid settings shared by every hybrid condition."""
    hyb = {"cot_groups": a.groups, "cot_group_tokens": a.group_tokens, "condense_tokens": a.condense_tokens,
           "answer_prefix": ANSWER_PREFIX}
    budget = a.loops * a.groups * a.group_tokens + a.answer_tokens
    return {
        "direct": {"hybrid": {"loops": 0, "answer_prefix": ANSWER_PREFIX}, "max_tokens": a.answer_tokens},
        f"full CoT ({a.loops}x{a.groups} groups)": {"cot": True, "hybrid": {"enabled": False},
                                                     "max_tokens": budget},
        "hybrid, 1 loop": {"hybrid": {**hyb, "loops": 1}, "max_tokens": a.answer_tokens},
        f"hybrid, {a.loops} loops": {"hybrid": {**hyb, "loops": a.loops}, "max_tokens": a.answer_tokens},
        "memory model only (empty CoT)": {"hybrid": {**hyb, "loops": 1, "cot_groups": 0},
                                          "max_tokens": a.answer_tokens},
        "truncation (question + CoT tail)": {"hybrid": {**hyb, "loops": 1, "condense_with": "truncate"},
                                             "max_tokens": a.answer_tokens},
    }


def compared(conds: dict[str, dict], name: str, which: list[str]) -> dict[str, dict]:
    """The conditions named in `which` again, on the second served artifact `name` (the seed's
    compensation claim: a 4-bit large model with the hybrid loop against int8 with full CoT)."""
    return {f"{name}: {k}": {**v, "model": name} for k, v in conds.items() if any(k.startswith(w) for w in which)}


def ask(client: httpx.Client, model: str, question: str, extra: dict) -> dict:
    """One streamed request: answer text, latency, time to first answer token, usage."""
    content = cot_prompt(question) if extra.get("cot") else question
    body = {"model": extra.get("model", model), "messages": [{"role": "user", "content": content}], "temperature": 0,
            "max_tokens": extra["max_tokens"], "hybrid": extra["hybrid"], "stream": True,
            "stream_options": {"include_usage": True}}
    t0, first, text, usage = time.perf_counter(), None, "", None
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.read()[:300]!r}")
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            usage = chunk.get("usage") or usage
            for c in chunk.get("choices", []):
                if c["delta"].get("content"):
                    text += c["delta"]["content"]
                    if first is None and ANSWER_PREFIX.lower() in text.lower():
                        first = time.perf_counter()  # the answer starts (full CoT: after its reasoning)
    end = time.perf_counter()
    h = (usage or {}).get("hybrid")
    peak = h["peak_context_tokens"] if h else usage["prompt_tokens"] + usage["completion_tokens"]
    large = h["large"]["completion_tokens"] if h else usage["completion_tokens"]
    return {"text": text, "latency_s": end - t0, "ttft_answer_s": (first or end) - t0, "peak_context": peak,
            "large_tokens": large, "condensed_tokens": h["condensed_tokens"] if h else 0,
            "loops": h["loops"] if h else 0}


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return 0.0, 0.0
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    w = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, c - w), min(1.0, c + w)


def summarize(rows: list[dict]) -> dict:
    k, n = sum(r["correct"] for r in rows), len(rows)
    lo, hi = wilson(k, n)
    return {"n": n, "correct": k, "accuracy": k / n, "ci95": [lo, hi],
            "latency_median_s": statistics.median(r["latency_s"] for r in rows),
            "ttft_answer_median_s": statistics.median(r["ttft_answer_s"] for r in rows),
            "peak_context_mean": statistics.mean(r["peak_context"] for r in rows),
            "peak_context_max": max(r["peak_context"] for r in rows),
            "large_tokens_mean": statistics.mean(r["large_tokens"] for r in rows),
            "loops_mean": statistics.mean(r.get("loops", 0) for r in rows)}  # loops run (stop_at_answer ends some early)


def table(results: dict) -> str:
    out = []
    for data, conds in results.items():
        out += [f"\n{data}\n", "| condition | accuracy (95% CI) | median latency | median TTFT answer | "
                "peak context mean / max | large-model tokens |", "|---|---:|---:|---:|---:|---:|"]
        for name, s in conds.items():
            out.append(f"| {name} | {s['accuracy']:.1%} ({s['ci95'][0]:.1%}-{s['ci95'][1]:.1%}), {s['correct']}/{s['n']} "
                       f"| {s['latency_median_s']:.2f} s | {s['ttft_answer_median_s']:.2f} s | "
                       f"{s['peak_context_mean']:.0f} / {s['peak_context_max']} | {s['large_tokens_mean']:.1f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", help="a running server (default: start one on loopback)")
    p.add_argument("--artifact", default="artifacts/smollm2-135m-instruct-int8")
    p.add_argument("--memory-model", default="memory_model/checkpoints/default")
    p.add_argument("--model", help="model name on --url (default: the artifact's directory name)")
    p.add_argument("--data", action="append", help="svamp-dev, gsm8k or gsm8k:N (repeatable)")
    p.add_argument("--limit", type=int, default=0, help="first N problems of each set (0 = all)")
    p.add_argument("--only", action="append", help="run only conditions whose name starts with this")
    p.add_argument("--loops", type=int, default=4, help="N_loops of the multi-loop condition")
    p.add_argument("--groups", type=int, default=3, help="G_max: CoT groups (lines) per loop")
    p.add_argument("--group-tokens", type=int, default=32)
    p.add_argument("--condense-tokens", type=int, default=64)
    p.add_argument("--answer-tokens", type=int, default=16)
    p.add_argument("--lora", metavar="NAME=DIR",
                   help="serve this PEFT LoRA adapter over --artifact (--lora-modules) and run the conditions "
                        "on it (model NAME); --artifact keeps its directory name")
    p.add_argument("--compare-artifact", metavar="NAME=DIR",
                   help="a second artifact served beside --artifact (e.g. 4bit=artifacts/...-gptq)")
    p.add_argument("--compare", action="append",
                   help="conditions (name prefixes) also run on --compare-artifact (default: full CoT, hybrid, 1 loop)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--memory-model-quant", choices=["none", "int8"], default="none",
                   help="the server's --memory-model-quant")
    p.add_argument("--compile", action="store_true", help="serve with --compile")
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    sets = a.data or ["svamp-dev"]
    if a.lora and "=" not in a.lora:
        p.error("--lora takes NAME=DIR")
    model = a.lora.split("=")[0] if a.lora else a.model or Path(a.artifact).name
    served = Path(a.artifact).name if a.lora else model  # the name --artifact is served under
    conds = conditions(a)
    if a.compare_artifact:
        if "=" not in a.compare_artifact:
            p.error("--compare-artifact takes NAME=DIR")
        conds |= compared(conds, a.compare_artifact.split("=")[0], a.compare or ["full CoT", "hybrid, 1 loop"])
    conds = {k: v for k, v in conds.items() if not a.only or any(k.startswith(o) for o in a.only)}
    srv = None
    if a.url is None:
        second = ["--artifact", a.compare_artifact] if a.compare_artifact else []
        lora = ["--lora-modules", a.lora] if a.lora else []
        args = ["--artifact", f"{served}={a.artifact}", *second, *lora, "--memory-model", a.memory_model,
                "--max-model-len", "2048",
                "--max-tokens-default", "512", "--memory-model-quant", a.memory_model_quant] + (
                    ["--threads", str(a.threads)] if a.threads else []) + (["--compile"] if a.compile else [])
        # --compile compiles every graph before /health says ready (minutes with an adapter on 2 cores)
        srv = ServerProcess(args, timeout=1800 if a.compile else 300)
    results, per_problem = {}, {}

    def save() -> None:  # after every condition: an interrupted run keeps what it measured
        if a.json:
            write_json({"settings": {k: v for k, v in vars(a).items() if k != "json"}, "summary": results,
                        "problems": per_problem}, a.json)

    try:
        with httpx.Client(base_url=a.url or srv.url, timeout=600) as client:
            for data in sets:
                probs = load(data)[: a.limit or None]
                for extra in {c.get("model", model): c for c in conds.values()}.values():
                    ask(client, model, probs[0].question, extra)  # warm-up, each served model
                results[data], per_problem[data] = {}, {}
                for name, extra in conds.items():
                    rows = []
                    for i, pr in enumerate(probs):
                        r = ask(client, model, pr.question, extra)
                        rows.append({"id": pr.id, "answer": pr.answer, **r, "correct": is_correct(r["text"], pr.answer)})
                    results[data][name] = summarize(rows)
                    per_problem[data][name] = rows
                    s = results[data][name]
                    print(f"{data} | {name}: {s['accuracy']:.1%} ({s['correct']}/{s['n']}), median "
                          f"{s['latency_median_s']:.2f}s, peak ctx {s['peak_context_mean']:.0f}", flush=True)
                    save()
    finally:
        if srv is not None:
            srv.close()
    print(table(results))
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
