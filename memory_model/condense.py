"""Inference with a trained memory model: (current prompt, new chain-of-thought) -> a
condensed, refined prompt. Used by REINFORCE (sampling several candidates), the
evaluation script, and the server's hybrid loop."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.generate import SamplingParams, generate
from engine.quant import quantize_linears

from .checkpoint import load_checkpoint


@dataclass
class Condensation:
    text: str
    token_ids: list[int]  # generated ids, EOS included when the model stopped by itself
    input_tokens: int
    stopped: bool  # wrote EOS before the token budget ran out


class MemoryModel:
    """A loaded checkpoint with its tokenizer and input limits."""

    QUANT = ("none", "int8")

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", max_prompt: int = 160,
                 max_cot: int = 320, quant: str = "none"):
        if quant not in self.QUANT:  # before loading: a typo costs no checkpoint read
            raise ValueError(f"memory-model quantization {quant!r}: choose from {', '.join(self.QUANT)}")
        self.path = Path(path)
        self.model, self.cfg, self.tok, self.meta = load_checkpoint(path, device)
        if quant == "int8":  # W8A16 for serving: condensing reads the weights once per step
            quantize_linears(self.model)
        self.max_prompt, self.max_cot = max_prompt, max_cot
        if max_prompt + max_cot + 3 >= self.cfg.max_len:
            raise ValueError(f"max_prompt + max_cot must leave room in the model's {self.cfg.max_len} positions")

    @property
    def name(self) -> str:
        return self.path.name

    def input_ids(self, prompt: str, cot: str) -> list[int]:
        return self.tok.condense_input(prompt, cot, self.max_prompt, self.max_cot)

    def budget(self, input_ids: list[int], max_new: int) -> int:
        """Tokens the model may write after this input: max_new, capped by its positions."""
        return max(1, min(max_new, self.cfg.max_len - len(input_ids)))

    def sample(self, prompt: str, cot: str, n: int = 1, max_new: int = 100, temperature: float = 0.0,
               top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
               cancel: threading.Event | None = None) -> list[Condensation]:
        """n condensations of one input (its prefix is prefilled once and shared)."""
        ids = self.input_ids(prompt, cot)
        max_new = self.budget(ids, max_new)
        params = SamplingParams(max_tokens=max_new, temperature=temperature, top_k=top_k, top_p=top_p,
                                seed=seed, n=n)
        outs: list[list[int]] = [[] for _ in range(n)]
        stopped = [False] * n
        for step in generate(self.model, ids, params, {self.cfg.eos_id}, cancel=cancel):
            for i in range(n):
                if step.active[i]:
                    outs[i].append(step.tokens[i])
                    stopped[i] = stopped[i] or step.eos[i]
        return [Condensation(self.tok.decode(o).strip(), o, len(ids), s) for o, s in zip(outs, stopped)]

    def condense(self, prompt: str, cot: str, max_new: int = 100, **kw) -> Condensation:
        return self.sample(prompt, cot, n=1, max_new=max_new, **kw)[0]
