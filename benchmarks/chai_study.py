"""The CHAI-KTQ 2x2x2 configuration study: Quant x Target x KD on/off, all on top of CHAI.

Run:
    python benchmarks/chai_study.py --source smollm2-135m-instruct           # ~45 min on 2 CPU cores
    python benchmarks/chai_study.py --source smollm2-135m-instruct --plot-only
    python benchmarks/chai_study.py --source smollm2-135m-instruct --speed-only   # re-time rows back to back
Each configuration is a recipe built into artifacts/<source>-chai-q<0|1>t<0|1>k<0|1>:
  chai                          always (clustered-head attention)
  Target on                     lora(layers=high,fraction=0.3): only the 30% most sensitive layers train
  KD on                         distillation from the unclustered source (kd=0.5); with Target off the
                                fine-tune covers every layer, with both off there is no fine-tune
  Quant on                      chai-quant(critical=0.3): sensitive layers bf16, the rest int8
and evaluated with the serving engine (perplexity, closed/open-book QA, decode tok/s, size,
KV cache bytes per token), next to the uncompressed model. Writes
results/chai_study_<source>.json, prints a markdown table, and draws the radar chart and
heatmap the paper shows into results/chai_study_<source>.png.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# max_residual=0.2: the plain elbow loses too much on SmolLM2 (perplexity 13 -> 59; README)
CHAI = "chai(samples=4,seq_len=128,max_residual=0.2)"


def recipe(quant: bool, target: bool, kd: bool, steps: int) -> str:
    parts = [CHAI]
    if target or kd:
        band = "layers=high,fraction=0.3," if target else ""
        parts.append(f"lora({band}steps={steps},targets=all{',kd=0.5' if kd else ''})")
    if quant:
        parts.append("chai-quant(critical=0.3)")
    return ",".join(parts)


def measure(source: str, name: str, rec: str, qa_n: int) -> dict:
    from compress.__main__ import main as compress
    from engine.artifact import load_engine_model, read_manifest

    art = ROOT / "artifacts" / f"{source}-{name}"
    if not (art / "manifest.json").is_file():
        if compress(["build", "--source", source, "--recipe", rec, "--out", str(art)]) != 0:
            raise SystemExit(f"build of {name} failed")
    if "qa" not in read_manifest(art).get("eval", {}):
        if compress(["eval", str(art), "--quiet", "--qa", "--qa-n", str(qa_n), "--repeats", "5"]) != 0:
            raise SystemExit(f"eval of {name} failed")
    m = read_manifest(art)
    e = m["eval"]
    model, _ = load_engine_model(art, max_len=64, check=False)
    chai = next((s["result"] for s in m["steps"] if s["name"] == "chai"), {})
    return {"name": name, "row": name, "artifact": str(art.relative_to(ROOT)), "recipe": rec,
            "size_bytes": m["size_bytes"], "perplexity": e["perplexity"],
            "qa_closed": e["qa"]["closed"]["accuracy"], "qa_open": e["qa"]["open"]["accuracy"],
            "decode_tok_s": e["decode_tok_s"], "kv_bytes_per_token": model.kv_bytes_per_token(),
            "clusters": chai.get("clusters"), "steps": [s.get("result") for s in m["steps"]]}


def table(rows: list[dict]) -> str:
    base = rows[0]
    out = ["| config | recipe | size MB (reduction) | KV B/token | perplexity | QA closed | QA open | decode tok/s |",
           "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['name']} | `{r['recipe']}` | {r['size_bytes'] / 1e6:.0f} "
                   f"({(1 - r['size_bytes'] / base['size_bytes']) * 100:.0f}%) | {r['kv_bytes_per_token']} | "
                   f"{r['perplexity']:.2f} | {r['qa_closed'] * 100:.0f}% | {r['qa_open'] * 100:.0f}% | "
                   f"{r['decode_tok_s']:.1f} |")
    return "\n".join(out)


def plot(rows: list[dict], out: Path) -> None:
    """Radar chart (higher = better on every axis, each scaled to the best config) and a heatmap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from clients.bench_plot import save_png

    axes_names = ["1/perplexity", "QA closed", "QA open", "decode tok/s", "1/size", "1/KV bytes"]
    vals = np.array([[1 / r["perplexity"], r["qa_closed"], r["qa_open"], r["decode_tok_s"], 1 / r["size_bytes"],
                      1 / r["kv_bytes_per_token"]] for r in rows])
    norm = vals / np.maximum(vals.max(axis=0), 1e-12)
    fig = plt.figure(figsize=(15, 6))
    ax = fig.add_subplot(1, 2, 1, polar=True)
    angles = np.linspace(0, 2 * np.pi, len(axes_names), endpoint=False).tolist()
    for r, v in zip(rows, norm):
        ax.plot(angles + angles[:1], list(v) + [v[0]], label=r["name"], lw=1.2)
    ax.set_xticks(angles, axes_names)
    ax.set_ylim(0, 1)
    ax.legend(loc="upper right", bbox_to_anchor=(1.35, 1.1), fontsize=8)
    ax.set_title("configurations (each axis scaled to the best)")
    hm = fig.add_subplot(1, 2, 2)
    im = hm.imshow(norm, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    hm.set_xticks(range(len(axes_names)), axes_names, rotation=30, ha="right")
    hm.set_yticks(range(len(rows)), [r["name"] for r in rows])
    for i, j in itertools.product(range(len(rows)), range(len(axes_names))):
        hm.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", color="w" if norm[i, j] < 0.6 else "k",
                fontsize=8)
    fig.colorbar(im, ax=hm)
    hm.set_title("heatmap (1 = best configuration on that metric)")
    fig.tight_layout()
    save_png(fig, out)
    print(f"wrote {out}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", default="smollm2-135m-instruct")
    p.add_argument("--steps", type=int, default=60, help="fine-tune steps where Target or KD is on")
    p.add_argument("--qa-n", type=int, default=50)
    p.add_argument("--plot-only", action="store_true")
    p.add_argument("--speed-only", action="store_true", help="re-time the rows in results/ back to back")
    p.add_argument("--repeats", type=int, default=5, help="speed pass repeats (median)")
    a = p.parse_args()
    res = ROOT / "results" / f"chai_study_{a.source}.json"
    png = ROOT / "results" / f"chai_study_{a.source}.png"
    if a.plot_only:
        return plot(json.loads(res.read_text())["rows"], png)
    if a.speed_only:
        rows = json.loads(res.read_text())["rows"]
    else:
        rows = [measure(a.source, "base", "none", a.qa_n)]
        for quant, target, kd in itertools.product([False, True], repeat=3):
            name = f"chai-q{int(quant)}t{int(target)}k{int(kd)}"
            rows.append(measure(a.source, name, recipe(quant, target, kd, a.steps), a.qa_n))
    from compress_table import speed_pass  # same speed protocol as the compression table

    speed_pass(rows, a.repeats)  # evals ran during builds; re-time all rows back to back
    res.write_text(json.dumps({"source": a.source, "rows": rows}, indent=2) + "\n")
    print(table(rows))
    plot(rows, png)


if __name__ == "__main__":
    main()
