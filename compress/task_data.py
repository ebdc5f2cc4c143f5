"""Supervised examples for task fine-tuning (`lora(data=svamp-train)`): each problem's
chain-of-thought target (tasks.cot) as the reply to the CoT prompt the hybrid loop and the
evaluation send, formatted by the served chat template (engine.runner.encode_reply), with
the loss on the reply only. `chat-replay` adds general chat prompts (tasks.chat_prompts)
answered by the model itself before tuning, so that task-tuning does not overwrite how it
answers everything else. `svamp-continue` teaches the hybrid loop's later loops: each
SVAMP-train problem with its first steps known, in the memory model's condensed format
(tasks.cot.continuation_targets), the rest of the reasoning as the reply; `svamp-steps` is the
part of it whose reply still has a step to write (most SVAMP problems take one step, so in
`svamp-continue` "answer now" outnumbers "go on" about 4.5 to 1; naming `svamp-steps` again
weighs them back). Parts combine with '+' (`data=svamp-train+chat-replay`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.runner import encode_reply
from tasks.chat_prompts import chat_prompts
from tasks.cot import ANSWER_PREFIX, continuation_targets, cot_prompt, cot_target
from tasks.data import DataError, load

TASKS = ("svamp-train", "svamp-continue", "svamp-steps", "chat-replay")  # training data only: svamp-dev and GSM8K are never trained on


@dataclass
class Example:
    ids: list[int]  # prompt + reply
    n_prompt: int  # loss starts after these


def task_examples(tokenizer, name: str, reply: Callable[[list[str]], list[str | None]] | None = None
                  ) -> tuple[list[Example], int]:
    """(examples, rows skipped: equations that disagree with their answer, or replay replies
    with no complete sentence). `reply` answers chat prompts with the model as it is now."""
    out, skipped = [], 0
    for part in name.split("+"):
        if part not in TASKS:
            raise DataError(f"task data {part!r} cannot be trained on; use one of {', '.join(TASKS)}")
        if part == "chat-replay":
            rows, bad = _replay(tokenizer, reply)
        else:
            rows, bad = _svamp(tokenizer, part)
        out, skipped = out + rows, skipped + bad
    return out, skipped


def _svamp(tokenizer, part: str) -> tuple[list[Example], int]:
    out, skipped = [], 0
    for p in load("svamp-train"):
        try:
            pairs = (continuation_targets(p.question, p.equation, p.answer) if part != "svamp-train"
                     else [(p.question, cot_target(p.equation, p.answer))])
        except ValueError:
            skipped += 1
            continue
        if part == "svamp-steps":
            pairs = [(q, reply) for q, reply in pairs if not reply.startswith(ANSWER_PREFIX)]
        for question, target in pairs:
            prompt, reply = encode_reply(tokenizer, [{"role": "user", "content": cot_prompt(question)}], target)
            out.append(Example(prompt + reply, len(prompt)))
    return out, skipped


def _replay(tokenizer, reply) -> tuple[list[Example], int]:
    if reply is None:
        raise DataError("chat-replay needs the model's own replies (only the lora step can make them)")
    prompts = chat_prompts()
    out, skipped = [], 0
    for question, answer in zip(prompts, reply(prompts)):
        if not answer:
            skipped += 1
            continue
        prompt, ids = encode_reply(tokenizer, [{"role": "user", "content": question}], answer)
        out.append(Example(prompt + ids, len(prompt)))
    return out, skipped


def whole_sentences(text: str) -> str | None:
    """The text up to its last full sentence (a reply cut by the token budget must not teach
    the model to stop mid-sentence); None if there is none."""
    end = max(text.rfind(c) for c in ".!?")
    return text[:end + 1].strip() if end > 0 else None


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
