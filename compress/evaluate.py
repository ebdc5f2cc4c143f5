"""Artifact evaluation: perplexity, prefill/decode speed, size.

All numbers are measured with the server's own engine (the code that serves the
artifact), not with transformers.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from engine.generate import decode_one_token, prefill
from engine.model import Transformer


@dataclass
class EvalConfig:
    seq_len: int = 512  # perplexity window (non-overlapping)
    max_tokens: int = 4096  # held-out tokens scored
    prefill_tokens: int = 256  # prompt length for the prefill timing
    decode_tokens: int = 64  # generated tokens for the decode timing
    repeats: int = 3  # timing repeats; the median is reported


@torch.inference_mode()
def perplexity(model: Transformer, ids: list[int], seq_len: int, bos: int | None = None,
               progress: bool = True) -> dict:
    """exp(mean NLL) over non-overlapping windows; every window restarts the context.

    With `bos`, each window is preceded by BOS (not scored), as the models saw in
    training; Gemma in particular is far off-distribution without it.
    """
    nll, count = 0.0, 0
    windows = [ids[i:i + seq_len] for i in range(0, len(ids), seq_len)]
    windows = [w for w in windows if len(w) > 1]
    for w in tqdm(windows, desc="perplexity", disable=not progress):
        x = torch.tensor([([bos] if bos is not None else []) + w])
        logits = model(x)[0, :-1]
        target = x[0, 1:]
        nll += torch.nn.functional.cross_entropy(logits, target, reduction="sum").item()
        count += target.numel()
    return {"perplexity": math.exp(nll / count), "tokens": count, "seq_len": seq_len}


@torch.inference_mode()
def latency(model: Transformer, prompt: list[int], decode_tokens: int, repeats: int) -> dict:
    """Median prefill and decode throughput (batch 1, greedy token feed)."""
    prefill_s, decode_s = [], []
    x = torch.tensor([prompt])
    for _ in range(repeats + 1):  # first run is warm-up
        cache = model.new_cache(1, len(prompt) + decode_tokens + 1)
        t0 = time.perf_counter()
        logits = prefill(model, x, cache)
        t1 = time.perf_counter()
        tok = logits.argmax(-1)
        for _ in range(decode_tokens):
            tok = decode_one_token(model, tok, cache).argmax(-1)
        t2 = time.perf_counter()
        prefill_s.append(t1 - t0)
        decode_s.append(t2 - t1)
    p, d = sorted(prefill_s[1:])[repeats // 2], sorted(decode_s[1:])[repeats // 2]
    return {"prefill_tok_s": len(prompt) / p, "decode_tok_s": decode_tokens / d,
            "prefill_tokens": len(prompt), "decode_tokens": decode_tokens, "threads": torch.get_num_threads()}


def evaluate(model: Transformer, tokenizer, cfg: EvalConfig, progress: bool = True) -> dict:
    from .data import DATASET_NAME, heldout_text

    ids = tokenizer(heldout_text(), add_special_tokens=False)["input_ids"][: cfg.max_tokens + 1]
    bos = tokenizer.bos_token_id if adds_bos(tokenizer) else None
    ppl = perplexity(model, ids, cfg.seq_len, bos, progress)
    lat = latency(model, ids[: cfg.prefill_tokens], cfg.decode_tokens, cfg.repeats)
    return {"dataset": DATASET_NAME, **ppl, **lat, "config": asdict(cfg)}


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer's own encoding starts with BOS (Gemma: yes, SmolLM2: no)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]
