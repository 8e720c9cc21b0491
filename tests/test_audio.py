"""Tests for mlx_canary.audio: decoding files, bytes and stdin as NeMo does; channels; arrays; error messages.

The reference here restates NeMo's pipeline independently (soundfile's float32 decode, scipy's resample_poly,
lhotse's round-half-up length); tests/test_audio_parity.py checks the same against NeMo itself.
"""

from __future__ import annotations

import io
import subprocess
import types
import wave
from math import gcd
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from scipy.signal import resample_poly

from mlx_canary import audio
from mlx_canary.errors import CanaryError


def nemo_resample(x: np.ndarray, rate: int, frames: int) -> np.ndarray:
    """lhotse without torchaudio: resample_poly in float32, then the length round_half_up(frames * 16000 / rate)."""
    g = gcd(rate, 16000)
    y = resample_poly(x.astype(np.float32), 16000 // g, rate // g) if rate != 16000 else x.astype(np.float32)
    expected = int(np.floor(frames * 16000 / rate + 0.5))
    return y[:expected]


def reference_decode(path: Path, channel=None) -> np.ndarray:
    """NeMo's loading of ``path`` (channel=N: its channel_selector); channel None: the mean of the channels."""
    data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    rows = [nemo_resample(data[:, c], rate, len(data)) for c in range(data.shape[1])]
    if channel is not None:
        return rows[channel]
    return rows[0] if len(rows) == 1 else np.mean(np.stack(rows), axis=0, dtype=np.float32)


def ffmpeg_native(path: Path) -> tuple[np.ndarray, int]:
    """What NeMo's last resort (audioread) reads through ffmpeg: 16-bit PCM at the file's rate and channels."""
    probe = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "a:0", "-show_entries",
                            "stream=sample_rate,channels", "-of", "csv=p=0", str(path)],
                           check=True, capture_output=True, text=True).stdout.strip().split(",")
    rate, channels = int(probe[0]), int(probe[1])
    pcm = subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-i", str(path), "-f", "s16le", "-"],
                         check=True, capture_output=True).stdout
    return (np.frombuffer(pcm, "<i2").astype(np.float32) / 32768).reshape(-1, channels), rate


def make_audio(path: Path, seconds: float = 1.0, rate: int = 16000, channels: int = 1, codec_args=()) -> Path:
    """A test signal made by ffmpeg: 440 Hz; a second channel, if any, carries a quieter 1000 Hz tone so a downmix
    differs from either channel."""
    if channels == 1:
        graph = f"sine=frequency=440:sample_rate={rate}:duration={seconds}"
        args = ["-f", "lavfi", "-i", graph]
    else:
        left = f"sine=frequency=440:sample_rate={rate}:duration={seconds}"
        right = f"sine=frequency=1000:sample_rate={rate}:duration={seconds},volume=0.3"
        args = ["-f", "lavfi", "-i", left, "-f", "lavfi", "-i", right,
                "-filter_complex", "[0:a][1:a]join=inputs=2:channel_layout=stereo[a]", "-map", "[a]"]
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", *args, *codec_args, str(path)], check=True)
    return path


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("clips")
    stereo = make_audio(d / "stereo44k.wav", seconds=1.5, rate=44100, channels=2)
    return {
        "wav": stereo,
        "flac": make_audio(d / "stereo44k.flac", seconds=1.5, rate=44100, channels=2),
        "mp3": make_audio(d / "stereo44k.mp3", seconds=1.5, rate=44100, channels=2),
        "ogg": make_audio(d / "stereo44k.ogg", seconds=1.5, rate=44100, channels=2, codec_args=("-c:a", "libvorbis")),
        "m4a": make_audio(d / "stereo44k.m4a", seconds=1.5, rate=44100, channels=2),
        "mono16k": make_audio(d / "mono16k.wav", seconds=1.0),
        "mono8k": make_audio(d / "mono8k.wav", seconds=1.0, rate=8000),
    }


# -- files ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["wav", "flac", "mp3", "ogg", "mono16k", "mono8k"])
def test_file_decodes_like_nemo(clips, kind):
    samples = audio.load_audio(clips[kind])
    assert samples.dtype == np.float32 and samples.ndim == 1
    np.testing.assert_array_equal(samples, reference_decode(clips[kind]))


@pytest.mark.parametrize("kind", ["wav", "flac", "mp3", "ogg"])
def test_each_channel_like_nemos_channel_selector(clips, kind):
    for channel in (0, 1):
        np.testing.assert_array_equal(audio.load_audio(clips[kind], channel=channel),
                                      reference_decode(clips[kind], channel))
    assert not np.array_equal(audio.load_audio(clips[kind], channel=0), audio.load_audio(clips[kind], channel=1))


