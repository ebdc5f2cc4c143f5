"""Build (if missing) and evaluate artifacts for each source x recipe; print one markdown table.

Run:
    python benchmarks/eval_table.py                       # both packaged models, none/bf16/int8/int8-dynamic
    python benchmarks/eval_table.py --sources gemma3-270m --recipes none,int8
Results are also recorded in each artifact's manifest (`eval`).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sources", default="smollm2-135m-instruct,gemma3-270m")
    p.add_argument("--recipes", default="none,bf16,int8,int8-dynamic")
    p.add_argument("--max-tokens", type=int, default=4096)
    a = p.parse_args()
    from compress.__main__ import main as compress

    rows = []
    for source in a.sources.split(","):
        base = None
        for recipe in a.recipes.split(","):
            art = Path("artifacts") / f"{source}-{recipe}"
            if not (art / "manifest.json").is_file():
                assert compress(["build", "--source", source, "--recipe", recipe, "--out", str(art)]) == 0
            assert compress(["eval", str(art), "--quiet", "--max-tokens", str(a.max_tokens)]) == 0
            from compress.artifact import read_manifest

            m = read_manifest(art)
            e = m["eval"]
            base = base or e
            rows.append(f"| {source} | {recipe} | {m['size_bytes'] / 1e6:.0f} | {e['perplexity']:.2f} "
                        f"({(e['perplexity'] / base['perplexity'] - 1) * 100:+.1f}%) | {e['prefill_tok_s']:.0f} | "
                        f"{e['decode_tok_s']:.1f} ({e['decode_tok_s'] / base['decode_tok_s']:.2f}x) |")
    print("\n| source | recipe | size MB | perplexity (vs none) | prefill tok/s | decode tok/s (vs none) |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
