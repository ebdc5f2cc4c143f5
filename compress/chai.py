"""CHAI: Clustered Head Attention (Agarwal et al. 2024), the offline (static) variant.

`chai(samples=4, seq_len=128, layers=all, min_layer=0)` runs calibration text through the
model block by block, takes every query head's attention probabilities (B, T, T) as its
feature, and per layer clusters the heads with k-means for every k in 1..n_heads. The
number of clusters is the elbow (knee) of the inertia curve: the k farthest below the chord
from k=1 to k=n_heads (Kneedle), optionally raised by `min_clusters` and `max_residual` (the
fewest clusters whose inertia is at most that share of the one-cluster inertia). Each
cluster's representative is the member closest to its centroid.

At serving (engine/model.py `ChaiLayout`) only representatives compute attention
scores; all heads of a cluster reuse them with their own value heads. The artifact keeps
query rows only for representatives, and key rows (and key cache) only for the KV groups a
representative reads. Grouped-query attention: query heads are clustered (SmolLM2-135M:
9 query heads over 3 KV groups; Gemma-3-270M: 4 over 1), so keys shrink only where a whole
KV group loses all its representatives; with one KV group (Gemma-3-270M) CHAI removes
query rows and score work, never key cache. The config records the clusters under
`chai_representatives`; such artifacts are served by this engine only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine import naming
from engine.config import ModelArgs
from engine.loader import build_model

from .calibration import step_calibration_ids
from .precision import quantize_int8
from .select import layer_set
from .sensitivity import layer_sensitivity, select_layers
from .step import RecipeError, Step


def kmeans(x: torch.Tensor, k: int, seed: int = 0, iters: int = 50, restarts: int = 4
           ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(labels (n,), centroids (k, d), inertia) of k-means with k-means++ seeding; best of restarts."""
    g = torch.Generator().manual_seed(seed)
    best = None
    for _ in range(restarts):
        cent = x[torch.randint(len(x), (1,), generator=g)]
        while len(cent) < k:  # k-means++: next centre drawn proportionally to squared distance
            d = torch.cdist(x, cent).min(dim=1).values ** 2
            nxt = torch.multinomial(d / d.sum(), 1, generator=g) if d.sum() > 0 else torch.tensor([len(cent)])
            cent = torch.cat([cent, x[nxt]])
        for _ in range(iters):
            labels = torch.cdist(x, cent).argmin(dim=1)
            new = torch.stack([x[labels == j].mean(0) if (labels == j).any() else cent[j] for j in range(k)])
            if torch.allclose(new, cent):
                break
            cent = new
        labels = torch.cdist(x, cent).argmin(dim=1)
        inertia = float(((x - cent[labels]) ** 2).sum())
        if best is None or inertia < best[2]:
            best = (labels, cent, inertia)
    return best


def elbow(inertias: list[float]) -> int:
    """Kneedle on a decreasing curve over k = 1..n: the k (1-based) whose normalized inertia
    lies farthest below the straight line between the first and last point."""
    n = len(inertias)
    if n <= 2 or inertias[0] <= inertias[-1]:
        return n if inertias[0] > inertias[-1] else 1
    lo, hi = inertias[-1], inertias[0]
    gaps = [(1 - i / (n - 1)) - (y - lo) / (hi - lo) for i, y in enumerate(inertias)]
    return max(range(n), key=lambda i: gaps[i]) + 1


def choose_k(inertias: list[float], min_k: int = 1, max_residual: float = 0.0) -> int:
    """The elbow, raised to at least `min_k` clusters and, when `max_residual` > 0, to the
    smallest k whose inertia is at most that fraction of the one-cluster inertia (the share
    of the heads' spread the merge throws away)."""
    k = max(elbow(inertias), min(min_k, len(inertias)))
    if max_residual > 0 and inertias[0] > 0:
        enough = [i + 1 for i, v in enumerate(inertias) if v <= max_residual * inertias[0]]
        k = max(k, enough[0] if enough else len(inertias))
    return k


