"""How much a memory-model checkpoint explores at each sampling temperature, before REINFORCE:
K samples for each of N training prompts, scored with REINFORCE's own reward (default weights).

    python benchmarks/mm_temperature_probe.py --memory-model checkpoints/mm-70m-svamp-loops \
        --large artifacts/smollm2-135m-svamp-loops-int8 \
        --data data/mm-svamp/train.jsonl,data/mm-svamp/loops.jsonl --prompts 16 \
        --temperature 1.0 --temperature 1.5 --temperature 2.0 --temperature 3.0 \
        --json results/mm70_temperature_probe.json

Per temperature: distinct condensations among a prompt's K samples (1 = nothing for a
leave-one-out baseline to compare), the reward's spread within a prompt, mean reward, the
large model's accuracy on the samples and their length. Prompts come from after the first 32
rows (REINFORCE's fixed evaluation set), drawn with a fixed seed.
"""

from __future__ import annotations

import argparse
import random
import statistics as st
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clients.bench import write_json  # noqa: E402
from engine.runner import load_model  # noqa: E402
from memory_model.condense import MemoryModel  # noqa: E402
from memory_model.cot import read_rows  # noqa: E402
from memory_model.reinforce import ReinforceConfig, distinct_per_prompt, rewards  # noqa: E402


def probe(mm: MemoryModel, lm, batch: list[dict], temperature: float, k: int, max_new: int) -> dict:
    t0 = time.perf_counter()
    texts, answers = [], []
    for i, r in enumerate(batch):
        for c in mm.sample(r["question"], r["cot"], n=k, max_new=max_new, temperature=temperature, seed=i):
            texts.append(c.text)
            answers.append(r["answer"])
    rs = rewards(lm, texts, answers, ReinforceConfig())
    groups = [range(i, i + k) for i in range(0, len(texts), k)]
    return {"temperature": temperature,
            "distinct": distinct_per_prompt(texts, k),
            "reward_spread": st.mean(max(rs[j]["reward"] for j in g) - min(rs[j]["reward"] for j in g)
                                     for g in groups),
            "reward": st.mean(x["reward"] for x in rs), "accuracy": st.mean(x["correct"] for x in rs),
            "large_tokens": st.mean(x["large_tokens"] for x in rs), "seconds": round(time.perf_counter() - t0, 1),
            "first_samples": texts[:k]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--memory-model", required=True)
    p.add_argument("--large", required=True)
    p.add_argument("--data", required=True, help="make-data / make-loop-data jsonl, several joined by ','")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--max-new", type=int, default=100)
    p.add_argument("--temperature", type=float, action="append", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    if any(t <= 0 for t in a.temperature):
        print("error: --temperature must be > 0", file=sys.stderr)
        return 2
    torch.set_num_threads(a.threads)
    rows = read_rows(a.data)[ReinforceConfig().eval_size:]
    rng = random.Random(1)
    batch = [rows[rng.randrange(len(rows))] for _ in range(a.prompts)]
    mm, lm = MemoryModel(a.memory_model), load_model(a.large)
    out = []
    for t in a.temperature:
        res = probe(mm, lm, batch, t, a.samples, a.max_new)
        print(f"T={t}: distinct {res['distinct']:.2f}/{a.samples}, reward spread {res['reward_spread']:.2f}, "
              f"reward {res['reward']:.2f}, accuracy {res['accuracy']:.3f}, {res['large_tokens']:.1f} tokens",
              flush=True)
        out.append(res)
    if a.json:
        write_json({"memory_model": a.memory_model, "large": a.large, "data": a.data,
                    "prompts": a.prompts, "samples": a.samples, "results": out}, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
