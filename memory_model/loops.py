"""Later-loop training data: the hybrid loop's second and later loops, whose prompt P is
already condensed ("Q Known: 76 - 25 = 51."), as the served loop produces them with one
chain-of-thought line per loop and `stop_at_answer`.

For each make-data row, loop 1's line is the first line of the large model's own CoT; every
later loop asks the large model (greedy, the served CoT prompt) to reason about the P the
extractive rule (`reference_condensation`, the memory model's warm-start target) made of the
previous loop. A loop whose line states the answer ends that problem (the served loop stops
there and condenses nothing); a line with no equation ends it too. Each remaining later loop is
one row: `question` is the condensed P the memory model reads, `cot` the new line.

    python -m memory_model make-loop-data --large artifacts/smollm2-135m-svamp-cont-int8 \\
        --data data/mm-svamp/train.jsonl --out data/mm-svamp/loops.jsonl --loops 4
"""

from __future__ import annotations

from tasks.cot import ANSWER_PREFIX

from . import large
from . import problems as P
from .data import reference_condensation


def first_line(text: str) -> str:
    """A loop's chain-of-thought with one line per loop (the served G_max = 1)."""
    return next((line.strip() for line in text.split("\n") if line.strip()), "")


def _goes_on(line: str) -> bool:
    """Whether the loop after this line runs: it neither states the answer nor lacks an equation."""
    return not line.startswith(ANSWER_PREFIX) and bool(P.equations(line))


def replay_loops(lm, rows: list[dict], loops: int, max_new: int = 24) -> list[dict]:
    """Rows for loops 2..`loops` (see the module docstring); `source_question` keeps the
    original question, `loop` the loop number."""
    active = [(r, reference_condensation(r["question"], first_line(r["cot"])))
              for r in rows if _goes_on(first_line(r["cot"]))]
    out: list[dict] = []
    for loop in range(2, loops + 1):
        if not active:
            break
        lines = [first_line(c) for c in large.generate_cot(lm, [p for _, p in active], max_new)]
        nxt = []
        for (r, p), line in zip(active, lines):
            if _goes_on(line):
                out.append({**r, "source_question": r["question"], "question": p, "cot": line, "loop": loop})
                nxt.append((r, reference_condensation(p, line)))
        active = nxt
    return out
