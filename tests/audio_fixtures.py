"""Deterministic speech corpus for tests: espeak-ng sentences in en/de/es/fr, a sub-second clip, a 44.1 kHz stereo file.

Usable without NeMo (only espeak-ng, ffmpeg and numpy). `build_corpus(dir)` writes the WAV files, the waveform ffmpeg's
`-ac 1 -ar 16000` decode gives each (`<name>.ffmpeg16k.npy`, float32; equal to NeMo's and the package's loading for
the 16 kHz mono clips, not for the stereo one: NeMo's loading is tests/nemo_oracle.py's `nemo_loader_waveform`)
and `audio.json` describing them. The corpus is rebuilt only when its spec (sentences, voices, tool versions) changes, keyed by a hash in
`audio.json`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import tempfile
import wave
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16000
MANIFEST = "audio.json"
SPEC_VERSION = 1

# ffmpeg's decode of any input -> mono 16 kHz float32 little-endian on stdout (the package loaded files this way
# before it loaded them as NeMo does).
FFMPEG_DECODE = ["ffmpeg", "-nostdin", "-v", "error", "-i", "{path}", "-f", "f32le", "-ac", "1", "-ar", "16000", "-"]


@dataclass(frozen=True)
class Clip:
    name: str
    lang: str  # language code used in prompts
    voice: str  # espeak-ng voice
    speed: int  # espeak-ng words per minute
    text: str
    kind: str = "mono16k"  # mono16k | short | stereo44k


# Mixed lengths (about 0.6 s to 6 s) so batches carry padding; the short clip is below transcribe()'s 1 s minimum.
CLIPS: tuple[Clip, ...] = (
    Clip("en_fox", "en", "en-us", 165, "The quick brown fox jumps over the lazy dog."),
    Clip(
        "en_stella",
        "en",
        "en-gb",
        185,
        "Please call Stella. Ask her to bring these things with her from the store: six spoons of fresh snow peas.",
    ),
    Clip("de_morgen", "de", "de", 160, "Guten Morgen! Wie geht es Ihnen heute? Ich hoffe, gut."),
    Clip("de_zahlen", "de", "de", 175, "Die Straße hat zwölf Häuser und drei große Bäume."),
    Clip("es_tiempo", "es", "es", 165, "¿Qué tiempo hace hoy en Madrid? Hace sol y mucho calor."),
    Clip("fr_paris", "fr", "fr-fr", 160, "Bonjour, je m'appelle Marie et j'habite à Paris depuis dix ans."),
    Clip("en_short", "en", "en-us", 200, "Yes.", kind="short"),
    Clip("en_stereo44k", "en", "en-us", 170, "Stereo recordings are mixed down to one channel.", kind="stereo44k"),
)

SHORT_SAMPLES = 9599  # ~0.6 s at 16 kHz; odd, so the 1 s padding of transcribe() cannot split evenly
STEREO_RATE = 44100
STEREO_DELAY_S = 0.12  # right channel = left delayed and attenuated, so a downmix differs from either channel
STEREO_RIGHT_GAIN = 0.5


def _tool_version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "missing"
    return out.splitlines()[0].strip() if out else "unknown"


def spec_hash() -> str:
    """Hash of everything that determines the corpus bytes (clips, constants, tool versions, this file)."""
    h = hashlib.sha256()
    h.update(json.dumps([asdict(c) for c in CLIPS], sort_keys=True).encode())
    h.update(json.dumps([SPEC_VERSION, SHORT_SAMPLES, STEREO_RATE, STEREO_DELAY_S, STEREO_RIGHT_GAIN]).encode())
    h.update(_tool_version(["espeak-ng", "--version"]).encode())
    h.update(_tool_version(["ffmpeg", "-version"]).encode())
    h.update(Path(__file__).read_bytes())
    return h.hexdigest()[:16]


def _run(cmd: list[str]) -> bytes:
    return subprocess.run(cmd, capture_output=True, check=True).stdout


def _write_wav(path: Path, samples: np.ndarray, rate: int) -> None:
    """Write int16 PCM; samples (N,) or (N, C)."""
    data = np.asarray(samples, dtype="<i2")
    channels = 1 if data.ndim == 1 else data.shape[1]
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(data.tobytes())


def _espeak_pcm(clip: Clip, rate: int, tmp: Path) -> np.ndarray:
    """espeak-ng (22050 Hz) -> ffmpeg resampled mono int16 at `rate`."""
    raw = tmp / f"{clip.name}.espeak.wav"
    subprocess.run(["espeak-ng", "-v", clip.voice, "-s", str(clip.speed), "-w", str(raw), clip.text], check=True)
    pcm = _run(
        ["ffmpeg", "-nostdin", "-v", "error", "-i", str(raw), "-ar", str(rate), "-ac", "1", "-f", "s16le", "-"]
    )
    return np.frombuffer(pcm, dtype="<i2").copy()


def ffmpeg_decode(path: str | Path) -> np.ndarray:
    """ffmpeg's decode: mono 16 kHz float32 (-ac 1 mixes channels, -ar resamples with ffmpeg's resampler)."""
    cmd = [str(path) if a == "{path}" else a for a in FFMPEG_DECODE]
    return np.frombuffer(_run(cmd), dtype="<f4").copy()


def _make_clip(clip: Clip, out: Path, tmp: Path) -> dict:
    if clip.kind == "stereo44k":
        left = _espeak_pcm(clip, STEREO_RATE, tmp).astype(np.int32)
        delay = int(round(STEREO_DELAY_S * STEREO_RATE))
        right = np.zeros(len(left) + delay, dtype=np.int32)
        right[delay:] = np.round(left * STEREO_RIGHT_GAIN).astype(np.int32)
        left = np.concatenate([left, np.zeros(delay, dtype=np.int32)])
        samples, rate, channels = np.stack([left, right], axis=1), STEREO_RATE, 2
    else:
        samples, rate, channels = _espeak_pcm(clip, SAMPLE_RATE, tmp), SAMPLE_RATE, 1
        if clip.kind == "short":
            # Keep the speech centred in exactly SHORT_SAMPLES samples.
            if len(samples) >= SHORT_SAMPLES:
                start = (len(samples) - SHORT_SAMPLES) // 2
                samples = samples[start : start + SHORT_SAMPLES]
            else:
                pad = SHORT_SAMPLES - len(samples)
                samples = np.pad(samples, (pad // 2, pad - pad // 2))
    wav = out / f"{clip.name}.wav"
    _write_wav(wav, np.clip(samples, -32768, 32767), rate)
    waveform = ffmpeg_decode(wav)
    np.save(out / f"{clip.name}.ffmpeg16k.npy", waveform)
    return {
        **asdict(clip),
        "file": wav.name,
        "sample_rate": rate,
        "channels": channels,
        "num_frames": int(samples.shape[0]),
        "duration_s": samples.shape[0] / rate,
        "waveform_file": f"{clip.name}.ffmpeg16k.npy",
        "waveform_samples": int(len(waveform)),
    }


def load_manifest(audio_dir: str | Path) -> dict | None:
    path = Path(audio_dir) / MANIFEST
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def build_corpus(audio_dir: str | Path, force: bool = False) -> dict:
    """Create (or reuse) the corpus in `audio_dir`; returns the manifest dict."""
    audio_dir = Path(audio_dir)
    want = spec_hash()
    manifest = load_manifest(audio_dir)
    if not force and manifest and manifest.get("spec_hash") == want:
        files = [audio_dir / c[k] for c in manifest["clips"] for k in ("file", "waveform_file")]
        if all(f.exists() for f in files):
            return manifest
    for tool in ("espeak-ng", "ffmpeg"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is required to build the test audio corpus")
    audio_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        clips = [_make_clip(c, audio_dir, Path(tmp)) for c in CLIPS]
    manifest = {
        "spec_hash": want,
        "ffmpeg_decode_cmd": FFMPEG_DECODE,
        "sample_rate": SAMPLE_RATE,
        "clips": clips,
    }
    (audio_dir / MANIFEST).write_text(json.dumps(manifest, indent=1, ensure_ascii=False))
    return manifest


def clip_paths(manifest: dict, audio_dir: str | Path, kinds=("mono16k", "short", "stereo44k")) -> list[Path]:
    return [Path(audio_dir) / c["file"] for c in manifest["clips"] if c["kind"] in kinds]


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args()
    m = build_corpus(args.out, force=args.force)
    for c in m["clips"]:
        print(f"{c['file']:22s} {c['sample_rate']:6d} Hz x{c['channels']} {c['duration_s']:.2f} s")