def cluster_heads(features: torch.Tensor, max_k: int | None = None, seed: int = 0, min_k: int = 1,
                  max_residual: float = 0.0) -> tuple[list[int], list[float]]:
    """features (n_heads, d) -> (representative of each head, inertia for k = 1..max_k)."""
    n = features.shape[0]
    max_k = min(max_k or n, n)
    runs = [kmeans(features, k, seed) for k in range(1, max_k + 1)]
    inertias = [r[2] for r in runs]
    labels, cent, _ = runs[choose_k(inertias, min_k, max_residual) - 1]
    rep = list(range(n))
    for j in labels.unique().tolist():
        members = (labels == j).nonzero().flatten()
        closest = members[((features[members] - cent[j]) ** 2).sum(1).argmin()].item()
        for h in members.tolist():
            rep[h] = closest
    return rep, inertias


def hf_chai_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """transformers attention function for a CHAI model (fine-tuning it with peft, CHAI-Target/KD):
    the engine's clustered attention on HF's tensors. query (B, n_reps, T, hd) and key
    (B, k_groups, T, hd) arrive already reduced, since HF views projections with -1 heads;
    `module.chai_layout` is the layer's ChaiLayout (identity for unclustered layers).
    Returns ((B, T, n_heads, hd), None) like transformers' own functions."""
    c = module.chai_layout
    scores = c.scores(query, key) * scaling
    if attention_mask is not None:  # eager-style additive mask
        scores = scores + attention_mask[:, :, :, : key.shape[-2]]
    probs = torch.nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = torch.nn.functional.dropout(probs, p=dropout, training=module.training)
    return c.mix(probs, value).transpose(1, 2).contiguous(), None


def hf_chai_model(cfg, reps: list[list[int]]):
    """A transformers causal LM (from `cfg`) reshaped to CHAI: reduced q/k projections per
    clustered layer and the "chai" attention implementation (registered on first use, with
    eager's additive masks)."""
    from transformers import AttentionInterface, AutoModelForCausalLM
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    from engine.model import ChaiLayout

    AttentionInterface.register("chai", hf_chai_attention)
    AttentionMaskInterface.register("chai", ALL_MASK_ATTENTION_FUNCTIONS["eager"])
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="chai").float()
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // nh
    bias = bool(getattr(cfg, "attention_bias", False)) or cfg.model_type == "qwen2"
    for layer, rep in zip(model.model.layers, reps):
        attn = layer.self_attn
        attn.chai_layout = ChaiLayout(rep or list(range(nh)), nh, nkv)
        if rep:
            attn.q_proj = torch.nn.Linear(cfg.hidden_size, len(attn.chai_layout.reps) * hd, bias=bias)
            attn.k_proj = torch.nn.Linear(cfg.hidden_size, len(attn.chai_layout.k_groups) * hd, bias=bias)
    return model


