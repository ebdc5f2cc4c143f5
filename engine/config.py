"""Architecture description of the decoder models the engine runs.

One dataclass covers Llama-style models (SmolLM2, Llama 3, Mistral, Qwen2, Qwen3, Phi-3) and
Gemma-3 text models: the differences are a handful of switches (norm offset, QK-norm,
sandwich norms, activation, per-layer sliding window and RoPE base, Llama 3 RoPE scaling);
projection biases (Qwen2's q/k/v) come with the weights. `from_hf_config` maps a Hugging Face
`config.json` dict onto it and refuses features the engine does not implement instead of
silently computing something else.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field


@dataclass
class ModelArgs:
    arch: str = "llama"  # "llama" or "gemma3": selects norm/activation conventions
    vocab_size: int = 32000
    dim: int = 512  # hidden size
    n_layers: int = 8
    n_heads: int = 8  # query heads
    n_kv_heads: int = 8  # key/value heads (GQA when < n_heads)
    head_dim: int = 64
    hidden_dim: int = 1376  # MLP intermediate size
    norm_eps: float = 1e-5
    rope_theta: list[float] = field(default_factory=list)  # per layer
    sliding_window: list[int | None] = field(default_factory=list)  # per layer, None = full attention
    max_position_embeddings: int = 2048
    tie_embeddings: bool = True
    # Gemma conventions; Llama defaults are the identity.
    embed_scale: float = 1.0  # Gemma multiplies embeddings by sqrt(dim)
    norm_offset: float = 0.0  # Gemma's RMSNorm scales by (1 + w)
    qk_norm: bool = False  # RMSNorm on each head's q and k before RoPE
    sandwich_norm: bool = False  # extra norms after attention and around the MLP
    activation: str = "silu"  # "silu" or "gelu_tanh"
    attn_scale: float | None = None  # None = head_dim ** -0.5
    # Llama 3 RoPE frequency scaling: {factor, low_freq_factor, high_freq_factor,
    # original_max_position_embeddings}; None = plain RoPE
    rope_scaling: dict | None = None
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    # CHAI clustered-head attention: per layer, the representative query head of each head
    # (empty list = plain attention in that layer). See model.ChaiLayout.
    chai: list[list[int]] = field(default_factory=list)

    def __post_init__(self):
        if not self.rope_theta:
            self.rope_theta = [10000.0] * self.n_layers
        if not self.sliding_window:
            self.sliding_window = [None] * self.n_layers
        if len(self.rope_theta) != self.n_layers or len(self.sliding_window) != self.n_layers:
            raise ValueError("rope_theta and sliding_window need one entry per layer")
        if self.n_heads % self.n_kv_heads:
            raise ValueError("n_heads must be a multiple of n_kv_heads")
        if self.attn_scale is None:
            self.attn_scale = self.head_dim**-0.5
        if self.chai and len(self.chai) != self.n_layers:
            raise ValueError("chai needs one entry per layer (an empty list for plain attention)")
        for reps in self.chai:
            if reps and (len(reps) != self.n_heads or any(reps[r] != r for r in reps)):
                raise ValueError("chai: each layer maps every query head to a representative that maps to itself")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "ModelArgs":
        """Translate a Hugging Face config.json dict; raise on unsupported features."""
        model_type = cfg.get("model_type")
        n_layers = cfg["num_hidden_layers"]
        n_heads = cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_heads
        eos = cfg.get("eos_token_id")
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        common = dict(
            vocab_size=cfg["vocab_size"],
            dim=cfg["hidden_size"],
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            head_dim=head_dim,
            hidden_dim=cfg["intermediate_size"],
            norm_eps=cfg["rms_norm_eps"],
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_embeddings=cfg.get("tie_word_embeddings", True),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            chai=[list(r) for r in cfg.get("chai_representatives") or []],
        )
        if model_type in LLAMA_LIKE:
            return cls(arch="llama", **_llama_like(cfg, model_type, n_layers), **common)
        if model_type in ("gemma3_text", "gemma3"):
            if cfg.get("attn_logit_softcapping") or cfg.get("final_logit_softcapping"):
                raise NotImplementedError("gemma3: logit soft-capping is not supported by the engine")
            layer_types = cfg.get("layer_types") or [
                "full_attention" if (i + 1) % cfg.get("sliding_window_pattern", 6) == 0 else "sliding_attention"
                for i in range(n_layers)
            ]
            rope_params = cfg["rope_parameters"]
            thetas = []
            for lt in layer_types:
                p = rope_params[lt]
                _require_default_rope(p, model_type)
                thetas.append(float(p["rope_theta"]))
            window = cfg.get("sliding_window")
            return cls(
                arch="gemma3",
                rope_theta=thetas,
                sliding_window=[window if lt == "sliding_attention" else None for lt in layer_types],
                embed_scale=math.sqrt(cfg["hidden_size"]),
                norm_offset=1.0,
                qk_norm=True,
                sandwich_norm=True,
                activation="gelu_tanh",
                attn_scale=cfg.get("query_pre_attn_scalar", head_dim) ** -0.5,
                **common,
            )
        raise NotImplementedError(f"model_type {model_type!r} is not supported (supported: "
                                  f"{', '.join(LLAMA_LIKE)}, gemma3_text)")


# Hugging Face model types that are Llama's block with switches (and their weight names, after
# naming.split_fused for Phi-3's fused projections)
LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "phi3")
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _llama_like(cfg: dict, model_type: str, n_layers: int) -> dict:
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope = {"rope_type": "default", "rope_theta": cfg.get("rope_theta", 10000.0), **rope}
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    scaling = None
    if rope_type == "llama3":
        scaling = {k: float(rope[k]) for k in LLAMA3_ROPE_KEYS}
    elif rope_type != "default":
        raise NotImplementedError(f"{model_type}: rope_type {rope_type!r} is not supported (default, llama3)")
    if cfg.get("partial_rotary_factor", 1.0) != 1.0:
        raise NotImplementedError(f"{model_type}: partial_rotary_factor {cfg['partial_rotary_factor']} is not "
                                  "supported (RoPE over the whole head only)")
    return dict(rope_theta=[float(rope["rope_theta"])] * n_layers, rope_scaling=scaling,
                sliding_window=_windows(cfg, model_type, n_layers), qk_norm=model_type == "qwen3")


def _windows(cfg: dict, model_type: str, n_layers: int) -> list[int | None]:
    """Per-layer sliding window: Mistral and Phi-3 window every layer when `sliding_window` is
    set; Qwen2/3 only with `use_sliding_window`, on the layers `layer_types` marks."""
    w = cfg.get("sliding_window")
    if model_type in ("qwen2", "qwen3"):
        if not cfg.get("use_sliding_window"):
            return [None] * n_layers
        types = cfg.get("layer_types") or []
        if len(types) != n_layers:
            raise NotImplementedError(f"{model_type}: use_sliding_window without layer_types is not supported")
        return [w if t == "sliding_attention" else None for t in types]
    if model_type == "llama" or not w:
        return [None] * n_layers
    return [int(w)] * n_layers


def _require_default_rope(rope: dict, model_type: str) -> None:
    if rope.get("rope_type", "default") != "default":
        raise NotImplementedError(f"{model_type}: rope_type {rope['rope_type']!r} is not supported")
