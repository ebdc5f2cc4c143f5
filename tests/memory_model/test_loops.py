"""Later-loop data (memory_model.loops): the served loop replayed offline, one CoT line per
loop, condensed by the extractive rule, ending where a line states the answer."""

from __future__ import annotations

import json

from memory_model import large
from memory_model.__main__ import main
from memory_model.loops import first_line, replay_loops

LATER = {  # the large model's next line for each condensed prompt
    "QA Known: 3 + 4 = 7.": "The answer is 7.",
    "QB Known: 76 - 25 = 51.": "51 * 3 = 153.\nThe answer is 153.",
    "QB Known: 76 - 25 = 51; 51 * 3 = 153.": "The answer is 153.",
    "QD Known: 2 + 2 = 4.": "I am not sure.",
}
ROWS = [{"question": "QA", "cot": "3 + 4 = 7.\nThe answer is 7.", "answer": 7},
        {"question": "QB", "cot": "76 - 25 = 51.\n51 * 3 = 153.\nThe answer is 153.", "answer": 153},
        {"question": "QC", "cot": "The answer is 5.", "answer": 5},  # loop 1 states it: no later loop
        {"question": "QD", "cot": "2 + 2 = 4.", "answer": 4}]


def _scripted(monkeypatch):
    asked = []

    def generate_cot(lm, contexts, max_new):
        asked.append(list(contexts))
        return [LATER[c] for c in contexts]

    monkeypatch.setattr(large, "generate_cot", generate_cot)
    return asked


def test_later_loops_read_the_condensed_prompt_and_end_at_the_answer(monkeypatch):
    asked = _scripted(monkeypatch)
    rows = replay_loops(None, ROWS, loops=4)
    assert [(r["question"], r["cot"], r["loop"], r["source_question"]) for r in rows] == [
        ("QB Known: 76 - 25 = 51.", "51 * 3 = 153.", 2, "QB")]
    # loop 2 asks about every problem whose first line was an equation; loop 3 only about QB's
    # merged P; nothing is left for loop 4
    assert asked == [["QA Known: 3 + 4 = 7.", "QB Known: 76 - 25 = 51.", "QD Known: 2 + 2 = 4."],
                     ["QB Known: 76 - 25 = 51; 51 * 3 = 153."]]
    assert first_line("\n 1 + 1 = 2.\nmore") == "1 + 1 = 2."


def test_make_loop_data_writes_rows_and_sft_reads_several_files(monkeypatch, tmp_path, mm_checkpoint, capsys):
    _scripted(monkeypatch)
    monkeypatch.setattr("engine.runner.load_model", lambda path: None)
    data, loops = tmp_path / "train.jsonl", tmp_path / "loops.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    assert main(["make-loop-data", "--large", "x", "--data", str(data), "--out", str(loops), "--loops", "1"]) == 2
    assert "at least 2" in capsys.readouterr().err and not loops.exists()
    assert main(["make-loop-data", "--large", "x", "--data", str(data), "--out", str(loops), "--loops", "3"]) == 0
    assert len(loops.read_text().splitlines()) == 1
    assert json.loads(capsys.readouterr().out)["by_loop"] == {"2": 1, "3": 0}
    out = tmp_path / "sft"
    assert main(["sft", "--init", str(mm_checkpoint), "--data", f"{data},{loops}", "--synthetic", "0",
                 "--target", "extractive", "--out", str(out), "--steps", "1", "--batch-size", "2", "--warmup", "1", "--quiet"]) == 0
    assert "4 training pairs, 1 validation pairs" in capsys.readouterr().out  # 4 rows + 1 later-loop row
