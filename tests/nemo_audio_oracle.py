"""NeMo loading audio files itself: references for mlx-canary's loader (run with an interpreter that has NeMo).

    python tests/nemo_audio_oracle.py --oracle tests/.cache/oracle

Builds a few files from the oracle's speech corpus in the formats, rates and channel counts NeMo's transcribe()
is given in practice (44.1 kHz stereo WAV whose channels differ, 48 kHz 6-channel WAV, 8 kHz mono WAV,
22.05 kHz FLAC, MP3, Ogg Vorbis, and M4A when ffmpeg is there), restores ``<oracle>/<VARIANT>/model.nemo`` and
runs NeMo's own ``transcribe()`` on the *paths*, batch 1, for every ``channel_selector`` (each channel of a
multi-channel file; none for mono). It records the tokens, the samples transcribe() fed the model, the
teacher-forced top-1/top-2 margin of every decision, and what NeMo says to a multi-channel file without a
selector. For mlx-canary's default on multi-channel audio (the channel mean), it writes the mean of NeMo's
channel loads as a 16 kHz float WAV and records NeMo's tokens on that. For featureless input (5 s of digital
silence, of 1e-9 noise, of DC) it records NeMo's log-mel features as transcribe() computes them: not zero but
amplified float rounding noise, which is why token equality with NeMo is not claimed there.

Output in ``<oracle>/audio_parity/``: the files, ``reference.json`` (keyed, so an unchanged oracle is reused)
and ``samples.npz`` (``<case>/<selection>``: float32 samples NeMo fed the model).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import nemo_oracle  # noqa: E402

VARIANT = "agg_canary2_proj"
PROMPT = "asr_en_pnc"
OUT = "audio_parity"


def _versions() -> dict:
    found = {}
    for dist in ("scipy", "soundfile", "lhotse", "audioread"):
        try:
            found[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            found[dist] = None
    try:
        import soundfile

        found["libsndfile"] = soundfile.__libsndfile_version__
    except (ImportError, OSError):
        found["libsndfile"] = None
    ffmpeg = shutil.which("ffmpeg")
    found["ffmpeg"] = (
        subprocess.run([ffmpeg, "-version"], capture_output=True, text=True).stdout.splitlines()[0] if ffmpeg else None
    )
    return found


def key(oracle: Path) -> str:
    h = hashlib.sha256(Path(__file__).read_bytes())
    h.update((oracle / "oracle.json").read_bytes())
    h.update(json.dumps(_versions(), sort_keys=True).encode())
    return h.hexdigest()[:16]


def is_fresh(oracle: Path) -> bool:
    try:
        have = json.loads((oracle / OUT / "reference.json").read_text())["key"]
    except (OSError, ValueError, KeyError):
        return False
    return have == key(oracle) and (oracle / OUT / "samples.npz").exists()


# -- the files ---------------------------------------------------------------------------------------------------


def _clip(audio_dir: Path, name: str) -> tuple[np.ndarray, int]:
    import soundfile as sf

    data, rate = sf.read(audio_dir / f"{name}.wav", dtype="float32", always_2d=True)
    return data, rate


def _at(x: np.ndarray, rate: int, new_rate: int) -> np.ndarray:
    """Any resampler will do to make test material (this one is not under test)."""
    from math import gcd

    from scipy.signal import resample_poly

    g = gcd(rate, new_rate)
    return resample_poly(x, new_rate // g, rate // g, axis=0).astype(np.float32)


def make_files(audio_dir: Path, out: Path) -> dict:
    """name -> file name; every file differs per channel where it has several."""
    import soundfile as sf

    files = {}
    stereo, rate = _clip(audio_dir, "en_stereo44k")  # right = left delayed 0.12 s at half gain
    assert rate == 44100 and stereo.shape[1] == 2
    shutil.copy(audio_dir / "en_stereo44k.wav", out / "stereo44k.wav")
    files["stereo44k_wav"] = "stereo44k.wav"

    fox, _ = _clip(audio_dir, "en_fox")
    stella, _ = _clip(audio_dir, "en_stella")
    fox48 = _at(fox[:, 0], 16000, 48000)
    n = len(fox48) + 6 * 480
    six = np.zeros((n, 6), dtype=np.float32)
    for c in range(6):  # each channel its own delay and gain; the last carries another sentence
        six[c * 480 : c * 480 + len(fox48), c] = fox48 * (1.0 - 0.12 * c)
    other = _at(stella[:, 0], 16000, 48000)[:n]
    six[: len(other), 5] += 0.5 * other
    sf.write(out / "six48k.wav", six, 48000, subtype="PCM_24")
    files["six48k_wav"] = "six48k.wav"

    sf.write(out / "mono8k.wav", _at(stella[:, 0], 16000, 8000), 8000, subtype="PCM_16")
    files["mono8k_wav"] = "mono8k.wav"

    morgen, _ = _clip(audio_dir, "de_morgen")
    sf.write(out / "mono22k.flac", _at(morgen[:, 0], 16000, 22050), 22050, subtype="PCM_16")
    files["mono22k_flac"] = "mono22k.flac"

    sf.write(out / "stereo44k.mp3", stereo, 44100, format="MP3")
    files["stereo44k_mp3"] = "stereo44k.mp3"

    paris, _ = _clip(audio_dir, "fr_paris")
    sf.write(out / "mono48k.ogg", _at(paris[:, 0], 16000, 48000), 48000, format="OGG", subtype="VORBIS")
    files["mono48k_ogg"] = "mono48k.ogg"

    if shutil.which("ffmpeg"):  # a format libsndfile cannot read: NeMo falls back to audioread (ffmpeg)
        subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-i", str(out / "stereo44k.wav"), "-c:a", "aac",
                        "-b:a", "128k", str(out / "stereo44k.m4a")], check=True)
        files["stereo44k_m4a"] = "stereo44k.m4a"
    return files


# -- NeMo -----------------------------------------------------------------------------------------------------


def _run(model, path: Path, kwargs: dict, selection) -> tuple[dict, np.ndarray]:
    call = dict(kwargs) if selection is None else dict(kwargs, channel_selector=selection)
    hyps, batches = nemo_oracle._transcribe(model, [path], 1, call)
    batch = batches[0]
    fed = batch["audio"][0, : int(batch["audio_lens"][0])].copy()
    y = [int(t) for t in hyps[0].y_sequence.tolist()]
    prompt = batch["prompt"][0].tolist()
    _, enc_states, enc_mask = nemo_oracle._forward_b1(model, fed)  # as the main oracle checks its decisions
    log_probs = nemo_oracle._teacher_forced(model, enc_states, enc_mask, prompt + y)
    cap = nemo_oracle._length_cap(model, batch["enc_states"].shape[1], len(prompt))
    check = nemo_oracle._check_tf(log_probs, len(prompt), y, int(model.tokenizer.eos_id),
                                  len(y) < cap["max_new_tokens"])
    return {"tokens": y, "text": hyps[0].text, **check}, fed


SILENT_SECONDS = 5


def silent_inputs() -> dict:
    rng = np.random.default_rng(0)
    n = SILENT_SECONDS * 16000
    return {
        "zeros": np.zeros(n, np.float32),
        "noise_1e-9": (1e-9 * rng.standard_normal(n)).astype(np.float32),
        "dc_0.5": np.full(n, 0.5, np.float32),
    }


def silence_features(model) -> dict:
    """NeMo's features for featureless input, as transcribe() runs the preprocessor (dither 0, pad_to 0)."""
    import torch

    found = {}
    with nemo_oracle._TranscribePreprocessing(model), torch.no_grad():
        for name, wave in silent_inputs().items():
            feats, length = model.preprocessor(input_signal=torch.from_numpy(wave)[None],
                                               length=torch.tensor([len(wave)]))
            valid = nemo_oracle._np(feats[0])[:, : int(length[0])]
            found[name] = {"max_abs": float(np.abs(valid).max()), "finite": bool(np.isfinite(valid).all()),
                           "distinct_values": int(len(np.unique(valid)))}
    return found


