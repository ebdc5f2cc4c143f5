"""Direct generation vs the hybrid loop, through the server's HTTP API, side by side.

Run:
    python benchmarks/hybrid_vs_direct.py                       # starts its own loopback server
    python benchmarks/hybrid_vs_direct.py --n 40 --loops 4 --cot-groups 3 --json results/hybrid.json
    python benchmarks/hybrid_vs_direct.py --url http://127.0.0.1:8000 --model smollm2-135m-instruct-int8

Prompts: held-out arithmetic word problems (`memory_model.problems`, split "heldout"),
sent as the user message. Each problem is asked directly and with the hybrid loop (same
model, temperature 0, streamed), alternating so neither mode gets a warmer machine.
Reported per mode: accuracy (the number after "answer is", else the last number of the
answer, equals the reference), time to the first answer token (reasoning excluded),
total latency, answer tokens, and peak context (prompt + generated for direct; the
longest large-model stage for hybrid, from usage.hybrid).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402

from memory_model.problems import NUMBER_RE, extract_answer  # noqa: E402


def final_number(text: str) -> int | None:
    """The number after "answer is", else the last number of a free-form answer."""
    m = re.search(rf"answer is[^\d-]{{0,20}}({NUMBER_RE.pattern})", text, re.IGNORECASE)
    nums = [m.group(1)] if m else NUMBER_RE.findall(text)
    return extract_answer(nums[0 if m else -1]) if nums else None


def ask(url: str, model: str, question: str, hybrid: dict | None, max_tokens: int) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": question}], "temperature": 0,
            "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True}}
    if hybrid is not None:
        body["hybrid"] = hybrid
    t0 = time.perf_counter()
    first_any = first_content = None
    content, usage = "", None
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.read().decode()}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            usage = chunk.get("usage") or usage
            for c in chunk["choices"]:
                d = c["delta"]
                now = time.perf_counter() - t0
                if (d.get("content") or d.get("reasoning_content")) and first_any is None:
                    first_any = now
                if d.get("content"):
                    if first_content is None:
                        first_content = now
                    content += d["content"]
    total = time.perf_counter() - t0
    h = (usage or {}).get("hybrid")
    answer_tokens = usage["completion_tokens"] - (usage.get("completion_tokens_details") or {}).get(
        "reasoning_tokens", 0) if usage else 0
    peak = h["peak_context_tokens"] if h else usage["prompt_tokens"] + usage["completion_tokens"]
    return {"content": content, "ttft_any": first_any, "ttft_answer": first_content if first_content else total,
            "latency": total, "answer_tokens": answer_tokens, "peak_context": peak, "usage": usage}


def summarize(rows: list[dict], answers: list[int]) -> dict:
    ok = [final_number(r["content"]) == a for r, a in zip(rows, answers)]
    med = lambda k: statistics.median(r[k] for r in rows)  # noqa: E731
    out = {"n": len(rows), "accuracy": sum(ok) / len(rows), "ttft_answer_s": med("ttft_answer"),
           "latency_s": med("latency"), "mean_latency_s": statistics.mean(r["latency"] for r in rows),
           "answer_tokens": statistics.mean(r["answer_tokens"] for r in rows),
           "peak_context": statistics.mean(r["peak_context"] for r in rows),
           "max_peak_context": max(r["peak_context"] for r in rows)}
    hs = [r["usage"]["hybrid"] for r in rows if r["usage"].get("hybrid")]
    if hs:
        out["raw_reasoning_tokens"] = statistics.mean(h["raw_reasoning_tokens"] for h in hs)
        out["condensed_tokens"] = statistics.mean(h["condensed_tokens"] for h in hs)
        out["final_prompt_tokens"] = statistics.mean(h["final_prompt_tokens"] for h in hs)
        out["large_cached_tokens"] = statistics.mean(h["large"]["cached_tokens"] for h in hs)
        for stage in ("cot", "condense", "answer"):
            out[f"{stage}_s"] = statistics.mean(h["seconds"][stage] for h in hs)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", help="an already running server (default: start one on loopback)")
    p.add_argument("--artifact", default="artifacts/smollm2-135m-instruct-int8")
    p.add_argument("--memory-model", default="memory_model/checkpoints/default")
    p.add_argument("--model", help="model name on --url (default: the artifact's directory name)")
    p.add_argument("--n", type=int, default=40, help="problems")
    p.add_argument("--loops", type=int, default=4)
    p.add_argument("--cot-groups", type=int, default=3)
    p.add_argument("--condense-tokens", type=int, default=100)
    p.add_argument("--max-tokens", type=int, default=64, help="answer budget (both modes)")
    p.add_argument("--answer-prefix", default="", help="hybrid.answer_prefix (e.g. 'The answer is')")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", help="write per-problem results and the summary here")
    a = p.parse_args(argv)

    from memory_model.problems import make_splits

    probs = make_splits({"train": 768, "heldout": a.n})["heldout"][:a.n]
    srv = None
    url, model = a.url, a.model or Path(a.artifact).name
    if url is None:
        from clients.launch import ServerProcess

        threads = ["--threads", str(a.threads)] if a.threads else []
        srv = ServerProcess(["--artifact", f"{model}={a.artifact}", "--memory-model", a.memory_model or "none",
                             "--max-model-len", "2048", *threads])
        url = srv.url
    hybrid = {"loops": a.loops, "cot_groups": a.cot_groups, "condense_tokens": a.condense_tokens}
    if a.answer_prefix:
        hybrid["answer_prefix"] = a.answer_prefix
    try:
        ask(url, model, probs[0].question, hybrid, 4)  # warm-up (first-call allocations)
        direct, hyb = [], []
        for i, pr in enumerate(probs):
            direct.append(ask(url, model, pr.question, None, a.max_tokens))
            hyb.append(ask(url, model, pr.question, hybrid, a.max_tokens))
            print(f"[{i + 1}/{len(probs)}] answer {pr.answer}: direct {final_number(direct[-1]['content'])} "
                  f"({direct[-1]['latency']:.1f}s), hybrid {final_number(hyb[-1]['content'])} "
                  f"({hyb[-1]['latency']:.1f}s)", flush=True)
    finally:
        if srv is not None:
            srv.close()
    answers = [pr.answer for pr in probs]
    summary = {"direct": summarize(direct, answers), "hybrid": summarize(hyb, answers),
               "settings": {**hybrid, "max_tokens": a.max_tokens, "model": model, "n": len(probs)}}
    d, h = summary["direct"], summary["hybrid"]
    print("| mode | accuracy | TTFT answer (median s) | latency (median s) | answer tokens | peak context |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, s in (("direct", d), (f"hybrid ({a.loops} loop{'s' if a.loops != 1 else ''})", h)):
        print(f"| {name} | {s['accuracy']:.1%} | {s['ttft_answer_s']:.2f} | {s['latency_s']:.2f} | "
              f"{s['answer_tokens']:.1f} | {s['peak_context']:.0f} (max {s['max_peak_context']}) |")
    print(f"hybrid/direct latency ratio (median): {h['latency_s'] / d['latency_s']:.2f}x; "
          f"raw reasoning {h['raw_reasoning_tokens']:.0f} tokens -> final prompt {h['final_prompt_tokens']:.0f} "
          f"tokens; stage seconds cot {h['cot_s']:.2f} / condense {h['condense_s']:.2f} / answer {h['answer_s']:.2f}")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({"summary": summary, "direct": direct, "hybrid": hyb}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
