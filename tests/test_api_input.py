"""What the public Python API does with odd input (bundled, trained demo model; no NeMo, no torch).

Issue 17: sample rates, empty arrays and None are refused with a ``CanaryError`` naming the problem, before
any work. Issue 12: digital silence, near-silence and DC give a finite, deterministic, empty or near-empty
transcript; absurd sample values are refused; ``<unk>`` never reaches transcript text.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

import mlx.core as mx

import mlx_canary
from mlx_canary import CanaryError
from mlx_canary.loading import DEMO_MODEL_DIR


@pytest.fixture(scope="module")
def model():
    return mlx_canary.load_model("demo")


@pytest.fixture(scope="module")
def speech():
    return mlx_canary.audio.load_audio(DEMO_MODEL_DIR / "sample.wav")


# -- issue 17: sample rates ----------------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [1, 999, 768001, 10**9, 0, -16000])
def test_sample_rates_outside_audio_are_refused_before_any_work(model, speech, rate):
    started = time.perf_counter()
    with pytest.raises(CanaryError, match=rf"sample_rate {rate} Hz is outside the rates audio uses \(1000-768000"):
        model.transcribe(speech, sample_rate=rate)
    assert time.perf_counter() - started < 1.0  # refused up front, not after resampling 16000-fold


@pytest.mark.parametrize("rate, message", [
    (16000.5, r"must be a whole number of samples per second, got 16000\.5"),
    (float("nan"), "must be a whole number"),
    ("16000", r"must be a number of samples per second, not str '16000'"),
    (True, "not bool"),
    ([16000], "not list"),
])
def test_sample_rates_that_are_not_whole_numbers_are_refused(model, speech, rate, message):
    with pytest.raises(CanaryError, match=message):
        model.transcribe(speech, sample_rate=rate)


def test_integral_float_and_numpy_rates_are_accepted(model, speech):
    expected = model.transcribe(speech).tokens
    assert model.transcribe(speech, sample_rate=16000.0).tokens == expected
    assert model.transcribe(speech, sample_rate=np.int64(16000)).tokens == expected


def test_other_rates_are_resampled_like_files(model, speech):
    """An array at 8 kHz goes through the same resampler as a file (scipy's resample_poly, as NeMo)."""
    from scipy.signal import resample_poly

    at8k = resample_poly(speech, 1, 2).astype(np.float32)
    expected = resample_poly(at8k, 2, 1).astype(np.float32)
    np.testing.assert_array_equal(mlx_canary.audio.load(at8k, sample_rate=8000), expected)
    assert model.transcribe(at8k, sample_rate=8000).text


# -- issue 17: empty and None inputs ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(0,), (0, 2), (2, 0)])
def test_empty_arrays_are_refused_naming_the_shape(model, shape):
    with pytest.raises(CanaryError, match=rf"the audio array \(shape \({shape[0]}, ?{shape[1] if len(shape) > 1 else ''}"
                                         r"\)\) holds no samples"):
        model.transcribe(np.zeros(shape, np.float32))


def test_empty_mlx_array_and_empty_file_are_refused(model, tmp_path):
    import soundfile as sf

    with pytest.raises(CanaryError, match="holds no samples"):
        model.transcribe(mx.zeros((0,)))
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, np.float32), 16000)
    with pytest.raises(CanaryError, match=rf"{empty} holds no audio samples"):
        model.transcribe(str(empty))


@pytest.mark.parametrize("value", [None, 5, 1.5, {"audio": "x.wav"}])
def test_inputs_of_other_types_name_the_accepted_types(model, value):
    with pytest.raises(CanaryError, match=r"audio must be a file path, '-' \(stdin\), encoded bytes, or a "
                                          rf"numpy/MLX array of samples, not {type(value).__name__}"):
        model.transcribe(value)


def test_a_bad_item_in_a_list_is_named(model, speech):
    with pytest.raises(CanaryError, match="not NoneType"):
        model.transcribe([speech, None])


@pytest.mark.parametrize("channel", [-1, 1.0, "0", True])
def test_bad_channel_values(model, speech, channel):
    with pytest.raises(CanaryError, match="channel must be a channel index"):
        model.transcribe(speech, channel=channel)


def test_channel_selects_from_arrays(model, speech):
    stereo = np.stack([speech, np.zeros_like(speech)], axis=1)
    assert model.transcribe(stereo, channel=0).tokens == model.transcribe(speech).tokens
    with pytest.raises(CanaryError, match=r"channel 2 does not exist: the audio array has 2 channels \(0-1\)"):
        model.transcribe(stereo, channel=2)


