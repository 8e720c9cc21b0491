"""Streaming without NeMo: the policies' pure decisions, the session API on the bundled demo model, a long
stream's bounded state, and NeMo issue #15231 (the stall) reproduced. Parity with NeMo is in
tests/test_streaming_parity.py."""

from __future__ import annotations

import numpy as np
import pytest

from mlx_canary import CanaryError, StreamingOptions as PublicOptions, load_model
from mlx_canary.options import Task
from mlx_canary.audio import load_audio
from mlx_canary.loading import DEMO_MODEL_DIR
from mlx_canary.prompts import build_prompt
from mlx_canary.streaming import StreamingSession, transcribe_stream
from mlx_canary.streaming_policy import (
    StreamingOptions,
    alignatt_may_continue,
    geometry,
    is_hallucination,
    laal,
    must_wait,
    sink_frames,
)

SR = 16000


def _options(policy="waitk", setting=(10.0, 1.0, 0.5), **knobs) -> StreamingOptions:
    left, chunk, right = setting
    return StreamingOptions(policy=policy, left_context_secs=left, chunk_secs=chunk, right_context_secs=right,
                            **knobs)


# -- pure decisions -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("setting, frames", [
    ((10.0, 1.0, 0.5), (125, 12, 6)),
    ((5.0, 2.0, 1.0), (62, 25, 12)),
    ((4.0, 0.5, 0.5), (50, 6, 6)),
])
def test_contexts_round_down_to_encoder_frames_as_nemo(setting, frames):
    g = geometry(_options(setting=setting), SR, 160, 8)
    assert (g.left, g.chunk, g.right) == frames
    assert g.frame_samples == 1280 and g.frame_ms == 80.0
    assert g.window_samples == sum(frames) * 1280


def test_window_schedule():
    g = geometry(_options(), SR, 160, 8)  # chunk 15360 samples, right 7680
    assert g.steps_for(0) == 0
    assert g.steps_for(1) == 1
    assert g.steps_for(15360 + 7680) == 1
    assert g.steps_for(15360 + 7680 + 1) == 2
    assert [g.decoder_length(k) for k in (0, 1, 10, 11, 50)] == [12, 24, 120 + 12, 125 + 12, 125 + 12]
    # prev_encoder_shift: zero until the left context is full, then one chunk per window
    assert [g.encoder_shift(k, None) for k in (0, 10, 11, 12)] == [0, 0, 7, 19]
    assert g.encoder_shift(0, 4800) == 0


def test_initial_lagging_and_alignatt_rule():
    assert must_wait(12, 12, 2, is_last=False)
    assert not must_wait(24, 12, 2, is_last=False)
    assert not must_wait(12, 12, 2, is_last=True)
    assert alignatt_may_continue(24, 15, 8, is_last=False)  # 24 - 16 = 8 >= 8
    assert not alignatt_may_continue(24, 16, 8, is_last=False)
    assert alignatt_may_continue(24, 23, 8, is_last=True)


def test_attention_sink():
    assert sink_frames(True, 4, 8, 0) == 2  # a window no longer than the sink: half of it, on the prompt pass
    assert sink_frames(False, 4, 8, 0) == 8
    assert sink_frames(True, 30, 8, 0) == 8
    assert sink_frames(False, 30, 8, 5) == 0  # the window has left the start of the audio


@pytest.mark.parametrize("tail, found", [
    ([5, 5, 5, 5, 5], True),
    ([6, 5, 5, 5, 5], False),
    ([1, 2, 1, 2, 1, 2], True),
    ([3, 2, 1, 2, 1, 2], False),
    ([1, 2, 3, 1, 2, 3, 1, 2, 3], True),
    ([9, 2, 3, 1, 2, 3, 1, 2, 3], False),
])
def test_hallucination_patterns(tail, found):
    row = [100 + i for i in range(12 - len(tail))] + tail
    assert is_hallucination(row) is found
    assert not is_hallucination(row[-8:])  # NeMo looks only from 9 positions on


def test_laal():
    # gamma = max(2 delays, 2 words) / 1000 ms; (100 - 0) + (200 - 500) over 2
    assert laal([100.0, 200.0], 1000.0, 2) == -100.0
    assert laal([1500.0], 1000.0, 3) == 1500.0  # first delay past the end


def test_options_are_checked():
    with pytest.raises(CanaryError, match="policy"):
        StreamingOptions(policy="greedy")
    with pytest.raises(CanaryError, match="chunk_secs"):
        StreamingOptions(chunk_secs=-1)
    with pytest.raises(CanaryError, match="history"):
        StreamingOptions(history="none")
    with pytest.raises(CanaryError, match="shorter than one encoder frame"):
        geometry(StreamingOptions(chunk_secs=0.05), SR, 160, 8)
    assert StreamingOptions().tokens_per_alignatt_step() == 10 * int(2.0 + 2.0)
    assert _options(setting=(10, 1, 0.5)).tokens_per_alignatt_step() == 10
    assert _options(setting=(5, 2, 1)).tokens_per_alignatt_step() == 30
    assert _options(max_tokens_per_alignatt_step=4).tokens_per_alignatt_step() == 4


# -- the session on the demo model ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo():
    model = load_model(DEMO_MODEL_DIR, dtype="float32").engine
    prompt = build_prompt(model.tokenizer, model.config.prompt_format, source_lang="en", target_lang="en",
                          pnc=True)
    return model, prompt, load_audio(DEMO_MODEL_DIR / "sample.wav")


