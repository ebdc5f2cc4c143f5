"""ONNX Runtime backend: runs an exported decoder behind the engine model's interface.

`generate()` and the server only need `forward(ids, cache, last_only)`, `new_cache`, `args`,
`device`, `max_len` and `kv_bytes_per_token`; this class provides them over an
`onnxruntime.InferenceSession`, with the KV cache held as numpy arrays between calls.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .config import ModelArgs


class OrtCache:
    def __init__(self, n_layers: int, batch: int, n_kv: int, head_dim: int, max_len: int):
        self.k = np.zeros((n_layers, batch, n_kv, 0, head_dim), np.float32)
        self.v = self.k.copy()
        self.batch, self.max_len = batch, max_len

    @property
    def pos(self) -> int:
        return self.k.shape[3]

    def reset(self) -> None:
        self.k, self.v = self.k[:, :, :, :0], self.v[:, :, :, :0]

    def prefill(self, other: "OrtCache") -> None:
        """Broadcast a batch-1 cache to this batch."""
        reps = self.batch // other.batch
        self.k = np.repeat(other.k, reps, axis=1)
        self.v = np.repeat(other.v, reps, axis=1)


class OrtModel:
    def __init__(self, root: Path, max_len: int | None = None, threads: int | None = None):
        import onnxruntime as ort

        config = json.loads((Path(root) / "config.json").read_text())
        self.args = ModelArgs.from_hf_config(config)
        self.max_len = min(max_len or self.args.max_position_embeddings, self.args.max_position_embeddings)
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(Path(root) / "model.onnx"), opts, providers=["CPUExecutionProvider"])
        self.device = torch.device("cpu")

    def new_cache(self, batch: int, max_len: int) -> OrtCache:
        if max_len > self.max_len:
            raise ValueError(f"cache length {max_len} exceeds the model's max_len {self.max_len}")
        a = self.args
        return OrtCache(a.n_layers, batch, a.n_kv_heads, a.head_dim, max_len)

    def kv_bytes_per_token(self) -> int:
        a = self.args
        return 2 * a.n_layers * a.n_kv_heads * a.head_dim * 4

    def eval(self) -> "OrtModel":
        return self

    def __call__(self, ids: torch.Tensor, cache: OrtCache | None = None, last_only: bool = False) -> torch.Tensor:
        b = ids.shape[0]
        if cache is None:
            cache = self.new_cache(b, ids.shape[1])
        if cache.pos + ids.shape[1] > cache.max_len:
            raise ValueError(f"KV cache overflow: {cache.pos} + {ids.shape[1]} > {cache.max_len}")
        logits, cache.k, cache.v = self.session.run(
            None, {"input_ids": ids.numpy().astype(np.int64), "past_k": cache.k, "past_v": cache.v})
        out = torch.from_numpy(logits)
        return out[:, -1:] if last_only else out
