"""Next-token training shared by `pretrain` (packed text) and `sft` (supervised condensation
pairs): AdamW, linear warm-up then cosine decay, gradient accumulation, gradient clipping,
periodic validation, checkpoints, exact resume (optimizer, step and data RNG restored),
tokens/s and loss on a progress bar and in the checkpoint's log.jsonl.

Runs unchanged on CPU and CUDA: bf16 autocast where the hardware has native bf16, else fp32.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from engine.hardware import autocast
from engine.model import Transformer

from .checkpoint import load_train_state, read_log, save_checkpoint
from .model import MemoryModelConfig, lm_loss
from .tokenizer import Framed

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class TrainConfig:
    steps: int = 2000  # optimizer steps
    batch_size: int = 16  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    seq_len: int = 256  # tokens per sequence (packed text)
    lr: float = 1e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup: int = 100  # linear warm-up steps
    weight_decay: float = 0.1  # on matrices only, not norms
    grad_clip: float = 1.0
    eval_every: int = 200
    eval_batches: int = 8
    save_every: int = 500
    log_every: int = 10
    precision: str = "auto"  # "auto" (bf16 autocast where the hardware runs it natively), "bf16", "fp32"
    seed: int = 0

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        frac = (step - self.warmup) / max(1, self.steps - self.warmup)
        cos = 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * cos)


def make_optimizer(model: Transformer, tc: TrainConfig) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    fused = next(model.parameters()).device.type == "cuda"
    return torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=tc.lr, betas=(0.9, 0.95),
                             eps=1e-8, fused=fused)


@torch.no_grad()
def evaluate_loss(model: Transformer, batches: list[Batch], precision: str = "auto") -> float:
    model.eval()
    dev = next(model.parameters()).device
    with autocast(dev, precision):
        losses = [lm_loss(model, x.to(dev), y.to(dev)).item() for x, y in batches]
    model.train()
    return sum(losses) / len(losses)


def train(model: Transformer, cfg: MemoryModelConfig, tok: Framed, tc: TrainConfig,
          next_batch: Callable[[torch.Generator], Batch], val_batches: list[Batch], out: Path, meta: dict,
          resume: bool = False, progress: bool = True) -> list[dict]:
    """Train in place; checkpoints go to `out`. Returns the log."""
    dev = next(model.parameters()).device
    opt = make_optimizer(model, tc)
    gen = torch.Generator().manual_seed(tc.seed)
    step, log, tokens_total = 0, [], 0
    state = load_train_state(out) if resume else None
    if resume and state is None:
        raise FileNotFoundError(f"--resume: {out} has no train_state.pt")
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["data_rng"])
        step, tokens_total = int(state["step"]), int(state["tokens"])
        log = read_log(out)
    meta = {**meta, "train_config": asdict(tc)}

    def save(final: bool = False) -> None:
        ts = {"optimizer": opt.state_dict(), "data_rng": gen.get_state(), "step": step, "tokens": tokens_total}
        save_checkpoint(out, model, cfg, tok, {**meta, "step": step, "tokens": tokens_total, "complete": final},
                        train_state=ts, log=log)

    model.train()
    bar = tqdm(total=tc.steps, initial=step, disable=not progress, unit="step", dynamic_ncols=True)
    t_last, tok_last = time.perf_counter(), tokens_total
    while step < tc.steps:
        lr = tc.lr_at(step)
        for g in opt.param_groups:
            g["lr"] = lr
        loss_sum = 0.0
        for _ in range(tc.grad_accum):
            x, y = next_batch(gen)
            x, y = x.to(dev), y.to(dev)
            with autocast(dev, tc.precision):
                loss = lm_loss(model, x, y) / tc.grad_accum
            loss.backward()
            loss_sum += loss.item()
            tokens_total += int((y != -100).sum())
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip).item()
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        if step % tc.log_every == 0 or step == tc.steps:
            now = time.perf_counter()
            tps = (tokens_total - tok_last) / max(now - t_last, 1e-9)
            t_last, tok_last = now, tokens_total
            rec = {"step": step, "loss": round(loss_sum, 4), "lr": lr, "grad_norm": round(gnorm, 3),
                   "tokens": tokens_total, "tok_per_s": round(tps, 1)}
            if val_batches and (step % tc.eval_every == 0 or step == tc.steps):
                rec["val_loss"] = round(evaluate_loss(model, val_batches, tc.precision), 4)
            log.append(rec)
            bar.set_postfix(loss=f"{loss_sum:.3f}", tok_s=f"{tps:.0f}",
                            **({"val": f"{rec['val_loss']:.3f}"} if "val_loss" in rec else {}))
        if step % tc.save_every == 0 and step < tc.steps:
            save()
    bar.close()
    save(final=True)
    return log
