"""Bad input through the command line, with a real tiny converted model (tests/model_fixtures.py, no NeMo).

Each case must give one clear message (no traceback), a non-zero exit status where something failed, and no
half-written output: the output directory holds complete files for the inputs that worked and nothing else
(no temporary files either). Pure silence and a 0.3 s clip are not errors: they must produce a transcript.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest

from model_fixtures import LocalHub, build_tiny_model  # skips this module when torch is missing

from mlx_canary import cli

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-input-models")
    return {"canary2": build_tiny_model(root), "v1": build_tiny_model(root, "tiny-canary-v1", prompt_format="canary")}


@pytest.fixture(scope="module")
def model(models) -> Path:
    return models["canary2"]


def write_wav(path: Path, samples: np.ndarray, rate: int = 16000) -> Path:
    pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return path


def tone(path: Path, seconds: float) -> Path:
    t = np.arange(int(16000 * seconds)) / 16000
    return write_wav(path, 0.3 * np.sin(2 * np.pi * 220 * t))


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "Traceback" not in out
    return code, out, err


def outputs(directory: Path) -> list:
    """Every entry in the output directory, hidden (temporary) files included."""
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def assert_one_failure(code, err, label, message_start):
    assert code == 1
    assert err.splitlines() == ["error: 1 of 1 inputs failed:", err.splitlines()[1]], err
    assert err.splitlines()[1].startswith(f"  {label}: {message_start}"), err


# -- audio that is not usable ---------------------------------------------------------------------------------


def test_empty_audio(model, tmp_path, capsys):
    empty = write_wav(tmp_path / "empty.wav", np.zeros(0))
    code, _, err = run(capsys, "transcribe", empty, "-m", model, "-o", tmp_path / "out", "-f", "all")
    assert_one_failure(code, err, empty, f"no audio samples in {empty} (the file holds no audio)")
    assert outputs(tmp_path / "out") == []


def test_zero_length_file(model, tmp_path, capsys):
    zero = tmp_path / "zero.wav"
    zero.write_bytes(b"")
    code, _, err = run(capsys, "transcribe", zero, "-m", model, "-o", tmp_path / "out")
    assert_one_failure(code, err, zero, f"could not decode audio from {zero}: the file is empty")
    assert outputs(tmp_path / "out") == []


@pytest.mark.parametrize("kind", ["wav", "flac"])
def test_truncated_file(model, tmp_path, capsys, kind):
    whole = tone(tmp_path / "whole.wav", 2.0)
    if kind == "flac":
        subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-i", str(whole), str(tmp_path / "whole.flac")],
                       check=True)
        whole = tmp_path / "whole.flac"
    data = whole.read_bytes()
    cut = tmp_path / f"cut.{kind}"
    cut.write_bytes(data[: len(data) // 2 + 1])  # an odd cut: inside a sample frame / a compressed frame
    code, _, err = run(capsys, "transcribe", cut, "-m", model, "-o", tmp_path / "out")
    assert_one_failure(code, err, cut, f"could not decode audio from {cut}: ")
    assert outputs(tmp_path / "out") == []


def test_corrupt_file(model, tmp_path, capsys):
    whole = tone(tmp_path / "whole.wav", 1.0)
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-i", str(whole), str(tmp_path / "whole.mp3")],
                   check=True)
    data = bytearray((tmp_path / "whole.mp3").read_bytes())
    # Garbage in the middle of the stream. (MP3: ffmpeg reports it. Its FLAC decoder conceals such damage
    # silently, using the frame checksums to skip bad frames, so FLAC is not used here.)
    data[len(data) // 3 : len(data) // 3 + 400] = bytes(range(200)) * 2
    corrupt = tmp_path / "corrupt.mp3"
    corrupt.write_bytes(bytes(data))
    code, _, err = run(capsys, "transcribe", corrupt, "-m", model, "-o", tmp_path / "out")
    assert_one_failure(code, err, corrupt, f"could not decode audio from {corrupt}: ")
    assert outputs(tmp_path / "out") == []


def test_text_file_named_wav(model, tmp_path, capsys):
    text = tmp_path / "notes.wav"
    text.write_text("these are my meeting notes, not a recording\n" * 10)
    code, _, err = run(capsys, "transcribe", text, "-m", model, "-o", tmp_path / "out")
    assert_one_failure(code, err, text, f"could not decode audio from {text}: ")
    assert "Invalid data found when processing input" in err
    assert outputs(tmp_path / "out") == []


def test_missing_file(model, tmp_path, capsys):
    missing = tmp_path / "nope.wav"
    code, _, err = run(capsys, "transcribe", missing, "-m", model, "-o", tmp_path / "out")
    assert_one_failure(code, err, missing, f"audio file not found: {missing}")
    assert outputs(tmp_path / "out") == []


# -- audio that is unusual but fine ---------------------------------------------------------------------------


def test_pure_silence_gives_a_transcript(model, tmp_path, capsys):
    silence = write_wav(tmp_path / "silence.wav", np.zeros(16000 * 3))
    code, _, err = run(capsys, "transcribe", silence, "-m", model, "-o", tmp_path / "out", "-f", "txt,json")
    assert code == 0, err
    assert outputs(tmp_path / "out") == ["silence.json", "silence.txt"]
    data = json.loads((tmp_path / "out" / "silence.json").read_text())
    assert isinstance(data["text"], str) and data["duration"] == 3.0
    assert (tmp_path / "out" / "silence.txt").read_text() == (data["text"] + "\n" if data["text"] else "")


def test_short_clip_works(model, tmp_path, capsys):
    short = tone(tmp_path / "short.wav", 0.3)
    code, _, err = run(capsys, "transcribe", short, "-m", model, "-o", tmp_path / "out", "-f", "json",
                       "--timestamps")
    assert code == 0, err
    data = json.loads((tmp_path / "out" / "short.json").read_text())
    assert data["duration"] == pytest.approx(0.3)
    assert set(data) >= {"text", "tokens", "source_lang", "target_lang", "duration", "model", "segments", "words"}
    assert data["model"] == str(model)


def test_bad_inputs_do_not_stop_good_ones(model, tmp_path, capsys):
    good = tone(tmp_path / "good.wav", 1.2)
    silence = write_wav(tmp_path / "silence.wav", np.zeros(16000))
    bad = tmp_path / "bad.wav"
    bad.write_text("not audio")
    zero = tmp_path / "zero.mp3"
    zero.write_bytes(b"")
    missing = tmp_path / "missing.flac"
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "transcribe", good, bad, zero, missing, silence, "-m", model, "-o", out,
                            "-f", "txt,srt")
    assert code == 1
    assert outputs(out) == ["good.srt", "good.txt", "silence.srt", "silence.txt"]
    lines = err.splitlines()
    assert lines[0] == "error: 3 of 5 inputs failed:"
    assert [line.split(":")[0].strip() for line in lines[1:]] == [str(bad), str(zero), str(missing)]
    assert stdout.count("==> ") == 2


# -- options the model does not support ----------------------------------------------------------------------


@pytest.mark.parametrize("argv, message", [
    (["translate", "-s", "en", "-t", "fr"], "error: Unsupported language 'fr'. This model supports: en, de.\n"),
    (["transcribe", "-s", "xx"], "error: Unsupported language 'xx'. This model supports: en, de.\n"),
    (["translate", "-s", "de", "-t", "de"], None),
    (["transcribe", "--chunk-length", "1.5"],
     "error: chunk length must be more than 2 seconds (chunks overlap by 1 s), or 0 for no chunking\n"),
])
def test_unsupported_options(model, tmp_path, capsys, argv, message):
    clip = tone(tmp_path / "clip.wav", 1.0)
    code, _, err = run(capsys, *argv, clip, "-m", model, "-o", tmp_path / "out")
    assert code == 1
    if message is None:
        assert err.startswith("error: translate: the source and target language are both 'de'")
    else:
        assert err == message
    assert err.count("\n") == 1
    assert outputs(tmp_path / "out") == []


def test_timestamps_on_a_model_without_them(models, tmp_path, capsys):
    clip = tone(tmp_path / "clip.wav", 1.0)
    code, _, err = run(capsys, "transcribe", clip, "-m", models["v1"], "--timestamps", "-o", tmp_path / "out")
    assert code == 1
    assert err == "error: This model does not predict timestamps (canary v1 prompt format).\n"
    assert outputs(tmp_path / "out") == []
    # without --timestamps the same model works
    code, _, err = run(capsys, "transcribe", clip, "-m", models["v1"], "-o", tmp_path / "out")
    assert code == 0, err
    assert outputs(tmp_path / "out") == ["clip.txt"]


# -- damaged model directories ------------------------------------------------------------------------------


def _unlink(name):
    return lambda d: (d / name).unlink()


def _truncate(name, size):
    return lambda d: (d / name).write_bytes((d / name).read_bytes()[:size])


def _write(name, data: bytes):
    return lambda d: (d / name).write_bytes(data)


DAMAGE = {
    "missing config.json": (_unlink("config.json"), "is not an mlx-canary model directory (no config.json)"),
    "config.json not JSON": (_write("config.json", b"{this is not json"), "config.json: "),
    "config.json not an object": (_write("config.json", b"[1, 2, 3]"), "model"),
    "missing model.safetensors": (_unlink("model.safetensors"), "has no model.safetensors"),
    "truncated model.safetensors": (_truncate("model.safetensors", 5000), "(corrupt or incomplete file?)"),
    "garbage model.safetensors": (_write("model.safetensors", b"\x00garbage" * 64), "(corrupt or incomplete file?)"),
    "empty model.safetensors": (_write("model.safetensors", b""), "(corrupt or incomplete file?)"),
    "missing tokenizer file": (_unlink("tokenizer_en.model"), "Tokenizer model file not found"),
    "corrupt tokenizer file": (_write("tokenizer_de.model", b"garbage"), "the file is corrupt"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_model_directory(model, tmp_path, capsys, damage):
    broken = tmp_path / "model"
    shutil.copytree(model, broken)
    change, expected = DAMAGE[damage]
    change(broken)
    clip = tone(tmp_path / "clip.wav", 1.0)
    code, _, err = run(capsys, "transcribe", clip, "-m", broken, "-o", tmp_path / "out")
    assert code == 1
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert expected in err
    assert str(broken) in err
    assert outputs(tmp_path / "out") == []


def test_no_such_model(tmp_path, capsys):
    clip = tone(tmp_path / "clip.wav", 1.0)
    code, _, err = run(capsys, "transcribe", clip, "-m", tmp_path / "no-model", "-o", tmp_path / "out")
    assert code == 1 and err.count("\n") == 1
    assert err.startswith("error: model not found: ")


# -- downloads ----------------------------------------------------------------------------------------------


def test_interrupted_download(model, tmp_path, capsys, monkeypatch):
    hub = LocalHub(tmp_path / "hub").install(monkeypatch)
    hub.add("org/tiny-canary", {"tiny-canary.nemo": model.parent / "tiny-canary.nemo"})
    hub.fail_after_bytes = 2048
    clip = tone(tmp_path / "clip.wav", 1.0)
    out = tmp_path / "out"
    code, _, err = run(capsys, "transcribe", clip, "-m", "org/tiny-canary", "-o", out)
    assert code == 1
    assert err.startswith("error: cannot download org/tiny-canary from Hugging Face: ConnectionError: ")
    assert err.count("\n") == 1
    assert outputs(out) == []
    converted = tmp_path / "hub" / "mlx-canary-cache" / "converted"
    assert outputs(converted) == []

    # Run again: the download completes, the model is converted once into the cache and used.
    code, _, err = run(capsys, "transcribe", clip, "-m", "org/tiny-canary", "-o", out)
    assert code == 0, err
    assert outputs(out) == ["clip.txt"] and len(outputs(converted)) == 1


# -- as a real process --------------------------------------------------------------------------------------


def test_process_has_no_traceback(model, tmp_path):
    broken = tmp_path / "model"
    shutil.copytree(model, broken)
    (broken / "config.json").write_text("[]")
    clip = tone(tmp_path / "clip.wav", 1.0)
    proc = subprocess.run([sys.executable, "-m", "mlx_canary", "transcribe", str(clip), "-m", str(broken), "-o",
                           str(tmp_path / "out")], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "Traceback" not in proc.stderr
