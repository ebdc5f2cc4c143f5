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
