"""forced_alignment: NeMo's forced aligner as pure functions.

Hand-made trellises check the rules (repeated tokens need a blank between them, ties, the final blank), and NeMo's
own ``get_forced_aligned_timestamps_with_external_model`` (run by tests/nemo_aligner_oracle.py in a subprocess,
cached) is the reference for words, segments and chars: on random log-probs (peaked, coarse with many exact ties,
uniform where everything ties) and on the tiny aligner's log-probs of real clips.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import sentencepiece

import nemo_aligner_oracle
from alignment_fixtures import CharVocab
from mlx_canary import forced_alignment as fa


def _log_probs(rows) -> np.ndarray:
    return np.log(np.asarray(rows, dtype=np.float32))


# -- the Viterbi rules on hand-made trellises -------------------------------------------------------------------


def test_viterbi_follows_the_best_path():
    # vocab {0: a, 1: b}, blank 2; targets blank a blank b blank
    lp = _log_probs([[0.1, 0.1, 0.8], [0.8, 0.1, 0.1], [0.1, 0.1, 0.8], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8]])
    assert fa.viterbi(lp, [2, 0, 2, 1, 2]) == [0, 1, 2, 3, 4]


def test_viterbi_skips_a_blank_between_different_tokens():
    lp = _log_probs([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1]])
    assert fa.viterbi(lp, [2, 0, 2, 1, 2]) == [1, 3]


def test_repeated_tokens_need_a_blank_between_them():
    # "a a": the path may not jump from the first a to the second; with two frames it has to pass the blank.
    lp = _log_probs([[0.8, 0.1, 0.1], [0.8, 0.1, 0.1], [0.8, 0.1, 0.1]])
    path = fa.viterbi(lp, [2, 0, 2, 0, 2])
    assert path == [1, 2, 3]


def test_ties_prefer_staying_then_one_step():
    uniform = np.full((4, 3), np.log(1 / 3), dtype=np.float32)
    # every path scores the same: the path ends on the last token (its tie with the final blank), and going back
    # the first candidate (stay) wins wherever it is possible: the token is entered as late as the start allows
    path = fa.viterbi(uniform, [2, 0, 2, 1, 2])
    assert path == [1, 3, 3, 3]


def test_a_path_that_ends_on_the_final_blank_when_it_is_better():
    lp = _log_probs([[0.8, 0.1, 0.1], [0.1, 0.1, 0.8]])
    assert fa.viterbi(lp, [2, 0, 2]) == [1, 2]


def test_empty_reference_is_all_blank():
    lp = _log_probs([[0.5, 0.5], [0.5, 0.5]])
    assert fa.viterbi(lp, [1]) == [0, 0]


# -- splitting rules ---------------------------------------------------------------------------------------------


def test_segments_split_after_punctuation_followed_by_a_space():
    assert fa.split_segments("Call me at 10 a.m. please! Yes. Ok") == ["Call me at 10 a.m.", "please!", "Yes.", "Ok"]
    assert fa.split_segments("a.m.b? x") == ["a.m.b?", "x"]
    assert fa.split_segments("Well... we") == ["Well...", "we"]
    assert fa.split_segments("one. two", None) == ["one. two"]


def test_plan_interleaves_blanks_and_numbers_positions():
    utt = fa.plan_utterance("ab c", CharVocab(), num_frames=10)
    assert utt.targets == [27, 1, 27, 2, 27, 3, 27]
    segment = utt.segments[1]
    assert (segment.s_start, segment.s_end) == (1, 5)
    words = [w for w in segment.children if not w.blank]
    assert [(w.text, w.s_start, w.s_end) for w in words] == [("ab", 1, 3), ("c", 5, 5)]


def test_too_many_tokens_for_the_frames_gives_no_timestamps():
    lp = np.zeros((2, 28), np.float32)
    assert fa.align_text(lp, "abc", CharVocab(), 0.08) == fa.AlignedText()
    assert fa.align_text(lp, "   ", CharVocab(), 0.08) == fa.AlignedText()


# -- against NeMo ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def oracle():
    out = nemo_aligner_oracle.oracle_dir_for_tests()
    ref = json.loads((out / "reference.json").read_text())
    tok = next((out / "aligner").glob("*_tokenizer.model"))
    vocab = fa.SentencePieceVocab(sentencepiece.SentencePieceProcessor(model_file=str(tok)))
    return ref, vocab, np.load(out / "random.npz"), np.load(out / "clips.npz")


def _nemo_words_segments(stamps: dict) -> tuple[list, list]:
    def convert(entries, key):
        return [{"text": e[key], "start": e["start"], "end": e["end"], "start_offset": e["start_offset"],
                 "end_offset": e["end_offset"]} for e in entries]

    return convert(stamps["word"], "word"), convert(stamps["segment"], "segment")


def _check(case, log_probs, vocab, frame_seconds):
    got = fa.align_text(log_probs, case["text"], vocab, frame_seconds)
    words, segments = _nemo_words_segments(case["words_segments"])
    assert got.words == words
    assert got.segments == segments
    chars = fa.align_text(log_probs, case["text"], vocab, frame_seconds, level="chars")
    assert chars.chars == case["chars"]["char"]
    assert chars.words == [] and chars.segments == []


@pytest.mark.parity
def test_random_log_probs_equal_nemo(oracle):
    ref, vocab, arrays, _ = oracle
    assert vocab.blank_id == ref["vocab_size"]
    for case in ref["random_cases"]:
        _check(case, arrays[case["array"]], vocab, ref["frame_seconds"])


@pytest.mark.parity
def test_aligner_log_probs_of_clips_equal_nemo(oracle):
    """NeMo's log-probs of the clips (through its own transcribe) -> the same words and segments as NeMo's."""
    ref, vocab, _, clips = oracle
    aligned = 0
    for case in ref["audio_cases"]:
        _check(case, clips[f"log_probs{case['clip']}"], vocab, ref["frame_seconds"])
        aligned += bool(case["words_segments"]["word"])
    assert aligned >= 5  # the cases do exercise alignment, not only the empty paths


@pytest.mark.parity
def test_the_cases_cover_the_rules(oracle):
    ref, vocab, _, _ = oracle
    texts = {c["text"] for c in ref["random_cases"]}
    assert any("⁇" in t for t in texts) and any("a.m." in t for t in texts) and "" in texts
    assert vocab.unknown_characters("Hello ẞ world") == ["ẞ"]
    moved = [c for c in ref["random_cases"] if any(w["word"].endswith((",", ".", "!", "?"))
                                                   for w in c["words_segments"]["word"])]
    assert moved
