"""Tests for mlx_canary.timestamps: bit-exact parity with NeMo's process_aed_timestamp_outputs (words, segments,
clean text) on hand-written edge cases and fuzzed token strings, plus unit tests without NeMo."""

from __future__ import annotations

import random

import pytest

from mlx_canary.timestamps import parse_timestamps

EXAMPLE = " <|0|>Hello<|3|><|4|>world.<|9|><|10|>How<|12|><|13|>are you?<|19|>"

EDGE_CASES = [
    EXAMPLE,
    "",
    "   ",
    "no timestamps here",
    " leading space, no timestamps ",
    "<|0|>",
    "<|0|><|5|>",
    "<|0|>   <|5|>",
    "<|3|>backwards<|1|>",
    "<|0|>Hello,<|2|><|3|>world!<|5|><|6|>Next<|7|>",
    "<|0|>are you?<|19|>",
    "prefix <|0|>a<|1|> suffix",
    "<|0|><|1|>word<|2|>",
    "<|0|>a\nb<|1|>",
    "<|0|>a<|1|>\n<|2|>b<|3|>",
    "<|٣|>arabic-indic digits<|٤|>",
    "<|899|>x<|900|><|1000|>y<|123456|>",
    "<|1|>?<|2|><|3|>!<|4|><|5|>.<|6|>",
    "<|1|>...<|2|><|3|>tail<|4|>",
    '<|0|>he said "hi."<|4|><|5|>then<|6|>',
    "<|en|><|0|>hi<|1|><|endoftext|>",
    "<|0|> padded  word <|2|>",
    "<|0|>Grüße, señor!<|7|><|8|>Ça va?<|12|>",
    "<|0|>a<|1|>b<|2|>c<|3|>",
    "<|00|>zero padded<|007|>",
    "<|0|>\ttab\t<|1|>",
    "<| 1|>not a token<|2|>",
]

STRIDES = [(0.01, 8), (0.01, 4), (0.02, 4), (0.015, 3), (0.01, 1)]


def _fuzz_cases(count: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    fragments = ["word", "Wörd", "are you", " ", "  ", ".", "?", "!", ",", "\n", "", "a b.", "<|en|>", "<|", "|>",
                 "<|pnc|>", "x?", "¿y?", "end!"]
    cases = []
    for _ in range(count):
        parts = []
        for _ in range(rng.randrange(0, 14)):
            if rng.random() < 0.45:
                parts.append(f"<|{rng.randrange(0, 1200)}|>")
            else:
                parts.append(rng.choice(fragments))
        cases.append(("" if rng.random() < 0.5 else " ") + "".join(parts))
    return cases


def _nemo_parse(text: str, window_stride: float, subsampling_factor: int):
    from nemo.collections.asr.parts.utils.rnnt_utils import Hypothesis
    from nemo.collections.asr.parts.utils.timestamp_utils import process_aed_timestamp_outputs

    hyp = process_aed_timestamp_outputs([Hypothesis(score=0.0, y_sequence=[], text=text)],
                                        subsampling_factor, window_stride)[0]
    words = [{"text": w["word"], **{k: w[k] for k in ("start", "end", "start_offset", "end_offset")}}
             for w in hyp.timestamp["word"]]
    segments = [{"text": s["segment"], **{k: s[k] for k in ("start", "end", "start_offset", "end_offset")}}
                for s in hyp.timestamp["segment"]]
    assert hyp.timestamp["char"] == []
    return hyp.text, words, segments


@pytest.fixture(scope="module")
def nemo_timestamps():
    pytest.importorskip("nemo")
    pytest.importorskip("nemo.collections.asr.parts.utils.timestamp_utils")
    return _nemo_parse


def _assert_same(ours, expected, case):
    text, words, segments = ours
    exp_text, exp_words, exp_segments = expected
    assert text == exp_text, case
    assert words == exp_words, case  # exact float equality, not approx
    assert segments == exp_segments, case
    for got, want in zip(words + segments, exp_words + exp_segments):
        for key in ("start", "end"):
            assert type(got[key]) is type(want[key]) and got[key].hex() == want[key].hex(), case


@pytest.mark.parity
@pytest.mark.parametrize("window_stride, subsampling_factor", STRIDES)
def test_edge_cases_match_nemo(nemo_timestamps, window_stride, subsampling_factor):
    for case in EDGE_CASES:
        ours = parse_timestamps(case, window_stride=window_stride, subsampling_factor=subsampling_factor)
        _assert_same(ours, nemo_timestamps(case, window_stride, subsampling_factor), case)


@pytest.mark.parity
def test_fuzzed_strings_match_nemo(nemo_timestamps):
    for i, case in enumerate(_fuzz_cases()):
        window_stride, subsampling_factor = STRIDES[i % len(STRIDES)]
        ours = parse_timestamps(case, window_stride=window_stride, subsampling_factor=subsampling_factor)
        _assert_same(ours, nemo_timestamps(case, window_stride, subsampling_factor), case)


# ---------------------------------------------------------------------------------------------------------------
# Unit tests (no NeMo)

def test_reference_example():
    text, words, segments = parse_timestamps(EXAMPLE)
    assert text == "Hello world. How are you?"
    assert [(w["text"], w["start_offset"], w["end_offset"]) for w in words] == [
        ("Hello", 0, 3), ("world.", 4, 9), ("How", 10, 12), ("are you?", 13, 19)]
    assert [(w["start"], w["end"]) for w in words] == [(0.0, 0.24), (0.32, 0.72), (0.8, 0.96), (1.04, 1.52)]
    assert [(s["text"], s["start"], s["end"]) for s in segments] == [
        ("Hello world.", 0.0, 0.72), ("How are you?", 0.8, 1.52)]
    assert segments[1]["start_offset"] == 10 and segments[1]["end_offset"] == 19


def test_times_use_nemo_multiplication_order():
    _, words, _ = parse_timestamps("<|7|>x<|11|>", window_stride=0.015, subsampling_factor=3)
    assert words[0]["start"] == 7 * 0.015 * 3 and words[0]["end"] == 11 * 0.015 * 3


def test_without_timestamps_text_is_only_stripped():
    assert parse_timestamps("  hello <|en|> world ") == ("hello <|en|> world", [], [])
    assert parse_timestamps("<|0|> <|1|>") == ("", [], [])


def test_start_after_end_kept_and_outside_text_dropped():
    text, words, segments = parse_timestamps("lead <|9|>late<|2|> mid <|3|>next.<|4|> trail")
    assert text == "late next."
    assert (words[0]["start_offset"], words[0]["end_offset"]) == (9, 2)
    assert words[0]["start"] > words[0]["end"]
    assert segments == [{"text": "late next.", "start": 9 * 0.01 * 8, "end": 4 * 0.01 * 8,
                         "start_offset": 9, "end_offset": 4}]


def test_tail_segment_without_delimiter():
    _, _, segments = parse_timestamps("<|0|>One.<|1|><|2|>two<|3|><|4|>three<|5|>")
    assert [(s["text"], s["start_offset"], s["end_offset"]) for s in segments] == [("One.", 0, 1), ("two three", 2, 5)]
