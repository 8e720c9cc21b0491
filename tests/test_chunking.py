"""Tests for mlx_canary.chunking: NeMo parity of the chunk planner and the LCS token merge, the timestamp-aware
merge across chunk seams on synthetic chunk outputs, and the pipeline's long-audio path (``CanaryModel.decode_long``)
end to end with a fake engine."""

from __future__ import annotations

import random
import re
import types
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest

from mlx_canary.chunking import (
    Chunk,
    lcs_alignment,
    merge_buffer,
    merge_chunk_tokens,
    merge_chunks_text,
    merge_delay,
    merge_timed_chunks,
    optimal_chunk_size,
    plan_chunks,
    timed_groups,
)
from mlx_canary.config import DecodingConfig
from mlx_canary.errors import CanaryError, UnsupportedOption
from mlx_canary.aed import AEDEngine
from mlx_canary.engine import Capabilities
from mlx_canary.timestamps import build_segments, parse_timestamps
from mlx_canary.transcribe import CanaryModel

SR = 16000
FRAME = 1280  # samples per encoder frame (hop 160 x subsampling 8)
SEC = SR


# ---------------------------------------------------------------------------------------------------------------
# Fakes

N_TIMESTAMPS = 2000  # ids 0..1999 are <|0|>..<|1999|> (global frames of 100 s for the expectations)


class FakeTokenizer:
    """Aggregate-style decoding (pieces joined, ▁ -> space) with timestamp tokens <|0|>..<|1999|>."""

    supports_timestamps = True
    eos_id, pad_id = -1, -2

    def __init__(self):
        self.pieces = [f"<|{i}|>" for i in range(N_TIMESTAMPS)]
        self.index = {piece: i for i, piece in enumerate(self.pieces)}

    def id(self, piece: str) -> int:
        if piece not in self.index:
            self.index[piece] = len(self.pieces)
            self.pieces.append(piece)
        return self.index[piece]

    def is_timestamp(self, token_id: int) -> bool:
        return 0 <= token_id < N_TIMESTAMPS

    def timestamp_value(self, token_id: int) -> int:
        return token_id

    def decode(self, ids) -> str:
        return "".join(self.pieces[i] for i in ids).replace("\u2581", " ")

    decode_text = decode  # no unknown or control pieces here


@dataclass
class Word:
    pieces: list[str]
    start: int  # global encoder frames
    end: int


def make_words(tok: FakeTokenizer, total_frames: int, seed: int, max_len: int = 10) -> list[Word]:
    """Words of 2..max_len frames with 0..3 frame gaps; 1..3 pieces, shared suffix pieces, some sentence ends."""
    rng = random.Random(seed)
    words, frame, k = [], rng.randrange(0, 4), 0
    while True:
        length = rng.randrange(2, max_len + 1)
        if frame + length > total_frames:
            return words
        pieces = [f"\u2581w{k}"] + rng.choice([[], [], ["x"], ["y", "x"]]) + rng.choice([[], [], [], ["."], ["?"]])
        for piece in pieces:
            tok.id(piece)
        words.append(Word(pieces, frame, frame + length))
        frame += length + rng.randrange(0, 4)
        k += 1