@pytest.mark.parametrize("kind", ["wav", "flac"])
def test_stereo_44k_becomes_16k_mono(clips, kind):
    samples = audio.load_audio(clips[kind])
    assert len(samples) == 24000  # 1.5 s at 16 kHz
    # The mean of both channels at unit gain (not ffmpeg's -ac 1 mix).
    left, right = (audio.load_audio(clips[kind], channel=c) for c in (0, 1))
    np.testing.assert_allclose(samples, (left + right) / 2, atol=1e-7, rtol=0)


def test_identical_channels_give_the_mono_samples(tmp_path):
    """Unit gain: a stereo file whose channels are equal is the mono file (ffmpeg's -ac 1 would scale it)."""
    x = (0.4 * np.sin(np.arange(33075) * 0.05)).astype(np.float32)
    sf.write(tmp_path / "mono.wav", x, 22050, subtype="FLOAT")
    sf.write(tmp_path / "dual.wav", np.stack([x, x], axis=1), 22050, subtype="FLOAT")
    np.testing.assert_array_equal(audio.load_audio(tmp_path / "dual.wav"), audio.load_audio(tmp_path / "mono.wav"))


def test_missing_channels_are_named(clips):
    with pytest.raises(CanaryError, match=r"channel 2 does not exist: .*stereo44k\.wav has 2 channels \(0-1\)"):
        audio.load_audio(clips["wav"], channel=2)
    with pytest.raises(CanaryError, match=r"channel 1 does not exist: .*mono16k\.wav has 1 channel \(0\)"):
        audio.load_audio(clips["mono16k"], channel=1)
    np.testing.assert_array_equal(audio.load_audio(clips["mono16k"], channel=0), audio.load_audio(clips["mono16k"]))
    with pytest.raises(CanaryError, match="channel must be a channel index"):
        audio.load_audio(clips["wav"], channel=-1)


@pytest.mark.parametrize("rate, frames", [(44100, 51234), (32000, 40001), (48000, 50001), (11025, 17777),
                                          (96000, 100003), (22050, 1)])
def test_length_follows_lhotse(tmp_path, rate, frames):
    """round_half_up(frames * 16000 / rate) samples: resample_poly's ceil trimmed (32 kHz odd: a half, up)."""
    x = np.random.default_rng(rate).uniform(-0.5, 0.5, frames).astype(np.float32)
    sf.write(tmp_path / "x.wav", x, rate, subtype="FLOAT")
    samples = audio.load_audio(tmp_path / "x.wav")
    assert len(samples) == int(np.floor(frames * 16000 / rate + 0.5))
    np.testing.assert_array_equal(samples, nemo_resample(x, rate, frames))


def test_formats_libsndfile_cannot_read_go_through_ffmpeg_as_nemo_does(clips):
    """M4A: NeMo falls back to audioread, 16-bit PCM from ffmpeg at the file's own rate and channels."""
    pcm, rate = ffmpeg_native(clips["m4a"])
    rows = [nemo_resample(pcm[:, c], rate, len(pcm)) for c in range(pcm.shape[1])]
    np.testing.assert_array_equal(audio.load_audio(clips["m4a"]), np.mean(np.stack(rows), axis=0, dtype=np.float32))
    np.testing.assert_array_equal(audio.load_audio(clips["m4a"], channel=1), rows[1])
    np.testing.assert_array_equal(audio.load_audio(clips["m4a"].read_bytes()), audio.load_audio(clips["m4a"]))


def test_path_objects_and_strings_agree(clips):
    np.testing.assert_array_equal(audio.load_audio(str(clips["wav"])), audio.load_audio(clips["wav"]))


def test_other_target_sample_rate(clips):
    samples = audio.load_audio(clips["mono16k"], sample_rate=8000)
    assert abs(len(samples) - 8000) <= 2


def test_name_with_colon_is_not_taken_for_a_protocol(clips, tmp_path, monkeypatch):
    odd = tmp_path / "take:1.wav"
    odd.write_bytes(clips["mono16k"].read_bytes())
    monkeypatch.chdir(tmp_path)
    np.testing.assert_array_equal(audio.load_audio("take:1.wav"), reference_decode(clips["mono16k"]))


# -- bytes and stdin ---------------------------------------------------------------------------------------


def test_bytes_equal_file(clips):
    for kind in ("wav", "mp3", "flac", "ogg"):
        np.testing.assert_array_equal(audio.load_audio(clips[kind].read_bytes()), reference_decode(clips[kind]))


