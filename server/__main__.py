"""OpenAI-compatible inference server for compressed artifacts.

Run:
    python -m server                                    # default artifact (built on first run)
    python -m server --artifact artifacts/smollm2-135m-instruct-int8 --port 8000
    python -m server --artifact chat=artifacts/a --artifact base=artifacts/b --api-key KEY1 --api-key KEY2
    python -m server --gguf ~/models/qwen2.5-0.5b-instruct-q8_0.gguf    # any local GGUF (built once, cached)
    python -m server --hybrid-default --hybrid-loops 2   # every chat request runs the hybrid loop
    python -m server --lora-modules svamp=adapters/smollm2-135m-svamp --hybrid-adapter svamp
                                                        # model "svamp" = base weights + that LoRA adapter;
                                                        # the hybrid loop reasons with it, direct chat without
    python -m server --profile auto --battery-artifact artifacts/smollm2-135m-instruct-gptq
                                                        # on battery: gptq artifact, half the threads, 1 loop
The shipped memory model (memory_model/checkpoints/default) is loaded unless --memory-model
names another checkpoint or `none`; a request turns the hybrid loop on with
"hybrid": {"loops": 2} or "reasoning_effort": "low" | "medium" | "high".
Then: curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \
        -d '{"model": "smollm2-135m-instruct-int8", "messages": [{"role": "user", "content": "Hi"}]}'
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub, even by accident

DEFAULT_SOURCE = "smollm2-135m-instruct"
DEFAULT_RECIPE = "int8"
DEFAULT_ARTIFACT = Path("artifacts") / f"{DEFAULT_SOURCE}-{DEFAULT_RECIPE}"
DEFAULT_MEMORY_MODEL = Path(__file__).resolve().parent.parent / "memory_model" / "checkpoints" / "default"


def ensure_default_artifact() -> Path:
    """Build the default artifact from the packaged SmolLM2 GGUF if it is not there yet."""
    if not (DEFAULT_ARTIFACT / "manifest.json").is_file():
        from compress.__main__ import main as compress_main

        print(f"building default artifact {DEFAULT_ARTIFACT} (one-time)", flush=True)
        rc = compress_main(["build", "--source", DEFAULT_SOURCE, "--recipe", DEFAULT_RECIPE,
                            "--out", str(DEFAULT_ARTIFACT)])
        if rc:
            sys.exit(rc)
    return DEFAULT_ARTIFACT


def ensure_gguf_artifact(gguf: str, recipe: str) -> str:
    """`NAME=DIR` of the artifact built from a local GGUF file with `recipe`, cached by the file's
    sha256 (a second start reuses it; a changed file builds again). NAME is the file's stem."""
    from compress.artifact import sha256_file
    from compress.sources import SourceError, cache_dir, servable_gguf

    path = Path(gguf)
    try:
        servable_gguf(path)  # a bad or unsupported file: one line, before hashing it
    except SourceError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    out = cache_dir() / "artifacts" / f"gguf-{sha256_file(path)[:16]}-{recipe.replace(',', '-')}"
    if not (out / "manifest.json").is_file():
        from compress.__main__ import main as compress_main

        rc = compress_main(["build", "--gguf", str(path), "--recipe", recipe, "--out", str(out), "--force"])
        if rc:
            sys.exit(rc)
    return f"{path.stem}={out}"


def _memory_model_path(arg: str | None) -> str | None:
    """A checkpoint directory; a shipped checkpoint's name (`svamp-70m`, the same wherever the
    package is installed); None (the shipped default, when this install has it) or 'none'."""
    if arg is None:
        return str(DEFAULT_MEMORY_MODEL) if (DEFAULT_MEMORY_MODEL / "config.json").is_file() else None
    if arg.lower() == "none":
        return None
    shipped = DEFAULT_MEMORY_MODEL.parent / arg
    if not Path(arg).exists() and "/" not in arg and (shipped / "config.json").is_file():
        return str(shipped)
    return arg


