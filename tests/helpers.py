"""Test builders (not fixtures): tiny random models and tokenizers made in-process (nothing is
downloaded), and artifacts built by the real `compress` code. conftest.py wraps them in
fixtures; tests that need a variant call them directly."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France. Berlin is the capital of Germany.",
    "Unicode: héllo wörld, naïve café, 你好世界, emoji 🙂 and more.",
    "def add(a, b):\n    return a + b\n",
    "One two three four five six seven eight nine ten.",
] * 20


def make_tokenizer(chat_template: str | None = CHATML, add_bos: bool = False):
    """A byte-level BPE trained on a few sentences: tiny, but round-trips any UTF-8."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<bos>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS, trainer)
    if add_bos:
        bos_id = tok.token_to_id("<bos>")
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", bos_id)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<bos>",
                                   pad_token="<|endoftext|>")
    if chat_template:
        fast.chat_template = chat_template
    return fast


def save_tiny_llama(path: Path, seed: int = 0, tie: bool = True, n_layers: int = 2) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=n_layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      tie_word_embeddings=tie, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # larger-than-default weights give peaky, non-degenerate distributions
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.5)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def save_tiny_gemma3(path: Path, seed: int = 0, sliding_window: int = 4, layer_types: list[str] | None = None
                     ) -> Path:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    tok = make_tokenizer(chat_template=None, add_bos=True)
    torch.manual_seed(seed)
    layer_types = layer_types or ["sliding_attention", "sliding_attention", "full_attention"]
    cfg = Gemma3TextConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                           num_hidden_layers=len(layer_types),
                           num_attention_heads=4, num_key_value_heads=1, head_dim=32, max_position_embeddings=256,
                           sliding_window=sliding_window, layer_types=layer_types,
                           query_pre_attn_scalar=32, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id)
    model = Gemma3ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.5 if p.dim() == 2 else 0.1)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def build_artifact(model_dir: Path, out: Path, recipe: str = "none") -> Path:
    from compress.build import build

    build(model_dir, out, recipe, {"model_dir": str(model_dir)})
    return out


def make_mm_tokenizer(path: Path, vocab: int = 400) -> Path:
    """A small memory-model sentencepiece tokenizer trained on generated problems."""
    from memory_model.data import problem_texts
    from memory_model.tokenizer import train_tokenizer

    return train_tokenizer(problem_texts(300), path, vocab_size=vocab)


def save_tiny_memory_model(path: Path, tokenizer: Path, seed: int = 0) -> Path:
    from memory_model.checkpoint import save_checkpoint
    from memory_model.model import build_model, from_preset
    from memory_model.tokenizer import Tokenizer

    tok = Tokenizer(tokenizer)
    cfg = from_preset("mm-tiny", vocab_size=tok.vocab_size, pad_id=tok.pad_id, bos_id=tok.bos_id,
                      eos_id=tok.eos_id)
    save_checkpoint(path, build_model(cfg, seed=seed), cfg, tok, {"stage": "random", "preset": "mm-tiny"})
    return path


def tiny_chai_model(model_dir: Path, max_len: int):
    """The tiny Llama as an engine model with a CHAI layout: query heads 0 and 1 represent all
    four, both reading key group 0 (only their query rows and that group's key rows are kept)."""
    from dataclasses import replace

    from compress.build import load_hf_dir
    from engine.config import ModelArgs
    from engine.loader import build_model

    config, state = load_hf_dir(model_dir)
    args = ModelArgs.from_hf_config(config)
    hd, st = args.head_dim, dict(state)
    for layer in range(args.n_layers):
        a = f"model.layers.{layer}.self_attn."
        st[a + "q_proj.weight"] = state[a + "q_proj.weight"][:2 * hd]
        st[a + "k_proj.weight"] = state[a + "k_proj.weight"][:hd]
    return build_model(replace(args, chai=[[0, 1, 0, 0]] * args.n_layers), st, max_len=max_len)


@contextmanager
def torch_threads(n: int):
    """Run with n intra-op threads, restoring the previous count."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
