"""Decode/prefill throughput: transformers `model.generate` vs this repo's engine, side by side.

Run:
    python benchmarks/decode_vs_hf.py --source smollm2-135m-instruct
    python benchmarks/decode_vs_hf.py --source gemma3-270m --recipes none,bf16,int8,int8-dynamic
Artifacts are built into artifacts/<source>-<recipe> when missing. Prints one table with
each row's ratio to the transformers fp32 baseline measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def hf_decode(model_dir: Path, prompt: list[int], new: int, repeats: int) -> tuple[float, float]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    pre, dec = [], []
    for _ in range(repeats + 1):
        with torch.inference_mode():
            t0 = time.perf_counter()
            model(ids)  # prefill alone
            t1 = time.perf_counter()
            model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
            t2 = time.perf_counter()
            model.generate(ids, max_new_tokens=new + 1, min_new_tokens=new + 1, do_sample=False)
            t3 = time.perf_counter()
        pre.append(t1 - t0)
        dec.append((t3 - t2) - (t2 - t1))  # generate(new+1) minus generate(1): the decode steps only
    return len(prompt) / statistics.median(pre[1:]), new / statistics.median(dec[1:])


def engine_decode(artifact: Path, prompt: list[int], new: int, repeats: int) -> tuple[float, float]:
    from engine.artifact import load_engine_model
    from compress.evaluate import latency

    model, _ = load_engine_model(artifact, max_len=len(prompt) + new + 1)
    r = latency(model, prompt, new, repeats)
    return r["prefill_tok_s"], r["decode_tok_s"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", default="smollm2-135m-instruct")
    p.add_argument("--recipes", default="none,bf16,int8,int8-dynamic")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    from transformers import AutoTokenizer

    from compress.build import build
    from compress.data import heldout_text
    from compress.sources import ensure_hf_dir

    hf_dir = ensure_hf_dir(a.source, progress=False)
    tok = AutoTokenizer.from_pretrained(hf_dir)
    prompt = tok(heldout_text(), add_special_tokens=False)["input_ids"][: a.prompt_tokens]
    rows = [("transformers generate fp32", *hf_decode(hf_dir, prompt, a.new_tokens, a.repeats))]
    for recipe in a.recipes.split(","):
        art = Path("artifacts") / f"{a.source}-{recipe}"
        if not (art / "manifest.json").is_file():
            build(hf_dir, art, recipe, {"name": a.source})
        rows.append((f"engine {recipe}", *engine_decode(art, prompt, a.new_tokens, a.repeats)))
    base_p, base_d = rows[0][1], rows[0][2]
    print(f"\n{a.source}: prompt {len(prompt)} tokens, {a.new_tokens} new tokens, batch 1, "
          f"{torch.get_num_threads()} threads, median of {a.repeats}")
    print(f"| {'backend':28s} | prefill tok/s | x base | decode tok/s | x base |")
    print(f"|{'-' * 30}|---------------|--------|--------------|--------|")
    for name, pre, dec in rows:
        print(f"| {name:28s} | {pre:13.1f} | {pre / base_p:5.2f}x | {dec:12.1f} | {dec / base_d:5.2f}x |")


if __name__ == "__main__":
    main()
