"""A loaded artifact: engine model + tokenizer + prompt formatting."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

# Completion-style chat format for base models that ship no chat template (Gemma-3-270M
# base): chat-formatted prompts give such models garbage, a plain transcript does not.
PLAIN_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] in ['system', 'developer'] %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}User: {{ m['content'] }}\n"
    "{% else %}Assistant: {{ m['content'] }}\n{% endif %}"
    "{% endfor %}Assistant:"
)
PLAIN_STOPS = ["\nUser:"]  # the model would otherwise write the user's next turn


def encode_chat(tokenizer, messages: list[dict], **template_vars) -> tuple[list[int], list[str]]:
    """(prompt ids, implicit stop strings) of a chat turn, the assistant's turn opened:
    the tokenizer's own chat template (given `template_vars`, e.g. Qwen3's enable_thinking),
    else the plain transcript above."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **template_vars)
        # The template already writes BOS/special tokens where the model wants them.
        return tokenizer(text, add_special_tokens=False)["input_ids"], []
    text = tokenizer.apply_chat_template(messages, chat_template=PLAIN_TEMPLATE, add_generation_prompt=False,
                                         tokenize=False)
    return tokenizer(text, add_special_tokens=True)["input_ids"], list(PLAIN_STOPS)


def encode_reply(tokenizer, messages: list[dict], reply: str) -> tuple[list[int], list[int]]:
    """(prompt ids, reply ids) for teaching a model to answer `messages` with `reply`: the
    prompt exactly as `encode_chat` serves it, the reply ending the way the template ends an
    assistant turn (e.g. `<|im_end|>`), so training and serving see the same format."""
    prompt, _ = encode_chat(tokenizer, messages)
    if getattr(tokenizer, "chat_template", None):
        full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": reply}],
                                             add_generation_prompt=False, tokenize=False)
        ids = tokenizer(full, add_special_tokens=False)["input_ids"]
        if ids[:len(prompt)] == prompt and len(ids) > len(prompt):
            return prompt, ids[len(prompt):]
    # the plain transcript (or a template that re-renders the prompt differently): the reply, a
    # newline (the transcript's turn end) and EOS
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return prompt, tokenizer(" " + reply + "\n", add_special_tokens=False)["input_ids"] + eos


@dataclass
class LoadedModel:
    name: str
    path: Path
    model: torch.nn.Module
    tokenizer: object
    manifest: dict
    eos_ids: set[int]
    max_model_len: int
    # a per-request LoRA adapter of `model` this name serves (engine.adapters), or the base weights;
    # `with_adapter` makes such a view, sharing the model, tokenizer and batch
    adapter: str | None = None
    _grammar_tokenizer: object = field(default=None, repr=False)

    def with_adapter(self, name: str, adapter: str) -> LoadedModel:
        if adapter not in self.model.adapter_bank:
            raise ValueError(f"{self.name} has no adapter {adapter!r}")
        return replace(self, name=name, adapter=adapter)

    def compile_grammar(self, spec):
        """`engine.grammar.Grammar` for this model's tokenizer (GrammarError when invalid); the
        tokenizer's grammar view is built on first use (~0.5 s for 49k tokens) and kept."""
        from .grammar import compile_grammar, grammar_tokenizer
        if self._grammar_tokenizer is None:
            self._grammar_tokenizer = grammar_tokenizer(self.tokenizer, self.model.args.vocab_size, self.eos_ids)
        return compile_grammar(self._grammar_tokenizer, spec, self.model.args.vocab_size)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def encode_chat(self, messages: list[dict], **template_vars) -> tuple[list[int], list[str]]:
        """(prompt ids, implicit stop strings) for a chat request."""
        return encode_chat(self.tokenizer, messages, **template_vars)

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, list):
            bad = [t for t in prompt if not 0 <= t < self.model.args.vocab_size]
            if bad:
                raise ValueError(f"prompt token ids out of range [0, {self.model.args.vocab_size}): {bad[:5]}")
            return list(prompt)
        return self.tokenizer(prompt, add_special_tokens=True)["input_ids"]


def load_model(path: str | Path, name: str | None = None, max_model_len: int | None = None,
               verify: bool = True, adapters: dict[str, Path] | None = None) -> LoadedModel:
    """An artifact ready to serve; `adapters` (name -> PEFT LoRA directory) load beside its
    weights for requests that name them (`LoadedModel.with_adapter`)."""
    from transformers import AutoTokenizer

    from .artifact import load_engine_model

    path = Path(path)
    config = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
    native = config.get("max_position_embeddings", 2048)
    n_ctx = min(max_model_len or 4096, native)
    model, manifest = load_engine_model(path, max_len=n_ctx, check=verify, adapters=adapters)
    tok = AutoTokenizer.from_pretrained(str(path))
    eos = set(model.args.eos_token_ids)
    gen_cfg = path / "generation_config.json"
    if gen_cfg.is_file():
        e = json.loads(gen_cfg.read_text()).get("eos_token_id")
        eos |= {e} if isinstance(e, int) else set(e or [])
    if tok.eos_token_id is not None:
        eos.add(tok.eos_token_id)
    return LoadedModel(name=name or path.name, path=path, model=model, tokenizer=tok, manifest=manifest,
                       eos_ids=eos, max_model_len=n_ctx)