def chunk_tokens(tok: FakeTokenizer, words: list[Word], start: int, length: int, timestamps: bool = True):
    """What an ideal model emits for samples [start, start+length): the words lying fully inside, with frame
    indices relative to the chunk start (floored when the chunk does not start on the frame grid)."""
    out = []
    for word in words:
        s, e = word.start * FRAME, word.end * FRAME
        if s >= start and e <= start + length:
            ids = [tok.id(p) for p in word.pieces]
            if timestamps:
                ids = [(s - start) // FRAME] + ids + [(e - start) // FRAME]
            out += ids
    return out


def expected_words(tok: FakeTokenizer, words: list[Word]):
    """parse_timestamps on the whole-file token string: the result a single (unchunked) decode would give."""
    ids = []
    for w in words:
        ids += [w.start] + [tok.id(p) for p in w.pieces] + [w.end]
    return parse_timestamps(tok.decode(ids))


def all_text_ids(tok: FakeTokenizer, words: list[Word]) -> list[int]:
    return [tok.id(p) for w in words for p in w.pieces]


def monotonic(words: list[dict]) -> bool:
    return all(a["end"] <= b["start"] for a, b in zip(words, words[1:])) and all(w["start"] <= w["end"] for w in words)


# ---------------------------------------------------------------------------------------------------------------
# Planner: NeMo parity

def _planner_lengths() -> list[int]:
    lengths = {0, 1, 100, 8000, 16000, 16001, 30 * SEC, 39 * SEC, 40 * SEC - 1, 40 * SEC, 40 * SEC + 1,
               41 * SEC, 59 * SEC, 60 * SEC, 61 * SEC, 3600 * SEC, 3600 * SEC + 1, 4000 * SEC}
    for seconds in range(30, 41):
        step = (seconds - 1) * SEC
        for k in (1, 2, 3, 7, 50):
            for delta in (-16001, -16000, -1, 0, 1, 15999, 16000, 16001, 16002):
                if k * step + delta > 0:
                    lengths.add(k * step + delta)
    rng = random.Random(1)
    lengths.update(rng.randrange(8000, 4000 * SEC) for _ in range(100))
    lengths.update(rng.randrange(39 * SEC, 200 * SEC) for _ in range(200))
    return sorted(lengths)


@pytest.fixture(scope="module")
def nemo_planner():
    pytest.importorskip("nemo")
    torch = pytest.importorskip("torch")
    prompted = pytest.importorskip("nemo.collections.asr.data.audio_to_text_lhotse_prompted")
    dataset = prompted.PromptedAudioToTextLhotseDataset
    # The methods use nothing of the dataset but each other: call them on a stand-in.
    stand_in = types.SimpleNamespace()
    stand_in._find_optimal_chunk_size = lambda total, **kw: dataset._find_optimal_chunk_size(stand_in, total, **kw)
    samples = torch.arange(4000 * SEC + 2, dtype=torch.int32)  # chunk values reveal their start sample

    def plan(total, chunk_size=None):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # the padding of tiny tensors is far slower with a contended thread pool
        try:
            chunks, lengths = dataset._chunk_waveform(stand_in, samples[:total], chunk_size=chunk_size)
        finally:
            torch.set_num_threads(threads)
        return [(int(c[0]) if n else 0, int(n), int(c.shape[0])) for c, n in zip(chunks, lengths)]

    return plan, lambda total: dataset._find_optimal_chunk_size(stand_in, total)


@pytest.mark.parity
def test_planner_matches_nemo(nemo_planner):
    nemo_plan, nemo_size = nemo_planner
    for total in _planner_lengths():
        assert optimal_chunk_size(total) == nemo_size(total), total
        ours = [(c.start, c.length, c.size) for c in plan_chunks(total)]
        assert ours == nemo_plan(total), total


@pytest.mark.parity
@pytest.mark.parametrize("chunk_seconds", [2, 10, 20.5, 45])
def test_user_chunk_length_matches_nemo(nemo_planner, chunk_seconds):
    nemo_plan, _ = nemo_planner
    rng = random.Random(chunk_seconds)
    size = int(chunk_seconds * SR)
    for total in [0, 1, size - 1, size, size + 1, size + 16000, 2 * size] + [rng.randrange(1, 300 * SEC)
                                                                              for _ in range(30)]:
        ours = [(c.start, c.length, c.size) for c in plan_chunks(total, chunk_seconds=chunk_seconds)]
        assert ours == nemo_plan(total, chunk_size=size), (chunk_seconds, total)


# Planner: unit tests

def test_plan_short_input_is_one_chunk():
    for total in (0, 100, 16000, 40 * SEC - 1):
        assert plan_chunks(total) == [Chunk(0, 0, total, total, 0)]


def test_plan_100_seconds_by_hand():
    # 35 s chunks (step 34 s) leave the longest last chunk (32 s) among 30..40 s.
    assert [(c.start, c.length, c.size) for c in plan_chunks(100 * SEC)] == [
        (0, 35 * SEC, 35 * SEC), (34 * SEC, 35 * SEC, 35 * SEC), (68 * SEC, 32 * SEC, 35 * SEC)]


def test_plan_exactly_40_seconds():
    assert [(c.start, c.length) for c in plan_chunks(40 * SEC)] == [(0, 30 * SEC), (29 * SEC, 11 * SEC)]


def test_plan_user_chunk_length_and_errors():
    assert [(c.start, c.length) for c in plan_chunks(25 * SEC, chunk_seconds=10)] == [
        (0, 10 * SEC), (9 * SEC, 10 * SEC), (18 * SEC, 7 * SEC)]
    # No chunk starts where only the overlap would be left: 19 s gives two chunks, not a third at 18 s.
    assert [(c.start, c.length) for c in plan_chunks(19 * SEC, chunk_seconds=10)] == [
        (0, 10 * SEC), (9 * SEC, 10 * SEC)]
    with pytest.raises(CanaryError):
        plan_chunks(10 * SEC, chunk_seconds=1)
    with pytest.raises(CanaryError):
        plan_chunks(-1)


def test_plan_windows():
    chunks = plan_chunks(7300 * SEC, window_seconds=3600)
    assert [c.window for c in chunks][0] == 0 and chunks[-1].window == 2
    by_window = {}
    for c in chunks:
        by_window.setdefault(c.window, []).append(c)
    for w, members in by_window.items():
        base = w * 3600 * SEC
        window_length = min(3600 * SEC, 7300 * SEC - base)
        assert [(c.start - base, c.length, c.size) for c in members] == [
            (c.start, c.length, c.size) for c in plan_chunks(window_length)]
    assert [c.index for c in chunks] == list(range(len(chunks)))


# ---------------------------------------------------------------------------------------------------------------
# LCS merge: NeMo parity

@pytest.fixture(scope="module")
def nemo_merge():
    pytest.importorskip("nemo")
    torch = pytest.importorskip("torch")
    streaming = pytest.importorskip("nemo.collections.asr.parts.utils.streaming_utils")
    chunking_utils = pytest.importorskip("nemo.collections.asr.parts.utils.chunking_utils")
    from nemo.collections.asr.parts.utils.rnnt_utils import Hypothesis

    decoding = SimpleNamespace(decode_tokens_to_str=lambda ids: " ".join(str(int(i)) for i in ids))

    def merge_parallel(chunks):
        hyps = [Hypothesis(score=0.0, y_sequence=torch.tensor(c, dtype=torch.long)) for c in chunks]
        merged = chunking_utils.merge_parallel_chunks(
            hyps, torch.tensor([100] * len(chunks)), None, False, 8, 0.01, decoding)
        return [int(t) for t in merged.text.split()]

    return SimpleNamespace(lcs=streaming.longest_common_subsequence_merge,
                           buffer=streaming.lcs_alignment_merge_buffer, parallel=merge_parallel)


def _random_overlapping_chunks(rng: random.Random) -> list[list[int]]:
    """Chunks cut from one token stream with overlaps of 0..8 tokens and seam noise (drops, substitutions,
    insertions), small vocabularies for repeated tokens, and short or empty chunks."""
    vocab = rng.choice([2, 3, 5, 12, 50, 1000])
    stream = [rng.randrange(vocab) for _ in range(rng.randrange(0, 120))]
    chunks, pos = [], 0
    while True:
        length = rng.choice([0, 1, 2, 3, 5, 8, 15, 30, 40])
        overlap = rng.randrange(0, 9)
        start = max(0, pos - overlap)
        chunk = list(stream[start : start + length + overlap])
        for _ in range(rng.choice([0, 0, 1, 2])):
            if not chunk:
                break
            at = rng.choice([0, 1, len(chunk) - 1, rng.randrange(len(chunk))]) % len(chunk)
            op = rng.randrange(3)
            if op == 0:
                del chunk[at]
            elif op == 1:
                chunk[at] = rng.randrange(vocab)
            else:
                chunk.insert(at, rng.randrange(vocab))
        chunks.append(chunk)
        pos = start + length + overlap
        if pos >= len(stream) or len(chunks) > 12:
            return chunks


@pytest.mark.parity
def test_lcs_alignment_matches_nemo(nemo_merge):
    rng = random.Random(0)
    cases = [([], []), ([1], []), ([], [1]), ([1, 2, 3, 4, 5], [4, 5, 6, 7]), ([1, 2, 3, 4, 5, 9], [4, 5, 6, 7]),
             ([7] * 24, [7] * 7), ([1, 2, 1, 2, 1, 2], [1, 2, 1, 2, 3]), ([1, 2, 3], [4, 5, 6])]
    for _ in range(4000):
        vocab = rng.choice([2, 3, 5, 20, 200])
        cases.append(([rng.randrange(vocab) for _ in range(rng.randrange(0, 26))],
                      [rng.randrange(vocab) for _ in range(rng.randrange(0, 9))]))
    for chunks in (_random_overlapping_chunks(rng) for _ in range(400)):
        for a, b in zip(chunks, chunks[1:]):
            cases.append((a[-24:], b[:7]))
    for x, y in cases:
        result, _ = nemo_merge.lcs(list(x), list(y))
        assert lcs_alignment(x, y) == tuple(result), (x, y)


@pytest.mark.parity
def test_merge_buffer_matches_nemo(nemo_merge):
    rng = random.Random(2)
    for _ in range(1500):
        chunks = _random_overlapping_chunks(rng)
        for a, b in zip(chunks, chunks[1:]):
            if not a:
                continue
            delay = rng.choice([12, 12, 3, 1, 25])
            want = nemo_merge.buffer(list(a), list(b[:7]), delay, None, max_steps_per_timestep=2,
                                     min_lcs_length=1, parallel_chunking=True)
            assert merge_buffer(a, b[:7], delay) == want, (a, b, delay)


@pytest.mark.parity
def test_merge_chunk_tokens_matches_merge_parallel_chunks(nemo_merge):
    rng = random.Random(3)
    for _ in range(600):
        chunks = _random_overlapping_chunks(rng)
        if len(chunks) < 2:
            continue  # NeMo merges only when there are several chunks
        assert merge_chunk_tokens(chunks) == nemo_merge.parallel(chunks), chunks


# LCS merge: unit tests

def test_merge_delay_and_basic_merges():
    assert merge_delay(8) == 12 and merge_delay(4) == 25
    assert merge_chunk_tokens([]) == []
    assert merge_chunk_tokens([[1, 2, 3]]) == [1, 2, 3]
    assert merge_chunk_tokens([[1, 2, 3, 4, 5], [4, 5, 6, 7]]) == [1, 2, 3, 4, 5, 6, 7]
    assert merge_chunk_tokens([[1, 2, 3], [4, 5, 6]]) == [1, 2, 3, 4, 5, 6]  # no overlap: appended
    assert merge_chunk_tokens([[], [1, 2], [2, 3]]) == [1, 2, 3]
    # Tokens past the 7-id head are never aligned.
    assert merge_chunk_tokens([[1, 2, 9], [3, 4, 5, 6, 7, 8, 10, 9, 11]]) == [1, 2, 9, 3, 4, 5, 6, 7, 8, 10, 9, 11]


# ---------------------------------------------------------------------------------------------------------------
# Timestamp-aware merge: unit tests on synthetic chunk outputs

def _timed_merge(tok, words, chunks, **kw):
    tokens = [chunk_tokens(tok, words, c.start, c.length) for c in chunks]
    return merge_timed_chunks(tokens, chunks, tok, **kw)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("chunk_seconds", [None, 3, 11])
def test_timed_merge_recovers_words_exactly(seed, chunk_seconds):
    # Chunk starts on the 80 ms grid (step 2 s, 10 s; planner: 100 s -> 35 s chunks, 34 s step).
    tok = FakeTokenizer()
    total = 100 * SEC
    words = make_words(tok, total // FRAME, seed)
    chunks = plan_chunks(total, chunk_seconds=chunk_seconds)
    assert len(chunks) > 1
    merged = _timed_merge(tok, words, chunks)
    text, exp_words, exp_segments = expected_words(tok, words)
    assert merged.ids == all_text_ids(tok, words)
    assert merged.text == text
    assert merged.words == exp_words  # exact: texts, frame offsets and float times
    assert merged.segments == exp_segments
    assert monotonic(merged.words)


@pytest.mark.parametrize("seed", range(4))
def test_timed_merge_off_grid_chunk_starts(seed):
    # 10.5 s chunks: starts at multiples of 9.5 s = 118.75 frames; chunk-relative frames are floored.
    tok = FakeTokenizer()
    total = 60 * SEC
    words = make_words(tok, total // FRAME, seed)
    chunks = plan_chunks(total, chunk_seconds=10.5)
    merged = _timed_merge(tok, words, chunks)
    text, exp_words, _ = expected_words(tok, words)
    assert merged.text == text and merged.ids == all_text_ids(tok, words)
    assert monotonic(merged.words)
    for got, want in zip(merged.words, exp_words):
        assert want["start_offset"] - 1 < got["start_offset"] <= want["start_offset"]
        assert abs(got["start"] - want["start"]) < 0.08 + 1e-9 and abs(got["end"] - want["end"]) < 0.08 + 1e-9
    assert any(isinstance(w["start_offset"], float) for w in merged.words)  # fractional chunk offsets show


def noisy_chunk_tokens(tok, words, start, length, rng):
    """A less ideal model: times jittered by up to a frame; a word cut by the chunk edge but at least half inside
    comes out as a different token ``▁wK~`` with its time clipped to the chunk; the rest as ``chunk_tokens``."""
    out = []
    first, last = start // FRAME, (start + length) // FRAME
    for word in words:
        inside = min(word.end, last) - max(word.start, first)
        if inside <= 0:
            continue
        s, e = max(word.start, first), min(word.end, last)
        pieces = word.pieces
        if (s, e) != (word.start, word.end):
            if 2 * inside < word.end - word.start:
                continue
            pieces = [word.pieces[0] + "~"]
        s = min(max(s + rng.choice([-1, 0, 0, 1]), first), last)
        e = min(max(e + rng.choice([-1, 0, 0, 1]), s), last)
        out += [s - first] + [tok.id(p) for p in pieces] + [e - first]
    return out


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("chunk_seconds", [None, 3, 11])
def test_timed_merge_noisy_chunks_keep_each_word_once(seed, chunk_seconds):
    tok = FakeTokenizer()
    rng = random.Random(seed)
    words = make_words(tok, 100 * SEC // FRAME, seed)
    chunks = plan_chunks(100 * SEC, chunk_seconds=chunk_seconds)
    tokens = [noisy_chunk_tokens(tok, words, c.start, c.length, rng) for c in chunks]
    merged = merge_timed_chunks(tokens, chunks, tok)
    names = [w["text"].split("~")[0].rstrip("xy.?") for w in merged.words]
    assert names == [w.pieces[0][1:] for w in words]
    assert monotonic(merged.words)
    for got, want in zip(merged.words, words):
        assert abs(got["start_offset"] - want.start) <= 1.5 or got["text"].endswith("~")


def test_timed_merge_single_chunk_equals_parse_timestamps():
    tok = FakeTokenizer()
    words = make_words(tok, 400, seed=9)
    chunk = plan_chunks(32 * SEC)
    merged = _timed_merge(tok, words, chunk)
    assert (merged.text, merged.words, merged.segments) == expected_words(tok, words)


def _seam(tok, first, second):
    """Two chunks overlapping by 1 s, [0, 124.5 frames) and [112 frames, +10 s), with hand-written outputs: lists
    of (pieces, start, end) in global frames; chunk-relative timestamps are derived here. The middle of the
    overlap is frame 118.25."""
    chunks = [Chunk(0, 0, 159360, 159360), Chunk(1, 112 * FRAME, 10 * SEC, 10 * SEC)]
    tokens = []
    for chunk, words in zip(chunks, (first, second)):
        ids = []
        for pieces, start, end in words:
            rel = chunk.start // FRAME
            ids += [start - rel] + [tok.id(p) for p in pieces] + [end - rel]
        tokens.append(ids)
    return tokens, chunks


def test_seam_word_cut_by_chunk_start_is_not_doubled():
    # Chunk 1 hears the tail of "▁hello" as "lo" (the audio starts mid-word) then the same words as chunk 0.
    tok = FakeTokenizer()
    first = [(["\u2581a"], 100, 104), (["\u2581hello"], 110, 114), (["\u2581big"], 115, 118),
             (["\u2581world"], 119, 123)]
    second = [(["lo"], 112, 114), (["\u2581big"], 115, 118), (["\u2581world"], 119, 123), (["\u2581again."], 124, 130)]
    tokens, chunks = _seam(tok, first, second)
    merged = merge_timed_chunks(tokens, chunks, tok)
    assert merged.text == "a hello big world again."
    assert [w["start_offset"] for w in merged.words] == [100, 110, 115, 119, 124]
    assert merged.segments[0]["text"] == "a hello big world again."


def test_seam_word_split_across_chunks_is_one_word():
    # Chunk 0's last word is cut by its end ("▁wor"); chunk 1 has it whole ("▁wor ld"). The LCS keeps chunk 0's
    # "▁wor" and continues chunk 1 after it: one word, start from chunk 0, end from chunk 1.
    tok = FakeTokenizer()
    first = [(["\u2581one"], 105, 110), (["\u2581two"], 113, 116), (["\u2581wor"], 121, 125)]
    second = [(["\u2581two"], 113, 116), (["\u2581wor", "ld"], 121, 127), (["\u2581three"], 128, 131)]
    tokens, chunks = _seam(tok, first, second)
    merged = merge_timed_chunks(tokens, chunks, tok)
    assert [(w["text"], w["start_offset"], w["end_offset"]) for w in merged.words] == [
        ("one", 105, 110), ("two", 113, 116), ("world", 121, 127), ("three", 128, 131)]


def test_spurious_single_token_alignment_is_rejected_by_time():
    # Silence in the overlap; chunk 0 ends with "." and chunk 1 has a "." 1.5 s later. NeMo's text merge aligns
    # the two dots and drops chunk 1's first words; the timestamps veto that alignment.
    tok = FakeTokenizer()
    first = [(["\u2581end", "."], 100, 108)]
    second = [(["\u2581then"], 125, 128), (["\u2581we"], 129, 131), (["\u2581go", "."], 132, 136)]
    tokens, chunks = _seam(tok, first, second)
    text_ids = [[t for t in ids if not tok.is_timestamp(t)] for ids in tokens]
    assert tok.decode(merge_chunk_tokens(text_ids)) == " end."  # the text-only merge drops "then we go."
    merged = merge_timed_chunks(tokens, chunks, tok)
    assert merged.text == "end. then we go."
    assert [s["text"] for s in merged.segments] == ["end.", "then we go."]


def test_differently_recognised_seam_word_is_kept_once():
    # The overlap word is "▁colour" in chunk 0 and "▁color" in chunk 1: no common run, NeMo would keep both.
    # The time cut (middle of the overlap, frame 118.25) keeps the one starting after it from chunk 1.
    tok = FakeTokenizer()
    first = [(["\u2581the"], 100, 104), (["\u2581colour"], 119, 123)]
    second = [(["\u2581color"], 119, 124), (["\u2581red"], 125, 130)]
    tokens, chunks = _seam(tok, first, second)
    text_ids = [[t for t in ids if not tok.is_timestamp(t)] for ids in tokens]
    assert tok.decode(merge_chunk_tokens(text_ids)) == " the colour color red"
    merged = merge_timed_chunks(tokens, chunks, tok)
    assert merged.text == "the color red"
    # ...and a seam word starting before the middle is kept from chunk 0.
    first = [(["\u2581the"], 100, 104), (["\u2581colour"], 114, 120)]
    second = [(["\u2581color"], 114, 121), (["\u2581red"], 125, 130)]
    tokens, chunks = _seam(tok, first, second)
    assert merge_timed_chunks(tokens, chunks, tok).text == "the colour red"


def test_jittered_seam_times_stay_monotonic():
    tok = FakeTokenizer()
    first = [(["\u2581a"], 100, 110), (["\u2581b"], 113, 117), (["\u2581c"], 118, 122)]
    second = [(["\u2581b"], 112, 118), (["\u2581c"], 117, 121), (["\u2581d"], 120, 126)]
    tokens, chunks = _seam(tok, first, second)
    merged = merge_timed_chunks(tokens, chunks, tok)
    assert merged.text == "a b c d"
    assert monotonic(merged.words)
    assert [(w["start_offset"], w["end_offset"]) for w in merged.words] == [(100, 110), (113, 117), (118, 122),
                                                                          (122, 126)]


def test_chunk_without_timestamps_and_empty_chunks():
    tok = FakeTokenizer()
    chunks = [Chunk(0, 0, 10 * SEC, 10 * SEC), Chunk(1, 9 * SEC, 10 * SEC, 10 * SEC),
              Chunk(2, 18 * SEC, 10 * SEC, 10 * SEC), Chunk(3, 27 * SEC, 5 * SEC, 10 * SEC)]
    tokens = [
        [0, tok.id("\u2581hi"), 5],
        [tok.id("\u2581plain"), tok.id("\u2581text")],  # no timestamp pairs: kept whole, spanning the chunk
        [],
        [3, 3],  # an empty bracket: nothing
    ]
    merged = merge_timed_chunks(tokens, chunks, tok)
    assert merged.text == "hi plain text"
    assert [(w["text"], w["start_offset"], w["end_offset"]) for w in merged.words] == [
        ("hi", 0, 5), ("plain text", 112.5, 237.5)]


def test_timed_merge_without_any_timestamps_is_the_plain_merge():
    # e.g. a model that does not predict timestamps: text as merge_chunk_tokens gives it, no words (like
    # parse_timestamps on text without timestamps).
    tok = FakeTokenizer()
    a, b, c, d = (tok.id(p) for p in ("\u2581a", "\u2581b", "\u2581c", "\u2581d"))
    chunks = plan_chunks(25 * SEC, chunk_seconds=10)
    tokens = [[a, b], [b, c, 17], [d]]  # a lone <|17|> pairs with nothing
    merged = merge_timed_chunks(tokens, chunks, tok)
    assert merged.ids == merge_chunk_tokens(tokens) == [a, b, c, 17, d]
    assert merged.text == "a b c<|17|> d" and merged.words == [] and merged.segments == []
    assert merge_chunks_text(tokens, chunks, tok) == (merged.ids, merged.text)
    windowed = plan_chunks(25 * SEC, chunk_seconds=10, window_seconds=12)  # windows [0, 12 s), [12, 24 s), [24, 25 s)
    assert [(c.start, c.length, c.window) for c in windowed] == [(0, 10 * SEC, 0), (9 * SEC, 3 * SEC, 0),
                                                                 (12 * SEC, 10 * SEC, 1), (21 * SEC, 3 * SEC, 1),
                                                                 (24 * SEC, 1 * SEC, 2)]
    ids, text = merge_chunks_text([[a, b], [b, c], [c], [c, d], [d]], windowed, tok)
    assert ids == [a, b, c, c, d, d] and text == "a b c c d d"


def test_timed_groups_pair_like_parse_timestamps():
    tok = FakeTokenizer()
    pieces = ["\u2581a", "\u2581b.", "c", "\u2581", "x\ny", "?"]
    rng = random.Random(5)
    a, c, newline = tok.id("\u2581a"), tok.id("c"), tok.id("x\ny")
    cases = [[7, 3, a, 4, c, 9, 10], [1, a, newline, 2, c, 3]]
    for _ in range(500):
        cases.append([rng.randrange(20) if rng.random() < 0.45 else tok.id(rng.choice(pieces))
                      for _ in range(rng.randrange(12))])
    for ids in cases:
        groups, found = timed_groups(ids, tok)
        _, words, _ = parse_timestamps(tok.decode(ids))
        assert [(tok.decode(g).strip(), s, e) for g, s, e in groups] == [
            (w["text"], w["start_offset"], w["end_offset"]) for w in words], ids
        assert found == bool(re.search(r"<\|(\d+)\|>(.*?)<\|(\d+)\|>", tok.decode(ids))), ids
    assert timed_groups(cases[0], tok) == ([([c], 4, 9)], True)  # <|7|><|3|> is an empty pair, a is outside
    assert timed_groups(cases[1], tok) == ([([c], 2, 3)], True)  # the newline restarts the match at <|2|>


def test_build_segments_rules():
    words = [{"text": t, "start_offset": i, "end_offset": i + 1, "start": 0.0, "end": 0.0}
             for i, t in enumerate(["a", "b.", "?", "c", "d!", "e"])]
    assert [(s["text"], s["start_offset"], s["end_offset"]) for s in build_segments(words)] == [
        ("a b.", 0, 2), ("?", 2, 3), ("c d!", 3, 5), ("e", 5, 6)]


# ---------------------------------------------------------------------------------------------------------------
# transcribe_long end to end with a fake model

class FakeEngine(AEDEngine):
    """decode reads each chunk's global position from its samples (the input is 0, 1, 2, ...) and emits the
    words that lie fully inside it."""

    def __init__(self, tok, words):
        config = SimpleNamespace(preprocessor=SimpleNamespace(sample_rate=SR, hop_length=160, min_duration=1.0),
                                 encoder=SimpleNamespace(subsampling_factor=8),
                                 decoding=DecodingConfig())
        super().__init__(net=None, tokenizer=tok, config=config, name="fake")
        self.words = words
        self.batches: list[list[tuple[int, int]]] = []
        self.settings = None

    capabilities = Capabilities(languages=("en", "de"), timestamps=True, translation=True, language_id=False,
                                default_source_lang="en")

    def prompt(self, task):
        self.settings = task
        return [7, 7]

    def decode_options(self, options):
        return ("options", options.beam_size)

    def encode(self, waves, pad_to=None):
        return list(waves)

    def decode(self, waves, prompt, options):
        assert prompt == [7, 7] and options == ("options", None)
        spans = [(int(w[0]) if len(w) else 0, len(w)) for w in waves]
        self.batches.append(spans)
        return [chunk_tokens(self.tokenizer, self.words, s, n, self.settings.timestamps) for s, n in spans]


def transcribe_long(model, wave, *, progress=None, item=None, window_seconds=None, **fields):
    """The long-audio path of the pipeline on one waveform, with the options as keywords."""
    return model.decode_long(item, wave, model.prepare(**fields), progress, window_seconds=window_seconds)


def _fake(total_seconds, seed=0):
    tok = FakeTokenizer()
    words = make_words(tok, total_seconds * SR // FRAME, seed)
    model = CanaryModel(FakeEngine(tok, words))
    model.words, model.batches = model.engine.words, model.engine.batches
    return model, np.arange(total_seconds * SR, dtype=np.float32)


@pytest.mark.parametrize("timestamps", [False, True])
def test_transcribe_long_end_to_end(timestamps):
    model, wave = _fake(100)
    calls = []
    result = transcribe_long(model, wave, timestamps=timestamps, batch_size=2,
                             progress=lambda done, total: calls.append((done, total)), item="talk.wav")
    planned = [(c.start, c.length) for c in plan_chunks(len(wave))]
    assert [span for batch in model.batches for span in batch] == planned
    assert [len(b) for b in model.batches] == [2, 1]
    assert calls == [(2, 3), (3, 3)]
    tok = model.tokenizer
    assert result.tokens == all_text_ids(tok, model.words)
    text, words, segments = expected_words(tok, model.words)
    assert result.text == text
    assert (result.words, result.segments) == ((words, segments) if timestamps else ([], []))
    assert result.path == "talk.wav" and result.model == "fake" and result.duration == 100.0
    assert (result.source_lang, result.target_lang) == ("en", "en")


def test_transcribe_long_user_chunks_and_batches():
    model, wave = _fake(61, seed=4)
    result = transcribe_long(model, wave, timestamps=True, chunk_seconds=7, batch_size=3)
    assert [span for batch in model.batches for span in batch] == [
        (c.start, c.length) for c in plan_chunks(len(wave), chunk_seconds=7)]
    assert all(len(b) <= 3 for b in model.batches) and len(model.batches) == 4  # 10 chunks
    text, words, _ = expected_words(model.tokenizer, model.words)
    assert result.text == text and result.words == words


def test_transcribe_long_single_chunk_is_the_plain_path():
    model, wave = _fake(20, seed=5)
    result = transcribe_long(model, wave, timestamps=True, source_lang="de", target_lang="en")
    assert model.batches == [[(0, 20 * SR)]]
    tokens = chunk_tokens(model.tokenizer, model.words, 0, 20 * SR)
    assert result == model.make_transcript(None, wave, tokens, model.engine.settings)
    assert result.tokens == tokens and (result.source_lang, result.target_lang) == ("de", "en")


@pytest.mark.parametrize("timestamps", [False, True])
def test_transcribe_long_windows_are_not_merged(timestamps):
    # NeMo-style windows (here 45 s): chunked and merged inside each window, joined with a space; a word across a
    # window edge is in no chunk.
    edges = [45 * SEC / FRAME, 90 * SEC / FRAME]
    for seed in range(50):  # a word list with a word across a window edge
        model, wave = _fake(100, seed=seed)
        kept = [w for w in model.words if not any(w.start < edge < w.end for edge in edges)]
        if len(kept) < len(model.words):
            break
    result = transcribe_long(model, wave, timestamps=timestamps, window_seconds=45)
    chunks = plan_chunks(len(wave), window_seconds=45)
    assert [span for batch in model.batches for span in batch] == [(c.start, c.length) for c in chunks]
    assert len(kept) < len(model.words)
    text, words, _ = expected_words(model.tokenizer, kept)
    assert result.text == text and result.tokens == all_text_ids(model.tokenizer, kept)
    if not timestamps:
        assert result.words == []
    else:  # windows' chunks may start off the 80 ms grid: the fake model floors those frames
        assert [w["text"] for w in result.words] == [w["text"] for w in words]
        assert all(0 <= w["start_offset"] - g["start_offset"] < 1 for g, w in zip(result.words, words))
        assert monotonic(result.words)


def test_transcribe_long_rejects_bad_input():
    model, wave = _fake(5)
    with pytest.raises(CanaryError):
        transcribe_long(model, wave, batch_size=0)
    with pytest.raises(CanaryError):
        transcribe_long(model, np.zeros((2, 100), dtype=np.float32))


# ----------------------------------------------------------------------------------------------------------------
# canary-1b-v2: chunks aligned by the CTC aligner, merged as NeMo's merge_parallel_chunks(timestamps=True)


def _tok(piece: str, token_id: int, start: int, end: int) -> dict:
    text = piece.replace("\u2581", " ").strip() if piece != "\u2581" else ""
    return {"char": text, "token": piece, "token_id": token_id, "start_offset": start, "end_offset": end,
            "start": round(start * 0.08, 2), "end": round(end * 0.08, 2)}


def _decode_pieces(pieces: dict):
    return lambda ids: "".join(pieces[i] for i in ids).replace("\u2581", " ").lstrip()


def test_aligned_chunk_offsets_drop_the_overlap_as_nemo_counts_it():
    from mlx_canary.chunking import aligned_chunk_offsets

    # 36 s chunks (450 frames): 29 s steps are 362.5 frames; NeMo counts (450*8 - 100) // 8 = 437 per chunk.
    assert aligned_chunk_offsets([450, 450, 404]) == [0, 437, 874]
    assert aligned_chunk_offsets([13]) == [0]
    assert aligned_chunk_offsets([12, 12]) == [0, -1]  # (96 - 100) // 8: floor division, as NeMo


def test_join_aligned_tokens_skips_merged_away_tokens_and_pushes_overlaps():
    from mlx_canary.chunking import join_aligned_tokens

    first = [_tok("\u2581a", 1, 0, 2), _tok("\u2581b", 2, 430, 436)]
    second = [_tok("\u2581b", 2, 0, 1), _tok("\u2581c", 3, 5, 6), _tok("\u2581d", 4, 8, 9)]
    # the LCS merge kept b from the first chunk, so the second chunk's b is skipped (it is not the next id)
    joined = join_aligned_tokens([first, second], [0, 432], [1, 2, 3, 4])
    assert [t["token_id"] for t in joined] == [1, 2, 3, 4]
    # c starts at 437 < b's end 436? no: kept as is; d at 440
    assert [(t["start_offset"], t["end_offset"]) for t in joined] == [(0, 2), (430, 436), (437, 438), (440, 441)]
    assert joined[2]["start"] == 437 * 0.01 * 8  # re-timed from the offset, unrounded
    # a token that would start before the previous end is moved there, its end too (even a later end)
    late = join_aligned_tokens([first, [_tok("\u2581c", 3, 1, 9)]], [0, 432], [1, 2, 3])
    assert (late[-1]["start_offset"], late[-1]["end_offset"]) == (436, 436)
    # -1 (a token the path skipped) stays -1, in offsets and times
    skipped = join_aligned_tokens([[dict(_tok("\u2581a", 1, 0, 0), start_offset=-1, end_offset=-1)]], [5], [1])
    assert (skipped[0]["start_offset"], skipped[0]["start"]) == (-1, -1)


def test_words_from_tokens_glue_punctuation_as_nemo():
    from mlx_canary.timestamps import segments_from_words, words_from_tokens

    pieces = {1: "\u2581Hel", 2: "lo", 3: ",", 4: "\u2581you", 5: ".", 6: "\u2581", 7: "?", 8: "\u2581ok"}
    decode = _decode_pieces(pieces)
    tokens = [_tok(pieces[1], 1, 1, 2), _tok(pieces[2], 2, 2, 3), _tok(pieces[3], 3, 3, 3),
              _tok(pieces[4], 4, 5, 7), _tok(pieces[6], 6, 8, 9), _tok(pieces[7], 7, 9, 9),
              _tok(pieces[8], 8, 12, 14), _tok(pieces[5], 5, 14, 14)]
    words = words_from_tokens(tokens, decode)
    # "," joins the word being built; a lone "▁" piece (text "") opens a word that the "?" after it replaces
    # (NeMo drops the space piece from a word that punctuation joins); "." closes "ok."
    assert [w["text"] for w in words] == ["Hello,", "you", "?", "ok."]
    assert [(w["start_offset"], w["end_offset"]) for w in words] == [(1, 3), (5, 7), (8, 9), (12, 14)]
    assert words[2]["start"] == tokens[4]["start"] and words[3]["end"] == tokens[7]["end"]
    segments = segments_from_words(words)
    assert [s["text"] for s in segments] == ["Hello, you ?", "ok."]
    assert (segments[0]["start_offset"], segments[0]["end_offset"], segments[0]["end"]) == (1, 9, words[2]["end"])
    # the first word starts where the first token starts, whatever it is
    lead = words_from_tokens([_tok(pieces[7], 7, 0, 0)] + tokens, decode)
    assert [w["text"] for w in lead[:2]] == ["?", "Hello,"] and lead[0]["start_offset"] == 0
    assert words_from_tokens([], decode) == [] and segments_from_words([]) == []


class AlignerEngine:
    """A fake engine with an aligner (canary-1b-v2 style): every chunk decodes to ids [1, 2, chunk], and aligns
    them one token per frame at the chunk's start."""

    name = "fake-v2"
    chunk_merge_by_time = False
    default_chunk_seconds = None
    capabilities = Capabilities(languages=("en",), timestamps=True, translation=False, language_id=False,
                                default_source_lang="en", alignment=True)
    framing = SimpleNamespace(sample_rate=SR, hop_length=160, subsampling_factor=8, min_samples=SR)
    pieces = {1: "\u2581a", 2: "b", 3: ".", 4: "\u2581c", 5: "\u2581d"}

    def __init__(self):
        self.aligned: list[tuple[int, list[int]]] = []
        decode = lambda ids: "".join(self.pieces[i] for i in ids).replace("\u2581", " ")  # noqa: E731
        self.tokenizer = SimpleNamespace(decode=decode, decode_text=decode)

    def prompt(self, task):
        return [0]

    def decode_options(self, options):
        return None

    def encode(self, waves, pad_to=None):
        return SimpleNamespace(waves=list(waves), lengths=np.array([-(-len(w) // 1280) for w in waves]))

    def decode(self, encoded, prompt, options):
        return [[1, 2, 3 + (int(w[0]) // SR) % 3] for w in encoded.waves]

    def align_chunk(self, wave, tokens, task):
        self.aligned.append((int(wave[0]), list(tokens)))
        return [_tok(self.pieces[t], t, k, k + 1) for k, t in enumerate(tokens)]


def test_transcribe_long_with_an_aligner_merges_aligned_chunks():
    """With an aligner and timestamps the long path is canary-1b-v2's (``merge_aligned_chunks``): each chunk's
    tokens are aligned against that chunk's own samples, and the merge places them by the chunks' encoder
    lengths; without timestamps it is NeMo's token merge."""
    from mlx_canary.chunking import merge_aligned_chunks

    engine = AlignerEngine()
    model = CanaryModel(engine)
    wave = np.arange(100 * SR, dtype=np.float32)
    chunks = plan_chunks(len(wave))
    assert model.long_form_merge(model.prepare(timestamps=True).task(), len(chunks)) == "aligned"
    assert model.long_form_merge(model.prepare().task(), len(chunks)) == "tokens"
    result = transcribe_long(model, wave, timestamps=True, batch_size=2)
    assert [start for start, _ in engine.aligned] == [c.start for c in chunks]
    tokens = [[1, 2, 3 + (c.start // SR) % 3] for c in chunks]
    assert [ids for _, ids in engine.aligned] == tokens
    lengths = [-(-c.length // 1280) for c in chunks]
    expected = merge_aligned_chunks([[_tok(engine.pieces[t], t, k, k + 1) for k, t in enumerate(ids)]
                                     for ids in tokens], lengths, engine.tokenizer.decode)
    assert (result.tokens, result.text, result.words, result.segments) == (
        expected.ids, expected.text, expected.words, expected.segments)
    assert result.words and result.timestamps
    plain = transcribe_long(model, wave, batch_size=2)
    assert plain.tokens == merge_chunk_tokens(tokens) and not plain.words
    with pytest.raises(UnsupportedOption):
        transcribe_long(model, wave, timestamps=True, window_seconds=45)
