"""The Python API's option checks and input handling (tiny random-weight model; no NeMo needed)."""

from __future__ import annotations

import numpy as np
import pytest

from mlx_canary import CanaryError, load_model
from mlx_canary.aed import pad_to_min_duration

torch = pytest.importorskip("torch")  # the tiny .nemo is written with torch.save


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from model_fixtures import build_tiny_model

    return load_model(build_tiny_model(tmp_path_factory.mktemp("tiny")))


def test_translation_directions_come_from_the_config(model):
    pairs = model.engine.config.translation_pairs
    assert ["en", "de"] in pairs and ["de", "en"] in pairs
    assert all("en" in pair for pair in pairs)  # released Canary models translate through English only
    saved = model.engine.config.translation_pairs
    model.engine.config.translation_pairs = [["en", "de"]]
    try:
        with pytest.raises(CanaryError, match=r"does not translate de -> en; supported translations: en->de"):
            model.validate(source_lang="de", target_lang="en")
        model.validate(source_lang="de", target_lang="de")  # transcription is always allowed
    finally:
        model.engine.config.translation_pairs = saved


def test_unknown_language_lists_the_choices(model):
    with pytest.raises(CanaryError, match="en"):
        model.validate(source_lang="klingon")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"batch_size": 0}, "batch_size"),
        ({"beam_size": 0}, "beam_size"),
        ({"chunk_seconds": 1.5}, "chunk length"),
        ({"source_lang": "en", "target_lang": "auto"}, "cannot be 'auto'"),
    ],
)
def test_bad_options_are_refused_before_any_audio(model, kwargs, message):
    with pytest.raises(CanaryError, match=message):
        model.transcribe(np.zeros(16000, np.float32), **kwargs)


def test_single_input_gives_one_result_and_a_list_a_list(model):
    one = model.transcribe(np.zeros(8000, np.float32))
    many = model.transcribe([np.zeros(8000, np.float32), np.zeros(20000, np.float32)], batch_size=2)
    assert not isinstance(one, list) and len(many) == 2
    assert many[0].duration == pytest.approx(0.5) and many[1].duration == pytest.approx(1.25)


def test_generator_yields_in_input_order(model):
    waves = [np.zeros(n, np.float32) for n in (4000, 30000, 12000)]
    results = list(model.generate(waves, batch_size=2))
    assert [r.duration for r in results] == [pytest.approx(n / 16000) for n in (4000, 30000, 12000)]


def test_a_list_is_batched_longest_first_and_answered_in_input_order(model, monkeypatch):
    """Batches hold similar lengths (less padding), the results come back in input order, and each equals the
    input's batch-1 result: batch composition changes the work, never a result."""
    rng = np.random.default_rng(3)
    lengths = (4000, 30000, 12000, 20000, 8000)
    waves = [(rng.standard_normal(n) * 0.1).astype(np.float32) for n in lengths]
    alone = [r.tokens for r in model.transcribe(waves, batch_size=1)]
    batches = []
    decode_batch = type(model).decode_batch

    def recording(self, items, batch_waves, request):
        batches.append([len(w) for w in batch_waves])
        return decode_batch(self, items, batch_waves, request)

    monkeypatch.setattr(type(model), "decode_batch", recording)
    results = model.transcribe(waves, batch_size=2)
    assert batches == [[30000, 20000], [12000, 8000], [4000]]
    assert [r.duration for r in results] == [pytest.approx(n / 16000) for n in lengths]
    assert [r.tokens for r in results] == alone


def test_a_list_is_read_a_bounded_number_of_batches_ahead(model, monkeypatch):
    from mlx_canary import transcribe as pipeline

    groups = []
    decode_waves = type(model).decode_waves

    def recording(self, items, waves, request, progress=None):
        groups.append(len(waves))
        return decode_waves(self, items, waves, request, progress)

    monkeypatch.setattr(type(model), "decode_waves", recording)
    monkeypatch.setattr(pipeline, "LOOKAHEAD_BATCHES", 2)
    list(model.generate([np.zeros(8000, np.float32)] * 7, batch_size=2))
    assert groups == [4, 3]
    groups.clear()
    monkeypatch.setattr(pipeline, "LOOKAHEAD_SECONDS", 1.0)  # two 0.5 s inputs reach it
    list(model.generate([np.zeros(8000, np.float32)] * 5, batch_size=2))
    assert groups == [2, 2, 1]