def test_stdin_dash(clips, monkeypatch):
    data = clips["flac"].read_bytes()
    monkeypatch.setattr("sys.stdin", types.SimpleNamespace(buffer=io.BytesIO(data)))
    np.testing.assert_array_equal(audio.load_audio("-"), reference_decode(clips["flac"]))


def test_stdin_terminal_is_refused(monkeypatch):
    monkeypatch.setattr("sys.stdin", types.SimpleNamespace(buffer=io.BytesIO(b""), isatty=lambda: True))
    with pytest.raises(CanaryError, match="stdin is a terminal"):
        audio.load_audio("-")


def test_empty_stdin_is_an_error(monkeypatch):
    monkeypatch.setattr("sys.stdin", types.SimpleNamespace(buffer=io.BytesIO(b"")))
    with pytest.raises(CanaryError, match=r"could not decode audio from <stdin>: no data"):
        audio.load_audio("-")


def test_undecodable_bytes():
    with pytest.raises(CanaryError, match=r"could not decode audio from <bytes>: Invalid data"):
        audio.load_audio(b"this is not audio at all")


# -- errors ------------------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(CanaryError, match=r"audio file not found: .*nope\.wav"):
        audio.load_audio(tmp_path / "nope.wav")


def test_directory_is_not_a_file(tmp_path):
    with pytest.raises(CanaryError, match="is a directory"):
        audio.load_audio(tmp_path)


def test_text_file_named_wav(tmp_path):
    fake = tmp_path / "notes.wav"
    fake.write_text("hello, I am not a WAV file\n" * 20)
    with pytest.raises(CanaryError) as err:
        audio.load_audio(fake)
    message = str(err.value)
    assert message.startswith(f"could not decode audio from {fake}: ")
    assert "Invalid data found when processing input" in message
    assert "\n" not in message and "0x" not in message  # one clean line, no ffmpeg pointer noise


