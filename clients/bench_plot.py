"""PNG for one or more clients.bench results: latency distributions per concurrency (box
plots of TTFT, TPOT, E2EL; one colour per result) and output throughput vs concurrency."""

from __future__ import annotations

import os
from pathlib import Path

METRICS = [("ttft", "TTFT (ms)"), ("tpot", "TPOT (ms)"), ("e2el", "E2EL (ms)")]


def plot(results: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .bench import tag

    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.8))
    width = 0.8 / len(results)
    labels = []
    for i, res in enumerate(results):
        c = colours[i % len(colours)]
        labels.append(tag(res))
        runs = res["runs"]
        for ax, (key, title) in zip(axes[:3], METRICS):
            data = [[r[key] * 1000 for r in run["requests"] if r["ok"] and r.get(key) is not None] or [float("nan")]
                    for run in runs]
            pos = [j + (i - (len(results) - 1) / 2) * width for j in range(len(runs))]
            ax.boxplot(data, positions=pos, widths=width * 0.9, patch_artist=True, showfliers=True,
                       boxprops={"facecolor": c, "alpha": 0.5}, medianprops={"color": "k"})
            ax.set_xticks(range(len(runs)), [_run_name(run) for run in runs], rotation=20)
            ax.set_title(title)
            ax.set_ylabel("ms")
        xs = [run["concurrency"] for run in runs]
        axes[3].plot(xs, [run["summary"]["output_throughput"] for run in runs], "o-", color=c, label=labels[-1])
    axes[3].set_xlabel("max concurrency")
    axes[3].set_ylabel("output tokens/s")
    axes[3].set_title("throughput vs concurrency")
    axes[3].legend(fontsize=7)
    fig.suptitle(" vs ".join(labels), fontsize=9)
    fig.tight_layout()
    save_png(fig, out, dpi=100)


def save_png(fig, out: Path, dpi: int = 110) -> None:
    """Write a matplotlib figure atomically (a temp file renamed into place) and close it."""
    import matplotlib.pyplot as plt

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.stem + ".tmp.png")
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    os.replace(tmp, out)


def _run_name(run: dict) -> str:
    rate = run["request_rate"]
    return f"c={run['concurrency']}" + ("" if rate == "inf" else f" r={rate:g}")
