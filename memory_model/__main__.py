"""The memory model's command line: data (first and later loops), tokenizer, pretrain, sft, reinforce, eval.

Run (defaults are the shipped checkpoint's settings; `make memory-model` has its exact commands):
    python -m memory_model make-data --large artifacts/smollm2-135m-instruct-int8 --out data/mm
    python -m memory_model make-loop-data --large ARTIFACT --data data/mm-svamp/train.jsonl \
        --out data/mm-svamp/loops.jsonl --loops 4     (later loops: P already condensed; sft takes both files)
    python -m memory_model tokenizer --out data/mm/tokenizer.model --vocab 8192
    python -m memory_model pretrain --preset mm-8m --tokenizer data/mm/tokenizer.model \
        --data stdlib,pydoc,problems,cot:data/mm/train.jsonl --out checkpoints/mm-8m-pre
    python -m memory_model init --artifact artifacts/smollm2-svamp-depth12-f32 --out checkpoints/mm-70m-init
        (instead of tokenizer + pretrain: a memory model initialised from a large model's float artifact)
    python -m memory_model sft --init checkpoints/mm-8m-pre --data data/mm/train.jsonl --out checkpoints/mm-8m-sft
    python -m memory_model reinforce --init checkpoints/mm-8m-sft --large artifacts/smollm2-135m-instruct-int8 \
        --data data/mm/train.jsonl --out checkpoints/mm-8m-rl
    python -m memory_model eval --large artifacts/smollm2-135m-instruct-int8 --data data/mm/heldout.jsonl \
        --policy rl=checkpoints/mm-8m-rl --policy sft=checkpoints/mm-8m-sft
    python -m memory_model export checkpoints/mm-8m-rl --out memory_model/checkpoints/default
    python -m memory_model condense checkpoints/mm-8m-rl "question text" "chain of thought text"
Any command resumes from its --out directory's last checkpoint when given --resume.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _threads(n: int) -> None:
    import torch

    if n:
        torch.set_num_threads(n)


def cmd_make_data(a) -> None:
    from engine.runner import load_model

    from .cot import make_cot_data, make_task_cot_data

    _threads(a.threads)
    if a.task:
        stats = make_task_cot_data(load_model(a.large), Path(a.out), a.task, a.n_heldout, a.max_new)
    else:
        stats = make_cot_data(load_model(a.large), Path(a.out), a.n_train, a.n_heldout, a.max_new)
    print(json.dumps(stats, indent=2))


def cmd_make_loop_data(a) -> None:
    from engine.runner import load_model

    from .cot import read_jsonl, write_jsonl
    from .loops import replay_loops

    _threads(a.threads)
    if a.loops < 2:
        raise ValueError("--loops must be at least 2 (loop 1 is make-data's own rows)")
    rows = read_jsonl(Path(a.data))
    t0 = time.perf_counter()
    out = replay_loops(load_model(a.large), rows, a.loops, a.max_new)
    write_jsonl(Path(a.out), out)
    by_loop = {k: sum(r["loop"] == k for r in out) for k in range(2, a.loops + 1)}
    print(json.dumps({"rows": len(out), "by_loop": by_loop, "from": len(rows),
                      "seconds": round(time.perf_counter() - t0, 1)}))


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cmd_tokenizer(a) -> None:
    from .data import load_texts
    from .tokenizer import Tokenizer, train_tokenizer

    texts = [t for part in load_texts(a.data).values() for t in part]
    out = train_tokenizer(texts, Path(a.out), a.vocab)
    tok = Tokenizer(out)
    sample = "Sam has 17 apples. 17 + 25 = 42."
    print(f"wrote {out}: {tok.vocab_size} pieces; {sample!r} -> {len(tok.encode(sample))} tokens")


def _refuse_existing(out: Path, a) -> None:
    """A new run must not overwrite a checkpoint unless asked (--resume continues it)."""
    if not a.resume and (out / "config.json").exists() and not a.force:
        raise ValueError(f"{out} exists: pass --resume to continue it or --force to start over")


def _train_config(a):
    from .train import TrainConfig

    return TrainConfig(steps=a.steps, batch_size=a.batch_size, grad_accum=a.grad_accum, seq_len=a.seq_len,
                       lr=a.lr, warmup=a.warmup, eval_every=a.eval_every, save_every=a.save_every,
                       log_every=a.log_every,
                       precision=a.precision,
                       seed=a.seed)


def cmd_pretrain(a) -> None:
    import torch

    from .checkpoint import load_checkpoint
    from .data import load_texts, random_windows, split_stream, token_stream
    from .model import build_model, from_preset, n_params
    from .tokenizer import Tokenizer
    from .train import train

    _threads(a.threads)
    dev = _device(a.device)
    tc = _train_config(a)
    out = Path(a.out)
    if a.resume:
        model, cfg, tok, meta = load_checkpoint(out, dev)
    else:
        _refuse_existing(out, a)
        tok = Tokenizer(a.tokenizer)
        cfg = from_preset(a.preset, vocab_size=tok.vocab_size, pad_id=tok.pad_id, bos_id=tok.bos_id,
                          eos_id=tok.eos_id)
        model = build_model(cfg, seed=a.seed, device=dev)
        meta = {"stage": "pretrain", "preset": a.preset, "data": a.data}
    texts = load_texts(a.data)
    streams = {name: token_stream(t, tok) for name, t in texts.items()}
    for name, s in streams.items():
        print(f"data {name}: {len(texts[name])} documents, {len(s):,} tokens")
    parts = [split_stream(s) for s in streams.values()]
    train_stream = torch.cat([p[0] for p in parts])
    val_stream = torch.cat([p[1] for p in parts])
    val_gen = torch.Generator().manual_seed(1234)
    val = [random_windows(val_stream, tc.batch_size, min(tc.seq_len, len(val_stream) - 2), val_gen)
           for _ in range(tc.eval_batches)]
    print(f"{a.preset if not a.resume else meta.get('preset')}: {n_params(model) / 1e6:.2f}M params, "
          f"{len(train_stream):,} training tokens, device {dev}")
    meta["data_tokens"] = int(len(train_stream))
    train(model, cfg, tok, tc, lambda g: random_windows(train_stream, tc.batch_size, tc.seq_len, g), val, out,
          meta, resume=a.resume, progress=not a.quiet)
    print(f"wrote {out}")


def cmd_init(a) -> None:
    from engine.artifact import ArtifactError

    from .checkpoint import save_checkpoint
    from .init_from import import_artifact
    from .model import n_params
    from .tokenizer import CONTROL

    out = Path(a.out)
    _refuse_existing(out, a)
    try:
        model, cfg, tok, meta = import_artifact(a.artifact, a.max_len)
    except ArtifactError as e:
        raise ValueError(str(e)) from e
    n = n_params(model)
    save_checkpoint(out, model, cfg, tok, {**meta, "params": n}, log=[{"imported": meta["source_artifact"],
                                                                         "params": n}])
    print(f"wrote {out}: {n / 1e6:.1f}M parameters, {cfg.n_layers} layers, vocabulary {cfg.vocab_size} "
          f"(the large model's + {len(CONTROL)} control tokens)")


def cmd_sft(a) -> None:
    from .checkpoint import load_checkpoint
    from .cot import read_rows
    from .data import condense_examples, pad_batch
    from .problems import make_splits, template_cot
    from .train import train

    import torch

    _threads(a.threads)
    dev = _device(a.device)
    tc = _train_config(a)
    out = Path(a.out)
    src = out if a.resume else Path(a.init)
    _refuse_existing(out, a)
    model, cfg, tok, meta = load_checkpoint(src, dev)
    rows = read_rows(a.data)
    if a.synthetic:
        synth = make_splits({"pretrain": a.synthetic})["pretrain"]
        rows = rows + [{"question": p.question, "cot": template_cot(p), "steps": p.steps} for p in synth]
    ex = condense_examples(rows, tok, a.max_prompt, a.max_cot, a.max_new, a.target)
    n_val = max(len(ex) // 50, 1)
    perm = torch.randperm(len(ex), generator=torch.Generator().manual_seed(0)).tolist()
    ex = [ex[i] for i in perm]
    val_ex, train_ex = ex[:n_val], ex[n_val:]
    val = [pad_batch(val_ex[i:i + tc.batch_size], cfg.pad_id) for i in range(0, len(val_ex), tc.batch_size)]

    def next_batch(g):
        idx = torch.randint(0, len(train_ex), (tc.batch_size,), generator=g).tolist()
        return pad_batch([train_ex[i] for i in idx], cfg.pad_id)

    if not a.resume:
        meta = {**{k: v for k, v in meta.items() if k in ("preset", "data")}, "stage": "sft", "init": str(src),
                "sft_data": a.data, "synthetic": a.synthetic, "target": a.target}
    print(f"sft: {len(train_ex)} training pairs, {len(val_ex)} validation pairs")
    train(model, cfg, tok, tc, next_batch, val[:tc.eval_batches], out, meta, resume=a.resume,
          progress=not a.quiet)
    print(f"wrote {out}")


def cmd_reinforce(a) -> None:
    from engine.runner import load_model

    from .condense import MemoryModel
    from .cot import read_rows
    from .reinforce import ReinforceConfig, reinforce

    _threads(a.threads)
    out = Path(a.out)
    _refuse_existing(out, a)
    mm = MemoryModel(out if a.resume else a.init, _device(a.device), a.max_prompt, a.max_cot)
    lm = load_model(a.large)
    rc = ReinforceConfig(steps=a.steps, prompts_per_step=a.prompts, samples_per_prompt=a.samples,
                         max_new=a.max_new, temperature=a.temperature, lr=a.lr, baseline=a.baseline,
                         kl_coef=a.kl_coef, entropy_coef=a.entropy_coef, length_penalty=a.length_penalty,
                         correct_bonus=a.correct_bonus, fidelity_coef=a.fidelity_coef, eval_every=a.eval_every, eval_size=a.eval_size,
                         save_every=a.save_every, seed=a.seed)
    # a resumed run keeps its own record; a new one records where it started
    meta = mm.meta if a.resume else {"preset": mm.meta.get("preset"), "stage": "reinforce", "init": str(a.init),
                                     "large": lm.name, "data": a.data}
    log = reinforce(mm, lm, read_rows(a.data), rc, out, meta, resume=a.resume, progress=not a.quiet)
    first = next(r for r in log if "eval_accuracy" in r)
    last = [r for r in log if "eval_accuracy" in r][-1]
    print(f"eval before: {first}\neval after:  {last}\n(eval_empty_cot_*: the same policy given no "
          f"chain-of-thought - what it scores by answering alone)\nwrote {out}")


def cmd_eval(a) -> None:
    from engine.runner import load_model

    from .condense import MemoryModel
    from .cot import read_jsonl
    from .evaluate import evaluate, markdown_table

    _threads(a.threads)
    lm = load_model(a.large)
    from .problems import pretrain_draws

    rows = read_jsonl(Path(a.data))
    seen = pretrain_draws(a.exclude_pretrain_draws)
    clean = [r for r in rows if r["question"] not in seen]
    if len(clean) < len(rows):
        print(f"excluded {len(rows) - len(clean)} held-out problems that pretraining text may contain")
    rows = clean[:a.limit or None]
    policies = {}
    for spec in a.policy:
        name, sep, path = spec.partition("=")
        if not sep:
            raise ValueError(f"--policy takes NAME=CHECKPOINT, got {spec!r}")
        policies[name] = MemoryModel(path, "cpu", a.max_prompt, a.max_cot)
    res = evaluate(lm, rows, policies, max_new=a.max_new, progress=None if a.quiet else print)
    print(markdown_table(res))
    if a.json:
        Path(a.json).write_text(json.dumps({"large": lm.name, "n": len(rows), "results": res}, indent=2))


def cmd_export(a) -> None:
    from .checkpoint import export_checkpoint

    import torch

    stages = export_checkpoint(Path(a.checkpoint), Path(a.out), {"bf16": torch.bfloat16}.get(a.dtype))
    print(f"wrote {a.out} (logs of: {', '.join(stages)})")


def cmd_condense(a) -> None:
    from .condense import MemoryModel

    mm = MemoryModel(a.checkpoint)
    c = mm.condense(a.prompt, a.cot, max_new=a.max_new)
    print(c.text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m memory_model", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("make-data", help="problems + the large model's chain-of-thought (train/heldout jsonl)")
    d.add_argument("--large", required=True, help="large-model artifact directory")
    d.add_argument("--out", default="data/mm")
    d.add_argument("--n-train", type=int, default=768)
    d.add_argument("--n-heldout", type=int, default=128)
    d.add_argument("--task", choices=["svamp-train"], help="a real task's training split instead of generated "
                   "problems (--n-heldout of it are held out for diagnostics; --n-train is ignored)")
    d.add_argument("--max-new", type=int, default=128, help="chain-of-thought tokens per problem")
    d.add_argument("--threads", type=int, default=0)
    d.set_defaults(fn=cmd_make_data)

    lp = sub.add_parser("make-loop-data", help="later-loop rows (P already condensed) replayed with the large model")
    lp.add_argument("--large", required=True, help="large-model artifact directory")
    lp.add_argument("--data", required=True, help="make-data jsonl (its first-loop CoT)")
    lp.add_argument("--out", required=True, help="jsonl to write")
    lp.add_argument("--loops", type=int, default=4, help="N_loops of the served loop")
    lp.add_argument("--max-new", type=int, default=24, help="tokens per loop (one CoT line)")
    lp.add_argument("--threads", type=int, default=0)
    lp.set_defaults(fn=cmd_make_loop_data)

    t = sub.add_parser("tokenizer", help="train the sentencepiece tokenizer")
    t.add_argument("--data", default="stdlib,pydoc,problems")
    t.add_argument("--vocab", type=int, default=8192)
    t.add_argument("--out", default="data/mm/tokenizer.model")
    t.set_defaults(fn=cmd_tokenizer)

    def train_args(q, steps, batch, lr, warmup):
        q.add_argument("--out", required=True, help="checkpoint directory")
        q.add_argument("--steps", type=int, default=steps)
        q.add_argument("--batch-size", type=int, default=batch)
        q.add_argument("--grad-accum", type=int, default=1)
        q.add_argument("--seq-len", type=int, default=256)
        q.add_argument("--lr", type=float, default=lr)
        q.add_argument("--warmup", type=int, default=warmup)
        q.add_argument("--eval-every", type=int, default=100)
        q.add_argument("--save-every", type=int, default=250)
        q.add_argument("--log-every", type=int, default=10)
        q.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
        q.add_argument("--seed", type=int, default=0)
        q.add_argument("--device", default="auto", help="auto, cpu, cuda")
        q.add_argument("--threads", type=int, default=0)
        q.add_argument("--resume", action="store_true", help="continue the checkpoint in --out")
        q.add_argument("--force", action="store_true", help="overwrite --out")
        q.add_argument("--quiet", action="store_true")

    pt = sub.add_parser("pretrain", help="next-token pretraining on packaged text")
    pt.add_argument("--preset", default="mm-8m")
    pt.add_argument("--tokenizer", default="data/mm/tokenizer.model")
    pt.add_argument("--data", default="stdlib,pydoc,problems")
    train_args(pt, 3000, 16, 1e-3, 100)
    pt.set_defaults(fn=cmd_pretrain)

    i = sub.add_parser("init", help="a memory model initialised from a large model's float artifact "
                                    "(its weights and tokenizer)")
    i.add_argument("--artifact", required=True, help="float artifact (e.g. depth-pruned by compress)")
    i.add_argument("--out", required=True, help="checkpoint directory")
    i.add_argument("--max-len", type=int, default=1024, help="positions (prompt + CoT + condensed)")
    i.add_argument("--force", action="store_true", help="overwrite --out")
    i.set_defaults(fn=cmd_init, resume=False)

    def condense_args(q):
        q.add_argument("--max-prompt", type=int, default=160, help="memory-model tokens of prompt kept")
        q.add_argument("--max-cot", type=int, default=320, help="memory-model tokens of chain-of-thought kept")
        q.add_argument("--max-new", type=int, default=100, help="condensed-prompt budget (tokens)")

    sf = sub.add_parser("sft", help="supervised warm start on extractive condensation targets")
    sf.add_argument("--init", help="checkpoint to start from")
    sf.add_argument("--data", required=True, help="make-data jsonl (train split); several joined by ','")
    sf.add_argument("--synthetic", type=int, default=4000, help="extra pairs from templated solutions")
    sf.add_argument("--target", choices=["extractive", "refined"], default="refined",
                    help="extractive: question + the CoT's last equations (its mistakes included); "
                         "refined: question + the correct intermediate results")
    condense_args(sf)
    train_args(sf, 600, 16, 3e-4, 30)
    sf.set_defaults(fn=cmd_sft)

    r = sub.add_parser("reinforce", help="REINFORCE with rewards from the large model")
    r.add_argument("--init", help="checkpoint to start from (usually the sft one)")
    r.add_argument("--large", required=True, help="large-model artifact")
    r.add_argument("--data", required=True, help="make-data jsonl (train split); several joined by ',' "
                   "(the first --eval-size rows of the first are the fixed evaluation set)")
    r.add_argument("--out", required=True)
    r.add_argument("--steps", type=int, default=80)
    r.add_argument("--prompts", type=int, default=8, help="prompts per step")
    r.add_argument("--samples", type=int, default=4, help="samples per prompt (K)")
    r.add_argument("--temperature", type=float, default=1.0)
    r.add_argument("--lr", type=float, default=1e-5)
    r.add_argument("--baseline", choices=["loo", "mean"], default="loo")
    r.add_argument("--kl-coef", type=float, default=0.05)
    r.add_argument("--entropy-coef", type=float, default=0.01)
    r.add_argument("--length-penalty", type=float, default=0.1, help="reward per 100 large-model tokens")
    r.add_argument("--correct-bonus", type=float, default=1.0)
    r.add_argument("--fidelity-coef", type=float, default=0.0,
                   help="reward lost per unit of the question's words not kept in order (0..1)")
    r.add_argument("--eval-every", type=int, default=20)
    r.add_argument("--eval-size", type=int, default=32)
    r.add_argument("--save-every", type=int, default=20)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--device", default="cpu")
    r.add_argument("--threads", type=int, default=0)
    r.add_argument("--resume", action="store_true")
    r.add_argument("--force", action="store_true")
    r.add_argument("--quiet", action="store_true")
    condense_args(r)
    r.set_defaults(fn=cmd_reinforce)

    e = sub.add_parser("eval", help="full CoT vs condensed (after/before REINFORCE) vs truncated, on held-out")
    e.add_argument("--large", required=True)
    e.add_argument("--data", default="data/mm/heldout.jsonl")
    e.add_argument("--policy", action="append", default=[], help="NAME=CHECKPOINT (repeatable)")
    e.add_argument("--limit", type=int, default=0)
    e.add_argument("--exclude-pretrain-draws", type=int, default=20000,
                   help="drop problems among the pretraining generator's first N draws")
    e.add_argument("--json", help="also write the results here")
    e.add_argument("--threads", type=int, default=0)
    e.add_argument("--quiet", action="store_true")
    condense_args(e)
    e.set_defaults(fn=cmd_eval)

    x = sub.add_parser("export", help="copy a checkpoint for shipping (weights, config, tokenizer, lineage logs)")
    x.add_argument("checkpoint")
    x.add_argument("--out", default="memory_model/checkpoints/default")
    x.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="weights as shipped")
    x.set_defaults(fn=cmd_export)

    c = sub.add_parser("condense", help="condense one (prompt, chain-of-thought) pair")
    c.add_argument("checkpoint")
    c.add_argument("prompt")
    c.add_argument("cot")
    c.add_argument("--max-new", type=int, default=100)
    c.set_defaults(fn=cmd_condense)
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        a.fn(a)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
