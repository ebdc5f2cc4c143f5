"""Real reasoning data: loading, the seeded SVAMP split, CoT targets from equations, answer checking."""

import json

import pytest

from tasks.answers import extract_answer, is_correct
from tasks.cot import continuation_targets, cot_target, equation_steps, with_known
from tasks.data import DataError, load, load_svamp, split_svamp


def _svamp(tmp_path, n=20):
    rows = [{"ID": f"p-{i}", "Body": f"Sam has {i + 3} apples", "Question": "How many apples?",
             "Equation": f"( {i + 3}.0 + 0.0 )", "Answer": float(i + 3), "Type": "Addition"} for i in range(n)]
    (tmp_path / "svamp.json").write_text(json.dumps(rows))
    (tmp_path / "gsm8k_test.json").write_text(json.dumps([{"question": f"q{i}?", "answer": i} for i in range(5)]))
    return tmp_path


def test_split_is_deterministic_disjoint_and_independent_of_file_order(tmp_path):
    root = _svamp(tmp_path)
    train, dev = load("svamp-train", root), load("svamp-dev", root)
    assert len(train) == 14 and len(dev) == 6  # 70/30 of a 20-row file
    assert not {p.id for p in train} & {p.id for p in dev}
    rows = json.loads((root / "svamp.json").read_text())
    (root / "svamp.json").write_text(json.dumps(rows[::-1]))  # a reordered copy splits the same way
    assert load("svamp-train", root) == train and load("svamp-dev", root) == dev
    assert train[0].question == f"Sam has {int(train[0].answer)} apples. How many apples?"


def test_gsm8k_prefix_and_bad_names(tmp_path):
    root = _svamp(tmp_path)
    assert [p.answer for p in load("gsm8k:3", root)] == [0.0, 1.0, 2.0]
    with pytest.raises(DataError, match="unknown task data"):
        load("svamp-test", root)
    with pytest.raises(DataError, match="positive N"):
        load("gsm8k:x", root)
    with pytest.raises(DataError, match="not found"):
        load("svamp-dev", tmp_path / "missing")
    (root / "svamp.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        load("svamp-dev", root)


def test_the_real_svamp_split_is_700_300_and_fixed():
    # CI lays ../shared/data beside the checkout; this pins the documented rule on the real file
    train, dev = split_svamp(load_svamp())
    assert len(train) == 700 and len(dev) == 300
    assert [p.id for p in dev[:3]] == [p.id for p in load("svamp-dev")[:3]]
    assert train[0].id == "chal-494"


@pytest.mark.parametrize("equation,answer,expected", [
    ("( 76.0 - 25.0 )", 51, "76 - 25 = 51.\nThe answer is 51."),
    ("( ( 76.0 - 25.0 ) * 3.0 )", 153, "76 - 25 = 51.\n51 * 3 = 153.\nThe answer is 153."),
    ("( 10.0 / 4.0 )", 2.5, "10 / 4 = 2.5.\nThe answer is 2.5."),
    ("( 7.0 * ( 2.0 + 3.0 ) )", 35, "2 + 3 = 5.\n7 * 5 = 35.\nThe answer is 35."),
])
def test_cot_target_writes_one_line_per_operation(equation, answer, expected):
    assert cot_target(equation, answer) == expected


def test_cot_target_refuses_an_equation_that_disagrees_with_the_answer():
    with pytest.raises(ValueError, match="not the answer"):
        cot_target("( ( 4.0 - 2.0 ) + 3.0 )", 1.0)
    with pytest.raises(ValueError):
        equation_steps("( 4.0 - )")


@pytest.mark.parametrize("text,ok", [("12", True), ("12.0", True), ("The answer is 12.", True),
                                     ("3 + 9 = 12.\nThe answer is 12.", True), ("123", False),
                                     ("12.5", False), ("-12", False), ("The answer is 13. 12", False),
                                     ("no number", False)])
def test_answers_must_equal_the_reference_not_start_with_it(text, ok):
    assert is_correct(text, 12.0) is ok


def test_extract_answer_reads_thousands_and_the_last_number():
    assert extract_answer("They paid $1,200 in total") == 1200
    assert extract_answer("5 + 3 = 8. So 8 apples") == 8
    assert extract_answer("") is None


def test_continuation_targets_start_from_each_known_step_in_the_memory_models_format():
    from memory_model.data import reference_condensation

    pairs = continuation_targets("Q?", "( ( 76.0 - 25.0 ) * 3.0 )", 153)
    assert pairs == [("Q? Known: 76 - 25 = 51.", "51 * 3 = 153.\nThe answer is 153."),
                     ("Q? Known: 76 - 25 = 51; 51 * 3 = 153.", "The answer is 153.")]
    # the prompt is what the memory model's extractive target makes of the same reasoning
    assert pairs[1][0] == reference_condensation("Q?", "76 - 25 = 51.\n51 * 3 = 153.")
    assert with_known("Q?", []) == "Q?"
    assert with_known("Q?", ["1 + 1 = 2.", "2 + 1 = 3.", "3 + 1 = 4."]) == "Q? Known: 2 + 1 = 3; 3 + 1 = 4."
