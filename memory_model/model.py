"""The memory model: a decoder-only multi-head-attention transformer with RoPE, RMSNorm,
SwiGLU and tied embeddings, and an explicit KV cache passed to `forward`.

It is the serving engine's own decoder (`engine.model.Transformer`, written in
this repo and tested token-for-token against transformers) configured as plain MHA
(n_kv_heads == n_heads) for the from-scratch presets, or as the large model's own shape (GQA)
when initialised from it (`init_from.import_artifact`). Sharing it means the memory model trains with the exact code
that serves it, reuses `KVCache` / `prefill` / `decode_one_token` / `sample`, and can be
int8-quantized like any artifact. This module adds what training needs: named presets,
initialisation, and a loss.

Presets (vocab size comes from the tokenizer; parameter counts at vocab 8192 / 16384):
    mm-tiny  dim 64,  2 layers,  4 heads   (~0.6M: tests)
    mm-8m    dim 256, 8 layers,  8 heads   (~8.4M: the shipped CPU checkpoint)
    mm-70m   dim 640, 12 layers, 10 heads  (~70M at vocab 16384: the seed's size, for a GPU)
A 70M memory model on a CPU budget is instead imported: SmolLM2-135M depth-pruned to 12 of its
30 blocks (`compress ... depth(n=18)`, then `python -m memory_model init`), ~70.8M parameters.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F

from engine.config import ModelArgs
from engine.model import Transformer


@dataclass
class MemoryModelConfig:
    vocab_size: int = 8192  # set from the tokenizer
    dim: int = 256  # residual width
    n_layers: int = 8
    n_heads: int = 8  # query heads
    n_kv_heads: int | None = None  # key/value heads: None = n_heads (MHA, the presets); fewer (GQA) when imported
    hidden_dim: int = 688  # SwiGLU width, ~8/3 * dim rounded to a multiple of 16
    max_len: int = 1024  # longest (prompt + chain-of-thought + condensed) sequence
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    # special token ids, copied from the tokenizer so a checkpoint is self-describing
    pad_id: int = 0
    bos_id: int = 2
    eos_id: int = 3

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def to_model_args(self) -> ModelArgs:
        return ModelArgs(arch="llama", vocab_size=self.vocab_size, dim=self.dim, n_layers=self.n_layers,
                         n_heads=self.n_heads, n_kv_heads=self.n_kv_heads or self.n_heads, head_dim=self.head_dim,
                         hidden_dim=self.hidden_dim, norm_eps=self.norm_eps,
                         rope_theta=[self.rope_theta] * self.n_layers, max_position_embeddings=self.max_len,
                         tie_embeddings=True, bos_token_id=self.bos_id, eos_token_ids=[self.eos_id])

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MemoryModelConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown memory-model config fields: {sorted(unknown)}")
        return cls(**d)


PRESETS: dict[str, dict] = {
    "mm-tiny": dict(dim=64, n_layers=2, n_heads=4, hidden_dim=176, max_len=512),
    "mm-8m": dict(dim=256, n_layers=8, n_heads=8, hidden_dim=688, max_len=1024),
    "mm-70m": dict(dim=640, n_layers=12, n_heads=10, hidden_dim=1728, max_len=1024),
}


def from_preset(name: str, **overrides) -> MemoryModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return MemoryModelConfig(**{**PRESETS[name], **overrides})


def init_weights(model: Transformer, cfg: MemoryModelConfig, generator: torch.Generator | None = None) -> None:
    """GPT-2 style: N(0, 0.02), residual output projections scaled by 1/sqrt(2 * n_layers)
    so the residual stream's variance does not grow with depth; norms at 1."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)
                continue
            std = 0.02
            if name.endswith("wo.weight") or name.endswith("w2.weight"):
                std = 0.02 / math.sqrt(2 * cfg.n_layers)
            p.normal_(0.0, std, generator=generator)


def build_model(cfg: MemoryModelConfig, seed: int | None = 0, device: str | torch.device | None = None
                ) -> Transformer:
    """seed=None leaves torch's default init (for loading weights or meta-device sizing)."""
    model = Transformer(cfg.to_model_args(), max_len=cfg.max_len)
    if seed is not None:
        init_weights(model, cfg, torch.Generator().manual_seed(seed))
    return model if device is None else model.to(device)


def n_params(model: Transformer) -> int:
    return sum(p.numel() for p in model.parameters())  # tied head counted once


def lm_loss(model: Transformer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy; positions where y == -100 (padding, prompt tokens in
    supervised data) are ignored."""
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100)


def right_pad(seqs: list[list[int]], pad_id: int, device=None) -> torch.Tensor:
    """(B, T) right-padded ids. For a causal model this needs no attention mask: a row's
    own positions never attend to the padding after them."""
    ids = torch.full((len(seqs), max(len(x) for x in seqs)), pad_id, dtype=torch.long)
    for j, x in enumerate(seqs):
        ids[j, :len(x)] = torch.tensor(x, dtype=torch.long)
    return ids.to(device) if device is not None else ids


def sequence_logprobs(model: Transformer, ids: torch.Tensor, start: torch.Tensor, lengths: torch.Tensor,
                      temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row sum of log pi(token) over generated positions [start, length) of right-padded
    ids (B, T), with gradients; also the per-row mean entropy there and the per-token log
    probs (B, T-1) for KL terms. Position i's logits predict token i + 1. pi is
    softmax(logits / temperature): the distribution the samples were drawn from, so the policy
    gradient stays on-policy at any sampling temperature (greedy decoding is the same for all)."""
    if temperature <= 0:
        raise ValueError("temperature must be > 0 for log-probabilities")
    logits = model(ids[:, :-1]).float() / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    tok_logp = logp_all.gather(-1, ids[:, 1:, None]).squeeze(-1)  # (B, T-1)
    pos = torch.arange(ids.shape[1] - 1, device=ids.device)[None, :] + 1  # index of the predicted token
    mask = (pos >= start[:, None]) & (pos < lengths[:, None])
    ent = -(logp_all.exp() * logp_all).sum(-1)
    denom = mask.sum(-1).clamp(min=1)
    return (tok_logp * mask).sum(-1), (ent * mask).sum(-1) / denom, tok_logp * mask