def build(oracle: Path) -> dict:
    import soundfile as sf
    from nemo.collections.asr.models import EncDecMultiTaskModel

    out = oracle / OUT
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    files = make_files(oracle / "audio", out)
    nemo_oracle.reset_restore_state()
    model = EncDecMultiTaskModel.restore_from(str(oracle / VARIANT / "model.nemo"), map_location="cpu")
    model.eval()
    ref = json.loads((oracle / VARIANT / "reference.json").read_text())
    kwargs = ref["prompts"][PROMPT]["kwargs"]
    cases, samples = {}, {}
    for name, file_name in files.items():
        path = out / file_name
        info = sf.info(str(path)) if not file_name.endswith(".m4a") else None
        channels = info.channels if info else 2
        case = {"file": file_name, "channels": channels, "sample_rate": info.samplerate if info else 44100,
                "runs": {}}
        selections = [None] if channels == 1 else list(range(channels))
        for selection in selections:
            run, fed = _run(model, path, kwargs, selection)
            label = "none" if selection is None else str(selection)
            case["runs"][label] = run
            samples[f"{name}/{label}"] = fed
            print(f"[audio-oracle] {name} channel_selector={selection}: {len(fed)} samples, {len(run['tokens'])} "
                  f"tokens, min margin {run['min_margin']}", flush=True)
        if channels > 1:
            try:
                nemo_oracle._transcribe(model, [path], 1, kwargs)
                case["without_selector"] = "accepted"
            except Exception as e:  # noqa: BLE001 - recording what NeMo says
                case["without_selector"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            mean = np.mean(np.stack([samples[f"{name}/{c}"] for c in range(channels)]), axis=0, dtype=np.float32)
            mean_file = out / f"{Path(file_name).stem}_{Path(file_name).suffix[1:]}.mean16k.wav"
            sf.write(mean_file, mean, 16000, subtype="FLOAT")
            run, fed = _run(model, mean_file, kwargs, None)
            assert np.array_equal(fed, mean)
            run["file"] = mean_file.name
            case["runs"]["mean"] = run
            samples[f"{name}/mean"] = fed
        cases[name] = case
    np.savez(out / "samples.npz", **samples)
    data = {"key": key(oracle), "variant": VARIANT, "prompt": PROMPT, "kwargs": kwargs, "versions": _versions(),
            "cases": cases, "silence_features": silence_features(model)}
    (out / "reference.json").write_text(json.dumps(data, indent=1))
    return data


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--oracle", type=Path, default=nemo_oracle.oracle_dir_default())
    args = ap.parse_args(argv)
    if is_fresh(args.oracle):
        return 0
    nemo_oracle.quiet_nemo()
    nemo_oracle.setup_torch()
    build(args.oracle)
    return 0


if __name__ == "__main__":
    sys.exit(main())
