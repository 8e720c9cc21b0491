"""Forced alignment of long inputs (``mlx-canary align`` on a film or a podcast) with bounded memory.

Up to ``aligner.ONE_PASS_SECONDS`` the aligner runs over the whole input (NeMo's result: the parity tests in
test_aligner.py / test_v2_timestamps_parity.py cover it). Beyond, its log-probs come from overlapping windows
stitched frame for frame, only the text's token columns are kept, and one Viterbi (whose backpointers are
recomputed block by block past a budget) runs over the whole text. Checked here:
- the blockwise Viterbi gives exactly the whole-trellis path, and keeping only the text's columns changes nothing;
- the windows join into exactly the one-pass frames: a frame-local stand-in network gives the same log-probs
  windowed as in one pass, and a 5-minute text repeated over its designed audio lands every word on its frames;
- the real (tiny, NeMo-built) aligner: windowed frame counts equal the one-pass ones, and 10 minutes are aligned
  with MLX and numpy peak memory far below what one pass needs (generous bounds, not timed).
"""

from __future__ import annotations

import tracemalloc

import mlx.core as mx
import numpy as np
import pytest

from mlx_canary import aligner as aligner_module
from mlx_canary import forced_alignment as fa
from mlx_canary.aligner import Aligner, plan_windows
from mlx_canary.config import AlignerConfig
from mlx_canary.features import valid_frames

from alignment_fixtures import CharVocab

# -- the Viterbi in blocks ----------------------------------------------------------------------------------------


def _random_log_probs(rng, frames, columns, kind):
    if kind == "uniform":
        logits = np.zeros((frames, columns), np.float32)
    elif kind == "coarse":  # many exact ties
        logits = np.round(rng.standard_normal((frames, columns)) * 2).astype(np.float32)
    else:
        logits = (rng.standard_normal((frames, columns)) * 6).astype(np.float32)
    return (logits - np.log(np.exp(logits).sum(-1, keepdims=True))).astype(np.float32)


@pytest.mark.parametrize("kind", ["peaked", "coarse", "uniform"])
def test_blockwise_viterbi_equals_the_whole_trellis(kind):
    rng = np.random.default_rng(7)
    for frames, tokens in [(1, 1), (2, 1), (40, 6), (97, 20), (300, 45)]:
        lp = _random_log_probs(rng, frames, 12, kind)
        ids = list(rng.integers(0, 11, tokens))
        targets = [11]
        for token in ids:
            targets += [int(token), 11]
        whole = fa.viterbi(lp, targets)
        for budget in (1, len(targets), 7 * len(targets), 64 * len(targets)):
            assert fa.viterbi(lp, targets, max_backpointer_bytes=budget) == whole, (frames, tokens, budget)


def test_blockwise_viterbi_holds_one_block_of_backpointers():
    rng = np.random.default_rng(5)
    lp = _random_log_probs(rng, 2000, 50, "peaked")
    targets = [49]
    for token in rng.integers(0, 49, 1000):
        targets += [int(token), 49]  # 2001 targets: 4 MB of backpointers whole
    tracemalloc.start()
    try:
        path = fa.viterbi(lp, targets, max_backpointer_bytes=256 << 10)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert path == fa.viterbi(lp, targets)
    assert peak < 1.5e6, peak  # one 256 KB block, ~16 checkpoints of 8 KB, per-frame temporaries


def test_keeping_only_the_texts_columns_changes_nothing():
    rng = np.random.default_rng(3)
    vocab = CharVocab()
    lp = _random_log_probs(rng, 80, 28, "peaked")
    for text in ["the cat sat. on a mat", "aa bb, cc!", "zz"]:
        for level in ("words", "chars"):
            columns = fa.text_columns(text, vocab, level)
            assert columns[-1] == vocab.blank_id and list(columns) == sorted(set(columns))
            assert fa.align_text(lp[:, columns], text, vocab, 0.08, level, columns) == \
                fa.align_text(lp, text, vocab, 0.08, level)
    with pytest.raises(ValueError, match="columns lack"):
        fa.align_text(lp[:, :5], "zz", vocab, 0.08, columns=np.arange(5))


# -- windows ------------------------------------------------------------------------------------------------------


def test_windows_keep_every_frame_once():
    for samples in (1, 1279, 1280 * 30, 1280 * 30 + 1, 1280 * 95 + 700, 1280 * 400):
        windows = plan_windows(samples, 1280, keep_frames=20, context_frames=5)
        assert windows[0].start == 0 and windows[-1].end == samples and windows[-1].keep_to is None
        for before, after in zip(windows, windows[1:]):
            assert after.first_frame == before.first_frame + before.keep_to - before.keep_from
            assert after.start % 1280 == 0 and after.start < before.end  # windows overlap (context)
            assert after.first_frame - after.keep_from == after.start // 1280


SAMPLES_PER_FRAME = 1280  # hop 160 x subsampling 8 (canary-1b-v2's aligner)
LEVELS = 100.0  # a frame's sample level encodes the token it "sounds" like: (id + 1) / LEVELS


class FrameLocalNet:
    """A stand-in ``CTCAligner``: NeMo's frame count (valid mel frames, three stride-2 convolutions), and per output
    frame peaked log-probs for the token its samples' mean level encodes. Frame-local, so windowing it changes
    nothing: any difference would be a stitching error."""

    def __init__(self, config: AlignerConfig):
        self.config = config

    def __call__(self, audio: mx.array, lengths: mx.array):
        frames = valid_frames(lengths, self.config.preprocessor)
        for _ in range(3):
            frames = (frames - 1) // 2 + 1
        n = int(frames[0])
        wave = np.array(audio[0])
        padded = np.pad(wave, (0, max(0, n * SAMPLES_PER_FRAME - len(wave))), mode="edge")
        levels = padded[: n * SAMPLES_PER_FRAME].reshape(n, SAMPLES_PER_FRAME).mean(axis=1)
        tokens = np.clip(np.round(levels * LEVELS) - 1, 0, self.config.vocab_size).astype(int)
        logits = np.full((n, self.config.vocab_size + 1), -8.0, np.float32)
        logits[np.arange(n), tokens] = 8.0
        log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        return mx.array(log_probs[None]), frames


