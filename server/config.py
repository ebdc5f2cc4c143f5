"""Server configuration: a plain dataclass; `python -m server` fills it from flags."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ServerConfig:
    artifacts: list[str] = field(default_factory=list)  # "DIR" or "NAME=DIR"; the first is the default model
    # "NAME=DIR": PEFT LoRA adapters over the first artifact's weights, each served as model NAME
    # (vLLM's --lora-modules); requests with and without one share the batch
    lora_modules: list[str] = field(default_factory=list)
    host: str = "127.0.0.1"  # loopback unless the operator opts in to exposure
    port: int = 8000
    api_keys: list[str] = field(default_factory=list)  # Bearer keys accepted on /v1/*; empty = no auth
    max_model_len: int = 4096  # context window (n_ctx), capped by the model's own limit
    max_queue: int = 16  # requests waiting for a free row; more get 429
    max_num_seqs: int = 8  # rows (sequences) decoded together in one batch; a request with n samples takes n
    prefill_chunk: int = 256  # prompt tokens prefilled per batch step, so running streams keep emitting
    compile: bool = False  # decode steps as one torch.compile graph (engine/compiled.py), compiled at start-up
    prefix_cache_mb: int = 256  # KV of recent prompts and answers, reused by prompts that share a prefix; 0 = off
    max_tokens_default: int | None = None  # when a request sets no max_tokens; None = rest of the window
    max_kv_cache_mb: int = 2048  # per request: n x (prompt + max_tokens) x KV bytes/token must fit
    threads: int | None = None  # torch intra-op threads; None = torch default
    verify_checksums: bool = True  # refuse artifacts whose files don't match the manifest
    retry_after_s: int = 2  # Retry-After sent with 429 / 503
    max_body_mb: float = 4.0  # larger request bodies get 413 before parsing
    ui: bool = True  # the chat page at / (server/static); --no-ui turns it off
    # the hybrid loop
    memory_model: str | None = None  # memory-model checkpoint directory; None = hybrid unavailable
    memory_model_quant: str = "none"  # "int8": the memory model's linears as W8A16 at load (~3x faster steps)
    hybrid_default: bool = False  # run the hybrid loop for requests that do not ask either way
    hybrid_loops: int = 4  # N_loops
    hybrid_cot_groups: int = 3  # G_max
    hybrid_cot_group_tokens: int = 64
    hybrid_condense_tokens: int = 100
    hybrid_answer_tokens: int = 512  # final answer budget when the request sets no max_tokens
    # a --lora-modules name: the hybrid loop's large-model stages on the default model run with
    # it (a reasoning adapter), its direct requests without; None = the request's own model
    hybrid_adapter: str | None = None
    ping_interval_s: float = 5.0  # SSE comment sent when a stream has had no event for this long
    # power profiles (server/profiles.py)
    profile: str = "plugged"  # plugged | battery | auto (follow the power source)
    battery_artifact: str | None = None  # "[NAME=]DIR" serving the primary model on battery; None = same
    battery_threads: int | None = None  # None = half the plugged thread count
    battery_hybrid_loops: int = 1  # cap on hybrid loops on battery
    power_poll_s: float = 5.0  # auto: re-read the power source at most this often

    def model_paths(self) -> dict[str, Path]:
        """Served artifacts by name, the primary first; the battery artifact, if any, last."""
        out = dict(_named(spec) for spec in self.artifacts)
        if self.battery_artifact:
            name, path = _named(self.battery_artifact)
            if name in out and out[name] != path:
                raise ValueError(f"battery artifact name {name!r} is already used by {out[name]}")
            out[name] = path
        return out

    def adapter_paths(self) -> dict[str, Path]:
        """LoRA adapters by served name; a name an artifact already uses is refused."""
        out, taken = {}, self.model_paths()
        for spec in self.lora_modules:
            name, sep, path = spec.partition("=")
            if not sep or not name or not path:
                raise ValueError(f"--lora-modules takes NAME=DIR, not {spec!r}")
            if name in out or name in taken:
                raise ValueError(f"lora module name {name!r} is already used")
            out[name] = Path(path)
        if self.hybrid_adapter is not None and self.hybrid_adapter not in out:
            raise ValueError(f"--hybrid-adapter {self.hybrid_adapter!r} is not one of the --lora-modules "
                             f"({', '.join(out) or 'none given'})")
        return out

    def battery_model(self) -> str | None:
        return _named(self.battery_artifact)[0] if self.battery_artifact else None


def _named(spec: str) -> tuple[str, Path]:
    name, sep, path = spec.partition("=")
    p = Path(path if sep else spec)
    return (name if sep else p.name), p
