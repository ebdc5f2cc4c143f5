"""SVAMP and GSM8K from `../shared/data/` (or $HYBRID_DATA_DIR), as `Problem`s.

Split rule (documented, never changed): SVAMP's 1000 rows are ordered by `ID`, shuffled
with `random.Random(0)`, and the first 700 are `svamp-train`, the other 300 `svamp-dev`.
Nothing trains on svamp-dev. GSM8K (test split) is evaluation only: `gsm8k` is its rows in
file order, `gsm8k:N` the first N.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

SVAMP_FILE, GSM8K_FILE = "svamp.json", "gsm8k_test.json"
SPLIT_SEED, N_TRAIN = 0, 700


@dataclass(frozen=True)
class Problem:
    id: str
    question: str  # the whole problem text as asked
    answer: float
    equation: str | None = None  # SVAMP's, e.g. "( 76.0 - 25.0 )"; None for GSM8K


class DataError(ValueError):
    """A data file or split name that cannot be used; the message says which and why."""


def data_dir() -> Path:
    env = os.environ.get("HYBRID_DATA_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _read(path: Path) -> list[dict]:
    if not path.is_file():
        raise DataError(f"{path} not found (set HYBRID_DATA_DIR to the folder holding {path.name})")
    try:
        rows = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list of problems")
    return rows


def _join(body: str, question: str) -> str:
    body = body.strip()
    return f"{body}{'' if body.endswith(('.', '?', '!')) else '.'} {question.strip()}"


def load_svamp(path: Path | None = None) -> list[Problem]:
    rows = _read(path or data_dir() / SVAMP_FILE)
    try:
        return [Problem(str(r["ID"]), _join(r["Body"], r["Question"]), float(r["Answer"]), r["Equation"].strip())
                for r in rows]
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"SVAMP row without ID/Body/Question/Equation/Answer: {e}") from e


def load_gsm8k(path: Path | None = None) -> list[Problem]:
    rows = _read(path or data_dir() / GSM8K_FILE)
    try:
        return [Problem(f"gsm8k-{i}", r["question"].strip(), float(r["answer"])) for i, r in enumerate(rows)]
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"GSM8K row without question/answer: {e}") from e


def split_svamp(problems: list[Problem]) -> tuple[list[Problem], list[Problem]]:
    """(train, dev) by the rule in this module's docstring."""
    ordered = sorted(problems, key=lambda p: p.id)
    random.Random(SPLIT_SEED).shuffle(ordered)
    n_train = min(N_TRAIN, len(ordered) * 7 // 10)
    return ordered[:n_train], ordered[n_train:]


def load(name: str, root: Path | None = None) -> list[Problem]:
    """'svamp-train', 'svamp-dev', 'gsm8k' or 'gsm8k:N' (the first N)."""
    root = root or data_dir()
    if name in ("svamp-train", "svamp-dev"):
        train, dev = split_svamp(load_svamp(root / SVAMP_FILE))
        return train if name == "svamp-train" else dev
    base, _, n = name.partition(":")
    if base == "gsm8k":
        rows = load_gsm8k(root / GSM8K_FILE)
        if not n:
            return rows
        if not n.isdigit() or int(n) < 1:
            raise DataError(f"gsm8k:N needs a positive N, got {name!r}")
        return rows[:int(n)]
    raise DataError(f"unknown task data {name!r}: use svamp-train, svamp-dev, gsm8k or gsm8k:N")
