"""Reading a model's final answer and judging it: the number after the last "The answer
is", else the last number in the text; correct only when numerically equal to the
reference (so "123" is not 12, nor "12.5", nor "-12")."""

from __future__ import annotations

import re

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_ANSWER_IS = re.compile(r"answer is\s*:?\s*\$?\s*(-?\d[\d,]*(?:\.\d+)?)", re.IGNORECASE)


def _to_float(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def extract_answer(text: str) -> float | None:
    said = _ANSWER_IS.findall(text)
    if said:
        return _to_float(said[-1])
    numbers = _NUMBER.findall(text)
    return _to_float(numbers[-1].rstrip(",")) if numbers else None


def is_correct(text: str, reference: float) -> bool:
    value = extract_answer(text)
    return value is not None and abs(value - reference) < 1e-6 * max(1.0, abs(reference))
