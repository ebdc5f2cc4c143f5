"""Does the memory model's condensed prompt help the large model answer?

On held-out problems with the large model's own chain-of-thought (make-data's
heldout.jsonl), each condition gives the large model one context and asks for the answer
with the serving prompt (`large.answer_prompt_ids`), greedy, one problem at a time:

    question        the question alone (no reasoning)
    full-cot        question + the full chain-of-thought
    <policy name>   the memory model's greedy condensation (one per --policy)
    <policy>-empty-cot  the same memory model given the question and an EMPTY chain-of-thought:
                    what it earns by itself (e.g. computing the answer alone), the control
                    any credit to condensing must beat
    rule            the supervised warm-start target (question + last two equations)
    truncate-head   question + the first tokens of the chain-of-thought, and
    truncate-tail   question + its last tokens, both cut to the length of the first
                    policy's condensation of that problem (the trivial baseline)

Reported per condition: accuracy (first number of the answer == reference), mean
log-probability of the reference answer, mean context tokens (large-model tokenizer), and
mean seconds per problem (condensation included).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from engine.runner import LoadedModel

from . import large
from .condense import MemoryModel
from .data import reference_condensation
from .problems import is_correct


def _truncate(lm: LoadedModel, question: str, cot: str, n_tokens: int, keep: str) -> str:
    q = len(lm.tokenizer(question, add_special_tokens=False)["input_ids"])
    budget = max(n_tokens - q, 0)
    ids = lm.tokenizer(cot, add_special_tokens=False)["input_ids"]
    part = ids[:budget] if keep == "head" else ids[len(ids) - budget:] if budget else []
    return f"{question}\n{lm.tokenizer.decode(part)}".strip()


def evaluate(lm: LoadedModel, rows: list[dict], policies: dict[str, MemoryModel], max_new: int = 100,
             progress: Callable[[str], None] | None = None) -> dict[str, dict]:
    conditions: dict[str, Callable[[dict], str]] = {
        "question": lambda r: r["question"],
        "full-cot": lambda r: f"{r['question']}\n{r['cot']}",
    }
    for name, mm in policies.items():
        conditions[name] = (lambda m: lambda r: m.condense(r["question"], r["cot"], max_new=max_new).text)(mm)
        conditions[f"{name}-empty-cot"] = (lambda m: lambda r: m.condense(r["question"], "", max_new=max_new).text)(mm)
    conditions["rule"] = lambda r: reference_condensation(r["question"], r["cot"])
    results: dict[str, dict] = {}
    first_policy = next(iter(policies), None)
    policy_lengths: list[int] = []
    for name, make_context in conditions.items():
        results[name], lengths = _run(lm, rows, make_context)
        if name == first_policy:
            policy_lengths = lengths
        if progress:
            progress(f"{name}: {results[name]}")
    if first_policy is not None:
        for keep in ("head", "tail"):
            ctxs = {id(r): _truncate(lm, r["question"], r["cot"], n, keep) for r, n in zip(rows, policy_lengths)}
            name = f"truncate-{keep}"
            results[name], _ = _run(lm, rows, lambda r: ctxs[id(r)])
            if progress:
                progress(f"{name}: {results[name]}")
    return results


def _run(lm: LoadedModel, rows: list[dict], make_context: Callable[[dict], str]) -> tuple[dict, list[int]]:
    """Summary of one condition, and each row's context length in large-model tokens."""
    correct, seconds, contexts, lengths = 0, 0.0, [], []
    for r in rows:
        t0 = time.perf_counter()
        ctx = make_context(r)
        out = large.generate_answers(lm, [ctx])[0]
        seconds += time.perf_counter() - t0
        correct += is_correct(out, r["answer"])
        lengths.append(len(lm.tokenizer(ctx, add_special_tokens=False)["input_ids"]))
        contexts.append(ctx)
    logps = [lp for lp, _ in large.score_answers(lm, contexts, [r["answer"] for r in rows])]
    n = len(rows)
    return {"accuracy": round(correct / n, 4), "answer_logp": round(sum(logps) / n, 4),
            "context_tokens": round(sum(lengths) / n, 1), "seconds": round(seconds / n, 3), "n": n}, lengths


def markdown_table(results: dict[str, dict]) -> str:
    lines = ["| condition | accuracy | answer log-prob | context tokens | s / problem |",
             "|---|---:|---:|---:|---:|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['accuracy']:.1%} | {r['answer_logp']:.3f} | {r['context_tokens']:.1f} | "
                     f"{r['seconds']:.3f} |")
    return "\n".join(lines)
