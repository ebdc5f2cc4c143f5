"""What a per-request LoRA adapter costs the engine, against the same adapter merged into the
weights, measured in one run (interleaved rounds, medians).

    python benchmarks/lora_overhead.py --base artifacts/smollm2-135m-instruct-int8 \
        --adapter artifacts/smollm2-135m-svamp-adapter-int8 --merged artifacts/smollm2-135m-svamp-int8 \
        --json results/lora_overhead.json

Every configuration decodes the same greedy tokens through `engine.batching.BatchEngine` (the
server's path): a prompt of --prompt-tokens, then --tokens new ones, ignoring EOS.
  - base: the base artifact loaded alone (no adapters);
  - base, adapter loaded: the same weights with the adapter registered, requests without it;
  - adapter: requests through the adapter (base weights + B(A x) on every projection);
  - merged: the artifact whose weights are W + BA (what serving the tuning without adapters costs);
  - batch 4: four rows together, all base, or two base + two adapter rows (mixed).
Per configuration: median prefill seconds and decode ms per step over --rounds rounds.
--compile: decode steps on the compiled graphs (`server --compile`; each model warmed up first,
the adapter's own graphs included: one row through the adapter, several rows on the masked graph
that any mix of base and adapter rows runs on).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clients.bench import write_json  # noqa: E402
from engine.batching import BatchConfig, BatchEngine, Sequence  # noqa: E402
from engine.generate import SamplingParams  # noqa: E402
from engine.runner import load_model  # noqa: E402

ADAPTER = "adapter"
SLOTS = 4


def run(model, prompt: list[int], adapters: list[str | None], tokens: int, compile: bool = False
        ) -> tuple[float, float]:
    """(prefill seconds, decode ms per step) of len(adapters) rows decoded together."""
    engine = BatchEngine(model, BatchConfig(max_num_seqs=SLOTS, prefill_chunk=4096, compile=compile))
    params = SamplingParams(max_tokens=tokens + 1, temperature=0.0, ignore_eos=True)
    for a in adapters:
        engine.add(Sequence(list(prompt), params, set(), adapter=a))
    t0 = time.perf_counter()
    while any(s.steps == 0 for s in engine.running + list(engine.waiting)):
        engine.step()
    t1 = time.perf_counter()
    steps = 0
    while engine.has_work:
        engine.step()
        steps += 1
    t2 = time.perf_counter()
    return t1 - t0, (t2 - t1) / max(steps, 1) * 1000


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="the base artifact")
    p.add_argument("--adapter", required=True, help="a PEFT LoRA directory over --base")
    p.add_argument("--merged", required=True, help="the artifact with the same adapter merged")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--compile", action="store_true", help="decode on compiled graphs (server --compile)")
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    base = load_model(a.base)
    with_adapter = load_model(a.base, adapters={ADAPTER: Path(a.adapter)})
    merged = load_model(a.merged)
    if a.compile:
        from engine.compiled import CompiledDecode

        for lm in (base, with_adapter, merged):
            print(f"compiled {lm.path.name} in {CompiledDecode(lm.model).warm_up(SLOTS):.0f} s", flush=True)
    prompt = [int(t) % 1000 + 100 for t in torch.randint(0, 10**6, (a.prompt_tokens,),
                                                         generator=torch.Generator().manual_seed(0))]
    configs = {
        "base": (base.model, [None]),
        "base, adapter loaded": (with_adapter.model, [None]),
        "adapter": (with_adapter.model, [ADAPTER]),
        "merged": (merged.model, [None]),
        "batch 4, base": (with_adapter.model, [None] * 4),
        "batch 4, 2 base + 2 adapter": (with_adapter.model, [None, None, ADAPTER, ADAPTER]),
        "batch 4, merged": (merged.model, [None] * 4),
    }
    for model, rows in configs.values():  # warm-up: allocator, caches, first-call paths
        run(model, prompt, rows, 4, a.compile)
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in configs}
    for _ in range(a.rounds):  # interleaved: drift in the machine's speed hits every configuration
        for name, (model, rows) in configs.items():
            times[name].append(run(model, prompt, rows, a.tokens, a.compile))
    out = {name: {"prefill_s": statistics.median(t[0] for t in ts), "decode_ms_per_step": statistics.median(t[1] for t in ts)}
           for name, ts in times.items()}
    for name, s in out.items():
        print(f"{name:32s} prefill {s['prefill_s'] * 1000:7.1f} ms   decode {s['decode_ms_per_step']:6.2f} ms/step")
    ratio = out["adapter"]["decode_ms_per_step"] / out["merged"]["decode_ms_per_step"]
    print(f"adapter / merged decode: {ratio:.2f}x")
    if a.json:
        write_json({"settings": {k: str(v) for k, v in vars(a).items() if k != "json"}, "results": out,
                    "adapter_over_merged_decode": ratio, "torch_threads": torch.get_num_threads()}, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
