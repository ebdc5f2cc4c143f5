"""Supervised examples for task fine-tuning (`lora(data=svamp-train)`): each problem's
chain-of-thought target (tasks.cot) as the reply to the CoT prompt the hybrid loop and the
evaluation send, formatted by the served chat template (engine.runner.encode_reply), with
the loss on the reply only."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.runner import encode_reply
from tasks.cot import cot_prompt, cot_target
from tasks.data import DataError, load

TASKS = ("svamp-train",)  # training splits only: svamp-dev and GSM8K are never trained on


@dataclass
class Example:
    ids: list[int]  # prompt + reply
    n_prompt: int  # loss starts after these


def task_examples(tokenizer, name: str) -> tuple[list[Example], int]:
    """(examples, rows skipped because their equation disagrees with their answer)."""
    if name not in TASKS:
        raise DataError(f"task data {name!r} cannot be trained on; use one of {', '.join(TASKS)}")
    out, skipped = [], 0
    for p in load(name):
        try:
            target = cot_target(p.equation, p.answer)
        except ValueError:
            skipped += 1
            continue
        prompt, reply = encode_reply(tokenizer, [{"role": "user", "content": cot_prompt(p.question)}], target)
        out.append(Example(prompt + reply, len(prompt)))
    return out, skipped


def collate(batch: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input ids, attention mask, labels) right-padded; labels are -100 on prompts and padding."""
    width = max(len(e.ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.ids)
        ids[i, :n] = torch.tensor(e.ids)
        mask[i, :n] = 1
        labels[i, e.n_prompt:n] = ids[i, e.n_prompt:n]
    return ids, mask, labels
