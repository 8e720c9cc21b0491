"""Audio input: decoding any file, byte string or array to the model's 16 kHz mono float32 samples.

Files and bytes are decoded by the ``ffmpeg`` command-line tool with exactly
``ffmpeg -nostdin -v error -i <input> -f f32le -ac 1 -ar 16000 -`` (ffmpeg's own ``-ac 1`` downmix and its
default resampler), so any format ffmpeg reads works, and the samples equal what the test oracle feeds NeMo.

Choices this module makes (callers rely on them):

* A file ffmpeg rejects, or one it decodes while reporting errors (a truncated or corrupt file), raises
  ``CanaryError("could not decode audio from X: <ffmpeg's first error line>")``. A file cut exactly at a frame
  boundary looks complete to ffmpeg and decodes to the shorter audio.
* A zero-byte file raises ``CanaryError``; a valid file holding no samples returns an empty array: the caller
  decides what empty audio means (the CLI reports it as a failed input).
* A 16-bit PCM WAV that is already mono at the target rate is read directly, without ffmpeg: its samples are
  exactly ffmpeg's (``s16 / 32768`` is exact in float32), and starting ffmpeg is the largest cost of a short clip.
  Any other WAV (other rate, channels, a cut data chunk) goes to ffmpeg, which decides.
* Byte strings (and ``"-"``, all of stdin) go through a temporary file rather than a pipe, because some
  containers (MP4/M4A with the index at the end) cannot be decoded from a non-seekable pipe.
* Arrays (numpy or MLX) are taken as samples at the sample rate the caller names (default: already 16 kHz).
  A 2-D array is (samples, channels) or (channels, samples): the shorter axis is the channel axis. Channels are
  averaged. Integer PCM is scaled to [-1, 1). Other rates are resampled by piping f32le through the same ffmpeg
  resampler the file path uses, so an array and the file it came from give (nearly) the same samples.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import wave
from pathlib import Path
from typing import Iterable, Optional, Union

import numpy as np

from .errors import CanaryError

SAMPLE_RATE = 16000

# Extensions a directory given to the CLI is searched for (audio and common audio-carrying video containers).
AUDIO_EXTENSIONS = frozenset(
    {
        ".wav", ".wave", ".flac", ".mp3", ".m4a", ".aac", ".ogg", ".oga", ".opus", ".wma", ".aif", ".aiff",
        ".aifc", ".amr", ".au", ".caf", ".mka", ".ac3", ".webm", ".mp4", ".m4v", ".mov", ".mkv", ".avi",
        ".wmv", ".flv", ".mpg", ".mpeg", ".ts", ".3gp",
    }
)

_INSTALL_FFMPEG = (
    "ffmpeg is needed to decode audio but was not found on PATH; install it "
    "(Debian/Ubuntu: apt-get install ffmpeg, macOS: brew install ffmpeg) or pass a 16 kHz numpy array instead"
)

AudioSource = Union[str, os.PathLike, bytes, bytearray, memoryview]


def _ffmpeg() -> str:
    exe = shutil.which("ffmpeg")
    if exe is None:
        raise CanaryError(_INSTALL_FFMPEG)
    return exe


def _first_error_line(stderr: bytes, input_name: str) -> str:
    """ffmpeg's first error line, without the ``[codec @ 0x...]`` address noise or a repeated input name."""
    for line in stderr.decode("utf-8", "replace").splitlines():
        line = line.strip()
        if not line:
            continue
        line = re.sub(r"^\[([^\]\s]+) @ 0x[0-9a-fA-F]+\]\s*", r"\1: ", line)
        prefix = input_name + ": "
        if line.startswith(prefix):
            line = line[len(prefix):]
        return line
    return "ffmpeg reported an error but printed nothing"


def _run_ffmpeg(args: list[str], label: str, stdin: Optional[bytes] = None) -> bytes:
    """Run ffmpeg, returning its stdout; ``label`` names the input in error messages."""
    try:
        proc = subprocess.run(
            [_ffmpeg(), *args],
            input=stdin,
            stdin=None if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            check=False,
        )
    except FileNotFoundError:  # removed between which() and exec
        raise CanaryError(_INSTALL_FFMPEG) from None
    # With ``-v error`` anything on stderr is an error; ffmpeg still exits 0 for many corrupt or truncated
    # inputs after decoding what it could, and returning that silently shortened audio would hide the damage.
    if proc.returncode != 0 or proc.stderr.strip():
        reason = _first_error_line(proc.stderr, args[args.index("-i") + 1])
        raise CanaryError(f"could not decode audio from {label}: {reason}")
    return proc.stdout


