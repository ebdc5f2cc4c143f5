"""Does constrained decoding make a small model's JSON usable, and what does the mask cost?

    python benchmarks/structured_outputs.py --artifact artifacts/smollm2-135m-instruct-int8 \
        --out results/structured_outputs.json

50 prompts ask for a JSON object matching one of four schemas (flat, nested, enum, array; the
schema is in the prompt), sent one at a time, greedy, to one server (`python -m server`, its
own process) twice: unconstrained, then with `response_format: json_schema` (strict). For each
output: does it parse (the whole reply, or - lenient - its first {...} block), and does it
validate against the schema (jsonschema). Time per output token is measured from the stream
(first to last content chunk) in the same run; since constrained outputs are shorter (less
attention per token), the masking's own cost is also measured directly: each constrained output
is replayed through `engine.grammar` (mask, apply to logits, consume) and timed per token.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jsonschema

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from clients.bench import write_json  # noqa: E402
from clients.launch import ServerProcess  # noqa: E402

SCHEMAS = {
    "flat": {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                              "city": {"type": "string"}},
             "required": ["name", "age", "city"], "additionalProperties": False},
    "nested": {"type": "object", "properties": {
        "customer": {"type": "object", "properties": {"name": {"type": "string"}, "email": {"type": "string"}},
                     "required": ["name", "email"], "additionalProperties": False},
        "total": {"type": "number"}}, "required": ["customer", "total"], "additionalProperties": False},
    "enum": {"type": "object", "properties": {"sentiment": {"enum": ["positive", "negative", "neutral"]},
                                              "score": {"type": "integer", "minimum": 1, "maximum": 5}},
             "required": ["sentiment", "score"], "additionalProperties": False},
    "array": {"type": "object", "properties": {"title": {"type": "string"}, "ingredients": {
        "type": "array", "items": {"type": "string"}, "minItems": 2}},
        "required": ["title", "ingredients"], "additionalProperties": False},
}

SUBJECTS = {
    "flat": ["a nurse from Lyon", "a retired pilot in Osaka", "a student living in Lagos", "a baker from Quebec",
             "a teenage chess player in Kyiv", "a farmer near Cusco", "a software engineer in Austin",
             "a violinist from Vienna", "a fisherman in Bergen", "a librarian in Edinburgh", "a surgeon in Delhi",
             "a painter from Seville", "a taxi driver in Cairo"],
    "nested": ["an order of three books", "an order for a bicycle", "a pizza delivery order", "an order of garden tools",
               "a laptop purchase", "an order of 12 roses", "a concert ticket purchase", "a grocery order",
               "an order for running shoes", "a furniture order", "an order of printer ink", "a coffee bean order"],
    "enum": ["a review saying the hotel was wonderful", "a review complaining about a late train",
             "a review of an average sandwich", "a review praising a phone's battery",
             "a review of a broken umbrella", "a review of a museum visit that was fine",
             "a review of a rude waiter", "a review of a relaxing spa", "a review of a boring movie",
             "a review of a fast delivery", "a review of a noisy apartment", "a review of a decent haircut",
             "a review of a great concert"],
    "array": ["a pancake recipe", "a tomato soup recipe", "a guacamole recipe", "a fruit salad recipe",
              "a lemonade recipe", "a vegetable curry recipe", "a banana bread recipe", "an omelette recipe",
              "a hummus recipe", "a pasta carbonara recipe", "a pesto recipe", "a smoothie recipe"],
}


def prompts() -> list[tuple[str, str]]:
    """(schema name, user message), 50 in all."""
    out = []
    for name, subjects in SUBJECTS.items():
        for s in subjects:
            out.append((name, f"Return a JSON object describing {s}. It must match this JSON schema: "
                              f"{json.dumps(SCHEMAS[name])}. Reply with the JSON only."))
    return out


def lenient(text: str):
    """The first {...} block that parses, as a human would salvage it; None if none."""
    start = text.find("{")
    while start >= 0:
        try:
            return json.JSONDecoder().raw_decode(text[start:])[0]
        except json.JSONDecodeError:
            start = text.find("{", start + 1)
    return None


def judge(text: str, schema: dict) -> dict:
    try:
        doc, parses = json.loads(text.strip()), True
    except json.JSONDecodeError:
        doc, parses = lenient(text), False
    valid = doc is not None and jsonschema.Draft202012Validator(schema).is_valid(doc)
    return {"parses": parses, "parses_lenient": doc is not None, "valid": parses and valid,
            "valid_lenient": valid}


def one(client, model: str, name: str, msg: str, constrained: bool, max_tokens: int) -> dict:
    extra = {"response_format": {"type": "json_schema", "json_schema": {
        "name": name, "schema": SCHEMAS[name], "strict": True}}} if constrained else {}
    t_first = t_last = None
    text, n_tokens, finish = "", 0, None
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": msg}],
                                            max_tokens=max_tokens, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, **extra)
    for chunk in stream:
        if chunk.usage is not None:
            n_tokens = chunk.usage.completion_tokens
        for c in chunk.choices:
            if c.delta.content:
                now = time.perf_counter()
                t_first = t_first or now
                t_last = now
                text += c.delta.content
            finish = c.finish_reason or finish
    tpot = (t_last - t_first) / (n_tokens - 1) if t_first and n_tokens > 1 else None
    return {"schema": name, "text": text, "tokens": n_tokens, "finish": finish, "tpot_s": tpot,
            **judge(text, SCHEMAS[name])}


def summary(rows: list[dict]) -> dict:
    n = len(rows)
    tp = [r["tpot_s"] for r in rows if r["tpot_s"]]
    return {"n": n, **{k: sum(r[k] for r in rows) / n for k in ("parses", "parses_lenient", "valid", "valid_lenient")},
            "finished": sum(r["finish"] == "stop" for r in rows) / n,
            "tpot_ms_median": statistics.median(tp) * 1e3 if tp else None,
            "by_schema": {s: sum(r["valid"] for r in rows if r["schema"] == s) / max(1, sum(r["schema"] == s
                                                                                          for r in rows))
                          for s in SCHEMAS}}


def mask_overhead(artifact: str, rows: list[dict]) -> dict:
    """Per-token time of what constraining adds to a decode step (the row's mask, applying it
    to a vocabulary of logits, consuming the token), replaying the constrained outputs."""
    import torch
    from transformers import AutoTokenizer

    from engine.grammar import GrammarSpec, RowGrammars, compile_grammar, grammar_tokenizer
    from engine.sampling import apply_allowed

    tok = AutoTokenizer.from_pretrained(artifact)
    vocab = len(tok)
    gt = grammar_tokenizer(tok, vocab, {tok.eos_token_id})
    logits = torch.randn(1, vocab)
    times = []
    for r in rows:
        rg = RowGrammars(compile_grammar(gt, GrammarSpec("json", SCHEMAS[r["schema"]]), vocab), 1)
        for t in tok(r["text"], add_special_tokens=False)["input_ids"]:
            t0 = time.perf_counter()
            apply_allowed(logits, rg.allowed([0], "cpu"))
            ok = rg.advance([0], [t])
            times.append(time.perf_counter() - t0)
            if ok[0]:
                break
    return {"tokens": len(times), "us_mean": statistics.mean(times) * 1e6,
            "us_median": statistics.median(times) * 1e6}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--artifact", default="artifacts/smollm2-135m-instruct-int8")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=160)
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--out", type=Path, default=ROOT / "results" / "structured_outputs.json")
    p.add_argument("--overhead-only", action="store_true", help="only redo the replay timing of an earlier --out")
    a = p.parse_args(argv)
    import torch
    torch.set_num_threads(a.threads)
    if a.overhead_only:
        old = json.loads(a.out.read_text())
        old["mask_overhead"] = mask_overhead(a.artifact, old["constrained"]["rows"])
        print(f"mask overhead: {old['mask_overhead']}")
        write_json(old, a.out)
        return 0
    from openai import OpenAI

    items = prompts()[:a.limit]
    results = {}
    with_srv = ServerProcess(["--artifact", f"m={a.artifact}", "--threads", str(a.threads), "--memory-model", "none"])
    try:
        client = OpenAI(base_url=with_srv.url + "/v1", api_key="unused", max_retries=0, timeout=300)
        one(client, "m", "flat", items[0][1], True, 8)  # warm-up: the grammar tokenizer is built on first use
        for label, constrained in (("unconstrained", False), ("constrained", True)):
            rows = [one(client, "m", name, msg, constrained, a.max_tokens) for name, msg in items]
            results[label] = {"summary": summary(rows), "rows": rows}
            s = results[label]["summary"]
            print(f"{label:13s}: parses {s['parses']:.0%} (lenient {s['parses_lenient']:.0%}), validates "
                  f"{s['valid']:.0%} (lenient {s['valid_lenient']:.0%}), finished {s['finished']:.0%}, "
                  f"TPOT median {s['tpot_ms_median']:.1f} ms  by schema {s['by_schema']}", flush=True)
    finally:
        with_srv.close()
    u, c = results["unconstrained"]["summary"], results["constrained"]["summary"]
    results["tpot_ratio_constrained_over_unconstrained"] = c["tpot_ms_median"] / u["tpot_ms_median"]
    print(f"TPOT constrained / unconstrained: x{results['tpot_ratio_constrained_over_unconstrained']:.3f}")
    results["mask_overhead"] = mask_overhead(a.artifact, results["constrained"]["rows"])
    print(f"mask overhead: {results['mask_overhead']}")
    write_json({"artifact": a.artifact, "max_tokens": a.max_tokens, **results}, a.out)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