@dataclass
class ChaiStep(Step):
    samples: int = 4  # calibration sequences
    seq_len: int = 128  # tokens each
    layers: str = "all"  # layers to cluster ("all", "4-11", "2+5")
    max_clusters: int = 0  # cap on k (0 = n_heads)
    # The elbow alone merges heads whose maps still differ a lot on small models (SmolLM2:
    # ~30% of the spread discarded, perplexity 13 -> 59); these floors keep more clusters.
    min_clusters: int = 1  # at least this many clusters per layer
    max_residual: float = 0.0  # 0 = off; else the fewest clusters leaving <= this inertia share
    seed: int = 0
    stats: dict = field(default_factory=dict, repr=False)

    name = "chai"

    @torch.inference_mode()
    def apply(self, state, ctx):
        config = ctx["config"]
        if self.min_clusters < 1 or not 0 <= self.max_residual < 1:
            raise RecipeError("chai: min_clusters must be >= 1 and max_residual in [0, 1)")
        if config.get("chai_representatives"):
            raise RecipeError("chai: the model is already clustered")
        if any(naming.is_gptq_weight(k) or naming.is_scale(k) or naming.is_lowrank(k) or naming.is_adapter(k)
               for k in state):
            raise RecipeError("chai works on float weights: put it before int8/gptq/svd/eora and kept adapters")
        args = ModelArgs.from_hf_config(config)
        chosen = set(range(args.n_layers)) if self.layers == "all" else layer_set(self.layers)
        ids = torch.tensor(step_calibration_ids(ctx, self.samples, self.seq_len))
        model = build_model(args, {k: v.float() for k, v in state.items()}, max_len=ids.shape[1] + 1)
        x = model.embed(ids).float()
        reps: list[list[int]] = []
        curves = {}
        for layer, (block, (cos, sin, mask)) in enumerate(zip(model.layers, model.layer_inputs(0, ids.shape[1],
                                                                                                 ids.device))):
            if layer in chosen:
                probs = block.attn.head_probs(block.attn_norm(x), cos, sin, mask)  # (B, nh, T, T)
                feats = probs.transpose(0, 1).reshape(args.n_heads, -1).float()
                rep, inertia = cluster_heads(feats, self.max_clusters or None, self.seed, self.min_clusters,
                                             self.max_residual)
                curves[str(layer)] = [round(v, 4) for v in inertia]
                reps.append(rep if len(set(rep)) < args.n_heads else [])
            else:
                reps.append([])
            x = block(x, cos, sin, mask, None)
        state = dict(state)
        per = args.n_heads // args.n_kv_heads
        k_heads = 0
        for layer, rep in enumerate(reps):
            if not rep:
                k_heads += args.n_kv_heads
                continue
            keep_q = sorted(set(rep))
            keep_k = sorted({r // per for r in keep_q})
            k_heads += len(keep_k)
            hd = args.head_dim
            p = naming.layer_prefix(layer) + "self_attn."
            for proj, keep in (("q_proj", keep_q), ("k_proj", keep_k)):
                for kind in ("weight", "bias"):  # a Qwen2-style bias loses the same rows
                    if (key := f"{p}{proj}.{kind}") in state:
                        state[key] = torch.cat([state[key][h * hd:(h + 1) * hd] for h in keep])
        config["chai_representatives"] = reps
        ModelArgs.from_hf_config(config)  # validates the layout
        n_q = sum(len(set(r)) if r else args.n_heads for r in reps)
        self.stats = {"clusters": [len(set(r)) if r else args.n_heads for r in reps],
                      "query_heads_kept": f"{n_q}/{args.n_layers * args.n_heads}",
                      "key_cache_heads_kept": f"{k_heads}/{args.n_layers * args.n_kv_heads}",
                      "kv_cache_reduction": round(1 - (k_heads + args.n_layers * args.n_kv_heads)
                                                  / (2 * args.n_layers * args.n_kv_heads), 4),
                      "inertia": curves}
        return state


@dataclass
class ChaiQuantStep(Step):
    """CHAI-Quant: mixed precision by layer sensitivity. The `critical` fraction of layers
    (highest sensitivity) keeps its projections in 16-bit (bf16), the rest, and the embedding,
    go to int8 (W8A16). The engine runs int8 and bf16 layers side by side with bf16 activations."""
    critical: float = 0.3  # fraction of layers kept at 16-bit
    metric: str = "perturb"  # perturb, attention or clusters (compress/sensitivity.py)
    samples: int = 4
    seq_len: int = 256
    stats: dict = field(default_factory=dict, repr=False)

    name = "chai-quant"

    def apply(self, state, ctx):
        if any(naming.is_scale(k) or naming.is_gptq_weight(k) or naming.is_lowrank(k) for k in state):
            raise RecipeError("chai-quant quantizes float weights: it replaces int8/gptq, not follows them")
        scores = layer_sensitivity(state, ctx, self.metric, self.samples, self.seq_len)
        keep = set(select_layers(scores, self.critical, "high"))

        def critical(name: str) -> bool:
            return naming.layer_index(name) in keep
        out = quantize_int8(state, ctx, skip=critical)
        for k, v in state.items():  # the critical layers' projections: 16-bit
            if critical(k) and naming.is_quantizable(k, v):
                out[k] = v.to(torch.bfloat16)
        before = sum(v.numel() * (2 if v.is_floating_point() else v.element_size()) for v in state.values())
        after = sum(v.numel() * v.element_size() for v in out.values())  # vs all-16-bit above
        ctx["int8_kernel"] = "weight_only"
        self.stats = {"critical_layers": sorted(keep), "metric": self.metric,
                      "scores": [round(s, 6) for s in scores],
                      "bytes_all_16bit": before, "bytes_mixed": after,
                      "memory_reduction_vs_16bit": round(1 - after / before, 4)}
        return out
