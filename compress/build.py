"""`python -m compress build`: source model -> recipe steps -> artifact directory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from engine import naming
from engine.config import ModelArgs

from .artifact import ADAPTER_WEIGHTS, WEIGHTS, split_adapter, write_artifact, write_peft_adapter
from .recipes import parse_recipe

# Files copied from the source directory besides the weights (tokenizer, configs).
_SKIP = {"source.json", "model.safetensors.index.json"}


def load_hf_dir(model_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config dict, state dict) from an HF directory of safetensors shards."""
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json: not a Hugging Face model directory")
    shards = sorted(model_dir.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"{model_dir} has no .safetensors weights (pickled .bin weights are refused)")
    state: dict[str, torch.Tensor] = {}
    for shard in tqdm(shards, desc="loading weights", disable=len(shards) == 1):
        state.update(load_file(str(shard)))
    config = json.loads(config_path.read_text())
    if config.get("model_type") == "phi3":  # fused qkv / gate_up -> Llama's names (engine.naming)
        heads = config["num_attention_heads"]
        hd = config.get("head_dim") or config["hidden_size"] // heads
        state = naming.split_fused(state, heads * hd, (config.get("num_key_value_heads") or heads) * hd)
    return config, state


def build(model_dir: Path, out: Path, recipe: str, source: dict, force: bool = False, progress: bool = True,
          extra: dict | None = None) -> dict:
    steps = parse_recipe(recipe)
    config, state = load_hf_dir(model_dir)
    args = ModelArgs.from_hf_config(config)  # refuses architectures the engine cannot serve
    if args.tie_embeddings:
        state.pop(naming.LM_HEAD, None)
    source_params = sum(t.numel() for t in state.values())
    ctx: dict = {"dtype": "float32", "int8_kernel": None, "config": config, "model_dir": model_dir,
                 "progress": progress}
    if config.get("model_type") == "phi3":
        ctx["hf_blocker"] = "Phi-3's qkv_proj / gate_up_proj are stored split into Llama's names (engine only)"
    for step in steps:
        state = step.apply(state, ctx)
    n_params = stored_params(state)
    lowrank = any(k.endswith(naming.LR_A) for k in state)
    float_dtype = ctx.get("float_dtype") or (ctx["dtype"] if ctx["dtype"] in ("float16", "bfloat16") else "float32")
    config = {**config, "dtype": float_dtype, "torch_dtype": float_dtype}
    base, adapter = split_adapter(state)
    int8 = any(naming.is_int8_scale(k) for k in base)
    gptq = any(naming.is_gptq_weight(k) for k in base)

    def fill(tmp: Path) -> dict:
        save_file({k: v.contiguous() for k, v in base.items()}, str(tmp / WEIGHTS), metadata={"format": "pt"})
        if adapter:
            write_peft_adapter(tmp, adapter, float_dtype)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        for f in model_dir.iterdir():
            if f.is_file() and f.suffix != ".safetensors" and f.name not in _SKIP and f.name != "config.json":
                shutil.copy2(f, tmp / f.name)
        return {
            "name": out.name,
            "source": source,
            "arch": args.arch,
            "model_type": config.get("model_type"),
            "recipe": recipe,
            "steps": [s.record() for s in steps],
            "dtype": ctx["dtype"],
            "int8_kernel": ctx["int8_kernel"],
            # plain transformers reads float and GPTQ weights (GPTQ through optimum + gptqmodel);
            # int8 rows and SVD factors are this engine's own formats
            "hf_loadable": not int8 and not lowrank and not config.get("chai_representatives")
            and not ctx.get("hf_blocker"),
            **({"hf_blocker": ctx["hf_blocker"]} if ctx.get("hf_blocker") else {}),
            **({"hf_requires": ["optimum", "gptqmodel"]} if gptq and not ctx.get("hf_blocker") else {}),
            **({"adapter": {"file": ADAPTER_WEIGHTS, "modules": len(adapter) // 2,
                            "params": sum(t.numel() for t in adapter.values())}} if adapter else {}),
            "n_params": n_params,
            "source_n_params": source_params,
            "chat_template": _has_chat_template(model_dir),
            "eval": {},
            **(extra or {}),
        }

    return write_artifact(out, fill, force=force)


def _has_chat_template(model_dir: Path) -> bool:
    if (model_dir / "chat_template.jinja").is_file():
        return True
    cfg = model_dir / "tokenizer_config.json"
    return cfg.is_file() and bool(json.loads(cfg.read_text()).get("chat_template"))


def stored_params(state: dict[str, torch.Tensor]) -> int:
    """Parameters as stored: int8 scales and GPTQ zero points/scales/group indices are
    bookkeeping, a GPTQ qweight holds 32/bits weights per int32; pruned zeros still count
    (they are stored densely)."""
    n = 0
    for k, t in state.items():
        if naming.is_bookkeeping(k):
            continue
        if naming.is_gptq_weight(k):
            n += t.shape[1] * state[naming.gptq_name(naming.gptq_module(k), "g_idx")].numel()
        else:
            n += t.numel()
    return n