def _stand_in_aligner() -> Aligner:
    config = AlignerConfig(vocab_size=27)
    return Aligner(FrameLocalNet(config), CharVocab(), config)


def _spoken(text: str, vocab: CharVocab) -> tuple[np.ndarray, list]:
    """Audio whose frames encode ``text``: each letter 2 frames + 1 blank, 3 blanks between words; and the frames
    every word should get (first frame, frame after its last letter; a final "." takes no time of its own)."""
    frames, spans = [], []
    for word in text.split(" "):
        start = len(frames)
        for token in vocab.ids(word):
            frames += [token, token, vocab.blank_id]
        spans.append((start, len(frames) - 1 - 3 * word.endswith(".")))
        frames += [vocab.blank_id] * 3
    levels = (np.asarray(frames, np.float32) + 1) / LEVELS
    return np.repeat(levels, SAMPLES_PER_FRAME), spans


def test_stand_in_windows_equal_one_pass(monkeypatch):
    aligner = _stand_in_aligner()
    wave, _ = _spoken(" ".join(["the quick brown fox jumps"] * 60), aligner.vocab)
    wave = np.concatenate([wave, wave[:1000]])  # not a whole number of frames
    assert len(wave) > aligner_module.ONE_PASS_SECONDS * 16000
    windowed = aligner.log_probs(wave)
    monkeypatch.setattr(aligner_module, "ONE_PASS_SECONDS", 1e9)
    np.testing.assert_array_equal(windowed, aligner.log_probs(wave))


def test_long_text_lands_on_its_frames(monkeypatch):
    """5 minutes of a sentence said over and over: every word of every repetition gets exactly its own frames
    (monotonic, in the right repetition), through windows and a blockwise Viterbi."""
    monkeypatch.setattr(fa, "VITERBI_BACKPOINTER_BYTES", 1 << 20)  # ~80 blocks of frames
    aligner = _stand_in_aligner()
    sentence = "so we meet again. said the cat to the dog"
    repeats = 0
    waves, spans = [], []
    while sum(len(w) for w in waves) < 300 * 16000:
        wave, sentence_spans = _spoken(sentence, aligner.vocab)
        offset = sum(len(w) for w in waves) // SAMPLES_PER_FRAME
        spans += [(s + offset, e + offset) for s, e in sentence_spans]
        waves.append(wave)
        repeats += 1
    text = " ".join([sentence] * repeats)
    aligned = aligner.align(np.concatenate(waves), text)
    assert [w["text"] for w in aligned.words] == text.split(" ")
    assert [(w["start"], w["end"]) for w in aligned.words] == [(round(s * 0.08, 2), round(e * 0.08, 2))
                                                              for s, e in spans]
    assert len(aligned.segments) == repeats + 1  # "... again." ends a segment; the next runs on


# -- the real aligner (tiny, built by NeMo) -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_aligner(tmp_path_factory):
    import model_fixtures
    import nemo_aligner_oracle
    from mlx_canary import load_model

    out = nemo_aligner_oracle.oracle_dir_for_tests()
    members = {p.name: p.read_bytes() for p in (out / "aligner").iterdir()}
    model_dir = model_fixtures.build_tiny_model(tmp_path_factory.mktemp("v2"), "tiny-v2", extra_files=members)
    return load_model(model_dir).engine.aligner, np.load(out / "clips.npz")["wave3"]


@pytest.mark.parity
def test_windowed_frames_equal_one_pass_frames(tiny_aligner, monkeypatch):
    aligner, clip = tiny_aligner
    monkeypatch.setattr(aligner_module, "ONE_PASS_SECONDS", 20.0)
    for seconds in (20.5, 47.0, 61.3):
        wave = np.resize(clip, int(seconds * 16000) + 333)
        windowed = aligner.log_probs(wave)
        one_pass = aligner._log_probs(wave, None)
        assert windowed.shape == one_pass.shape
        assert np.allclose(np.exp(windowed).sum(-1), 1, atol=1e-4)
        frames_net = FrameLocalNet(aligner.config)(mx.array(wave[None]), mx.array([len(wave)]))[1]
        assert int(frames_net[0]) == one_pass.shape[0]  # the stand-in's framing is the real one


@pytest.mark.parity
def test_ten_minutes_align_with_bounded_memory(tiny_aligner):
    """One pass over 10 minutes would hold ~7,500^2 attention scores per head (GBs even for this tiny network);
    windowed, MLX's peak stays at one window's worth, numpy's at the text's columns and a backpointer block."""
    aligner, clip = tiny_aligner
    wave = np.resize(clip, 600 * 16000).astype(np.float32)
    text = " ".join(["aa ll oo"] * 300)
    mx.reset_peak_memory()
    tracemalloc.start()
    try:
        aligned = aligner.align(wave, text)
        numpy_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    mlx_peak = mx.get_peak_memory()
    assert mlx_peak < 200e6, mlx_peak  # one pass: > 2 GB (654 MB at 200 s, growing with its square)
    assert numpy_peak < 100e6, numpy_peak
    assert len(aligned.words) == 900
    starts = [w["start"] for w in aligned.words]
    assert starts == sorted(starts) and aligned.words[-1]["end"] <= 600.0
