"""A memory model's tokenizer when it was initialised from a large model: that model's own
Hugging Face tokenizer (`tokenizer.json`), with the three control tokens appended as special
tokens. Sharing the large model's vocabulary is the point: the memory model starts from the
large model's embeddings, and reads and writes text the large model tokenizes the same way.

Which ids are BOS / EOS / padding is not in tokenizer.json; the checkpoint config carries
them (from the artifact's tokenizer_config.json at import), so loading takes them as arguments.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tokenizers import AddedToken
from tokenizers import Tokenizer as _HF

from .tokenizer import CONTROL, Framed


class HFTokenizer(Framed):
    FILE = "tokenizer.json"

    def __init__(self, tk: _HF, bos_id: int, eos_id: int, pad_id: int):
        ids = [tk.token_to_id(s) for s in CONTROL]
        if any(i is None for i in ids):
            raise ValueError(f"tokenizer lacks the control tokens {CONTROL}: not a memory-model tokenizer")
        self.tk = tk
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.prompt_id, self.cot_id, self.condensed_id = ids

    @classmethod
    def load(cls, path: str | Path, bos_id: int, eos_id: int, pad_id: int) -> "HFTokenizer":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer {path} not found")
        return cls(_HF.from_file(str(path)), bos_id, eos_id, pad_id)

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> "HFTokenizer":
        """The large model's tokenizer plus the control tokens (appended after its vocabulary).
        BOS / EOS come from its tokenizer_config.json: an instruct model's end-of-turn token is
        EOS, which it already emits after a reply; no BOS falls back to EOS as the start token."""
        d = Path(model_dir)
        if not (d / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{d} has no tokenizer.json: need a Hugging Face tokenizer to share")
        tk = _HF.from_file(str(d / "tokenizer.json"))
        conf = json.loads((d / "tokenizer_config.json").read_text()) if (d / "tokenizer_config.json").is_file() else {}
        eos = _token_id(tk, conf.get("eos_token"))
        if eos is None:
            raise ValueError(f"{d}: tokenizer_config.json names no EOS token in the vocabulary")
        bos = _token_id(tk, conf.get("bos_token"))
        pad = _token_id(tk, conf.get("pad_token"))
        tk.add_special_tokens([AddedToken(c, special=True, normalized=False) for c in CONTROL])
        return cls(tk, eos if bos is None else bos, eos, eos if pad is None else pad)

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tk.decode(ids, skip_special_tokens=True)

    def save(self, directory: Path) -> None:
        out = Path(directory) / self.FILE
        tmp = out.with_name(out.name + ".tmp")
        self.tk.save(str(tmp))
        os.replace(tmp, out)


def _token_id(tk: _HF, token) -> int | None:
    if isinstance(token, dict):  # {"content": "<|im_end|>", ...} in older configs
        token = token.get("content")
    return tk.token_to_id(token) if token else None
