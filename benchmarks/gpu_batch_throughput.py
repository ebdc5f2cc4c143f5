"""The continuous-batching engine on a GPU in bf16: decode tok/s per stream and aggregate
output tok/s at several concurrencies (engine only, no HTTP).

    python benchmarks/gpu_batch_throughput.py --concurrency 1,8,32 --prompt 128 --output 128

SmolLM2-135M-Instruct's exact shapes (its config.json, below) with random bf16 weights:
speed depends on shapes, not on weight values, and a device machine cannot reach the
packaged model. Greedy, EOS ignored, so every stream writes exactly --output tokens.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.batching import BatchConfig, BatchEngine, Sequence  # noqa: E402
from engine.config import ModelArgs  # noqa: E402
from engine.generate import SamplingParams  # noqa: E402
from engine.model import Transformer  # noqa: E402

SMOLLM2_135M = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
                "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152, "rms_norm_eps": 1e-5,
                "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}, "tie_word_embeddings": True,
                "max_position_embeddings": 8192, "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu"}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run(model, concurrency: int, prompt: int, output: int, slots: int) -> dict:
    engine = BatchEngine(model, BatchConfig(max_num_seqs=slots, prefill_chunk=prompt * concurrency))
    gen = torch.Generator().manual_seed(0)
    seqs = []
    for _ in range(concurrency):
        ids = torch.randint(3, model.args.vocab_size, (prompt,), generator=gen).tolist()
        seq = Sequence(ids, SamplingParams(max_tokens=output, temperature=0.0, ignore_eos=True), {2})
        seqs.append(seq)
        engine.add(seq)
    first, last, t0 = {}, {}, time.perf_counter()
    while engine.has_work:
        outs = engine.step()
        sync()
        now = time.perf_counter()
        for s in outs:
            first.setdefault(id(s), now)
            last[id(s)] = now
    wall = time.perf_counter() - t0
    per_stream = [(output - 1) / (last[id(s)] - first[id(s)]) for s in seqs]
    return {"concurrency": concurrency, "decode_tok_s_per_stream": statistics.median(per_stream),
            "aggregate_output_tok_s": concurrency * output / wall, "ttft_ms_median":
            statistics.median((first[id(s)] - t0) * 1000 for s in seqs), "wall_s": wall}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--output", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    conc = [int(x) for x in a.concurrency.split(",")]
    args = ModelArgs.from_hf_config(SMOLLM2_135M)
    torch.manual_seed(0)
    with torch.device(a.device):
        model = Transformer(args, max_len=a.prompt + a.output + 8)
    model = model.to(getattr(torch, a.dtype)).eval()
    for name, buf in model.named_buffers():  # RoPE tables stay fp32, as the loader keeps them
        if name.startswith("rope_"):
            setattr(model, name, buf.float())
    name = torch.cuda.get_device_name() if a.device == "cuda" else a.device
    run(model, max(conc), a.prompt, 8, max(conc))  # warm-up: allocations, kernel selection
    rows = [run(model, c, a.prompt, a.output, max(conc)) for c in conc]
    print(f"{name}, {a.dtype}, SmolLM2-135M shapes, prompt {a.prompt}, output {a.output}, torch {torch.__version__}")
    print("| concurrency | decode tok/s per stream (median) | aggregate output tok/s | TTFT median |")
    print("|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['concurrency']} | {r['decode_tok_s_per_stream']:.0f} | {r['aggregate_output_tok_s']:.0f} | "
              f"{r['ttft_ms_median']:.0f} ms |")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"device": name, "dtype": a.dtype, "torch": torch.__version__, "rows": rows},
                                     indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