def _decode_file(path: str, label: str, sample_rate: int) -> np.ndarray:
    out = _run_ffmpeg(
        ["-nostdin", "-v", "error", "-i", path, "-f", "f32le", "-ac", "1", "-ar", str(sample_rate), "-"], label
    )
    usable = len(out) - len(out) % 4
    return np.frombuffer(out[:usable], dtype="<f4").astype(np.float32, copy=True)


def pcm16_wav_samples(source, sample_rate: int = SAMPLE_RATE) -> Optional[np.ndarray]:
    """Samples of a complete mono 16-bit PCM WAV at ``sample_rate`` (bytes, a path or a binary file object),
    read without ffmpeg; None for anything else (ffmpeg decides)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(bytes(source))
    try:
        with wave.open(source) as w:
            if (w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getcomptype()) != (1, 2, sample_rate, "NONE"):
                return None
            frames = w.getnframes()
            raw = w.readframes(frames)
    except (wave.Error, EOFError, ValueError, OSError):
        return None
    if len(raw) != 2 * frames:  # a truncated data chunk: leave the verdict to ffmpeg
        return None
    return np.frombuffer(raw, dtype="<i2").astype(np.float32) / np.float32(32768.0)


def _decode_bytes(data: bytes, label: str, sample_rate: int) -> np.ndarray:
    if len(data) == 0:
        raise CanaryError(f"could not decode audio from {label}: no data")
    if data.startswith(b"RIFF") and data[8:12] == b"WAVE":
        samples = pcm16_wav_samples(data, sample_rate)
        if samples is not None:
            return samples
    fd, tmp = tempfile.mkstemp(prefix="mlx-canary-", suffix=".audio")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return _decode_file(tmp, label, sample_rate)
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass


def load_audio(source: AudioSource, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Decode a file path, ``"-"`` (all of stdin) or encoded bytes to mono float32 samples at ``sample_rate``.

    Returns a 1-D ``np.float32`` array, possibly empty (a valid file with no samples). Raises ``CanaryError``
    when ffmpeg is missing, the file does not exist, or the data cannot be decoded.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _decode_bytes(bytes(source), "<bytes>", sample_rate)
    if isinstance(source, str) and source == "-":
        isatty = getattr(sys.stdin, "isatty", None)
        if isatty is not None and isatty():
            raise CanaryError("'-' reads audio from stdin, but stdin is a terminal; pipe audio in "
                              "(e.g. cat talk.wav | mlx-canary transcribe - ...)")
        return _decode_bytes(sys.stdin.buffer.read(), "<stdin>", sample_rate)
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"load_audio expects a path, '-' or bytes, not {type(source).__name__}")
    label = os.fspath(source)
    path = Path(source)
    if not path.exists():
        raise CanaryError(f"audio file not found: {label}")
    if path.is_dir():
        raise CanaryError(f"{label} is a directory, not an audio file")
    try:
        if path.stat().st_size == 0:
            raise CanaryError(f"could not decode audio from {label}: the file is empty")
    except OSError as e:
        raise CanaryError(f"cannot read {label}: {e.strerror}") from None
    if not os.access(path, os.R_OK):
        raise CanaryError(f"cannot read {label}: permission denied")
    if path.suffix.lower() in (".wav", ".wave"):
        samples = pcm16_wav_samples(os.fspath(path), sample_rate)
        if samples is not None:
            return samples
    # An absolute path keeps ffmpeg from reading a name such as "take:1.wav" as a protocol ("take:").
    return _decode_file(os.path.abspath(path), label, sample_rate)


def _to_numpy(audio) -> np.ndarray:
    if type(audio).__module__.startswith("mlx"):
        import mlx.core as mx

        if audio.dtype not in (mx.float32, mx.int16, mx.int32, mx.uint8, mx.float64):
            audio = audio.astype(mx.float32)  # bfloat16/float16 have no exact numpy buffer view
        return np.array(audio)
    return np.asarray(audio)


def _to_float(audio: np.ndarray) -> np.ndarray:
    if audio.dtype == np.uint8:  # 8-bit PCM is unsigned, centred on 128
        return (audio.astype(np.float32) - 128.0) / 128.0
    if np.issubdtype(audio.dtype, np.integer):
        return audio.astype(np.float32) / float(-np.iinfo(audio.dtype).min)
    if np.issubdtype(audio.dtype, np.floating):
        return audio.astype(np.float32, copy=False)
    if audio.dtype == np.bool_ or not np.issubdtype(audio.dtype, np.number):
        raise CanaryError(f"audio array has dtype {audio.dtype}; expected float or integer PCM samples")
    raise CanaryError(f"audio array has dtype {audio.dtype}; complex samples are not audio")


def downmix(audio: np.ndarray) -> np.ndarray:
    """Average the channels of a 2-D array (the shorter axis is the channel axis); 1-D passes through."""
    if audio.ndim == 1:
        return audio
    if audio.ndim != 2:
        raise CanaryError(f"audio array must be 1-D (samples) or 2-D (samples and channels), got shape {audio.shape}")
    channel_axis = 1 if audio.shape[1] <= audio.shape[0] else 0
    return audio.mean(axis=channel_axis, dtype=np.float32)


def resample(audio: np.ndarray, orig_sr: int, target_sr: int = SAMPLE_RATE) -> np.ndarray:
    """Resample mono float32 samples with ffmpeg's default resampler (the one file decoding uses)."""
    orig_sr, target_sr = int(orig_sr), int(target_sr)
    if orig_sr <= 0 or target_sr <= 0:
        raise CanaryError(f"sample rates must be positive, got {orig_sr} -> {target_sr}")
    audio = np.ascontiguousarray(audio, dtype="<f4")
    if orig_sr == target_sr or audio.size == 0:
        return audio.astype(np.float32, copy=True)
    out = _run_ffmpeg(
        [
            "-nostdin", "-v", "error", "-f", "f32le", "-ac", "1", "-ar", str(orig_sr), "-i", "pipe:0",
            "-f", "f32le", "-ac", "1", "-ar", str(target_sr), "-",
        ],
        f"a {orig_sr} Hz array",
        stdin=audio.tobytes(),
    )
    usable = len(out) - len(out) % 4
    return np.frombuffer(out[:usable], dtype="<f4").astype(np.float32, copy=True)


