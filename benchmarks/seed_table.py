"""The first seed paper's table, measured side by side: speedup of Quantization, Pruning+SV,
Q⇒P+SV and P+SV⇒Q over the uncompressed baseline, plus perplexity and size (the seed
reported speed only: 1.74x, 1.65x, 1.66x, 1.31x).

Run:
    python benchmarks/seed_table.py --source gemma3-270m
    python benchmarks/seed_table.py --source smollm2-135m-instruct --layers 4-11 --rank 4
Artifacts go to artifacts/seed-<source>-<row>; existing ones are re-evaluated, not rebuilt.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SEED = {"Quantization": 1.74, "Pruning+SV": 1.65, "Q⇒P+SV": 1.66, "P+SV⇒Q": 1.31}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", default="gemma3-270m")
    p.add_argument("--layers", default="4-11", help="layers pruned and factored (first/last kept dense)")
    p.add_argument("--modules", default="mlp")
    p.add_argument("--rank", type=int, default=4, help="SVD rank (the paper's 4)")
    p.add_argument("--n-masks", type=int, default=500)
    p.add_argument("--top-k", type=int, default=20)
    p.add_argument("--max-tokens", type=int, default=2048, help="held-out tokens for perplexity")
    a = p.parse_args()
    from compress.__main__ import main as compress
    from compress.artifact import read_manifest

    ps = (f"prune(layers={a.layers},modules={a.modules},n_masks={a.n_masks},top_k={a.top_k}),"
          f"svd(rank={a.rank},layers={a.layers},modules={a.modules})")
    rows = [("baseline", "none"), ("Quantization", "int8"), ("Pruning+SV", ps), ("Q⇒P+SV", f"int8,{ps}"),
            ("P+SV⇒Q", f"{ps},int8")]
    results = []
    for label, recipe in rows:
        slug = label.lower().replace("⇒", "-then-").replace("+", "-")
        art = Path("artifacts") / f"seed-{a.source}-{slug}"
        t0 = time.perf_counter()
        if not (art / "manifest.json").is_file():
            assert compress(["build", "--source", a.source, "--recipe", recipe, "--out", str(art)]) == 0
        build_s = time.perf_counter() - t0
        assert compress(["eval", str(art), "--quiet", "--max-tokens", str(a.max_tokens)]) == 0
        m = read_manifest(art)
        results.append((label, recipe, m, build_s))
    base = results[0][2]["eval"]
    print(f"\n{a.source}: pruning/SVD on layers {a.layers} ({a.modules}), rank {a.rank}, "
          f"{a.n_masks} masks, top-{a.top_k}; perplexity on {base['tokens']} held-out tokens")
    print("| row | size MB | perplexity (vs base) | decode tok/s | speedup | seed speedup | build s | pruned |")
    print("|---|---|---|---|---|---|---|---|")
    for label, recipe, m, build_s in results:
        e = m["eval"]
        pruned = next((s["result"]["sparsity"] for s in m["steps"] if s["name"] == "prune"), None)
        print(f"| {label} | {m['size_bytes'] / 1e6:.0f} | {e['perplexity']:.2f} "
              f"({(e['perplexity'] / base['perplexity'] - 1) * 100:+.1f}%) | {e['decode_tok_s']:.1f} | "
              f"{e['decode_tok_s'] / base['decode_tok_s']:.2f}x | {SEED.get(label, 1.0):.2f}x | {build_s:.0f} | "
              f"{'' if pruned is None else f'{pruned * 100:.2f}%'} |")


if __name__ == "__main__":
    main()
