"""Calibration: run text through the model and accumulate per-projection input statistics.

Forward hooks on the engine's projections feed a running accumulator (wanda's
`add_batch` idea): for each projection the Gram matrix G = Σ xᵀx of its inputs, from
which layer-local reconstruction losses ‖(W − W')X‖² = tr((W − W') G (W − W')ᵀ) follow
exactly. Projections that share an input in the engine (q/k/v; gate/up) share one G.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from engine.config import ModelArgs
from engine.loader import build_model, fused_module_of
from engine.quant import dequantize_state

from .step import RecipeError


@dataclass
class CalibConfig:
    samples: int = 16  # sequences
    seq_len: int = 256  # tokens per sequence


def calibration_ids(tokenizer, cfg: CalibConfig) -> list[list[int]]:
    """Consecutive windows of the calibration split (disjoint from the eval split)."""
    from .data import calibration_text

    return _windows(tokenizer(calibration_text(), add_special_tokens=False)["input_ids"], cfg, "calibration text")


def _windows(ids: list[int], cfg: CalibConfig, source: str) -> list[list[int]]:
    """cfg.samples consecutive windows of cfg.seq_len tokens from the start of ids."""
    need = cfg.samples * cfg.seq_len
    if len(ids) < need:
        raise ValueError(f"{source}: {len(ids)} calibration tokens, {need} requested")
    return [ids[i * cfg.seq_len:(i + 1) * cfg.seq_len] for i in range(cfg.samples)]


def engine_module_for(hf_name: str) -> str:
    """'model.layers.3.mlp.up_proj.weight' -> 'layers.3.mlp.w13' (projections fused there share its input)."""
    return fused_module_of(hf_name)[0]


@torch.inference_mode()
def collect_grams(config: dict, state: dict[str, torch.Tensor], batches: list[list[int]],
                  hf_names: list[str], progress: bool = True, stat: str = "gram") -> dict[str, torch.Tensor]:
    """Per named projection (keyed by HF weight name), a statistic of its calibration inputs:
    stat="gram": G = Σ xᵀx (in, in); stat="absmax": max |x_j| per input channel (in,)."""
    # Calibrate the model as it stands at this point of the recipe (int8 weights included).
    float_state = dequantize_state(state)
    model = build_model(ModelArgs.from_hf_config(config), float_state, max_len=max(len(b) for b in batches) + 1)
    wanted = {engine_module_for(n) for n in hf_names}
    grams: dict[str, torch.Tensor] = {}
    hooks = []
    for path, module in model.named_modules():
        if path in wanted:
            def hook(mod, inputs, output, path=path):
                x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()  # double: sums of many outer products
                if stat == "gram":
                    grams[path] = grams.get(path, 0) + x.T @ x
                else:
                    m = x.abs().amax(dim=0)
                    grams[path] = torch.maximum(grams[path], m) if path in grams else m
            hooks.append(module.register_forward_hook(hook))
    try:
        for ids in tqdm(batches, desc="calibration", disable=not progress):
            model(torch.tensor([ids]))
    finally:
        for h in hooks:
            h.remove()
    return {n: grams[engine_module_for(n)].float() for n in hf_names}


TEXT = "text"  # the held-in half of the pydoc topics (compress.data)
TASK_SOURCES = ("svamp-train",)  # chat-formatted task examples (compress.task_data): prompt + CoT reply


def check_calib(step: str, calib: str) -> None:
    """A recipe step's `calib=` value: 'text', a task, or parts joined by '+'."""
    known = (TEXT, *TASK_SOURCES)
    for part in calib.split("+"):
        if part not in known:
            raise RecipeError(f"{step}: calib part {part!r} is not one of {', '.join(known)} "
                              f"(join parts with '+')")


def task_calibration_ids(tokenizer, task: str, cfg: CalibConfig) -> list[list[int]]:
    """Windows of a task's chat-formatted examples, packed end to end in the split's order:
    the activations the served task prompts produce, not documentation prose."""
    from .task_data import task_examples

    return _windows([t for ex in task_examples(tokenizer, task)[0] for t in ex.ids], cfg, f"task {task}")


def step_calibration_ids(ctx: dict, samples: int, seq_len: int, calib: str = TEXT) -> list[list[int]]:
    """Calibration windows for a recipe step, tokenized with the source model's tokenizer.
    With parts ('text+svamp-train') the windows are split between them, the first part
    taking the remainder."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(ctx["model_dir"]))
    parts = calib.split("+")
    out: list[list[int]] = []
    for i, part in enumerate(parts):
        n = samples // len(parts) + (samples % len(parts) if i == 0 else 0)
        cfg = CalibConfig(samples=n, seq_len=seq_len)
        out += calibration_ids(tok, cfg) if part == TEXT else task_calibration_ids(tok, part, cfg)
    return out


def training_windows(ctx: dict, n: int, seq_len: int) -> list[list[int]]:
    """n training windows from the calibration split for a fine-tuning step (QAT, LoRA);
    where the split holds fewer, a quarter as many distinct windows, cycled by the caller."""
    try:
        return step_calibration_ids(ctx, n, seq_len)
    except ValueError:
        return step_calibration_ids(ctx, max(1, n // 4), seq_len)


def calibration_loss(model, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of an engine model on calibration windows ids (B, T)."""
    logits = model(ids[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


def calibration_stat(state: dict[str, torch.Tensor], ctx: dict, names: list[str], samples: int, seq_len: int,
                     stat: str = "gram", calib: str = TEXT) -> dict[str, torch.Tensor]:
    """`collect_grams` for a recipe step: the calibration split tokenized with the source
    model's tokenizer (ctx["model_dir"]), on the model as it stands (ctx["config"], state)."""
    batches = step_calibration_ids(ctx, samples, seq_len, calib)
    return collect_grams(ctx["config"], state, batches, names, progress=ctx.get("progress", True), stat=stat)