def _speech(demo, seconds: float) -> np.ndarray:
    """The demo clip over and over with uneven pauses (no exact period)."""
    wave = demo[2]
    rng = np.random.default_rng(0)
    parts, total = [], 0
    while total < seconds * SR:
        gap = np.zeros(int(rng.uniform(0.2, 1.5) * SR), np.float32)
        parts += [wave, gap]
        total += wave.size + gap.size
    return np.concatenate(parts)[: int(seconds * SR)]


@pytest.mark.parametrize("policy", ["waitk", "alignatt"])
def test_pieces_of_any_size_give_the_whole_file_result(demo, policy):
    model, prompt, wave = demo
    options = _options(policy, (4.0, 0.5, 0.5))
    whole = transcribe_stream(model.net, model.tokenizer, prompt, wave, options)
    assert whole.tokens and whole.text
    session = StreamingSession(model.net, model.tokenizer, prompt, options)
    rng = np.random.default_rng(1)
    events, at = [], 0
    while at < wave.size:
        n = int(rng.choice([0, 1, 7, 160, 1280, 5000, 20000]))
        events += session.feed(wave[at : at + n])
        at += n
    result = session.finish()
    events += result.events
    assert result.tokens == whole.tokens and result.text == whole.text
    assert [t for e in events for t in e.tokens] == whole.tokens
    assert "".join(e.text for e in events) == whole.text
    assert len(result.token_times) == len(result.tokens)
    assert all(0 < e.time <= e.received <= wave.size / SR for e in events)


def test_int16_pieces_and_bad_input(demo):
    model, prompt, wave = demo
    pcm = np.round(wave * 32767).astype(np.int16)
    as_float = transcribe_stream(model.net, model.tokenizer, prompt, pcm.astype(np.float32) / 32768.0, _options())
    as_int = transcribe_stream(model.net, model.tokenizer, prompt, pcm, _options())
    assert as_int.tokens == as_float.tokens
    session = StreamingSession(model.net, model.tokenizer, prompt, _options())
    with pytest.raises(CanaryError, match="1-D"):
        session.feed(np.zeros((2, 100), np.float32))
    with pytest.raises(CanaryError, match="float or int16"):
        session.feed(np.array(["a"]))
    with pytest.raises(CanaryError, match="NaN or infinite"):
        session.feed(np.array([0.0, np.nan], np.float32))
    with pytest.raises(CanaryError, match="xatt_scores_layer=5 does not exist"):
        StreamingSession(model.net, model.tokenizer, prompt, _options("alignatt", xatt_scores_layer=5))
    empty = session.finish()
    assert empty.tokens == [] and empty.text == "" and empty.duration == 0
    with pytest.raises(CanaryError, match="finished"):
        session.feed(wave)
    with pytest.raises(CanaryError, match="finished"):
        session.finish()


def test_nemo_issue_15231_stall_reproduced_and_the_window_history_remedy(demo):
    """NeMo's decoding (history "all") goes silent once the window slides; history "window" keeps decoding."""
    model, prompt, _ = demo
    audio = _speech(demo, 90)
    nemo_like = transcribe_stream(model.net, model.tokenizer, prompt, audio, _options("alignatt"))
    last_nemo = max(e.time for e in nemo_like.events)
    remedied = transcribe_stream(model.net, model.tokenizer, prompt, audio, _options("alignatt", history="window"))
    last_remedied = max(e.time for e in remedied.events)
    # speech runs to 90 s: NeMo's scheme stops emitting well before (the final window's flush aside)
    before_end = [e.time for e in nemo_like.events if e.time < 89]
    assert max(before_end) < 45
    assert last_remedied > 85 and len(remedied.tokens) > 3 * len(nemo_like.tokens)
    assert last_nemo <= 90


def test_a_long_stream_keeps_its_state_bounded(demo):
    """Ten minutes fed in 1 s pieces: audio buffer, decoder prefix and cache stay bounded; tokens keep coming."""
    model, prompt, _ = demo
    audio = _speech(demo, 600)
    options = _options("alignatt", history="window")
    session = StreamingSession(model.net, model.tokenizer, prompt, options)
    window = session.geometry.window_samples
    cache_shape = None
    max_buffer = max_prefix = 0
    last_time = 0.0
    for at in range(0, audio.size, SR):
        for event in session.feed(audio[at : at + SR]):
            last_time = event.time
        max_buffer = max(max_buffer, session.buffered_samples)
        max_prefix = max(max_prefix, session.decoder_prefix_length)
        if at > 30 * SR:
            cache_shape = cache_shape or session.decoder_cache_shape
            assert session.decoder_cache_shape == cache_shape
    result = session.finish()
    assert max_buffer <= window + SR
    assert max_prefix < 256
    assert last_time > 590
    assert result.duration == pytest.approx(600)


def test_the_engine_opens_a_session_with_its_prompt(demo):
    model, prompt, wave = demo
    assert PublicOptions is StreamingOptions
    session = model.open_stream(Task(source_lang="en", target_lang="en", pnc=True), _options())
    session.feed(wave)
    assert session.finish().tokens == transcribe_stream(model.net, model.tokenizer, prompt, wave, _options()).tokens


def test_stream_to_transcript_caption_lines(demo):
    model, prompt, wave = demo
    audio = _speech(demo, 20)
    result = transcribe_stream(model.net, model.tokenizer, prompt, audio, _options("alignatt"))
    transcript = result.to_transcript(result.events, source_lang="en")
    assert transcript.text == result.text and transcript.tokens == result.tokens
    assert transcript.duration == pytest.approx(20)
    assert " ".join(s["text"] for s in transcript.segments).split() == result.text.split()
    ends = [s["end"] for s in transcript.segments]
    assert ends == sorted(ends) and all(s["start"] <= s["end"] for s in transcript.segments)
