"""The thesis-style compression table (Table A.1/A.2): one row per recipe, each a servable artifact.

Run:
    python benchmarks/compress_table.py --source smollm2-135m-instruct        # ~1 h on 2 CPU cores
    python benchmarks/compress_table.py --source gemma3-270m --rows base,int8,gptq,gptq-eora
    python benchmarks/compress_table.py --source gemma3-270m --speed-only      # re-time the rows back to back
    python benchmarks/compress_table.py --plot-only                            # redraw the PNG from results/
Builds every missing artifact under artifacts/<source>-<row>, evaluates it with the serving
engine (`python -m compress eval --qa`: held-out perplexity, closed/open-book QA accuracy,
decode tok/s), then re-times every row back to back in one speed pass (so speeds compare
side by side) and prints one markdown table; results go to results/compress_table_<source>.json
and the size-vs-perplexity Pareto plot of every source measured so far to
results/compress_pareto.png.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LORA = "lora(steps={lora_steps},batch=2,seq_len=256,lr=2e-4,targets=all)"
# row -> recipe. "lora-control" fine-tunes the unpruned model the same way: calibration and
# held-out text share a domain (CPython docs), so it separates recovery from domain adaptation.
ROWS = {
    "base": "none",
    "int8": "int8",
    "gptq": "gptq(bits=4,group_size=128)",
    "gptq-eora": "gptq(bits=4,group_size=128),eora(rank=32)",
    "gptq-g32": "gptq(bits=4,group_size=32,sym=false)",
    "gptq-e8": "gptq(bits=4,group_size=128,embed=int8)",  # int8 embedding: Gemma's is 63% of its weights
    "depth": "depth(n={depth},metric=ppl)",
    "depth-lora": "depth(n={depth},metric=ppl)," + LORA,
    "wanda": "wanda(pattern=2:4)",
    "wanda-lora": "wanda(pattern=2:4)," + LORA,
    "lora-control": LORA,
    "pipeline": "depth(n={depth},metric=ppl),wanda(pattern=2:4)," + LORA + ",gptq(bits=4,group_size=128),eora(rank=32)",
}
DEPTH = {"smollm2-135m-instruct": 4, "gemma3-270m": 2}
# LoRA steps: Gemma's 262k-entry vocabulary makes a step ~2.5x dearer on 2 CPU cores
LORA_STEPS = {"smollm2-135m-instruct": 100, "gemma3-270m": 60}


def run_row(source: str, row: str, recipe: str, qa_n: int, force: bool) -> dict:
    from compress.__main__ import main as compress
    from compress.artifact import read_manifest

    art = ROOT / "artifacts" / f"{source}-{row}"
    t0 = time.perf_counter()
    if force or not (art / "manifest.json").is_file():
        if compress(["build", "--source", source, "--recipe", recipe, "--out", str(art), "--force"]) != 0:
            raise SystemExit(f"build of {row} failed")
    build_s = time.perf_counter() - t0
    m = read_manifest(art)
    if "qa" not in m.get("eval", {}) or force:
        if compress(["eval", str(art), "--quiet", "--qa", "--qa-n", str(qa_n)]) != 0:
            raise SystemExit(f"eval of {row} failed")
        m = read_manifest(art)
    e = m["eval"]
    sparsity = next((s["result"].get("sparsity") for s in m["steps"] if s["name"] == "wanda"), None)
    layers = json.loads((art / "config.json").read_text())["num_hidden_layers"]
    return {"row": row, "recipe": recipe, "artifact": str(art.relative_to(ROOT)), "n_params": m["n_params"],
            "size_bytes": m["size_bytes"], "layers": layers, "sparsity": sparsity, "perplexity": e["perplexity"],
            "qa_closed": e["qa"]["closed"]["accuracy"], "qa_open": e["qa"]["open"]["accuracy"],
            "decode_tok_s": e["decode_tok_s"], "prefill_tok_s": e["prefill_tok_s"], "threads": e["threads"],
            "hf_loadable": m["hf_loadable"], "build_s": round(build_s, 1) if build_s > 1 else None,
            "steps": [s.get("result") for s in m["steps"]]}


def speed_pass(rows: list[dict], repeats: int) -> None:
    """Re-measure prefill/decode speed of every row back to back in one process, so the
    speeds in the table are comparable (same machine state, nothing else running)."""
    import torch
    from transformers import AutoTokenizer

    from engine.artifact import load_engine_model
    from compress.data import heldout_text
    from compress.evaluate import latency

    for r in rows:
        art = ROOT / r["artifact"]
        model, _ = load_engine_model(art, max_len=512)
        ids = AutoTokenizer.from_pretrained(str(art))(heldout_text(), add_special_tokens=False)["input_ids"][:256]
        lat = latency(model, ids, decode_tokens=64, repeats=repeats)
        r["decode_tok_s"], r["prefill_tok_s"], r["threads"] = lat["decode_tok_s"], lat["prefill_tok_s"], lat["threads"]
        r["speed"] = f"speed pass: 256-token prompt, 64 decoded, median of {repeats}, {torch.get_num_threads()} threads"
        print(f"{r['row']:14s} prefill {r['prefill_tok_s']:7.1f} tok/s  decode {r['decode_tok_s']:5.1f} tok/s")
        del model


def table(rows: list[dict]) -> str:
    base = rows[0]
    lines = ["| row | recipe | layers | params | zeros | size MB | perplexity | QA closed | QA open | decode tok/s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        zeros = "" if r["sparsity"] is None else f"{r['sparsity'] * 100:.0f}%"
        lines.append(
            f"| {r['row']} | `{r['recipe']}` | {r['layers']} | {r['n_params'] / 1e6:.1f}M | "
            f"{zeros} | {r['size_bytes'] / 1e6:.0f} | "
            f"{r['perplexity']:.2f} ({(r['perplexity'] / base['perplexity'] - 1) * 100:+.0f}%) | "
            f"{r['qa_closed'] * 100:.0f}% | {r['qa_open'] * 100:.0f}% | {r['decode_tok_s']:.1f} |")
    return "\n".join(lines)


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both size and perplexity (lower is better)."""
    return [i for i, (s, p) in enumerate(points)
            if not any((s2 <= s and p2 <= p) and (s2 < s or p2 < p) for s2, p2 in points)]


