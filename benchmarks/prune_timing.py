"""Time stochastic-consensus pruning per layer (calibration once, then each MLP matrix).

Run:
    python benchmarks/prune_timing.py --source smollm2-135m-instruct --layers 5+6
    python benchmarks/prune_timing.py --source gemma3-270m --layers 5 --n-masks 1000
Prints seconds and the consensus sparsity per matrix and per layer.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", default="smollm2-135m-instruct")
    p.add_argument("--layers", default="5")
    p.add_argument("--modules", default="mlp")
    p.add_argument("--n-masks", type=int, default=500)
    p.add_argument("--top-k", type=int, default=20)
    p.add_argument("--chunk-size", type=int, default=15)
    a = p.parse_args()
    from transformers import AutoTokenizer

    from compress.build import load_hf_dir
    from compress.calibration import CalibConfig, calibration_ids, collect_grams
    from compress.prune import consensus_mask, select_weights
    from compress.sources import ensure_hf_dir

    hf = ensure_hf_dir(a.source, progress=False)
    config, state = load_hf_dir(hf)
    names = select_weights(state, a.modules, a.layers)
    t0 = time.perf_counter()
    grams = collect_grams(config, state, calibration_ids(AutoTokenizer.from_pretrained(hf), CalibConfig()), names,
                          progress=False)
    calib = time.perf_counter() - t0
    print(f"\n{a.source}: calibration (16 x 256 tokens, Gram matrices of {len(names)} inputs) {calib:.1f} s; "
          f"{a.n_masks} masks/chunk, top-{a.top_k}, chunks of {a.chunk_size}, {torch.get_num_threads()} threads")
    print("| matrix | shape | chunks | seconds | pruned |")
    print("|---|---|---|---|---|")
    per_layer: dict[str, float] = {}
    gen = torch.Generator().manual_seed(0)
    for n in names:
        w = state[n]
        t0 = time.perf_counter()
        mask = consensus_mask(w, grams[n], a.chunk_size, a.n_masks, 0.5, a.top_k, gen)
        dt = time.perf_counter() - t0
        layer = n.split(".")[2]
        per_layer[layer] = per_layer.get(layer, 0.0) + dt
        chunks = w.shape[0] * -(-w.shape[1] // a.chunk_size)
        print(f"| {n.removeprefix('model.')} | {tuple(w.shape)} | {chunks} | {dt:.1f} | {mask.float().mean() * 100:.2f}% |")
    for layer, dt in per_layer.items():
        print(f"layer {layer}: {dt:.1f} s for its {a.modules} matrices")


if __name__ == "__main__":
    main()