def build_parser(prog: str = "python -m server", description: str | None = None) -> argparse.ArgumentParser:
    """Every serving flag; `python -m server.cluster` adds its own group to the same parser."""
    from .config import ServerConfig

    d = ServerConfig()
    p = argparse.ArgumentParser(prog=prog, description=description or __doc__.splitlines()[0])
    p.add_argument("--artifact", action="append", default=[], metavar="[NAME=]DIR",
                   help="artifact to serve (repeatable; the name defaults to the directory name)")
    p.add_argument("--lora-modules", nargs="+", action="extend", default=[], metavar="NAME=DIR",
                   help="PEFT LoRA adapter directories over the first artifact's weights, each served as "
                        "model NAME (repeatable; requests with and without an adapter share the batch)")
    p.add_argument("--gguf", action="append", default=[], metavar="FILE",
                   help="serve a local GGUF file (repeatable): built once into a cached artifact with "
                        "--gguf-recipe, keyed by the file's sha256; the model name is the file's stem")
    p.add_argument("--gguf-recipe", default=DEFAULT_RECIPE, help="compress recipe for --gguf (default int8)")
    p.add_argument("--host", default=d.host)
    p.add_argument("--port", type=int, default=d.port)
    p.add_argument("--api-key", action="append", default=[], help="accepted Bearer key (repeatable); "
                   "also read from HYBRID_API_KEYS (comma-separated)")
    p.add_argument("--max-model-len", type=int, default=d.max_model_len, help="context window n_ctx")
    p.add_argument("--max-queue", type=int, default=d.max_queue,
                   help="requests waiting for a free row before 429")
    p.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs,
                   help="sequences decoded together (continuous batching); a request with n samples takes n")
    p.add_argument("--prefill-chunk", type=int, default=d.prefill_chunk,
                   help="prompt tokens prefilled per batch step, so running streams keep emitting")
    p.add_argument("--compile", action="store_true",
                   help="decode steps as one torch.compile graph per model (compiled at start-up, before the "
                        "server admits requests; models with CHAI layers and ONNX artifacts stay eager)")
    p.add_argument("--prefix-cache-mb", type=int, default=d.prefix_cache_mb,
                   help="memory for KV of recent prompts + answers, reused by later prompts sharing a prefix "
                        "(the next chat turn, a common system prompt); least recently used evicted; 0 disables")
    p.add_argument("--max-tokens-default", type=int, default=None, help="max_tokens when a request sets none")
    p.add_argument("--max-kv-cache-mb", type=int, default=d.max_kv_cache_mb,
                   help="per-request KV cache limit: n x (prompt + max_tokens) must fit")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--backend", choices=["auto", "torch", "onnxruntime"], default="auto",
                   help="require this runtime (auto: what each artifact was built for; ONNX artifacts come "
                        "from `python -m compress export-onnx`)")
    p.add_argument("--max-body-mb", type=float, default=d.max_body_mb, help="request body limit (413 above)")
    p.add_argument("--no-verify", action="store_true", help="skip artifact checksum verification")
    p.add_argument("--no-ui", action="store_true", help="do not serve the chat page at /")
    h = p.add_argument_group("hybrid loop")
    h.add_argument("--memory-model", default=None,
                   help="memory-model checkpoint directory for the hybrid loop, or a shipped one's name "
                        "(default, svamp-70m; default: 'default'); 'none' disables the loop")
    h.add_argument("--memory-model-quant", choices=["none", "int8"], default=d.memory_model_quant,
                   help="int8: the memory model's weights as int8 (W8A16) at load, condensing ~3x faster")
    h.add_argument("--hybrid-default", action="store_true", help="run the hybrid loop unless a request says no")
    h.add_argument("--hybrid-loops", type=int, default=d.hybrid_loops, help="N_loops")
    h.add_argument("--hybrid-cot-groups", type=int, default=d.hybrid_cot_groups, help="G_max")
    h.add_argument("--hybrid-cot-group-tokens", type=int, default=d.hybrid_cot_group_tokens)
    h.add_argument("--hybrid-condense-tokens", type=int, default=d.hybrid_condense_tokens)
    h.add_argument("--hybrid-answer-tokens", type=int, default=d.hybrid_answer_tokens,
                   help="final answer budget when a request sets no max_tokens")
    h.add_argument("--hybrid-adapter", metavar="NAME",
                   help="a --lora-modules name the hybrid loop's large-model stages run with on the default "
                        "model (e.g. a reasoning adapter); its direct requests keep the base weights")
    h.add_argument("--ping-interval", type=float, default=d.ping_interval_s,
                   help="seconds of silence before an SSE keep-alive comment")
    w = p.add_argument_group("power profiles")
    w.add_argument("--profile", choices=["plugged", "battery", "auto"], default=d.profile,
                   help="battery = fewer threads, the battery artifact, fewer hybrid loops; auto follows "
                        "the power source (unknown counts as plugged); switch later with POST /profile")
    w.add_argument("--battery-artifact", metavar="[NAME=]DIR",
                   help="more compressed artifact that serves the primary model's requests on battery")
    w.add_argument("--battery-threads", type=int, help="torch threads on battery (default: half)")
    w.add_argument("--battery-hybrid-loops", type=int, default=d.battery_hybrid_loops,
                   help="cap on hybrid loops on battery")
    w.add_argument("--power-poll", type=float, default=d.power_poll_s, help="auto: seconds between power checks")
    p.add_argument("--log-level", default="info")
    return p


def parse_args(argv: list[str] | None = None):
    p = build_parser()
    a = p.parse_args(argv)
    return a, to_config(a, p)


