"""Memory-model checkpoints: a directory written atomically.

    model.safetensors   weights (engine names; the tied output head is not stored twice)
    config.json         {"format": "memory-model/1", "model": MemoryModelConfig, "stage", "step", ...}
    tokenizer.model     the sentencepiece model it was trained with, or
    tokenizer.json      the large model's tokenizer plus control tokens (imported memory models)
    train_state.pt      optimizer + RNG state for --resume (tensors only, loaded weights_only)
    log.jsonl           the training log, one JSON object per logged step

A new checkpoint is written to a temporary sibling and swapped in with renames, so an
interrupted save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from engine.model import Transformer

from .model import MemoryModelConfig, build_model
from .hf_tokenizer import HFTokenizer
from .tokenizer import Framed, Tokenizer

FORMAT = "memory-model/1"


def save_checkpoint(out: Path, model: Transformer, cfg: MemoryModelConfig, tokenizer: Framed, meta: dict,
                    train_state: dict | None = None, log: list[dict] | None = None) -> None:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    state = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items() if k != "output.weight"}
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    meta = {k: v for k, v in meta.items() if k not in ("format", "model")}
    (tmp / "config.json").write_text(json.dumps({"format": FORMAT, "model": cfg.to_dict(), **meta}, indent=2))
    tokenizer.save(tmp)
    if train_state is not None:
        torch.save(train_state, tmp / "train_state.pt")
    if log is not None:
        (tmp / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    old = out.with_name(f".{out.name}.old-{int(time.time())}")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def read_config(path: Path) -> dict:
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path} is not a memory-model checkpoint (no config.json)")
    meta = json.loads(cfg_file.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu"
                    ) -> tuple[Transformer, MemoryModelConfig, Framed, dict]:
    path = Path(path)
    meta = read_config(path)
    cfg = MemoryModelConfig.from_dict(meta["model"])
    tok = load_tokenizer(path, cfg)
    if tok.vocab_size != cfg.vocab_size:
        raise ValueError(f"{path}: tokenizer has {tok.vocab_size} tokens, model expects {cfg.vocab_size}")
    model = build_model(cfg, seed=None)
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found")
    missing, unexpected = model.load_state_dict(load_file(str(weights)), strict=False)
    if set(missing) - {"output.weight"} or unexpected:
        raise ValueError(f"{path}: weights do not match the config (missing {missing}, unexpected {unexpected})")
    return model.to(device).eval(), cfg, tok, meta


def tokenizer_file(path: Path) -> str:
    """Which tokenizer a checkpoint holds: an imported model's tokenizer.json, else its own
    sentencepiece model."""
    return HFTokenizer.FILE if (path / HFTokenizer.FILE).is_file() else Tokenizer.FILE


def load_tokenizer(path: Path, cfg: MemoryModelConfig) -> Framed:
    if tokenizer_file(path) == HFTokenizer.FILE:
        return HFTokenizer.load(path / HFTokenizer.FILE, cfg.bos_id, cfg.eos_id, cfg.pad_id)
    return Tokenizer(path / Tokenizer.FILE)


def export_checkpoint(src: Path, dst: Path, dtype: torch.dtype | None = None) -> list[str]:
    """Copy a checkpoint for shipping: weights (cast to `dtype` if given: bf16 halves a 70M
    model to 142 MB; loading casts back to fp32), config, tokenizer, and the training logs of
    it and of every checkpoint it was initialised from (following config "init"), named
    log-<stage>.jsonl; no optimizer state. Written atomically. Returns the stages found."""
    src, dst = Path(src), Path(dst)
    read_config(src)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in ("config.json", tokenizer_file(src)):
        shutil.copyfile(src / f, tmp / f)
    if dtype is None:
        shutil.copyfile(src / "model.safetensors", tmp / "model.safetensors")
    else:
        weights = {k: v.to(dtype).contiguous() for k, v in load_file(str(src / "model.safetensors")).items()}
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    stages, cur = [], src
    while cur is not None and (cur / "config.json").is_file():
        meta = read_config(cur)
        stage = meta.get("stage", "unknown")
        if (cur / "log.jsonl").is_file():
            shutil.copyfile(cur / "log.jsonl", tmp / f"log-{stage}.jsonl")
        stages.append(stage)
        cur = Path(meta["init"]) if meta.get("init") else None
    for f in tmp.iterdir():
        f.chmod(0o644)  # readable by a service user (the Docker image runs as non-root)
    old = dst.with_name(f".{dst.name}.old-{int(time.time())}")
    if dst.exists():
        os.replace(dst, old)
    os.replace(tmp, dst)
    shutil.rmtree(old, ignore_errors=True)
    return stages


def load_train_state(path: Path) -> dict | None:
    f = Path(path) / "train_state.pt"
    return torch.load(f, weights_only=True) if f.is_file() else None


def read_log(path: Path) -> list[dict]:
    f = Path(path) / "log.jsonl"
    return [json.loads(x) for x in f.read_text().splitlines() if x.strip()] if f.is_file() else []
