"""The engine's own decoder: Llama-style and Gemma-3 text models with an explicit KV cache.

Written for decode speed on small CPUs: q/k/v and gate/up projections are fused
into one matmul each (fewer kernel launches and Python calls per token), RoPE
tables are precomputed, and prefill can skip the vocabulary projection for all
but the last position (262k-wide for Gemma-3). `forward_rows` runs one step over several
independent sequences at different positions (continuous batching, `engine.batching`).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .adapters import AdapterBank
from .config import ModelArgs
from .kv_cache import KVCache, RowsView, SlotKVCache

# On CUDA, cuDNN's SDPA backend builds a new graph for every new key length, i.e. at every
# decode step: measured 1.5 ms of CPU per attention call on an H200 (GPU time 6 us). The
# other backends have no per-shape setup.
_CUDA_SDPA = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, offset: float = 0.0):
        super().__init__()
        self.eps = eps
        self.offset = offset  # Gemma stores w and scales by (1 + w)
        self.weight = nn.Parameter(torch.zeros(dim) if offset else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * (self.offset + self.weight.float())).to(x.dtype)


def llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3's RoPE scaling (transformers' `_compute_llama3_parameters`): long wavelengths
    slowed by `factor`, short ones kept, the band between interpolated."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return torch.where(medium, smoothed, scaled)


def rope_tables(head_dim: int, theta: float, max_len: int, scaling: dict | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    if scaling is not None:
        inv_freq = llama3_inv_freq(inv_freq, scaling)
    freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)  # (T, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # HF "rotate_half" layout
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x (B, H, T, hd); cos/sin (T, hd), or (B, 1, T, hd) for rows at different positions
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class ChaiLayout:
    """The heads a CHAI layer (Clustered Head Attention) keeps. `rep[h]` is the representative
    query head of head h's cluster; only representatives compute attention scores, every head
    applies its representative's scores to its own value head. So the layer stores query rows
    only for the representatives, key rows (and key cache) only for the KV groups they read,
    and all value heads. GQA: query heads are clustered; a key group no representative reads
    is dropped whole."""

    def __init__(self, rep: list[int], n_heads: int, n_kv: int):
        self.per = n_heads // n_kv  # query heads per KV group
        self.reps = sorted(set(rep))
        self.k_groups = sorted({r // self.per for r in self.reps})
        # representatives sorted by head index are sorted by KV group: each key group's
        # representatives are one contiguous span of the query rows
        self.q_spans = [(min(i for i, r in enumerate(self.reps) if r // self.per == g),
                         max(i for i, r in enumerate(self.reps) if r // self.per == g) + 1) for g in self.k_groups]
        # a list, not a tensor: models are built on the meta device, where a tensor would hold no values
        self.head_rep = [self.reps.index(rep[h]) for h in range(n_heads)]

    def scores(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Unscaled scores of the representatives, each against its own key group (a view, no
        copy of the cache): q (B, n_reps, T, hd), k (B, k_groups, S, hd) -> (B, n_reps, T, S)."""
        return torch.cat([q[:, a:b] @ k[:, j:j + 1].transpose(-1, -2) for j, (a, b) in enumerate(self.q_spans)],
                         dim=1)

    def mix(self, probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Every head applies its representative's probabilities to its own value head:
        probs (B, n_reps, T, S), v (B, n_kv, S, hd) -> (B, n_heads, T, hd)."""
        return torch.cat([probs[:, self.head_rep[g * self.per:(g + 1) * self.per]] @ v[:, g:g + 1]
                          for g in range(v.shape[1])], dim=1)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv, self.hd = args.n_heads, args.n_kv_heads, args.head_dim
        self.chai = ChaiLayout(args.chai[layer], args.n_heads, args.n_kv_heads) \
            if args.chai and args.chai[layer] else None
        self.q_heads = len(self.chai.reps) if self.chai else args.n_heads
        self.k_heads = len(self.chai.k_groups) if self.chai else args.n_kv_heads
        self.wqkv = nn.Linear(args.dim, (self.q_heads + self.k_heads + args.n_kv_heads) * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.scale = args.attn_scale
        self.repeat_kv = False  # set for ONNX export: expand KV heads instead of SDPA's enable_gqa
        if args.qk_norm:
            self.q_norm = RMSNorm(args.head_dim, args.norm_eps, args.norm_offset)
            self.k_norm = RMSNorm(args.head_dim, args.norm_eps, args.norm_offset)
        else:
            self.q_norm = self.k_norm = None

    def project(self, x, cos, sin):
        """q (B, q_heads, T, hd), k (B, k_heads, T, hd), v (B, nkv, T, hd): normed, RoPE'd, in
        the attention dtype (fp32 on CPU, where bf16 SDPA measured ~6x slower for single-token
        decode; RoPE tables arrive in that dtype)."""
        b, t, _ = x.shape
        q, k, v = self.wqkv(x).split([self.q_heads * self.hd, self.k_heads * self.hd, self.n_kv * self.hd], dim=-1)
        q = q.view(b, t, self.q_heads, self.hd).transpose(1, 2)
        k = k.view(b, t, self.k_heads, self.hd).transpose(1, 2)
        v = v.view(b, t, self.n_kv, self.hd).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        adt = cos.dtype
        q, k, v = q.to(adt), k.to(adt), v.to(adt)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def head_probs(self, x, cos, sin, mask) -> torch.Tensor:
        """Attention probabilities of every query head (B, nh, T, T), no cache: what CHAI
        clusters on."""
        q, k, _ = self.project(x, cos, sin)
        k = k.repeat_interleave(self.n_heads // self.n_kv, dim=1)
        scores = (q @ k.transpose(-1, -2)) * self.scale
        return scores.masked_fill(~mask, float("-inf")).softmax(-1)

    def forward(self, x, cos, sin, mask, cache: KVCache | None):
        b, t, _ = x.shape
        q, k, v = self.project(x, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        if self.chai is not None:
            y = self._clustered(q, k, v, mask)
        else:
            if self.n_kv != self.n_heads and self.repeat_kv:  # exporters lack SDPA's enable_gqa
                k = k.repeat_interleave(self.n_heads // self.n_kv, dim=1)
                v = v.repeat_interleave(self.n_heads // self.n_kv, dim=1)
            y = self._sdpa(q, k, v, mask)
        return self.wo(y.transpose(1, 2).reshape(b, t, self.n_heads * self.hd).to(x.dtype))

    def _sdpa(self, q, k, v, mask):
        gqa = self.n_kv != self.n_heads and not self.repeat_kv
        if q.shape[2] == 1 and not q.is_cuda and torch.compiler.is_compiling():
            return self._one_query(q, k, v, mask)
        if not q.is_cuda:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale, enable_gqa=gqa)
        with sdpa_kernel(_CUDA_SDPA):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale, enable_gqa=gqa)

    def _one_query(self, q, k, v, mask):
        """Decode attention (one query per row) written as products and sums for inductor to
        fuse into the layer's kernel (the compiled decode graphs): 30 SDPA calls, about 90 us
        each with their wrapper code, were a sixth of a SmolLM2 token at one row; with 4 / 8
        rows the batched step went from 19.9 / 25.5 to 18.6 / 23.5 ms (interleaved, 4 rounds),
        same logits. q (B, nh, 1, hd), k/v (B, nkv, S, hd)."""
        b, nh, _, hd = q.shape
        g = k.shape[1]
        q = q.view(b, g, nh // g, 1, hd)  # query heads grouped by the KV head they share
        scores = (q * k[:, :, None]).sum(-1) * self.scale  # (B, g, nh/g, S)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))  # mask (B, 1, 1, S)
        return (scores.softmax(-1)[..., None] * v[:, :, None]).sum(-2).view(b, nh, 1, hd)

    def _clustered(self, q, k, v, mask):
        """CHAI: scores for the representatives only, each against its own key group (a view,
        no copy of the cache); every head then takes its representative's probabilities to its
        own value head. (B, nh, T, hd)."""
        scores = self.chai.scores(q, k) * self.scale  # (B, n_reps, T, S)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return self.chai.mix(scores.softmax(-1), v)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.hidden = args.hidden_dim
        self.w13 = nn.Linear(args.dim, 2 * args.hidden_dim, bias=False)  # [gate; up]
        self.w2 = nn.Linear(args.hidden_dim, args.dim, bias=False)
        self.act = F.silu if args.activation == "silu" else (lambda g: F.gelu(g, approximate="tanh"))

    def forward(self, x):
        gate, up = self.w13(x).split(self.hidden, dim=-1)
        return self.w2(self.act(gate) * up)


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        eps, off = args.norm_eps, args.norm_offset
        self.attn_norm = RMSNorm(args.dim, eps, off)
        self.attn = Attention(args, layer)
        self.mlp_norm = RMSNorm(args.dim, eps, off)
        self.mlp = MLP(args)
        self.sandwich = args.sandwich_norm
        if self.sandwich:
            self.post_attn_norm = RMSNorm(args.dim, eps, off)
            self.post_mlp_norm = RMSNorm(args.dim, eps, off)

    def forward(self, x, cos, sin, mask, cache):
        h = self.attn(self.attn_norm(x), cos, sin, mask, cache)
        if self.sandwich:
            h = self.post_attn_norm(h)
        x = x + h
        h = self.mlp(self.mlp_norm(x))
        if self.sandwich:
            h = self.post_mlp_norm(h)
        return x + h


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs, max_len: int | None = None):
        super().__init__()
        self.args = args
        self.max_len = max_len or args.max_position_embeddings
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps, args.norm_offset)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.adapter_bank = AdapterBank()  # per-request LoRA adapters, named at load (engine.loader)
        self._rope = {}
        for theta in sorted(set(args.rope_theta)):
            cos, sin = rope_tables(args.head_dim, theta, self.max_len, args.rope_scaling)
            self.register_buffer(f"rope_cos_{len(self._rope)}", cos, persistent=False)
            self.register_buffer(f"rope_sin_{len(self._rope)}", sin, persistent=False)
            self._rope[theta] = len(self._rope)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tok_embeddings(ids)
        return x * self.args.embed_scale if self.args.embed_scale != 1.0 else x

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        if max_len > self.max_len:
            raise ValueError(f"cache length {max_len} exceeds the model's max_len {self.max_len}")
        a = self.args
        return KVCache(a.n_layers, batch, a.n_kv_heads, max_len, a.head_dim, self.attn_dtype, self.device,
                       k_heads=[blk.attn.k_heads for blk in self.layers])

    def new_slot_cache(self, slots: int, max_len: int | None = None) -> SlotKVCache:
        """Rows for continuous batching (`forward_rows`), each up to max_len positions."""
        a, max_len = self.args, max_len or self.max_len
        if max_len > self.max_len:
            raise ValueError(f"cache length {max_len} exceeds the model's max_len {self.max_len}")
        return SlotKVCache(a.n_layers, slots, a.n_kv_heads, max_len, a.head_dim, self.attn_dtype, self.device,
                           k_heads=[blk.attn.k_heads for blk in self.layers])

    def kv_bytes_per_token(self) -> int:
        a = self.args
        heads = sum(blk.attn.k_heads for blk in self.layers) + a.n_layers * a.n_kv_heads
        return heads * a.head_dim * torch.finfo(self.attn_dtype).bits // 8

    @property
    def attn_dtype(self) -> torch.dtype:
        """dtype of attention math and the KV cache: fp32 on CPU (fast SDPA path), the
        compute dtype on accelerators."""
        return torch.float32 if self.device.type == "cpu" else self.compute_dtype

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.norm.weight.dtype

    def _masks(self, start: int, t: int, device) -> dict:
        """Boolean masks (T, S) keyed by window size; None where nothing needs masking."""
        masks = {}
        end = start + t
        for w in set(self.args.sliding_window):
            if t == 1 and (w is None or end <= w):
                masks[w] = None  # a single new query may see every cached key
                continue
            q_pos = torch.arange(start, end, device=device)[:, None]
            k_pos = torch.arange(end, device=device)[None, :]
            m = k_pos <= q_pos
            if w is not None:
                m = m & (q_pos - k_pos < w)
            masks[w] = m
        return masks

    def layer_inputs(self, start: int, t: int, device) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """Per layer, the (cos, sin, mask) its block takes for positions [start, start + t):
        RoPE tables of the layer's base in the attention dtype and its window's mask. Tables and
        masks are built once per distinct base/window and shared."""
        masks = self._masks(start, t, device)
        adt = self.attn_dtype
        tables = {theta: (getattr(self, f"rope_cos_{i}")[start:start + t].to(adt),
                          getattr(self, f"rope_sin_{i}")[start:start + t].to(adt))
                  for theta, i in self._rope.items()}
        return [(*tables[self.args.rope_theta[layer]], masks[self.args.sliding_window[layer]])
                for layer in range(len(self.layers))]

    def row_inputs(self, starts: list[int], t: int, device) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """`layer_inputs` for a batch of rows at different positions: row b's tokens sit at
        [starts[b], starts[b] + t). RoPE tables (B, 1, T, hd) follow each row's positions;
        masks (B, 1, T, S), S = the longest row's end, hide every key a row's query may not
        see: later positions, another row's longer history (stale cache), and keys outside
        a sliding window."""
        pos = torch.tensor(starts, device=device)[:, None] + torch.arange(t, device=device)  # (B, T)
        return self.inputs_at(pos, torch.arange(max(starts) + t, device=device))

    def inputs_at(self, pos: torch.Tensor, k_pos: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """`row_inputs` from tensors: pos (B, T) the new tokens' positions, k_pos = arange(S) the
        keys' (what the compiled decode step traces, B and S its dynamic sizes)."""
        q_pos = pos[:, :, None]  # (B, T, 1)
        masks = {}
        for w in set(self.args.sliding_window):
            m = k_pos <= q_pos
            if w is not None:
                m = m & (q_pos - k_pos < w)
            masks[w] = m[:, None]
        adt = self.attn_dtype
        tables = {theta: (getattr(self, f"rope_cos_{i}")[pos][:, None].to(adt),
                          getattr(self, f"rope_sin_{i}")[pos][:, None].to(adt))
                  for theta, i in self._rope.items()}
        return [(*tables[self.args.rope_theta[layer]], masks[self.args.sliding_window[layer]])
                for layer in range(len(self.layers))]

    def forward(self, ids: torch.Tensor, cache: KVCache | None = None, last_only: bool = False,
                adapter: str | None = None) -> torch.Tensor:
        """ids (B, T) -> logits (B, T, V), or (B, 1, V) with last_only; every row through the
        named per-request LoRA adapter when `adapter` is given.

        With a cache, the new tokens sit at positions [cache.pos, cache.pos + T) and the cache
        advances by T; without one this is a plain causal forward from position 0.
        """
        b, t = ids.shape
        start = cache.pos if cache is not None else 0
        if start + t > self.max_len:
            raise ValueError(f"sequence length {start + t} exceeds max_len {self.max_len}")
        return self._run(ids, self.layer_inputs(start, t, ids.device), cache, last_only,
                         None if adapter is None else [adapter] * b)

    def forward_rows(self, ids: torch.Tensor, rows: RowsView, last_only: bool = False,
                     adapters: list[str | None] | None = None) -> torch.Tensor:
        """Continuous batching: ids (B, T) are the next T tokens of B independent sequences,
        each in its own cache row at its own length (`SlotKVCache.view`); every row advances by
        T. -> logits (B, T, V), or (B, 1, V) with last_only. adapters[b]: row b's per-request
        LoRA adapter (None: the base weights alone)."""
        t = ids.shape[1]
        if max(rows.starts) + t > self.max_len:
            raise ValueError(f"sequence length {max(rows.starts) + t} exceeds max_len {self.max_len}")
        return self._run(ids, self.row_inputs(rows.starts, t, ids.device), rows, last_only, adapters)

    def _run(self, ids, inputs, cache, last_only: bool, adapters: list[str | None] | None = None) -> torch.Tensor:
        """The blocks over `inputs`; adapters[b]: row b's per-request LoRA adapter (None, or all
        None: the base weights; the compiled decode step passes none and selects the adapter
        bank's rows itself, engine/compiled.py)."""
        if adapters is not None and any(a is not None for a in adapters):
            with self.adapter_bank.select(self.adapter_bank.masks(adapters, device=ids.device)):
                return self._blocks(ids, inputs, cache, last_only)
        return self._blocks(ids, inputs, cache, last_only)

    def _blocks(self, ids, inputs, cache, last_only: bool) -> torch.Tensor:
        x = self.embed(ids).to(self.compute_dtype)
        for block, (cos, sin, mask) in zip(self.layers, inputs):
            x = block(x, cos, sin, mask, cache)
        if cache is not None:
            cache.advance(ids.shape[1])
        if last_only:
            x = x[:, -1:]
        return self.output(self.norm(x)).float()