def to_config(a: argparse.Namespace, p: argparse.ArgumentParser):
    from .config import ServerConfig

    if a.max_num_seqs < 1 or a.prefill_chunk < 1:
        p.error("--max-num-seqs and --prefill-chunk must be at least 1")
    if a.prefix_cache_mb < 0:
        p.error("--prefix-cache-mb must be 0 (off) or more")
    keys = a.api_key + [k for k in os.environ.get("HYBRID_API_KEYS", "").split(",") if k]
    return ServerConfig(artifacts=a.artifact, lora_modules=a.lora_modules, hybrid_adapter=a.hybrid_adapter,
                           host=a.host, port=a.port, api_keys=keys,
                           max_model_len=a.max_model_len, max_queue=a.max_queue,
                           max_num_seqs=a.max_num_seqs, prefill_chunk=a.prefill_chunk, compile=a.compile,
                           prefix_cache_mb=a.prefix_cache_mb,
                           max_tokens_default=a.max_tokens_default, threads=a.threads,
                           max_kv_cache_mb=a.max_kv_cache_mb,
                           verify_checksums=not a.no_verify, ui=not a.no_ui, max_body_mb=a.max_body_mb,
                           memory_model=_memory_model_path(a.memory_model), memory_model_quant=a.memory_model_quant,
                           hybrid_default=a.hybrid_default, hybrid_loops=a.hybrid_loops,
                           hybrid_cot_groups=a.hybrid_cot_groups, hybrid_cot_group_tokens=a.hybrid_cot_group_tokens,
                           hybrid_condense_tokens=a.hybrid_condense_tokens,
                           hybrid_answer_tokens=a.hybrid_answer_tokens, ping_interval_s=a.ping_interval,
                           profile=a.profile, battery_artifact=a.battery_artifact, battery_threads=a.battery_threads,
                           battery_hybrid_loops=a.battery_hybrid_loops, power_poll_s=a.power_poll)


def prepare(a: argparse.Namespace, cfg) -> int:
    """Build what the flags ask for (default / GGUF artifacts) and check every artifact and the
    memory model, before anything binds a port or starts a cluster: 0, or 2 after one line."""
    from compress.artifact import ArtifactError, read_manifest, verify

    if a.gguf:
        cfg.artifacts = [ensure_gguf_artifact(g, a.gguf_recipe) for g in a.gguf] + cfg.artifacts
    if not cfg.artifacts:
        cfg.artifacts = [str(ensure_default_artifact())]
    # Fail fast, before binding the port, on a missing or tampered artifact.
    try:
        paths = cfg.model_paths()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    manifests = {}
    for name, path in paths.items():
        try:
            manifest = manifests[name] = verify(path) if cfg.verify_checksums else read_manifest(path)
        except ArtifactError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        backend = manifest.get("backend", "torch")
        if a.backend != "auto" and backend != a.backend:
            print(f"error: {path} is a {backend} artifact but --backend {a.backend} was asked"
                  + ("; export one with `python -m compress export-onnx`" if a.backend == "onnxruntime" else ""),
                  file=sys.stderr)
            return 2
    if rc := _check_adapters(cfg, next(iter(manifests.values()))):
        return rc
    if cfg.memory_model:
        from memory_model.checkpoint import read_config

        try:
            read_config(Path(cfg.memory_model))
        except (FileNotFoundError, ValueError) as e:
            print(f"error: memory model: {e}", file=sys.stderr)
            return 2
    return 0


def _check_adapters(cfg, primary: dict) -> int:
    """Every --lora-modules directory readable as a PEFT LoRA adapter; one exported with a
    manifest (`compress export-adapter`) also intact and trained from the primary artifact's
    source weights: 0, or 2 after one line. (Shapes are checked when the model loads.)"""
    from compress.artifact import MANIFEST, ArtifactError, read_manifest, verify
    from engine.adapters import AdapterError, read_peft_adapter

    try:
        for name, path in cfg.adapter_paths().items():
            read_peft_adapter(path)
            if (path / MANIFEST).is_file():
                m = verify(path) if cfg.verify_checksums else read_manifest(path)
                if _weights_id(m.get("source")) != _weights_id(primary.get("source")):
                    raise AdapterError(f"adapter {name!r} was trained on {_weights_id(m.get('source'))}, but the "
                                       f"primary artifact comes from {_weights_id(primary.get('source'))}")
    except (ValueError, AdapterError, ArtifactError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _weights_id(source: dict | None) -> str:
    """What identifies source weights in a manifest: the GGUF file's sha256, else the directory."""
    source = source or {}
    return source.get("gguf_sha256") or source.get("model_dir") or source.get("name") or "unknown weights"


def main(argv: list[str] | None = None) -> int:
    a, cfg = parse_args(argv)
    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if rc := prepare(a, cfg):
        return rc
    import uvicorn

    from .app import create_app

    uvicorn.run(create_app(cfg), host=cfg.host, port=cfg.port, log_level=a.log_level.lower())
    return 0


if __name__ == "__main__":
    sys.exit(main())
