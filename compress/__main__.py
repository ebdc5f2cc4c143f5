"""Offline compression pipeline: Hugging Face causal LM -> serving artifact.

Run:
    python -m compress sources                                   # list packaged source models
    python -m compress build --source smollm2-135m-instruct --recipe int8 --out artifacts/smollm2-int8
    python -m compress build --model-dir path/to/hf_model --recipe bf16 --out artifacts/my-bf16
    python -m compress build --gguf path/to/model.gguf --recipe int8 --out artifacts/my-int8   # any local GGUF
    python -m compress eval artifacts/smollm2-int8               # perplexity, prefill/decode tok/s, size
    python -m compress inspect artifacts/smollm2-int8            # manifest: params, size, precision
    python -m compress hardware                                  # detected device and precision plan
    python -m compress export-onnx artifacts/smollm2-135m-instruct-none --int8   # ONNX Runtime artifact
    python -m compress export-adapter artifacts/x-lora-kept --out adapters/x   # a kept LoRA as a PEFT directory
    python -m compress build --source gemma3-270m --recipe "prune(layers=4-11),svd(energy=0.9),int8"
    python -m compress build --source smollm2-135m-instruct --recipe "depth(n=6,metric=ppl),int8"
Recipe steps (comma-separated, applied in order): none, fp16, bf16, int8, int8-dynamic,
prune(...) (stochastic-consensus pruning), svd(...) (low-rank re-densification),
depth(...) (block removal), wanda(...) (N:M / unstructured), channels(...), smooth(...), qat(...), int8-static,
lora(...) (LoRA/KD recovery), gptq(...) (GPTQ 4-bit), eora(...) (quantization-error adapter).
    python -m compress build --source smollm2-135m-instruct \
        --recipe "depth(n=4),wanda(pattern=2:4),lora(steps=100),gptq(bits=4,group_size=128),eora(rank=32)"
    python -m compress eval artifacts/x --qa                      # + closed/open-book QA accuracy
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub, even by accident


def cmd_sources(a) -> None:
    from .sources import SOURCES

    for s in SOURCES.values():
        print(f"{s.name:24s} {s.distribution:26s} chat={'yes' if s.chat else 'no ':3s} {s.description}")


def cmd_build(a) -> None:
    from .build import build
    from .sources import ensure_hf_dir, gguf_hf_dir

    if a.model_dir:
        model_dir, source = Path(a.model_dir), {"model_dir": str(Path(a.model_dir).resolve())}
    elif a.gguf:
        model_dir = gguf_hf_dir(a.gguf)
        source = json.loads((model_dir / "source.json").read_text())
    else:
        model_dir = ensure_hf_dir(a.source)
        source = json.loads((model_dir / "source.json").read_text())
    recipe, extra = a.recipe, {}
    if "auto" in [s.strip() for s in recipe.split(",")]:
        from .hardware import HardwareOptimizer

        opt = HardwareOptimizer()
        plan = opt.plan()
        recipe = ",".join(plan.recipe if s.strip() == "auto" else s for s in recipe.split(","))
        extra["hardware"] = opt.report()
        print(f"auto -> {plan.recipe}: " + "; ".join(plan.reasons))
    stem = a.source or (Path(a.gguf).stem if a.gguf else model_dir.name)
    out = Path(a.out or f"artifacts/{stem}-{recipe.replace(',', '-')}")
    manifest = build(model_dir, out, recipe, source, force=a.force, extra=extra)
    print(f"wrote {out} ({manifest['size_bytes'] / 1e6:.1f} MB, {manifest['n_params'] / 1e6:.1f}M params, "
          f"recipe {a.recipe})")


def cmd_export_onnx(a) -> None:
    from .onnx_export import export_onnx

    out = Path(a.out or f"{a.artifact.rstrip('/')}-onnx{'-int8' if a.int8 else ''}")
    m = export_onnx(Path(a.artifact), out, int8=a.int8, opset=a.opset, force=a.force)
    print(f"wrote {out} ({m['size_bytes'] / 1e6:.1f} MB, ONNX opset {a.opset}{', int8' if a.int8 else ''}); "
          f"serve it with: python -m server --artifact {out}")


def cmd_export_adapter(a) -> None:
    from .artifact import export_adapter

    m = export_adapter(Path(a.artifact), Path(a.out), force=a.force)
    print(f"wrote {a.out} ({m['size_bytes'] / 1e6:.1f} MB, {m['adapter']['params'] / 1e6:.2f}M adapter params); "
          f"serve it with: python -m server --lora-modules {Path(a.out).name}={a.out}")


def cmd_hardware(a) -> None:
    from .hardware import HardwareOptimizer

    opt = HardwareOptimizer()
    i, plan = opt.info, opt.plan()
    print(f"device     {i.kind}: {i.name}")
    print(f"cores      {i.cores}")
    if i.cuda_capability:
        print(f"capability {i.cuda_capability[0]}.{i.cuda_capability[1]}   memory {i.memory_bytes / 2**30:.1f} GiB")
    print(f"cpu flags  {' '.join(i.cpu_flags) or '(none detected)'}")
    print(f"plan       --recipe {plan.recipe}" + (f" (int8 kernel {plan.int8_kernel})" if plan.int8_kernel else "")
          + f", {plan.threads} threads")
    for r in plan.reasons:
        print(f"  why: {r}")
    if a.json:
        print(json.dumps(opt.report(), indent=2))


def cmd_eval(a) -> None:
    import torch
    from transformers import AutoTokenizer

    from .artifact import load_engine_model, update_manifest
    from .evaluate import EvalConfig, evaluate

    if a.threads:
        torch.set_num_threads(a.threads)
    need = max(a.seq_len + 1, a.prefill_tokens + a.decode_tokens + 1, 1024 if a.qa else 0)  # open-book prompts
    model, manifest = load_engine_model(Path(a.artifact), max_len=need, int8_kernel=a.int8_kernel)
    tok = AutoTokenizer.from_pretrained(a.artifact)
    cfg = EvalConfig(seq_len=a.seq_len, max_tokens=a.max_tokens, prefill_tokens=a.prefill_tokens,
                     decode_tokens=a.decode_tokens, repeats=a.repeats)
    res = evaluate(model, tok, cfg, progress=not a.quiet)
    res["size_bytes"] = manifest["size_bytes"]
    if a.qa:
        from .evaluate import adds_bos
        from .qa import QAConfig, qa_accuracy

        res["qa"] = qa_accuracy(model, tok, QAConfig(n_closed=a.qa_n, n_open=a.qa_n, max_new_tokens=a.qa_max_new_tokens),
                                add_bos=adds_bos(tok), progress=not a.quiet)
        print(f"QA ({res['qa']['dataset']}): closed-book {res['qa']['closed']['accuracy'] * 100:.1f}%, "
              f"open-book {res['qa']['open']['accuracy'] * 100:.1f}% (n={a.qa_n} each)")
    print(f"{Path(a.artifact).name}: perplexity {res['perplexity']:.3f} on {res['tokens']} tokens ({res['dataset']}), "
          f"prefill {res['prefill_tok_s']:.1f} tok/s, decode {res['decode_tok_s']:.1f} tok/s "
          f"({res['threads']} threads), size {res['size_bytes'] / 1e6:.1f} MB")
    if not a.no_save:
        update_manifest(Path(a.artifact), eval=res)
    if a.json:
        print(json.dumps(res, indent=2))


def cmd_inspect(a) -> None:
    from .artifact import read_manifest, verify

    root = Path(a.artifact)
    m = verify(root) if a.verify else read_manifest(root)
    dtypes: Counter = Counter()
    modules: dict = {}  # projection kind -> {"form": Counter, "params": n, "zeros": n}
    from engine import naming
    from engine.gptq_format import bits_of, dequantize_gptq, module_tensors

    from .artifact import load_state

    state = load_state(root)  # base weights and the adapter file, if any
    for k, t in state.items():
        dtypes[str(t.dtype).replace("torch.", "")] += t.numel()
        if naming.is_bookkeeping(k):
            continue
        kind = _module_kind(k)
        entry = modules.setdefault(kind, {"form": Counter(), "params": 0, "zeros": 0})
        form = "int8" if naming.scale_name(k) in state else str(t.dtype).replace("torch.", "")
        if naming.is_lowrank(k):
            form = f"low-rank r={min(t.shape)} {form}"
        if naming.is_adapter(k):
            form = f"adapter r={min(t.shape)} {form}"
        if naming.is_gptq_weight(k):
            gq = module_tensors(state, naming.gptq_module(k))
            form, t = f"gptq int{bits_of(gq)}", dequantize_gptq(gq, bits_of(gq))
        entry["form"][form] += 1
        entry["params"] += t.numel()
        entry["zeros"] += int((t == 0).sum())
    print(f"artifact   {root}")
    print(f"source     {m['source'].get('name') or m['source'].get('model_dir')} "
          f"({m['source'].get('distribution', '')} {m['source'].get('version') or ''})".rstrip())
    print(f"arch       {m['arch']}   chat template: {'yes' if m['chat_template'] else 'no (completions)'}")
    print(f"recipe     {m['recipe']}   steps: {', '.join(s['name'] for s in m['steps'])}")
    print(f"precision  {m['dtype']}" + (f" (kernel {m['int8_kernel']})" if m.get("int8_kernel") else ""))
    print(f"params     {m['n_params'] / 1e6:.2f}M   size {m['size_bytes'] / 1e6:.1f} MB   files {len(m['files'])}")
    print("tensors    " + ", ".join(f"{k}: {v / 1e6:.2f}M elems" for k, v in sorted(dtypes.items())))
    print(f"{'module':12s} {'params':>10s} {'zeros':>7s}  storage")
    for kind, e in modules.items():
        forms = ", ".join(f"{n}x {f}" for f, n in e["form"].most_common())
        print(f"{kind:12s} {e['params'] / 1e6:9.2f}M {e['zeros'] / max(e['params'], 1) * 100:6.2f}%  {forms}")
    if a.memory:
        import resource

        import torch

        from .artifact import load_engine_model

        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        model, _ = load_engine_model(root, max_len=256, check=False)
        rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if isinstance(model, torch.nn.Module):
            tensors = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
            print(f"memory     {tensors / 1e6:.1f} MB of engine tensors (parameters + buffers, RoPE tables "
                  f"included), peak RSS grew {(rss1 - rss0) / 1e3:.1f} MB while loading")
        else:
            print(f"memory     peak RSS grew {(rss1 - rss0) / 1e3:.1f} MB while loading (ONNX Runtime session)")
    if m.get("eval"):
        e = m["eval"]
        print(f"eval       perplexity {e['perplexity']:.3f}  prefill {e['prefill_tok_s']:.1f} tok/s  "
              f"decode {e['decode_tok_s']:.1f} tok/s")
    if a.json:
        print(json.dumps(m, indent=2))


def _module_kind(name: str) -> str:
    """'model.layers.3.mlp.up_proj.weight_lr_a' -> 'up_proj'; embeddings and norms by role."""
    parts = name.split(".")
    if "embed_tokens" in parts:
        return "embedding"
    if name.startswith("lm_head"):
        return "lm_head"
    if len(parts) > 4 and parts[1] == "layers":
        return "norm" if "norm" in parts[-2] or "layernorm" in parts[-2] else parts[4]
    return "norm"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m compress", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("sources", help="list packaged source models").set_defaults(fn=cmd_sources)

    b = sub.add_parser("build", help="build an artifact from a source model")
    src = b.add_mutually_exclusive_group()
    src.add_argument("--source", help="packaged source model (see `sources`)")
    src.add_argument("--model-dir", help="a local Hugging Face model directory (safetensors)")
    src.add_argument("--gguf", help="a local GGUF file (llama, mistral, qwen2, qwen3, phi3, gemma3); converted once, "
                                    "cached by its sha256")
    b.add_argument("--recipe", default="none",
                   help="comma-separated steps, each optionally with parameters: none, fp16, bf16, int8, "
                        "int8-dynamic, prune(chunk_size=15,n_masks=500,mask_sparsity=0.5,top_k=20,modules=mlp,"
                        "layers=all), svd(rank=4,energy=0,modules=mlp), depth(n=4,metric=ppl|taylor|magnitude,"
                        "protect_first=4,protect_last=2), wanda(pattern=2:4 | ratio=0.5,modules=all); "
                        "lists inside a value use '+'")
    b.add_argument("--out", help="artifact directory (default artifacts/<source>-<recipe>)")
    b.add_argument("--force", action="store_true", help="replace an existing artifact")
    b.set_defaults(fn=cmd_build)

    e = sub.add_parser("eval", help="perplexity, latency and size of an artifact")
    e.add_argument("artifact")
    e.add_argument("--seq-len", type=int, default=512)
    e.add_argument("--max-tokens", type=int, default=4096, help="held-out tokens to score")
    e.add_argument("--prefill-tokens", type=int, default=256)
    e.add_argument("--decode-tokens", type=int, default=64)
    e.add_argument("--repeats", type=int, default=3)
    e.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    e.add_argument("--int8-kernel", choices=["weight_only", "dynamic"], help="override the artifact's int8 kernel")
    e.add_argument("--qa", action="store_true", help="also closed-/open-book QA accuracy (greedy)")
    e.add_argument("--qa-n", type=int, default=50, help="questions per QA kind")
    e.add_argument("--qa-max-new-tokens", type=int, default=16, help="1..50")
    e.add_argument("--no-save", action="store_true", help="do not record the results in the manifest")
    e.add_argument("--quiet", action="store_true")
    e.add_argument("--json", action="store_true")
    e.set_defaults(fn=cmd_eval)

    x = sub.add_parser("export-onnx", help="export an artifact's decoder (with KV cache I/O) to ONNX")
    x.add_argument("artifact")
    x.add_argument("--out", help="new artifact directory (default <artifact>-onnx[-int8])")
    x.add_argument("--int8", action="store_true", help="ONNX Runtime dynamic int8 quantization")
    x.add_argument("--opset", type=int, default=18)
    x.add_argument("--force", action="store_true")
    x.set_defaults(fn=cmd_export_onnx)

    x = sub.add_parser("export-adapter", help="an artifact's kept LoRA adapter (lora(merge=false)) as a PEFT "
                                              "directory for `server --lora-modules`")
    x.add_argument("artifact")
    x.add_argument("--out", required=True, help="adapter directory")
    x.add_argument("--force", action="store_true", help="replace an existing directory")
    x.set_defaults(fn=cmd_export_adapter)

    h = sub.add_parser("hardware", help="detect the device and show the precision plan (--recipe auto)")
    h.add_argument("--json", action="store_true")
    h.set_defaults(fn=cmd_hardware)

    i = sub.add_parser("inspect", help="print an artifact's manifest summary")
    i.add_argument("artifact")
    i.add_argument("--verify", action="store_true", help="also check every file's sha256")
    i.add_argument("--memory", action="store_true", help="load the model and report its in-memory size")
    i.add_argument("--json", action="store_true")
    i.set_defaults(fn=cmd_inspect)

    a = p.parse_args(argv)
    if a.cmd == "build" and not (a.source or a.model_dir or a.gguf):
        a.source = "smollm2-135m-instruct"
    from .artifact import ArtifactError
    from .sources import SourceError
    from .step import RecipeError

    try:
        a.fn(a)
    except (ArtifactError, RecipeError, SourceError, FileNotFoundError, NotImplementedError, KeyError,
            ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
