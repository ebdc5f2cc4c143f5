"""The memory model's tokenizers: its own sentencepiece model (from-scratch presets) or, for a
memory model initialised from a large model, that model's Hugging Face tokenizer
(`hf_tokenizer.HFTokenizer`). Both frame the task the same way (`Framed`).

The sentencepiece model: BPE with byte fallback (any text encodes, nothing maps to <unk>), digits split one per
token (arithmetic copies digit by digit instead of memorising numbers), identity
normalisation (the condensed prompt is re-read by another model: text must round-trip),
and three control tokens that frame the memory model's task:

    <bos> <|prompt|> P_current <|cot|> new chain-of-thought <|condensed|> refined prompt <eos>
"""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

PROMPT, COT, CONDENSED = "<|prompt|>", "<|cot|>", "<|condensed|>"
CONTROL = [PROMPT, COT, CONDENSED]


def train_tokenizer(texts: Iterable[str], out: Path, vocab_size: int = 8192,
                    seed_sentence_limit: int = 2_000_000) -> Path:
    """Train on `texts` (documents; long ones are split into lines) and write `out` atomically."""
    def sentences():
        for doc in texts:
            for line in doc.splitlines():
                line = line.strip()
                if line:
                    yield line[:4096]

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=sentences(), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        pad_id=0, unk_id=1, bos_id=2, eos_id=3, user_defined_symbols=CONTROL,
        input_sentence_size=seed_sentence_limit, shuffle_input_sentence=True,
        character_coverage=1.0, num_threads=os.cpu_count() or 1, minloglevel=2)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, out)
    return out


class Framed:
    """The condense framing both tokenizers share. Subclasses set the special ids and
    implement encode / decode / save."""

    FILE = ""  # the file name a checkpoint stores it under
    pad_id: int
    bos_id: int
    eos_id: int
    prompt_id: int
    cot_id: int
    condensed_id: int

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def save(self, directory: Path) -> None:
        raise NotImplementedError

    def condense_input(self, prompt: str, cot: str, max_prompt: int, max_cot: int) -> list[int]:
        """Policy input. Over-long parts are cut from the middle of the prompt (its start states
        the task, its end the question) and from the start of the chain-of-thought (its
        latest steps matter most)."""
        p, c = self.encode(prompt), self.encode(cot)
        if len(p) > max_prompt:
            half = max_prompt // 2
            p = p[:half] + p[len(p) - (max_prompt - half):]
        if len(c) > max_cot:
            c = c[len(c) - max_cot:]
        return [self.bos_id, self.prompt_id, *p, self.cot_id, *c, self.condensed_id]


class Tokenizer(Framed):
    FILE = "tokenizer.model"

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer model {path} not found")
        self.path = path
        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        self.pad_id, self.bos_id, self.eos_id = self.sp.pad_id(), self.sp.bos_id(), self.sp.eos_id()
        ids = [self.sp.piece_to_id(s) for s in CONTROL]
        if any(i == self.sp.unk_id() for i in ids):
            raise ValueError(f"{path} lacks the control tokens {CONTROL}: not a memory-model tokenizer")
        self.prompt_id, self.cot_id, self.condensed_id = ids

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        specials = {self.pad_id, self.bos_id, self.eos_id, self.prompt_id, self.cot_id, self.condensed_id}
        return self.sp.decode([i for i in ids if i not in specials])

    def save(self, directory: Path) -> None:
        shutil.copy2(self.path, Path(directory) / self.FILE)