def audio_from_array(audio, sample_rate: int = SAMPLE_RATE, target_sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """A numpy or MLX array of samples at ``sample_rate`` → 1-D float32 mono at ``target_sample_rate``."""
    array = _to_float(_to_numpy(audio))
    mono = downmix(array)
    if mono.size and not np.isfinite(mono).all():
        raise CanaryError("audio array contains NaN or infinite samples")
    return np.ascontiguousarray(resample(mono, sample_rate, target_sample_rate), dtype=np.float32)


def is_array(audio) -> bool:
    """True for numpy arrays, MLX arrays and other array-likes that are not paths or encoded bytes."""
    if isinstance(audio, (str, os.PathLike, bytes, bytearray, memoryview)):
        return False
    return isinstance(audio, np.ndarray) or type(audio).__module__.startswith("mlx") or hasattr(audio, "__array__")


def load(source, sample_rate: Optional[int] = None, target_sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Any supported input → 1-D float32 mono samples at ``target_sample_rate``.

    Paths, ``"-"`` and bytes are decoded with ffmpeg (``sample_rate`` is ignored: the file says its rate);
    arrays are taken to be at ``sample_rate`` (default ``target_sample_rate``).
    """
    if is_array(source):
        return audio_from_array(source, sample_rate or target_sample_rate, target_sample_rate)
    return load_audio(source, target_sample_rate)


def find_audio_files(directory: Union[str, os.PathLike], recursive: bool = False) -> list[Path]:
    """Audio/video files (by extension, case-insensitive) in ``directory``, sorted by name; hidden files skipped."""
    root = Path(directory)
    pattern: Iterable[Path] = root.rglob("*") if recursive else root.iterdir()
    found = [
        p for p in pattern
        if p.suffix.lower() in AUDIO_EXTENSIONS and not p.name.startswith(".") and p.is_file()
    ]
    return sorted(found)


def duration(samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> float:
    """Seconds of audio in a 1-D sample array."""
    return len(samples) / float(sample_rate)


__all__ = [
    "SAMPLE_RATE", "AUDIO_EXTENSIONS", "load_audio", "audio_from_array", "resample", "downmix", "load",
    "is_array", "find_audio_files", "duration",
]