# -- issue 12 item 5: silence, near-silence, DC -------------------------------------------------------------


def _features(model, samples: np.ndarray) -> np.ndarray:
    feats, _ = model.engine.net.features(mx.array(samples)[None], mx.array([len(samples)]), pad_to=0)
    return np.array(feats)


SILENT = {
    "digital silence": lambda n, rng: np.zeros(n, np.float32),
    "near-silence (1e-9)": lambda n, rng: (1e-9 * rng.standard_normal(n)).astype(np.float32),
    "DC 0.5": lambda n, rng: np.full(n, 0.5, np.float32),
    "DC -1": lambda n, rng: np.full(n, -1.0, np.float32),
    "one LSB of dither": lambda n, rng: (rng.integers(-1, 2, n) / 32768).astype(np.float32),
}


@pytest.mark.parametrize("kind", list(SILENT))
@pytest.mark.parametrize("seconds", [0.5, 3.0, 10.0])
def test_silence_and_dc_are_finite_and_deterministic(model, kind, seconds):
    samples = SILENT[kind](int(16000 * seconds), np.random.default_rng(0))
    assert np.isfinite(_features(model, samples)).all()
    first, second = model.transcribe(samples), model.transcribe(samples)
    assert first.tokens == second.tokens and first.text == second.text
    # Batched equals alone (the featureless rule is per utterance).
    batched = model.transcribe([samples, np.zeros(16000, np.float32)], batch_size=2)[0]
    assert batched.tokens == first.tokens


@pytest.mark.parametrize("kind", ["digital silence", "near-silence (1e-9)", "DC 0.5", "DC -1"])
@pytest.mark.parametrize("seconds", [1.0, 3.0, 10.0])
def test_featureless_input_gives_an_empty_transcript(model, kind, seconds):
    """Digital silence, audio below the log guard, and DC give exactly zero features (the exact value of NeMo's
    normalisation; NeMo itself amplifies rounding noise there, so token equality with NeMo is not meaningful),
    and the trained demo model writes nothing for them."""
    samples = SILENT[kind](int(16000 * seconds), np.random.default_rng(0))
    result = model.transcribe(samples)
    assert result.text == ""
    if kind in ("digital silence", "near-silence (1e-9)"):
        assert not _features(model, samples).any()


# -- issue 12 item 7: absurd samples, <unk> ----------------------------------------------------------------


def test_absurd_sample_values_are_refused(model, speech, tmp_path):
    import soundfile as sf

    huge = tmp_path / "huge.wav"
    sf.write(huge, speech * np.float32(1e30), 16000, subtype="FLOAT")
    with pytest.raises(CanaryError, match=rf"{huge} has samples of magnitude .*e\+29, beyond any audio scale"):
        model.transcribe(str(huge))
    with pytest.raises(CanaryError, match="the audio array has samples of magnitude"):
        model.transcribe(speech * np.float32(1e12))
    with pytest.raises(CanaryError, match="NaN or infinite"):
        model.transcribe(np.array([0.0, np.inf] * 8000, np.float32))


def test_loud_audio_is_kept_not_clipped(model, speech, tmp_path):
    """Float audio above 0 dBFS and floats on the int16 scale are audio; NeMo's per-feature normalisation makes
    them transcribe (nearly) like the same audio at normal level, which clipping would destroy."""
    import soundfile as sf

    hot = tmp_path / "hot.wav"
    sf.write(hot, speech * np.float32(4.0), 16000, subtype="FLOAT")
    np.testing.assert_array_equal(mlx_canary.audio.load_audio(hot), speech * np.float32(4.0))
    int_scale = speech * np.float32(32768.0)
    assert np.isfinite(_features(model, int_scale)).all()
    assert model.transcribe(int_scale).text
    assert np.isfinite(_features(model, speech * np.float32(2**31 / 1.01))).all()


def test_unknown_pieces_never_reach_the_text(model):
    tok = model.tokenizer
    unk = [i for i in sorted(tok.unprintable_ids) if tok.decode([i]).strip() == "<unk>"]
    assert unk, "the demo tokenizer has <unk> pieces"
    words = tok.encode("hello", tok.languages[0])
    ids = unk[:1] + words + unk * 3
    assert "<unk>" in tok.decode(ids)  # NeMo's ids_to_text, unchanged
    assert tok.decode_text(ids) == tok.decode(words)
    settings = mlx_canary.options.Task("en", "en")
    result = model.make_transcript("x.wav", np.zeros(16000, np.float32), ids, settings)
    assert "<unk>" not in result.text and result.tokens == ids
