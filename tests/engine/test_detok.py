"""Incremental detokenization and stop strings."""

from engine.detok import IncrementalDetokenizer, StopMatcher
from tests.helpers import make_tokenizer


def _stream(tok, prompt_ids, ids):
    d = IncrementalDetokenizer(tok, prompt_ids)
    return "".join(d.push(i) for i in ids) + d.flush()


def test_incremental_text_equals_full_decode_for_multibyte_text():
    tok = make_tokenizer()
    text = "héllo wörld, 你好世界 🙂 café naïve"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    prompt = tok("Prompt: ", add_special_tokens=False)["input_ids"]
    assert _stream(tok, prompt, ids) == text


def test_no_replacement_characters_are_emitted_mid_character():
    tok = make_tokenizer()
    ids = tok("🙂🙂", add_special_tokens=False)["input_ids"]
    d = IncrementalDetokenizer(tok, [])
    pieces = [d.push(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + d.flush() == "🙂🙂"


def test_stop_string_split_across_deltas_is_not_emitted():
    m = StopMatcher(["STOP"])
    out = [m.feed(x) for x in ["Hello ", "wor", "ld ST", "O", "P and more"]]
    assert "".join(out) == "Hello world "
    assert m.stopped
    assert m.feed("later") == ""


def test_partial_stop_prefix_is_released_when_it_diverges():
    m = StopMatcher(["\nUser:"])
    assert m.feed("a\nUs") == "a"
    assert m.feed("ually") == "\nUsually"
    assert not m.stopped


def test_earliest_of_several_stops_wins():
    m = StopMatcher(["cd", "b"])
    assert m.feed("abcd") == "a"


def test_flush_releases_held_text_at_the_end():
    m = StopMatcher(["xyz"])
    assert m.feed("abx") == "ab"
    assert m.flush() == "x"
