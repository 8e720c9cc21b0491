"""Tests for mlx_canary.audio: ffmpeg decoding of files, bytes and stdin; array input; error messages."""

from __future__ import annotations

import io
import subprocess
import types
import wave
from pathlib import Path

import numpy as np
import pytest

from mlx_canary import audio
from mlx_canary.errors import CanaryError

# The oracle: the exact command the package promises to run.
ORACLE = ["ffmpeg", "-nostdin", "-v", "error", "-i", "{path}", "-f", "f32le", "-ac", "1", "-ar", "16000", "-"]


def oracle_decode(path: Path) -> np.ndarray:
    cmd = [str(path) if part == "{path}" else part for part in ORACLE]
    out = subprocess.run(cmd, check=True, capture_output=True).stdout
    return np.frombuffer(out, dtype="<f4")


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
        "mono16k": make_audio(d / "mono16k.wav", seconds=1.0),
    }


# -- files ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["wav", "flac", "mp3", "mono16k"])
def test_file_decodes_exactly_like_the_oracle_command(clips, kind):
    samples = audio.load_audio(clips[kind])
    assert samples.dtype == np.float32 and samples.ndim == 1
    np.testing.assert_array_equal(samples, oracle_decode(clips[kind]))


@pytest.mark.parametrize("kind", ["wav", "flac"])
def test_stereo_44k_becomes_16k_mono(clips, kind):
    samples = audio.load_audio(clips[kind])
    assert abs(len(samples) - 24000) <= 2  # 1.5 s at 16 kHz
    # A mix of both channels: neither pure 440 Hz at full scale nor silence.
    assert 0.1 < np.abs(samples).max() < 1.0


def test_path_objects_and_strings_agree(clips):
    np.testing.assert_array_equal(audio.load_audio(str(clips["wav"])), audio.load_audio(clips["wav"]))


def test_other_target_sample_rate(clips):
    samples = audio.load_audio(clips["mono16k"], sample_rate=8000)
    assert abs(len(samples) - 8000) <= 2


def test_name_with_colon_is_not_taken_for_a_protocol(clips, tmp_path, monkeypatch):
    odd = tmp_path / "take:1.wav"
    odd.write_bytes(clips["mono16k"].read_bytes())
    monkeypatch.chdir(tmp_path)
    np.testing.assert_array_equal(audio.load_audio("take:1.wav"), oracle_decode(clips["mono16k"]))


# -- bytes and stdin ---------------------------------------------------------------------------------------


def test_bytes_equal_file(clips):
    for kind in ("wav", "mp3"):
        np.testing.assert_array_equal(audio.load_audio(clips[kind].read_bytes()), oracle_decode(clips[kind]))


def test_stdin_dash(clips, monkeypatch):
    data = clips["flac"].read_bytes()
    monkeypatch.setattr("sys.stdin", types.SimpleNamespace(buffer=io.BytesIO(data)))
    np.testing.assert_array_equal(audio.load_audio("-"), oracle_decode(clips["flac"]))


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
    with pytest.raises(CanaryError, match=r"ffmpeg .*not found.*apt-get install ffmpeg.*brew install ffmpeg"):
        audio.load_audio(clips["wav"])


def test_16k_mono_pcm16_wav_is_read_without_ffmpeg(clips, tmp_path, monkeypatch):
    """The common case skips starting ffmpeg and gives ffmpeg's exact samples; other WAVs still need it."""
    expected = oracle_decode(clips["mono16k"])
    data = clips["mono16k"].read_bytes()
    monkeypatch.setenv("PATH", "/nonexistent")
    np.testing.assert_array_equal(audio.load_audio(clips["mono16k"]), expected)
    np.testing.assert_array_equal(audio.load_audio(data), expected)
    with pytest.raises(CanaryError, match="ffmpeg"):  # 44.1 kHz stereo: ffmpeg's job
        audio.load_audio(clips["wav"])
    cut = tmp_path / "cut16k.wav"
    cut.write_bytes(data[: len(data) // 2])  # header promises more frames than there are: ffmpeg decides
    with pytest.raises(CanaryError, match="ffmpeg"):
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


def test_resampled_array_matches_ffmpeg_file_decoding(tmp_path):
    rng = np.random.default_rng(0)
    x = (0.3 * rng.standard_normal(44100)).astype(np.float32)
    raw = tmp_path / "x.f32"
    raw.write_bytes(x.astype("<f4").tobytes())
    wav = tmp_path / "x.wav"
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-f", "f32le", "-ar", "44100", "-ac", "1", "-i", str(raw),
                    "-c:a", "pcm_f32le", str(wav)], check=True)
    from_file = audio.load_audio(wav)
    from_array = audio.audio_from_array(x, sample_rate=44100)
    assert from_array.shape == from_file.shape
    np.testing.assert_allclose(from_array, from_file, atol=1e-6)


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
    np.testing.assert_array_equal(audio.load(clips["wav"]), oracle_decode(clips["wav"]))
    np.testing.assert_array_equal(audio.load(str(clips["wav"])), oracle_decode(clips["wav"]))


def test_find_audio_files(tmp_path):
    for name in ("b.WAV", "a.mp3", "c.txt", ".hidden.wav", "d.mp4"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "e.flac").write_bytes(b"x")
    assert [p.name for p in audio.find_audio_files(tmp_path)] == ["a.mp3", "b.WAV", "d.mp4"]
    assert [p.name for p in audio.find_audio_files(tmp_path, recursive=True)] == ["a.mp3", "b.WAV", "d.mp4", "e.flac"]
