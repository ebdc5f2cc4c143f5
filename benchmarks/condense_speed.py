"""How long the hybrid loop's condensation stage takes with the memory model's prompt-lookup
draft checks eager and compiled (`--compile`: engine/compiled.py `CompiledDecode.check`),
interleaved in one process on the same inputs: SVAMP dev questions, each with the
chain-of-thought in the tuned large model's style written from its equation (tasks/cot.py),
condensed exactly as the server's `Condenser` does (greedy, 8-token drafts, one engine per mode).

    python benchmarks/condense_speed.py [--memory-model DIR] [--quant int8] [--n 60] [--rounds 3]
        [--json results/condense_speed.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from clients.bench import write_json  # noqa: E402
from engine.batching import BatchConfig, drive  # noqa: E402
from engine.compiled import CompiledDecode  # noqa: E402
from memory_model.condense import MemoryModel  # noqa: E402
from server.hybrid import Condenser, HybridStats  # noqa: E402
from tasks.cot import cot_target  # noqa: E402
from tasks.data import load  # noqa: E402


def condense(mm: MemoryModel, cfg: BatchConfig, question: str, cot: str, max_tokens: int) -> tuple[float, str]:
    stats = HybridStats()
    t0 = time.perf_counter()
    job = Condenser(mm, stats).steps(question, cot, max_tokens, threading.Event())
    text = []

    def run():
        text.append((yield from job))

    for _ in drive(run(), cfg):
        pass
    return time.perf_counter() - t0, text[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--memory-model", default="memory_model/checkpoints/svamp-70m")
    p.add_argument("--quant", choices=MemoryModel.QUANT, default="int8")
    p.add_argument("--n", type=int, default=60, help="first N SVAMP dev problems")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--condense-tokens", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    if min(a.n, a.rounds, a.condense_tokens) < 1:
        p.error("--n, --rounds and --condense-tokens must be at least 1")
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        mm = MemoryModel(a.memory_model, quant=a.quant)
    except (OSError, ValueError) as e:
        p.error(str(e))
    decode = CompiledDecode(mm.model)  # as the server compiles it: the checks and the one-token step
    warm = decode.warm_up_checks(1, 1 + Condenser.LOOKUP_DRAFT) + decode.warm_up(1)
    probs = load("svamp-dev")[:a.n]
    modes = {"eager": BatchConfig(max_num_seqs=1), "compiled": BatchConfig(max_num_seqs=1, compile=True)}
    secs = {m: [] for m in modes}
    texts = {m: {} for m in modes}
    for _ in range(a.rounds):
        for pr in probs:  # interleaved: each input eager then compiled
            cot = cot_target(pr.equation, pr.answer)
            for m, cfg in modes.items():
                s, texts[m][pr.id] = condense(mm, cfg, pr.question, cot, a.condense_tokens)
                secs[m].append(s)
    out = {m: {"median_s": statistics.median(v), "mean_s": statistics.mean(v)} for m, v in secs.items()}
    same = sum(texts["eager"][k] == texts["compiled"][k] for k in texts["eager"])
    result = {"settings": vars(a) | {"json": str(a.json)}, "compile_s": warm, "modes": out,
              "same_text": same, "problems": len(probs)}
    for m, v in out.items():
        print(f"{m}: median {v['median_s'] * 1000:.1f} ms, mean {v['mean_s'] * 1000:.1f} ms")
    print(f"compiled/eager median {out['compiled']['median_s'] / out['eager']['median_s']:.2f}; "
          f"same condensation {same}/{len(probs)}; draft checks compiled in {warm:.1f} s")
    if a.json:
        write_json(result, a.json)


if __name__ == "__main__":
    main()
