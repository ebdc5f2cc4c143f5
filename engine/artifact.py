"""Reading a serving artifact: the manifest, checksum verification, the weights (safetensors
only), and the engine model built from them. Writing artifacts is `compress.artifact`'s.

Layout: `model.safetensors` (HF tensor names; float recipes load in plain transformers,
int8 recipes add `<name>_scale` tensors), `config.json`, tokenizer files, and
`manifest.json` with the source, every step and its parameters, dtype/kernel, parameter
count, size, evaluation results and a sha256 per file. Tensor names follow engine/naming.py.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

# An adapter kept beside the weights (`lora(merge=false)`) uses PEFT's file names, so
# `PeftModel.from_pretrained(model, dir)` works; compress.artifact writes them from here
from .adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_PREFIX, AdapterError, read_peft_adapter

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"


class ArtifactError(RuntimeError):
    """The artifact is missing, incomplete, tampered with or of an unknown format."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_manifest(root: Path) -> dict:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{root} is not an artifact: {MANIFEST} is missing (build one with `python -m compress build`)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path} is not valid JSON: {e}") from e
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path}: unsupported format_version {manifest.get('format_version')!r}")
    return manifest


def verify(root: Path) -> dict:
    """Check every file against the manifest; raise ArtifactError naming what is wrong."""
    root = Path(root)
    manifest = read_manifest(root)
    problems = []
    for rel, digest in manifest["files"].items():
        p = root / rel
        if not p.is_file():
            problems.append(f"missing {rel}")
        elif sha256_file(p) != digest:
            problems.append(f"checksum mismatch in {rel}")
    if problems:
        raise ArtifactError(f"artifact {root} failed verification: {'; '.join(problems)}")
    return manifest


def load_state(root: Path) -> dict:
    """Safetensors only: never unpickle weights. An adapter file's tensors join the state
    under the recipe's names (`<module>.lora_A.weight`, `<module>.lora_B.weight`)."""
    from safetensors.torch import load_file

    state = load_file(str(Path(root) / WEIGHTS))
    if (Path(root) / ADAPTER_WEIGHTS).is_file():
        state.update(read_peft_adapter(root))
    return state


def load_engine_model(root: Path, max_len: int | None = None, check: bool = True, int8_kernel: str | None = None,
                      adapters: dict[str, Path] | None = None):
    """(model, manifest) for the server's engine; verifies checksums unless check=False.
    adapters: name -> PEFT LoRA directory, each applied to the requests that name it
    (engine.adapters); an artifact's own kept adapter (`lora(merge=false)`) applies to all."""
    import torch

    from .config import ModelArgs
    from .loader import build_model

    root = Path(root)
    manifest = verify(root) if check else read_manifest(root)
    if manifest.get("backend") == "onnxruntime":
        if adapters:
            raise AdapterError(f"{root} is an ONNX Runtime artifact: per-request LoRA adapters need the torch engine")
        from .ort_backend import OrtModel

        return OrtModel(root, max_len=max_len, threads=torch.get_num_threads()), manifest
    config = json.loads((root / "config.json").read_text())
    args = ModelArgs.from_hf_config(config)
    float_dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    dtype = float_dtypes.get(manifest.get("dtype"), torch.float32)  # int8 kernels fix their own
    kernel = int8_kernel or manifest.get("int8_kernel") or "weight_only"
    named = {name: read_peft_adapter(path) for name, path in (adapters or {}).items()}
    model = build_model(args, load_state(root), dtype=dtype, max_len=max_len, int8_kernel=kernel, adapters=named)
    return model, manifest

