"""llguidance vs xgrammar on this machine, for choosing the grammar engine behind
`response_format` / tools: per-token mask cost on SmolLM2's 49k vocabulary, grammar compile
time, and JSON-schema coverage (does each keyword compile, accept a valid instance and refuse
an invalid one).

    pip install llguidance xgrammar   # xgrammar only for this comparison (`--no-deps` + apache-tvm-ffi
                                      # avoids the triton wheel it asks for)
    python benchmarks/grammar_engines.py --tokenizer artifacts/smollm2-135m-instruct-int8 \
        --out results/grammar_engines.json

The token sequences are the tokenizer's own encoding of schema-valid JSON documents (what a
model following the grammar emits); every step computes the mask, then consumes the token.
Both engines run single-threaded here (one request's mask; 2 cores).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from clients.bench import write_json  # noqa: E402

# (name, schema, a valid document) for the mask-cost runs: the README's schema families
SPEED = [
    ("flat", {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                                 "admin": {"type": "boolean"}},
              "required": ["name", "age", "admin"], "additionalProperties": False},
     {"name": "Ada Lovelace", "age": 36, "admin": True}),
    ("nested", {"type": "object", "properties": {
        "user": {"type": "object", "properties": {"id": {"type": "integer"}, "email": {"type": "string"}},
                 "required": ["id", "email"], "additionalProperties": False},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                    "required": ["city", "zip"], "additionalProperties": False}},
        "required": ["user", "address"], "additionalProperties": False},
     {"user": {"id": 42, "email": "ada@example.org"}, "address": {"city": "London", "zip": "NW1 6XE"}}),
    ("enum", {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                                 "size": {"enum": ["S", "M", "L", "XL"]}},
              "required": ["color", "size"], "additionalProperties": False},
     {"color": "green", "size": "XL"}),
    ("array", {"type": "object", "properties": {"items": {"type": "array", "items": {
        "type": "object", "properties": {"sku": {"type": "string"}, "qty": {"type": "integer"}},
        "required": ["sku", "qty"], "additionalProperties": False}, "minItems": 1}},
        "required": ["items"], "additionalProperties": False},
     {"items": [{"sku": "A-1", "qty": 2}, {"sku": "B-7", "qty": 1}, {"sku": "C-3", "qty": 12}]}),
]

# (keyword, schema, valid, invalid) for coverage
COVERAGE = [
    ("pattern", {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}, "ABC-12", "abc-12"),
    ("minLength/maxLength", {"type": "string", "minLength": 2, "maxLength": 4}, "abc", "abcdef"),
    ("format: date", {"type": "string", "format": "date"}, "2024-02-29", "yesterday"),
    ("format: email", {"type": "string", "format": "email"}, "a@b.org", "not an email"),
    ("format: uuid", {"type": "string", "format": "uuid"}, "123e4567-e89b-12d3-a456-426614174000", "123"),
    ("minimum/maximum", {"type": "integer", "minimum": 1, "maximum": 5}, 3, 9),
    ("exclusiveMinimum", {"type": "number", "exclusiveMinimum": 0}, 0.5, -1),
    ("multipleOf", {"type": "integer", "multipleOf": 5}, 15, 7),
    ("minItems/maxItems", {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 3}, [1, 2], [1]),
    ("uniqueItems", {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, [1, 2], [1, 1]),
    ("prefixItems", {"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}], "items": False},
     ["a", 1], [1, "a"]),
    ("anyOf", {"anyOf": [{"type": "integer"}, {"type": "string"}]}, 3, True),
    ("oneOf", {"oneOf": [{"type": "integer"}, {"type": "boolean"}]}, True, "x"),
    ("allOf", {"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                         {"type": "object", "properties": {"b": {"type": "integer"}}, "required": ["b"]}]},
     {"a": 1, "b": 2}, {"a": 1}),
    ("$ref/$defs", {"$defs": {"p": {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"],
                                    "additionalProperties": False}},
                    "type": "array", "items": {"$ref": "#/$defs/p"}}, [{"x": 1}], [{"y": 1}]),
    ("recursive $ref", {"$defs": {"n": {"type": "object", "properties": {"kids": {"type": "array", "items":
                                        {"$ref": "#/$defs/n"}}}, "required": ["kids"], "additionalProperties": False}},
                        "$ref": "#/$defs/n"}, {"kids": [{"kids": []}]}, {"kids": [{}]}),
    ("additionalProperties: schema", {"type": "object", "additionalProperties": {"type": "integer"}},
     {"a": 1}, {"a": "x"}),
    ("patternProperties", {"type": "object", "patternProperties": {"^n_": {"type": "integer"}},
                           "additionalProperties": False}, {"n_a": 1}, {"m": 1}),
    ("const", {"const": "fixed"}, "fixed", "other"),
    ("enum (mixed types)", {"enum": [1, "two", None]}, "two", 3),
    ("if/then/else", {"if": {"type": "integer"}, "then": {"minimum": 0}, "else": {"type": "string"}}, 1, -1),
    ("not", {"not": {"type": "string"}}, 1, "s"),
]


def doc_text(doc) -> str:
    return json.dumps(doc)


# ---- the two engines, behind one tiny interface -----------------------------------------

class LLG:
    name = "llguidance"

    def __init__(self, hf_tok, vocab: int):
        import llguidance
        import llguidance.hf
        import llguidance.torch
        self.llg, self.t = llguidance, llguidance.torch
        t0 = time.perf_counter()
        self.tok = llguidance.hf.from_tokenizer(hf_tok, n_vocab=vocab)
        self.setup_s = time.perf_counter() - t0
        self.mask = self.t.allocate_token_bitmask(1, vocab)

    def matcher(self, schema: dict):
        m = self.llg.LLMatcher(self.tok, self.llg.LLMatcher.grammar_from_json_schema(schema), log_level=0)
        if m.is_error():
            raise ValueError(m.get_error())
        return m

    def fill(self, m) -> None:
        self.t.fill_next_token_bitmask(m, self.mask)

    @staticmethod
    def accept(m, tok: int) -> bool:
        return m.consume_token(tok) and not m.is_error()

    def accepting(self, m) -> bool:
        return m.is_accepting()


class XGR:
    name = "xgrammar"

    def __init__(self, hf_tok, vocab: int):
        import xgrammar
        self.x = xgrammar
        t0 = time.perf_counter()
        info = xgrammar.TokenizerInfo.from_huggingface(hf_tok, vocab_size=vocab)
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        self.setup_s = time.perf_counter() - t0
        self.mask = xgrammar.allocate_token_bitmask(1, vocab)
        self.eos = hf_tok.eos_token_id

    def matcher(self, schema: dict):
        return self.x.GrammarMatcher(self.compiler.compile_json_schema(json.dumps(schema), strict_mode=True))

    def fill(self, m) -> None:
        m.fill_next_token_bitmask(self.mask)

    @staticmethod
    def accept(m, tok: int) -> bool:
        return m.accept_token(tok)

    def accepting(self, m) -> bool:  # xgrammar: the stop token is accepted only after a whole document
        return m.accept_token(self.eos)


def run_doc(eng, hf_tok, schema: dict, doc) -> dict:
    t0 = time.perf_counter()
    m = eng.matcher(schema)
    compile_s = time.perf_counter() - t0
    ids = hf_tok(doc_text(doc), add_special_tokens=False)["input_ids"]
    times, ok = [], True
    for tok in ids:
        t1 = time.perf_counter()
        eng.fill(m)
        times.append(time.perf_counter() - t1)
        if not eng.accept(m, tok):
            ok = False
            break
    return {"compile_ms": compile_s * 1e3, "tokens": len(ids), "accepted": ok,
            "mask_us_mean": statistics.mean(times) * 1e6, "mask_us_p90": sorted(times)[int(0.9 * len(times))] * 1e6}


def accepts(eng, hf_tok, schema: dict, doc) -> bool:
    m = eng.matcher(schema)
    for tok in hf_tok(doc_text(doc), add_special_tokens=False)["input_ids"]:
        if not eng.accept(m, tok):
            return False
    return eng.accepting(m)


def coverage(eng, hf_tok) -> dict:
    out = {}
    for kw, schema, good, bad in COVERAGE:
        try:
            eng.matcher(schema)
        except Exception as e:  # noqa: BLE001 - the engine's refusal is the result
            out[kw] = f"refused: {str(e).splitlines()[0][:120]}"
            continue
        try:
            g, b = accepts(eng, hf_tok, schema, good), accepts(eng, hf_tok, schema, bad)
        except Exception as e:  # noqa: BLE001
            out[kw] = f"error: {str(e).splitlines()[0][:120]}"
            continue
        out[kw] = "enforced" if g and not b else ("ignored (invalid accepted)" if g else "valid doc rejected")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", default="artifacts/smollm2-135m-instruct-int8")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=ROOT / "results" / "grammar_engines.json")
    a = p.parse_args(argv)
    import torch
    from transformers import AutoTokenizer
    torch.set_num_threads(1)
    hf_tok = AutoTokenizer.from_pretrained(a.tokenizer)
    vocab = len(hf_tok)
    result = {"tokenizer": a.tokenizer, "vocab": vocab, "engines": {}}
    for cls in (LLG, XGR):
        eng = cls(hf_tok, vocab)
        rows = {}
        for name, schema, doc in SPEED:
            runs = [run_doc(eng, hf_tok, schema, doc) for _ in range(a.repeats)]
            best = min(runs, key=lambda r: r["mask_us_mean"])
            best["compile_ms"] = statistics.median(r["compile_ms"] for r in runs)
            rows[name] = best
        cov = coverage(eng, hf_tok)
        result["engines"][eng.name] = {"tokenizer_setup_s": eng.setup_s, "schemas": rows, "coverage": cov}
        print(f"{eng.name}: tokenizer setup {eng.setup_s:.2f} s")
        for name, r in rows.items():
            print(f"  {name:7s} compile {r['compile_ms']:7.2f} ms  mask {r['mask_us_mean']:7.1f} us/token "
                  f"(p90 {r['mask_us_p90']:.1f})  {r['tokens']} tokens accepted={r['accepted']}")
        print(f"  coverage: {sum(v == 'enforced' for v in cov.values())}/{len(cov)} keywords enforced")
    print(f"\n{'keyword':30s} " + " ".join(f"{n:28s}" for n in result["engines"]))
    for kw, *_ in COVERAGE:
        print(f"{kw:30s} " + " ".join(f"{e['coverage'][kw][:28]:28s}" for e in result["engines"].values()))
    write_json(result, a.out)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