def test_long_inputs_among_short_ones_and_any_iterable(model):
    """A long (chunked) input in a read-ahead group goes its own way; the results still come in input order, and
    ``generate`` takes any iterable, read lazily."""
    rng = np.random.default_rng(4)
    lengths = (8000, 16000 * 5, 4000, 12000)
    waves = [(rng.standard_normal(n) * 0.1).astype(np.float32) for n in lengths]
    results = list(model.generate(iter(waves), batch_size=2, chunk_seconds=3))
    assert [r.duration for r in results] == [pytest.approx(n / 16000) for n in lengths]
    assert [r.tokens for r in results] == [r.tokens for r in model.transcribe(waves, batch_size=1, chunk_seconds=3)]


def test_streaming_reads_one_input_at_a_time(model):
    from mlx_canary.options import TranscribeOptions
    from mlx_canary.streaming_policy import StreamingOptions
    from mlx_canary.transcribe import lookahead_inputs

    assert lookahead_inputs(TranscribeOptions(batch_size=4)) == 16
    assert lookahead_inputs(TranscribeOptions(batch_size=4, streaming=StreamingOptions())) == 1


def test_batch_order_is_longest_first_and_stable():
    from mlx_canary.transcribe import batch_order

    assert batch_order([5, 9, 5, 1, 9]) == [1, 4, 0, 2, 3]
    assert batch_order([]) == []


def test_short_clips_are_padded_on_both_sides_like_lhotse():
    padded = pad_to_min_duration(np.ones(4800, np.float32), 16000)
    assert len(padded) == 16000
    assert padded[:5600].sum() == 0 and padded[-5600:].sum() == 0 and padded[5600:-5600].all()
    odd = pad_to_min_duration(np.ones(9599, np.float32), 16000)
    assert np.argmax(odd) == 3201  # 6401 samples of padding: the rounded-up half goes first (lhotse)
    one = pad_to_min_duration(np.ones(15999, np.float32), 16000)
    assert one[0] == 0 and one[-1] == 1


def test_model_config_sets_the_default_chunk_length(model):
    """``decoding.chunk_seconds`` in config.json (the demo model's 10 s) applies when the caller names none."""
    rng = np.random.default_rng(0)
    wave = (rng.standard_normal(16000 * 9) * 0.1).astype(np.float32)
    assert not model.needs_chunking(wave)
    saved = model.engine.config.decoding.chunk_seconds
    model.engine.config.decoding.chunk_seconds = 4.0
    try:
        assert model.needs_chunking(wave)
        assert not model.needs_chunking(wave, chunk_seconds=30.0)  # the caller's choice wins
        by_default = model.transcribe(wave, pnc=False)
        named = model.transcribe(wave, pnc=False, chunk_seconds=4.0)
    finally:
        model.engine.config.decoding.chunk_seconds = saved
    assert by_default.tokens == named.tokens
    assert model.validate().chunk_seconds is None


def test_chunk_merge_by_timestamps_returns_text_only(model):
    """``decoding.chunk_merge = "timestamps"``: long inputs are decoded with timestamps and merged by time, and the
    result is the timestamped run's text without words, segments or timestamp ids."""
    def transcribe_long(model, wave, **fields):
        return model.decode_long(None, wave, model.prepare(**fields))

    rng = np.random.default_rng(1)
    wave = (rng.standard_normal(16000 * 9) * 0.1).astype(np.float32)
    saved = model.engine.config.decoding.chunk_merge
    model.engine.config.decoding.chunk_merge = "timestamps"
    try:
        plain = transcribe_long(model, wave, pnc=False, chunk_seconds=4.0)
    finally:
        model.engine.config.decoding.chunk_merge = saved
    timed = transcribe_long(model, wave, pnc=False, timestamps=True, chunk_seconds=4.0)
    assert plain.text == timed.text and plain.tokens == timed.tokens
    assert plain.words == [] and plain.segments == [] and not plain.timestamps
    assert not any(model.tokenizer.is_timestamp(t) for t in plain.tokens)
