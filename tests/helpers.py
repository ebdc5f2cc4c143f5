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


# GGUF architecture name and gguf-package enum for the HF model types the tests write as GGUF;
# llama.cpp's converter permutes Llama's q/k rows (for its RoPE layout), transformers undoes it.
GGUF_WRITE = {"llama": ("llama", "LLAMA", True), "qwen2": ("qwen2", "QWEN2", False),
              "qwen3": ("qwen3", "QWEN3", False), "phi3": ("phi3", "PHI3", False)}


def _llama_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(hf_dir: Path, out: Path) -> Path:
    """An HF directory (tiny model + byte-level BPE tokenizer) as an f32 GGUF file, written with
    the gguf package the way llama.cpp's converter names and lays out the tensors."""
    import json

    import gguf
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    cfg = json.loads((hf_dir / "config.json").read_text())
    arch, enum, permute = GGUF_WRITE[cfg["model_type"]]
    n_layers, n_head = cfg["num_hidden_layers"], cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads") or n_head
    w = gguf.GGUFWriter(str(out), arch)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(n_layers)
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    rope = cfg.get("rope_parameters") or {}
    w.add_rope_freq_base(float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))))
    if cfg.get("sliding_window"):
        w.add_sliding_window(cfg["sliding_window"])
    if cfg.get("head_dim"):
        w.add_key_length(cfg["head_dim"])
        w.add_value_length(cfg["head_dim"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    model = json.loads(tok.backend_tokenizer.to_str())["model"]
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    special = set(tok.all_special_ids)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for _, i in vocab])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model["merges"]])
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    if tok.chat_template:
        w.add_chat_template(tok.chat_template)
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, enum), n_layers)
    for name, t in load_file(str(hf_dir / "model.safetensors")).items():
        base, suffix = name.rsplit(".", 1)
        if permute and base.endswith("q_proj"):
            t = _llama_permute(t, n_head)
        elif permute and base.endswith("k_proj"):
            t = _llama_permute(t, n_kv)
        w.add_tensor(f"{names.get_name(base)}.{suffix}", t.float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def int8_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every matrix of an HF state dict as per-channel int8 (`name` + `name_scale`), the rest as is."""
    from engine.quant import quantize_per_channel

    out = {}
    for k, v in state.items():
        if v.dim() == 2:
            out[k], out[k + "_scale"] = quantize_per_channel(v)
        else:
            out[k] = v
    return out


def save_peft_adapter(model_dir: Path, out: Path, seed: int, **lora) -> torch.nn.Module:
    """A PEFT LoRA adapter with random (non-zero) B saved to `out`; returns the PeftModel."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"],
                        "lora_dropout": 0.0, **lora})
    model = get_peft_model(base, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model.save_pretrained(out)
    return model.eval()
