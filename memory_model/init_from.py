"""Initialise a memory model from a large model's float artifact (issue 16's route to a 70M
memory model on a CPU budget): SmolLM2-135M depth-pruned to 12 blocks by `compress`
(`depth(n=18)`) is imported as is, with the large model's tokenizer plus the three control
tokens, then fine-tuned on condensation (`sft`, `reinforce`) like any checkpoint.

Run:
    python -m compress build --model-dir artifacts/smollm2-135m-svamp-f32 \
        --recipe "depth(n=18,metric=ppl,protect_first=2,protect_last=1)" --out artifacts/smollm2-svamp-depth12-f32
    python -m memory_model init --artifact artifacts/smollm2-svamp-depth12-f32 --out checkpoints/mm-70m-init

The memory model is the engine's llama-style Transformer with tied embeddings; an artifact
whose shape differs in anything else (Gemma's norms, qk-norm, windows, untied head, int8 or
low-rank weights) is refused with the differences named, not approximated.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from engine import naming
from engine.artifact import load_state, verify
from engine.config import ModelArgs
from engine.loader import build_model as build_engine_model
from engine.model import Transformer

from .hf_tokenizer import HFTokenizer
from .model import MemoryModelConfig, build_model

# ModelArgs fields the memory model's config does not carry (ids, vocabulary, length: set apart)
_FREE = {"vocab_size", "max_position_embeddings", "bos_token_id", "eos_token_ids"}


def memory_config(args: ModelArgs, tok: HFTokenizer, max_len: int) -> MemoryModelConfig:
    """The memory-model config with the artifact's shape; ValueError naming what it cannot express."""
    cfg = MemoryModelConfig(vocab_size=tok.vocab_size, dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads,
                            n_kv_heads=args.n_kv_heads, hidden_dim=args.hidden_dim, max_len=max_len,
                            rope_theta=float(args.rope_theta[0]), norm_eps=args.norm_eps, pad_id=tok.pad_id,
                            bos_id=tok.bos_id, eos_id=tok.eos_id)
    want, got = asdict(args), asdict(cfg.to_model_args())
    diff = sorted(k for k in want if k not in _FREE and want[k] != got[k])
    if diff:
        raise ValueError("the memory model is a llama-style decoder with tied embeddings; this artifact differs in "
                         + ", ".join(f"{k}={want[k]!r}" for k in diff))
    return cfg


def float_state(artifact: Path) -> dict[str, torch.Tensor]:
    state = load_state(artifact)
    packed = sorted(k for k in state if not k.endswith(naming.WEIGHT) or naming.ADAPTER in k
                    or not state[k].is_floating_point())
    if packed:
        raise ValueError(f"{artifact}: needs a float artifact (no int8, low-rank, GPTQ or adapter tensors); "
                         f"found {packed[0]} and {len(packed) - 1} more")
    return state


def import_artifact(artifact: str | Path, max_len: int = 1024
                    ) -> tuple[Transformer, MemoryModelConfig, HFTokenizer, dict]:
    """(model, config, tokenizer, meta) of a memory model with the artifact's weights. The
    control tokens' embedding rows start at the mean embedding (no token's meaning in particular)."""
    artifact = Path(artifact)
    manifest = verify(artifact)
    args = ModelArgs.from_hf_config(json.loads((artifact / "config.json").read_text()))
    tok = HFTokenizer.from_model_dir(artifact)
    cfg = memory_config(args, tok, max_len)
    src = build_engine_model(args, float_state(artifact), torch.float32)
    params = {k: v.detach().clone() for k, v in src.named_parameters()}  # tied head listed once
    emb = params["tok_embeddings.weight"]
    extra = cfg.vocab_size - emb.shape[0]
    params["tok_embeddings.weight"] = torch.cat([emb, emb.mean(0, keepdim=True).expand(extra, -1)])
    model = build_model(cfg, seed=None)
    missing, unexpected = model.load_state_dict(params, strict=False)
    if set(missing) - {"output.weight"} or unexpected:
        raise ValueError(f"{artifact}: weights do not map onto the memory model (missing {missing}, "
                         f"unexpected {unexpected})")
    meta = {"stage": "init", "preset": f"import:{artifact.name}", "source_artifact": str(artifact),
            "source_recipe": manifest.get("recipe"),
            "source_weights_sha256": (manifest.get("files") or {}).get("model.safetensors")}
    return model.eval(), cfg, tok, meta
