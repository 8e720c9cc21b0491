"""Audio input: any file, byte string or array -> the model's 16 kHz mono float32 samples, loaded as NeMo loads them.

What NeMo 3.0's ``transcribe()`` does with a file path (read in its installed source and checked against it by
tests/test_audio_parity.py, NeMo loading the files itself), and so what this module does:

* Decoding: NeMo reads files through lhotse, whose first audio backend is libsndfile (the ``soundfile``
  package): ``read(dtype=float32, always_2d=True)``. WAV (any PCM or float subtype), FLAC, MP3, Ogg Vorbis/Opus,
  AIFF, AU, CAF, W64/RF64... are decoded by soundfile here too, giving NeMo's exact samples.
* Resampling: without torchaudio (NeMo's default install) lhotse resamples with
  ``scipy.signal.resample_poly(x, up, down, axis=-1)`` (``up``/``down`` the two rates divided by their gcd,
  scipy's default Kaiser window), per channel, in float32; then it trims or reflect-pads the result to
  ``round_half_up(frames * 16000 / rate)`` samples (``frames`` = what the file header declares; a mismatch over
  0.5 s is an error). ``resample`` does exactly this; arrays at another rate go through it too, so a file and
  the array it holds give the same samples.
* Channels: NeMo refuses a multi-channel file unless ``channel_selector`` names one channel ("Expected input
  audio to have a single channel"). Refusing stereo is not a sensible default, so ours is the channel mean at
  unit gain (``(L + R) / 2``, not ffmpeg's ``-ac 1`` mix at 1/sqrt(2) per channel), taken after resampling
  each channel: exactly the mean of what NeMo gives for each ``channel_selector``; ``channel=N`` (CLI:
  ``--channel N``) keeps channel N alone (counting from 0), equal to NeMo's ``channel_selector=N``. Channel 0 of
  a mono file is the file, as in NeMo.
* Formats libsndfile cannot read (M4A/AAC, WMA, AMR, video containers, and such data on stdin): the ``ffmpeg``
  command-line tool is the fallback. It decodes to 16-bit PCM at the file's own rate and channel count (what
  NeMo's own last resort, audioread over ffmpeg, produces); the same channel handling and resampler follow.
  Only these formats need ffmpeg installed.

Choices this module makes (callers rely on them):

* A file neither decoder accepts, or a damaged one (a WAV whose data chunk is shorter than its header says, a
  FLAC that loses sync, an MP3 or FLAC decoding to much less audio than it declares, an ffmpeg decode that
  reports errors) raises ``CanaryError("could not decode audio from X: <reason>")``. A WAV whose header holds a
  streaming placeholder size (0 or ~4 GB: written to a pipe) is read to its end.
* A zero-byte file raises ``CanaryError``; a valid file holding no samples returns an empty array: the caller
  decides what empty audio means (the CLI reports it as a failed input; ``CanaryModel.transcribe`` refuses it).
* Samples must be finite, and no larger in magnitude than ``MAX_ABS_SAMPLE`` (2**31, the largest integer PCM
  scale): anything above cannot be audio at any scale (it is a damaged file, or floats read with the wrong
  byte order, e.g. a float WAV of 1e30), and would overflow the log-mel power, so it is refused with
  ``CanaryError``. Everything up to that is kept as it is, not clipped: NeMo's per-feature normalisation makes
  the transcript independent of the input gain, so a float file hotter than 0 dBFS, or floats on the int16
  scale, transcribe as NeMo transcribes them; clipping would distort them.
* Byte strings (and ``"-"``, all of stdin) are decoded from memory by soundfile; for ffmpeg they go through a
  temporary file rather than a pipe, because some containers (MP4/M4A with the index at the end) cannot be
  decoded from a non-seekable pipe.
* Arrays (numpy or MLX) are taken as samples at the sample rate the caller names (default: already 16 kHz;
  ``check_sample_rate`` bounds it to 1-768 kHz). A 2-D array is (samples, channels) or (channels, samples): the
  shorter axis is the channel axis. Integer PCM is scaled to [-1, 1). An empty array is refused.
* Digital silence, near-silence and DC give finite features and a deterministic (empty or near-empty)
  transcript. NeMo's per-feature normalisation turns such constant features into amplified float rounding
  noise (its features for 5 s of zeros are a constant -0.276, not 0), so token equality with NeMo there is
  not meaningful and is not claimed.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
from math import gcd
from pathlib import Path
from typing import Iterable, NamedTuple, Optional, Union

import numpy as np

from .errors import AudioError, CanaryError

SAMPLE_RATE = 16000
# Rates audio is ever recorded at lie well inside these; outside them a rate is a mistake (1 Hz would turn a
# 3 s clip into 13 hours of "16 kHz" audio).
MIN_SAMPLE_RATE = 1000
MAX_SAMPLE_RATE = 768000
# The largest magnitude of a sample (integer PCM scale of 32-bit audio): beyond it data is not audio.
MAX_ABS_SAMPLE = float(2**31)
# lhotse's default tolerance between the frames a header declares and the frames decoded.
LENGTH_TOLERANCE_S = 0.5

# Extensions a directory given to the CLI is searched for (audio and common audio-carrying video containers).
AUDIO_EXTENSIONS = frozenset(
    {
        ".wav", ".wave", ".flac", ".mp3", ".m4a", ".aac", ".ogg", ".oga", ".opus", ".wma", ".aif", ".aiff",
        ".aifc", ".amr", ".au", ".caf", ".mka", ".ac3", ".webm", ".mp4", ".m4v", ".mov", ".mkv", ".avi",
        ".wmv", ".flv", ".mpg", ".mpeg", ".ts", ".3gp",
    }
)

_INSTALL_FFMPEG = (
    "ffmpeg is needed to decode this format (WAV, FLAC, MP3 and Ogg are read without it) but was not found on "
    "PATH; install it (Debian/Ubuntu: apt-get install ffmpeg, macOS: brew install ffmpeg) or convert the file "
    "to WAV or FLAC"
)

AudioSource = Union[str, os.PathLike, bytes, bytearray, memoryview]


class Decoded(NamedTuple):
    """A decoded file: ``samples`` (channels, frames) float32 at ``rate``; ``declared`` the frames its header
    declares (NeMo's output length follows the header, not the decoder)."""

    samples: np.ndarray
    rate: int
    declared: int


# -- parameters ------------------------------------------------------------------------------------------------


def check_sample_rate(value, name: str = "sample_rate") -> int:
    """``value`` as an int sample rate, or ``CanaryError`` naming it: an integer (or integral float) in
    [MIN_SAMPLE_RATE, MAX_SAMPLE_RATE]."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise CanaryError(f"{name} must be a number of samples per second, not {type(value).__name__} {value!r}")
    if not np.isfinite(value) or float(value) != int(value):
        raise CanaryError(f"{name} must be a whole number of samples per second, got {value!r}")
    rate = int(value)
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise CanaryError(
            f"{name} {rate} Hz is outside the rates audio uses ({MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE} Hz); "
            "it is the rate the array was recorded at, e.g. 16000 or 44100"
        )
    return rate


def check_channel(channel) -> Optional[int]:
    """``channel`` (None: the channel mean) as a non-negative int index, or ``CanaryError``."""
    if channel is None:
        return None
    if isinstance(channel, (bool, np.bool_)) or not isinstance(channel, (int, np.integer)) or channel < 0:
        raise CanaryError(f"channel must be a channel index (0 for the first channel) or None, got {channel!r}")
    return int(channel)


# -- ffmpeg (fallback) -----------------------------------------------------------------------------------------


def _ffmpeg() -> str:
    exe = shutil.which("ffmpeg")
    if exe is None:
        raise AudioError(_INSTALL_FFMPEG)
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


def _run_ffmpeg(args: list[str], label: str) -> bytes:
    """Run ffmpeg, returning its stdout; ``label`` names the input in error messages."""
    try:
        proc = subprocess.run(
            [_ffmpeg(), *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=False
        )
    except FileNotFoundError:  # removed between which() and exec
        raise AudioError(_INSTALL_FFMPEG) from None
    # With ``-v error`` anything on stderr is an error; ffmpeg still exits 0 for many corrupt or truncated
    # inputs after decoding what it could, and returning that silently shortened audio would hide the damage.
    if proc.returncode != 0 or proc.stderr.strip():
        reason = _first_error_line(proc.stderr, args[args.index("-i") + 1])
        raise AudioError(f"could not decode audio from {label}: {reason}")
    return proc.stdout


def _pcm16_wav_stream(data: bytes, label: str) -> Decoded:
    """The 16-bit WAV ffmpeg writes to a pipe (its sizes are placeholders: the data runs to the end)."""
    pos, channels, rate = 12, 0, 0
    while pos + 8 <= len(data):
        chunk, size = data[pos : pos + 4], int.from_bytes(data[pos + 4 : pos + 8], "little")
        if chunk == b"fmt ":
            channels = int.from_bytes(data[pos + 10 : pos + 12], "little")
            rate = int.from_bytes(data[pos + 12 : pos + 16], "little")
        elif chunk == b"data":
            if not channels or not rate:
                break
            body = data[pos + 8 :]
            pcm = np.frombuffer(body[: len(body) - len(body) % (2 * channels)], dtype="<i2")
            samples = (pcm.astype(np.float32) / np.float32(32768.0)).reshape(-1, channels).T
            return Decoded(np.ascontiguousarray(samples), rate, samples.shape[1])
        pos += 8 + size + (size & 1)
    raise AudioError(f"could not decode audio from {label}: ffmpeg produced no audio stream")


def _decode_with_ffmpeg(path: str, label: str) -> Decoded:
    out = _run_ffmpeg(
        ["-nostdin", "-v", "error", "-i", path, "-vn", "-map", "0:a:0", "-f", "wav", "-c:a", "pcm_s16le", "-"],
        label,
    )
    return _pcm16_wav_stream(out, label)


# -- soundfile (libsndfile, NeMo's decoder) --------------------------------------------------------------------


def _refuse_truncated_wav(head: bytes, total_size: int, label: str) -> None:
    """Refuse a RIFF WAV whose data chunk holds less than its header declares (libsndfile, and so NeMo, would
    quietly read the part that is there); a streaming placeholder size (0, ~4 GB) is not a declaration."""
    if not (head.startswith(b"RIFF") and head[8:12] == b"WAVE"):
        return
    pos = 12
    while pos + 8 <= len(head):
        chunk, size = head[pos : pos + 4], int.from_bytes(head[pos + 4 : pos + 8], "little")
        if chunk == b"data":
            present = total_size - pos - 8
            if 0 < size < 0x7FFFF000 and present < size:
                raise AudioError(f"could not decode audio from {label}: it is truncated (its data chunk holds "
                                  f"{present} of the {size} bytes its header declares)")
            return
        pos += 8 + size + (size & 1)


def _decode_with_soundfile(source, label: str) -> Optional[Decoded]:
    """Decode with libsndfile as lhotse does; None when libsndfile does not know the format (ffmpeg's turn)."""
    import soundfile as sf

    try:
        with sf.SoundFile(source) as f:
            rate, declared, kind = int(f.samplerate), int(f.frames), f.format
            data = f.read(dtype="float32", always_2d=True)
    except sf.LibsndfileError as e:
        if "Format not recognised" in str(e) or "unknown format" in str(e).lower():
            return None
        reason = str(e).split(":", 1)[-1].strip() if str(e).startswith("Error") else str(e)
        raise AudioError(f"could not decode audio from {label}: {reason}") from None
    except (RuntimeError, ValueError) as e:  # what soundfile cannot open at all (a damaged header...)
        raise AudioError(f"could not decode audio from {label}: {e}") from None
    if data.shape[0] == 0 and kind not in ("WAV", "WAVEX", "RF64", "W64", "AIFF", "AU", "CAF", "FLAC"):
        return None  # e.g. an Ogg stream libsndfile cannot read into: let ffmpeg decide, reporting damage
    return Decoded(np.ascontiguousarray(data.T), rate, declared)


# -- decoding front doors --------------------------------------------------------------------------------------


def _decode_path(path: Path, label: str) -> Decoded:
    with open(path, "rb") as f:
        _refuse_truncated_wav(f.read(4096), path.stat().st_size, label)
    decoded = _decode_with_soundfile(os.fspath(path), label)
    if decoded is None:
        # An absolute path keeps ffmpeg from reading a name such as "take:1.wav" as a protocol ("take:").
        decoded = _decode_with_ffmpeg(os.path.abspath(path), label)
    return decoded


def _decode_bytes(data: bytes, label: str) -> Decoded:
    if len(data) == 0:
        raise AudioError(f"could not decode audio from {label}: no data")
    _refuse_truncated_wav(data[:4096], len(data), label)
    decoded = _decode_with_soundfile(io.BytesIO(data), label)
    if decoded is not None:
        return decoded
    fd, tmp = tempfile.mkstemp(prefix="mlx-canary-", suffix=".audio")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return _decode_with_ffmpeg(tmp, label)
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass


def _decode_source(source: AudioSource) -> tuple[Decoded, str]:
    """Decode a path, ``"-"`` or bytes; returns the decoded audio and the label naming it in messages."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _decode_bytes(bytes(source), "<bytes>"), "<bytes>"
    if isinstance(source, str) and source == "-":
        isatty = getattr(sys.stdin, "isatty", None)
        if isatty is not None and isatty():
            raise AudioError("'-' reads audio from stdin, but stdin is a terminal; pipe audio in "
                              "(e.g. cat talk.wav | mlx-canary transcribe - ...)")
        return _decode_bytes(sys.stdin.buffer.read(), "<stdin>"), "<stdin>"
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"load_audio expects a path, '-' or bytes, not {type(source).__name__}")
    label = os.fspath(source)
    path = Path(source)
    if not path.exists():
        raise AudioError(f"audio file not found: {label}")
    if path.is_dir():
        raise AudioError(f"{label} is a directory, not an audio file")
    try:
        if path.stat().st_size == 0:
            raise AudioError(f"could not decode audio from {label}: the file is empty")
    except OSError as e:
        raise AudioError(f"cannot read {label}: {e.strerror}") from None
    if not os.access(path, os.R_OK):
        raise AudioError(f"cannot read {label}: permission denied")
    return _decode_path(path, label), label


# -- channels, range, resampling -------------------------------------------------------------------------------


def select_channel(samples: np.ndarray, channel: Optional[int], label: str) -> np.ndarray:
    """(channels, frames) -> (frames,) for ``channel`` (NeMo's ``channel_selector``), or, with None,
    (channels, frames) unchanged: the mean is taken after resampling (see ``_to_mono_at``)."""
    count = samples.shape[0]
    if channel is None:
        return samples[0] if count == 1 else samples
    if channel >= count:
        have = "1 channel (0)" if count == 1 else f"{count} channels (0-{count - 1})"
        raise AudioError(f"channel {channel} does not exist: {label} has {have}")
    return samples[channel]


def check_range(mono: np.ndarray, label: str) -> None:
    """Refuse non-finite samples and samples beyond ``MAX_ABS_SAMPLE`` (see the module notes)."""
    if mono.size == 0:
        return
    peak = float(np.max(np.abs(mono)))
    if not np.isfinite(peak):
        raise AudioError(f"{label} contains NaN or infinite samples")
    if peak > MAX_ABS_SAMPLE:
        raise AudioError(
            f"{label} has samples of magnitude {peak:.3g}, beyond any audio scale (float audio lies in [-1, 1]); "
            "the data is damaged or not audio (floats read with the wrong byte order look like this)"
        )


def _round_half_up_frames(frames: int, from_rate: int, to_rate: int) -> int:
    """``frames`` at ``from_rate`` counted at ``to_rate``, rounding halves up (lhotse's compute_num_samples)."""
    return (2 * frames * to_rate + from_rate) // (2 * from_rate)


def _fit_length(samples: np.ndarray, expected: int, rate: int, label: str) -> np.ndarray:
    """Trim or reflect-pad to ``expected`` samples, as lhotse does after resampling; a gap past its 0.5 s
    tolerance means the decoder found much less (or more) audio than the header declares."""
    diff = expected - len(samples)
    if diff == 0:
        return samples
    if abs(diff) > int(np.ceil(LENGTH_TOLERANCE_S * rate)):
        raise AudioError(
            f"could not decode audio from {label}: it declares {expected / rate:.2f} s of audio but "
            f"{len(samples) / rate:.2f} s decode (truncated or damaged)"
        )
    if diff < 0:
        return samples[:diff]
    mode = "reflect" if len(samples) > diff else "constant"
    return np.pad(samples, (0, diff), mode=mode)


def resample(audio: np.ndarray, orig_sr: int, target_sr: int = SAMPLE_RATE, declared: Optional[int] = None,
             label: str = "audio") -> np.ndarray:
    """Mono float32 samples at ``orig_sr`` -> ``target_sr`` exactly as NeMo's lhotse resamples without
    torchaudio: ``scipy.signal.resample_poly`` in float32, then the length fitted to
    ``round_half_up(declared * target_sr / orig_sr)`` (``declared``: the frames the file header declares,
    default ``len(audio)``)."""
    orig_sr, target_sr = int(orig_sr), int(target_sr)
    if orig_sr <= 0 or target_sr <= 0:
        raise AudioError(f"sample rates must be positive, got {orig_sr} -> {target_sr}")
    audio = np.ascontiguousarray(audio, dtype=np.float32)
    declared = len(audio) if declared is None else declared
    if orig_sr != target_sr and audio.size:
        from scipy.signal import resample_poly

        common = gcd(orig_sr, target_sr)
        audio = resample_poly(audio, up=target_sr // common, down=orig_sr // common).astype(np.float32, copy=False)
    elif audio.size:
        audio = audio.copy()
    return _fit_length(audio, _round_half_up_frames(declared, orig_sr, target_sr), target_sr, label)


def _to_mono_at(samples: np.ndarray, rate: int, declared: int, label: str, target_rate: int,
                channel: Optional[int]) -> np.ndarray:
    """(channels, frames) at ``rate`` -> mono at ``target_rate``: the chosen channel resampled as NeMo does it,
    or the mean of every channel resampled so (the mean of NeMo's result for each ``channel_selector``; equal
    to resampling the mean, up to float32 rounding)."""
    chosen = select_channel(samples, channel, label)
    check_range(chosen, label)
    if chosen.ndim == 1:
        return resample(chosen, rate, target_rate, declared=declared, label=label)
    per_channel = [resample(row, rate, target_rate, declared=declared, label=label) for row in chosen]
    return np.mean(np.stack(per_channel), axis=0, dtype=np.float32)


def load_audio(source: AudioSource, sample_rate: int = SAMPLE_RATE, channel: Optional[int] = None) -> np.ndarray:
    """Decode a file path, ``"-"`` (all of stdin) or encoded bytes to mono float32 samples at ``sample_rate``.

    ``channel``: None averages the channels; an index keeps that channel (NeMo's ``channel_selector``).
    Returns a 1-D ``np.float32`` array, possibly empty (a valid file with no samples). Raises ``CanaryError``
    when the file does not exist or cannot be decoded (or, for formats only ffmpeg reads, ffmpeg is missing).
    """
    channel = check_channel(channel)
    decoded, label = _decode_source(source)
    return _to_mono_at(decoded.samples, decoded.rate, decoded.declared, label, sample_rate, channel)


def load_segment(source: Union[str, os.PathLike], offset: float, duration: Optional[float],
                 sample_rate: int = SAMPLE_RATE, channel: Optional[int] = None) -> np.ndarray:
    """``duration`` seconds of a file from ``offset`` seconds on (a NeMo manifest row with ``offset``), as lhotse
    cuts a recording: the frames ``[round(offset * rate), + round(duration * rate))`` at the file's own rate
    (rounding halves up), then resampled like a whole file. ``duration=None`` reads to the end. A segment past
    the end of the file is an error."""
    channel = check_channel(channel)
    decoded, label = _decode_source(source)
    rate, frames = decoded.rate, decoded.samples.shape[1]
    start = _round_half_up_seconds(offset, rate)
    count = frames - start if duration is None else _round_half_up_seconds(duration, rate)
    if offset < 0 or count < 0 or start + count > frames + int(np.ceil(LENGTH_TOLERANCE_S * rate)):
        raise AudioError(
            f"{label}: the segment {offset:g} s + {duration if duration is not None else 'rest'} s lies outside "
            f"the file ({frames / rate:.2f} s long)"
        )
    count = min(count, frames - start)
    piece = decoded.samples[:, start : start + count]
    return _to_mono_at(piece, rate, piece.shape[1], label, sample_rate, channel)


def _round_half_up_seconds(seconds: float, rate: int) -> int:
    """Seconds as a frame count at ``rate``, halves rounded up (lhotse's compute_num_samples)."""
    from decimal import ROUND_HALF_UP, Decimal

    return int(Decimal(round(float(seconds) * rate, 8)).quantize(0, rounding=ROUND_HALF_UP))


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
        raise AudioError(f"audio array has dtype {audio.dtype}; expected float or integer PCM samples")
    raise AudioError(f"audio array has dtype {audio.dtype}; complex samples are not audio")


def as_channels(audio: np.ndarray) -> np.ndarray:
    """A 1-D or 2-D sample array as (channels, frames): the shorter axis of a 2-D array is the channel axis."""
    if audio.ndim == 1:
        return audio[None, :]
    if audio.ndim != 2:
        raise AudioError(f"audio array must be 1-D (samples) or 2-D (samples and channels), got shape {audio.shape}")
    return audio.T if audio.shape[1] <= audio.shape[0] else audio


def downmix(audio: np.ndarray) -> np.ndarray:
    """Average the channels of a 2-D array (the shorter axis is the channel axis); 1-D passes through."""
    channels = as_channels(audio)
    return channels[0] if channels.shape[0] == 1 else channels.mean(axis=0, dtype=np.float32)


def audio_from_array(audio, sample_rate: int = SAMPLE_RATE, target_sample_rate: int = SAMPLE_RATE,
                     channel: Optional[int] = None) -> np.ndarray:
    """A numpy or MLX array of samples at ``sample_rate`` → 1-D float32 mono at ``target_sample_rate``, channels
    handled and resampled exactly as a file's."""
    raw = _to_numpy(audio)
    if raw.size == 0:
        raise AudioError(f"the audio array (shape {raw.shape}) holds no samples")
    channels = as_channels(_to_float(raw))
    label = "the audio array"
    return _to_mono_at(channels, sample_rate, channels.shape[1], label, target_sample_rate, check_channel(channel))


def is_array(audio) -> bool:
    """True for numpy arrays, MLX arrays and other array-likes that are not paths or encoded bytes."""
    if isinstance(audio, (str, os.PathLike, bytes, bytearray, memoryview)):
        return False
    return isinstance(audio, np.ndarray) or type(audio).__module__.startswith("mlx") or hasattr(audio, "__array__")


ACCEPTED_INPUTS = "a file path, '-' (stdin), encoded bytes, or a numpy/MLX array of samples"


def load(source, sample_rate: Optional[int] = None, target_sample_rate: int = SAMPLE_RATE,
         channel: Optional[int] = None) -> np.ndarray:
    """Any supported input → 1-D float32 mono samples at ``target_sample_rate``.

    Paths, ``"-"`` and bytes are decoded (``sample_rate`` is ignored: the file says its rate); arrays are taken
    to be at ``sample_rate`` (default ``target_sample_rate``). ``channel``: see ``load_audio``.
    """
    if is_array(source):
        rate = target_sample_rate if sample_rate is None else check_sample_rate(sample_rate)
        return audio_from_array(source, rate, target_sample_rate, channel)
    if not isinstance(source, (str, os.PathLike, bytes, bytearray, memoryview)):
        raise AudioError(f"audio must be {ACCEPTED_INPUTS}, not {type(source).__name__}")
    return load_audio(source, target_sample_rate, channel)


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
    "SAMPLE_RATE", "MIN_SAMPLE_RATE", "MAX_SAMPLE_RATE", "MAX_ABS_SAMPLE", "AUDIO_EXTENSIONS", "load_audio",
    "audio_from_array", "load_segment", "resample", "downmix", "select_channel", "check_sample_rate", "check_channel", "load",
    "is_array", "find_audio_files", "duration",
]
