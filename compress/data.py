"""Evaluation and calibration text that needs no download.

Source: the Python Language Reference and library topics that every CPython ships as
`pydoc_data.topics` (real, human-written English technical prose, ~1 MB). Topics are
split deterministically by sorted name: even positions are held out for evaluation,
odd positions are reserved for calibration, so the two never overlap.
"""

from __future__ import annotations


def _topics() -> list[tuple[str, str]]:
    from pydoc_data.topics import topics

    return sorted(topics.items())


def heldout_text() -> str:
    return "\n\n".join(text for i, (_, text) in enumerate(_topics()) if i % 2 == 0)


def calibration_text() -> str:
    return "\n\n".join(text for i, (_, text) in enumerate(_topics()) if i % 2 == 1)


DATASET_NAME = "cpython-pydoc-topics (even topics held out)"
