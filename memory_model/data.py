"""Training text for the memory model, all from what the machine already has.

Sources (`--data`, comma-separated):
  stdlib    docstrings of CPython's standard library (parsed with `ast` from the .py
            files, not imported; tests, idlelib, lib2to3, turtledemo and site-packages
            skipped; docstrings under 80 characters dropped): ~4k documents, ~1.5 MB of
            human-written English technical prose
  pydoc     CPython's `pydoc_data.topics` (the language reference, ~0.5 MB)
  problems  N arithmetic word problems from the `pretrain` split of
            `memory_model.problems`, each followed by its templated solution
  cot:PATH  questions + chain-of-thought written by the large model (`make-data` jsonl)

`condense_examples` builds the supervised warm-start pairs (prompt, chain-of-thought ->
condensed prompt). Two targets: `extractive` (`reference_condensation`: the question plus
the chain-of-thought's last equations, mistakes included) and `refined`
(`refined_condensation`: the question plus the correct intermediate results).
"""

from __future__ import annotations

import ast
import random
import sysconfig
from pathlib import Path

import torch

from tasks.cot import KNOWN, KNOWN_EQUATIONS, split_known, with_known

from . import problems as P
from .cot import read_jsonl
from .tokenizer import Framed

_SKIP_DIRS = {"test", "tests", "site-packages", "idlelib", "lib2to3", "turtledemo"}


def stdlib_docstrings(min_chars: int = 80) -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for f in sorted(root.rglob("*.py")):
        if _SKIP_DIRS & set(f.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(f.read_bytes())
        except (SyntaxError, ValueError):
            continue  # a few stdlib files are deliberately invalid (bad-syntax fixtures)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                d = ast.get_docstring(node)
                if d and len(d) >= min_chars:
                    docs.append(d)
    return docs


def pydoc_topics() -> list[str]:
    from pydoc_data.topics import topics

    return [text for _, text in sorted(topics.items())]


def problem_texts(n: int = 20000) -> list[str]:
    probs = P.make_splits({"pretrain": n})["pretrain"]
    return [f"{p.question}\n{P.template_cot(p)}" for p in probs]


def cot_texts(path: str | Path) -> list[str]:
    return [f"{r['question']}\n{r['cot']}" for r in read_jsonl(Path(path))]


def load_texts(spec: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for part in [s.strip() for s in spec.split(",") if s.strip()]:
        name, _, arg = part.partition(":")
        if name == "stdlib":
            out[part] = stdlib_docstrings()
        elif name == "pydoc":
            out[part] = pydoc_topics()
        elif name == "problems":
            out[part] = problem_texts(int(arg) if arg else 20000)
        elif name == "cot":
            if not arg:
                raise ValueError("cot needs a path: cot:data/mm/train.jsonl")
            out[part] = cot_texts(arg)
        else:
            raise ValueError(f"unknown data source {name!r} (stdlib, pydoc, problems[:N], cot:PATH)")
    return out


def token_stream(texts: list[str], tok: Framed) -> torch.Tensor:
    """Documents as one stream: <bos> doc <eos> <bos> doc <eos> ..."""
    ids: list[int] = []
    for t in texts:
        ids += [tok.bos_id, *tok.encode(t), tok.eos_id]
    return torch.tensor(ids, dtype=torch.int32)


def split_stream(stream: torch.Tensor, val_fraction: float = 0.02) -> tuple[torch.Tensor, torch.Tensor]:
    n_val = max(int(len(stream) * val_fraction), 1)
    return stream[:-n_val], stream[-n_val:]


def random_windows(stream: torch.Tensor, batch: int, seq_len: int, gen: torch.Generator
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) windows of seq_len tokens at random offsets; y is x shifted by one."""
    if len(stream) <= seq_len + 1:
        raise ValueError(f"only {len(stream)} tokens of text: need more than seq_len + 1 = {seq_len + 1}")
    starts = torch.randint(0, len(stream) - seq_len - 1, (batch,), generator=gen)
    w = torch.stack([stream[s:s + seq_len + 1] for s in starts.tolist()]).long()
    return w[:, :-1], w[:, 1:]


def reference_condensation(question: str, cot: str, max_equations: int = KNOWN_EQUATIONS) -> str:
    """The warm-start target: the question, then the chain-of-thought's last arithmetic
    statements ('a + b = c'), which carry its intermediate results. A fixed rule that
    REINFORCE is then free to improve on. In a later loop the prompt is already condensed
    ('Q Known: ...'): its known results and the new CoT's merge into one list."""
    question, known = split_known(question)
    return with_known(question, P.equations(known) + P.equations(cot), max_equations)


def refined_condensation(question: str, steps) -> str:
    """The 'refined' warm-start target: the question and its correct intermediate results,
    from the generator's ground-truth steps (the chain-of-thought is still the input, but
    the target does not copy its mistakes). Only possible where answers are known, as in
    the seed's post-training data."""
    eqs = "; ".join(f"{x} {op} {y} = {r}" for op, x, y, r in steps)
    return f"{split_known(question)[0]}{KNOWN}{eqs}."  # a later loop's P: its own list replaced


TARGETS = ("extractive", "refined")


def condense_examples(rows: list[dict], tok: Framed, max_prompt: int, max_cot: int, max_out: int,
                      target_kind: str = "extractive") -> list[tuple[list[int], int]]:
    """(token ids, index where the target starts) per example."""
    if target_kind not in TARGETS:
        raise ValueError(f"unknown target {target_kind!r}; choose one of {TARGETS}")
    out = []
    for r in rows:
        if target_kind == "refined":
            target = refined_condensation(r["question"], r["steps"])
        else:
            target = reference_condensation(r["question"], r["cot"])
        x = tok.condense_input(r["question"], r["cot"], max_prompt, max_cot)
        y = tok.encode(target)[:max_out] + [tok.eos_id]
        out.append((x + y, len(x)))
    return out


def pad_batch(examples: list[tuple[list[int], int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) for supervised examples: loss only on target tokens, -100 elsewhere."""
    t = max(len(ids) for ids, _ in examples)
    x = torch.full((len(examples), t - 1), pad_id, dtype=torch.long)
    y = torch.full((len(examples), t - 1), -100, dtype=torch.long)
    for i, (ids, start) in enumerate(examples):
        ids_t = torch.tensor(ids)
        x[i, :len(ids) - 1] = ids_t[:-1]
        y[i, start - 1:len(ids) - 1] = ids_t[start:]
    return x, y


def sample_examples(examples: list, batch: int, rng: random.Random) -> list:
    return [examples[rng.randrange(len(examples))] for _ in range(batch)]
