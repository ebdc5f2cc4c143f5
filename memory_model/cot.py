"""Reasoning traces written by the large model itself (the seed used OpenThoughts; no hub here).

`make_cot_data` draws problems from `memory_model.problems` (disjoint train/heldout
splits), asks the large model for step-by-step reasoning with the same chat prompt the
hybrid loop uses (`large.cot_messages`, greedy, up to `max_new` tokens), and writes one
JSON line per problem: question, answer, kind, steps, cot. Files are written atomically.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from tqdm import tqdm

from tasks.cot import equation_ops
from tasks.data import load

from . import large
from .problems import Problem, make_splits


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (make it with `python -m memory_model make-data`)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_rows(spec: str) -> list[dict]:
    """Rows of one or several make-data / make-loop-data files joined by ','."""
    return [r for path in spec.split(",") for r in read_jsonl(Path(path))]


def make_cot_data(lm, out: Path, n_train: int, n_heldout: int, max_new: int = 128, chunk: int = 64) -> dict:
    splits = make_splits({"train": n_train, "heldout": n_heldout})
    stats = {"model": lm.name, "max_new_tokens": max_new}
    for name, probs in splits.items():
        rows: list[dict] = []
        t0 = time.perf_counter()
        for s in tqdm(range(0, len(probs), chunk), desc=f"cot {name}", unit="chunk"):
            part: list[Problem] = probs[s:s + chunk]
            cots = large.generate_cot(lm, [p.question for p in part], max_new)
            rows += [{**p.to_dict(), "cot": c} for p, c in zip(part, cots)]
        write_jsonl(out / f"{name}.jsonl", rows)
        stats[name] = {"n": len(rows), "seconds": round(time.perf_counter() - t0, 1)}
    (out / "stats.json").write_text(json.dumps(stats, indent=2))
    return stats


def task_rows(task: str) -> list[dict]:
    """A real task's training problems as make-data rows (question, answer, kind, steps): the
    steps are its equation's operations, so `refined` targets carry correct intermediate
    results. Rows whose equation contradicts their answer are left out."""
    rows = []
    for p in load(task):
        try:
            ops, _ = equation_ops(p.equation)
        except ValueError:
            continue
        if ops and abs(float(ops[-1][3]) - p.answer) > 1e-6:
            continue
        # integral answers as ints: the reward scores the text " 51", not " 51.0"
        answer = int(p.answer) if p.answer == int(p.answer) else p.answer
        rows.append({"question": p.question, "answer": answer, "kind": task, "id": p.id, "steps": ops})
    return rows


def make_task_cot_data(lm, out: Path, task: str, n_val: int, max_new: int = 96, chunk: int = 64) -> dict:
    """make-data on a real task's training split (e.g. svamp-train): the large model's own
    chain-of-thought for each problem; the last n_val rows (of the task's seeded order) are
    `heldout.jsonl` for training diagnostics. The task's evaluation split is never read."""
    rows = task_rows(task)
    if not 0 < n_val < len(rows):
        raise ValueError(f"n_val must be between 1 and {len(rows) - 1}")
    t0 = time.perf_counter()
    for s in tqdm(range(0, len(rows), chunk), desc=f"cot {task}", unit="chunk"):
        part = rows[s:s + chunk]
        for r, c in zip(part, large.generate_cot(lm, [r["question"] for r in part], max_new)):
            r["cot"] = c
    write_jsonl(out / "train.jsonl", rows[:-n_val])
    write_jsonl(out / "heldout.jsonl", rows[-n_val:])
    stats = {"model": lm.name, "task": task, "max_new_tokens": max_new, "train": len(rows) - n_val,
             "heldout": n_val, "seconds": round(time.perf_counter() - t0, 1)}
    (out / "stats.json").write_text(json.dumps(stats, indent=2))
    return stats