@pytest.mark.parametrize("kind", ["wav", "flac"])
def test_truncated_file(clips, tmp_path, kind):
    data = clips[kind].read_bytes()
    cut = tmp_path / f"cut.{kind}"
    # An odd cut lands inside a sample frame (wav) or inside a compressed frame (flac).
    cut.write_bytes(data[: len(data) // 2 + 1])
    with pytest.raises(CanaryError, match=rf"could not decode audio from {cut}: "):
        audio.load_audio(cut)


def test_zero_byte_file(tmp_path):
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    with pytest.raises(CanaryError, match="the file is empty"):
        audio.load_audio(empty)


def test_valid_file_without_samples_returns_empty_array(tmp_path):
    path = tmp_path / "silence0.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(b"")
    samples = audio.load_audio(path)
    assert samples.dtype == np.float32 and samples.shape == (0,)


def test_missing_ffmpeg_says_how_to_install(clips, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(CanaryError, match=r"ffmpeg is needed to decode this format .*apt-get install ffmpeg.*brew "
                                          r"install ffmpeg"):
        audio.load_audio(clips["m4a"])


def test_common_formats_need_no_ffmpeg(clips, tmp_path, monkeypatch):
    """WAV, FLAC, MP3 and Ogg are read by libsndfile, as NeMo reads them; ffmpeg is only the fallback."""
    expected = {kind: reference_decode(clips[kind]) for kind in ("wav", "flac", "mp3", "ogg", "mono16k")}
    data = clips["mono16k"].read_bytes()
    monkeypatch.setenv("PATH", "/nonexistent")
    for kind, samples in expected.items():
        np.testing.assert_array_equal(audio.load_audio(clips[kind]), samples)
    np.testing.assert_array_equal(audio.load_audio(data), expected["mono16k"])
    np.testing.assert_array_equal(  # 16-bit PCM: exactly s16 / 32768
        expected["mono16k"], np.frombuffer(data[-32000:], "<i2").astype(np.float32) / np.float32(32768))
    cut = tmp_path / "cut16k.wav"
    cut.write_bytes(data[: len(data) // 2])  # cut at a frame boundary: the header promises more than there is
    with pytest.raises(CanaryError, match=r"cut16k\.wav: it is truncated \(its data chunk holds \d+ of the \d+ bytes"):
        audio.load_audio(cut)


def test_wav_written_to_a_pipe_is_read_to_its_end(clips, tmp_path):
    """A streaming WAV's header carries a placeholder size: that is not truncation."""
    streamed = subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-i", str(clips["mono16k"]), "-f", "wav", "-"],
                              check=True, capture_output=True).stdout
    (tmp_path / "streamed.wav").write_bytes(streamed)
    np.testing.assert_array_equal(audio.load_audio(tmp_path / "streamed.wav"), reference_decode(clips["mono16k"]))


def test_mp3_decoding_to_much_less_than_it_declares_is_refused(clips, tmp_path):
    data = clips["mp3"].read_bytes()
    cut = tmp_path / "cut.mp3"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CanaryError, match=r"could not decode audio from .*cut\.mp3: it declares 1\.50 s of audio but "
                                          r"0\.\d+ s decode \(truncated or damaged\)"):
        audio.load_audio(cut)


def test_wrong_type():
    with pytest.raises(TypeError):
        audio.load_audio(12345)


# -- arrays ------------------------------------------------------------------------------------------------


def test_array_at_16k_passes_through():
    x = np.linspace(-0.5, 0.5, 16000, dtype=np.float32)
    y = audio.audio_from_array(x)
    np.testing.assert_array_equal(x, y)
    assert y is not x  # callers may modify the result


@pytest.mark.parametrize("layout", ["channels_last", "channels_first"])
def test_multichannel_array_is_averaged(layout):
    left = np.full(1000, 0.5, dtype=np.float32)
    right = np.full(1000, -0.1, dtype=np.float32)
    stacked = np.stack([left, right], axis=1 if layout == "channels_last" else 0)
    np.testing.assert_allclose(audio.audio_from_array(stacked), np.full(1000, 0.2, dtype=np.float32), atol=1e-7)


def test_integer_pcm_is_scaled():
    pcm = np.array([0, 16384, -32768, 32767], dtype=np.int16)
    np.testing.assert_allclose(audio.audio_from_array(pcm), [0.0, 0.5, -1.0, 32767 / 32768], rtol=0, atol=1e-7)
    u8 = np.array([128, 0, 255], dtype=np.uint8)
    np.testing.assert_allclose(audio.audio_from_array(u8), [0.0, -1.0, 127 / 128])


def test_resampled_array_equals_its_file(tmp_path):
    """Arrays go through the file path's resampler and channel handling: a file and its array agree exactly."""
    rng = np.random.default_rng(0)
    x = (0.3 * rng.standard_normal((44101, 3))).astype(np.float32)
    sf.write(tmp_path / "x.wav", x, 44100, subtype="FLOAT")
    for channel in (None, 2):
        from_file = audio.load_audio(tmp_path / "x.wav", channel=channel)
        np.testing.assert_array_equal(audio.audio_from_array(x, sample_rate=44100, channel=channel), from_file)
        np.testing.assert_array_equal(audio.audio_from_array(x.T, sample_rate=44100, channel=channel), from_file)


def test_mlx_arrays():
    mx = pytest.importorskip("mlx.core")
    x = np.linspace(-0.5, 0.5, 8000, dtype=np.float32)
    np.testing.assert_array_equal(audio.audio_from_array(mx.array(x)), x)
    half = audio.audio_from_array(mx.array(x).astype(mx.bfloat16))
    assert half.dtype == np.float32
    np.testing.assert_allclose(half, x, atol=1e-2)


def test_bad_arrays():
    with pytest.raises(CanaryError, match="1-D .* or 2-D"):
        audio.audio_from_array(np.zeros((2, 3, 4), dtype=np.float32))
    with pytest.raises(CanaryError, match="NaN"):
        audio.audio_from_array(np.array([0.0, np.nan], dtype=np.float32))
    with pytest.raises(CanaryError, match="sample rates must be positive"):
        audio.audio_from_array(np.zeros(10, dtype=np.float32), sample_rate=0)
    with pytest.raises(CanaryError, match="dtype"):
        audio.audio_from_array(np.array(["a", "b"]))


def test_load_dispatches_on_type(clips):
    x = np.zeros(16000, dtype=np.float32)
    assert audio.load(x).shape == (16000,)
    assert abs(len(audio.load(np.zeros(8000, dtype=np.float32), sample_rate=8000)) - 16000) <= 2
    np.testing.assert_array_equal(audio.load(clips["wav"]), reference_decode(clips["wav"]))
    np.testing.assert_array_equal(audio.load(str(clips["wav"]), channel=1), reference_decode(clips["wav"], 1))
    with pytest.raises(CanaryError, match="audio must be a file path"):
        audio.load(None)


def test_find_audio_files(tmp_path):
    for name in ("b.WAV", "a.mp3", "c.txt", ".hidden.wav", "d.mp4"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "e.flac").write_bytes(b"x")
    assert [p.name for p in audio.find_audio_files(tmp_path)] == ["a.mp3", "b.WAV", "d.mp4"]
    assert [p.name for p in audio.find_audio_files(tmp_path, recursive=True)] == ["a.mp3", "b.WAV", "d.mp4", "e.flac"]