def plot(out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from clients.bench_plot import save_png

    files = sorted((ROOT / "results").glob("compress_table_*.json"))
    fig, axes = plt.subplots(1, len(files), figsize=(7 * len(files), 5.5), squeeze=False)
    for ax, f in zip(axes[0], files):
        rows = json.loads(f.read_text())["rows"]
        pts = [(r["size_bytes"] / 1e6, r["perplexity"]) for r in rows]
        front = sorted(pareto(pts), key=lambda i: pts[i][0])
        ax.scatter(*zip(*pts), c=["tab:red" if i in front else "tab:blue" for i in range(len(pts))], zorder=3)
        ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "r--", lw=1, label="Pareto front")
        for r, (s, p) in zip(rows, pts):
            ax.annotate(r["row"], (s, p), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set(xscale="log", yscale="log", xlabel="size on disk (MB)", ylabel="held-out perplexity",
               title=f.stem.removeprefix("compress_table_"))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    save_png(fig, out)
    print(f"wrote {out}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", default="smollm2-135m-instruct")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, from: {', '.join(ROWS)}")
    p.add_argument("--qa-n", type=int, default=50, help="questions per QA kind")
    p.add_argument("--force", action="store_true", help="rebuild and re-evaluate every row")
    p.add_argument("--plot-only", action="store_true")
    p.add_argument("--speed-only", action="store_true",
                   help="re-measure the speeds of the rows in results/ back to back, then print the table")
    p.add_argument("--repeats", type=int, default=5, help="speed pass repeats (median)")
    a = p.parse_args()
    out_png = ROOT / "results" / "compress_pareto.png"
    res = ROOT / "results" / f"compress_table_{a.source}.json"
    if a.plot_only:
        return plot(out_png)
    if a.speed_only:
        data = json.loads(res.read_text())
        speed_pass(data["rows"], a.repeats)
        res.write_text(json.dumps(data, indent=2) + "\n")
        print(table(data["rows"]))
        return None
    unknown = [r for r in a.rows.split(",") if r not in ROWS]
    if unknown:
        raise SystemExit(f"error: unknown row(s) {', '.join(unknown)}; known: {', '.join(ROWS)}")
    fmt = {"depth": DEPTH.get(a.source, 4), "lora_steps": LORA_STEPS.get(a.source, 100)}
    rows = [run_row(a.source, r, ROWS[r].format(**fmt), a.qa_n, a.force) for r in a.rows.split(",")]
    speed_pass(rows, a.repeats)
    res.write_text(json.dumps({"source": a.source, "qa_n": a.qa_n, "rows": rows}, indent=2) + "\n")
    print(table(rows))
    plot(out_png)


if __name__ == "__main__":
    main()
