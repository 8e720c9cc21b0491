"""Tests for mlx_canary.cli with a fake model (no weights needed): outputs, messages, exit codes."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

import mlx_canary
from mlx_canary import cli
from mlx_canary.errors import CanaryError
from mlx_canary.options import TranscribeOptions
from mlx_canary.transcript import Transcript

REPO = Path(__file__).resolve().parents[1]


def make_tone(path: Path, seconds: float = 0.5, rate: int = 16000) -> Path:
    subprocess.run(
        ["ffmpeg", "-nostdin", "-v", "error", "-y", "-f", "lavfi",
         "-i", f"sine=frequency=440:sample_rate={rate}:duration={seconds}", str(path)],
        check=True,
    )
    return path


class FakeModel:
    """Stands in for the object ``load_model`` returns: prepare(options), transcribe(list, options, progress) -> list,
    needs_chunking(wave, chunk_seconds). Inputs longer than ``long_samples`` are "long": their call reports
    chunk progress."""

    def __init__(self, name, dtype=None, load_options=None, fail_on_samples=None, interrupt=False, crash_on_samples=None,
                 long_samples=10 ** 9):
        self.name = name
        self.dtype = dtype
        self.load_options = load_options or {}
        self.calls = []
        self.batches = []  # the samples of each input, per transcribe() call
        self.validated = []
        self.fail_on_samples = fail_on_samples
        self.crash_on_samples = crash_on_samples
        self.interrupt = interrupt
        self.long_samples = long_samples

    def prepare(self, options):
        self.validated.append(options)
        resolved = options.replace(source_lang=options.source_lang or "en")
        if resolved.source_lang not in ("en", "de", "auto"):
            raise CanaryError(f"Unsupported language {options.source_lang!r}. This model supports: en, de.")
        if options.target_lang not in (None, "en", "de"):
            raise CanaryError(f"Unsupported language {options.target_lang!r}. This model supports: en, de.")
        if options.chunk_seconds is not None and options.chunk_seconds <= 2:
            raise CanaryError("chunk length must be more than 2 seconds (chunks overlap by 1 s)")
        return types.SimpleNamespace(options=resolved)

    def needs_chunking(self, wave, chunk_seconds=None):
        return len(wave) > self.long_samples

    def transcribe(self, audio, options, progress=None):
        assert isinstance(audio, list), "the CLI passes a list"
        self.prepare(options)
        self.calls.append((len(audio), options, progress))
        self.batches.append([len(wave) for wave in audio])
        if self.interrupt:
            raise KeyboardInterrupt
        results = []
        for wave in audio:
            assert isinstance(wave, np.ndarray) and wave.dtype == np.float32 and wave.ndim == 1
            if self.fail_on_samples is not None and len(wave) == self.fail_on_samples:
                raise CanaryError(f"audio of {len(wave)} samples is not supported")
            if self.crash_on_samples is not None and len(wave) == self.crash_on_samples:
                raise ValueError("a bug")
            if self.needs_chunking(wave):
                assert len(audio) == 1 and progress is not None, "long inputs go one at a time, with progress"
                for done in (1, 2, 3):
                    progress(done, 3)
            duration = len(wave) / 16000
            segments = []
            if options.timestamps:
                segments = [{"start": 0.0, "end": duration, "text": f"heard {len(wave)} samples."}]
            source = options.source_lang or "en"
            results.append(Transcript(
                text=f"heard {len(wave)} samples.", tokens=[1, 2, 3],
                source_lang=source, target_lang=options.target_lang or source,
                duration=duration, segments=segments,
            ))
        return results


class _Made(list):
    settings: dict


@pytest.fixture
def fake(monkeypatch):
    """Install a FakeModel factory as mlx_canary.load_model; returns the list of models it created."""
    made = _Made()
    settings: dict = {}

    def load_model(path_or_repo, dtype=None, **load_options):
        if str(path_or_repo) == "missing-model":
            raise CanaryError("model not found: missing-model")
        model = FakeModel(path_or_repo, dtype, load_options, **settings)
        made.append(model)
        return model

    monkeypatch.setattr(cli, "load_model", load_model)
    made.settings = settings
    return made


@pytest.fixture
def tones(tmp_path) -> list:
    d = tmp_path / "in"
    d.mkdir()
    return [make_tone(d / "one.wav", 0.5), make_tone(d / "two.flac", 0.25)]


def run_cli(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


# -- transcribe / translate --------------------------------------------------------------------------------


def test_transcribe_writes_one_file_per_input(fake, tones, tmp_path, capsys):
    out_dir = tmp_path / "out"
    code, out, err = run_cli(capsys, "transcribe", *tones, "--model", "m", "-o", out_dir)
    assert code == 0, err
    assert (out_dir / "one.txt").read_text() == "heard 8000 samples.\n"
    assert (out_dir / "two.txt").read_text() == "heard 4000 samples.\n"
    assert "heard 8000 samples." in out and "==> " in out
    assert err == ""
    (model,) = fake
    assert model.name == "m" and model.dtype is None and model.load_options == {}
    n, options, _ = model.calls[0]
    assert n == 2
    assert options == TranscribeOptions(source_lang=None, target_lang=None, pnc=True, timestamps=False)
    assert model.validated[0] == options  # checked once before any audio


def test_inputs_are_batched_longest_first_and_reported_in_input_order(fake, tmp_path, capsys):
    files = [make_tone(tmp_path / f"{name}.wav", seconds) for name, seconds in
             (("short", 0.25), ("long", 0.75), ("middle", 0.5))]
    code, out, err = run_cli(capsys, "transcribe", *files, "-m", "m", "-o", tmp_path / "out", "-b", "2")
    assert code == 0, err
    assert fake[0].batches == [[12000, 8000], [4000]]
    shown = [line for line in out.splitlines() if line.startswith("==> ")]
    assert shown == [f"==> {f} <==" for f in files]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["long.txt", "middle.txt", "short.txt"]


def test_reading_ahead_is_bounded_in_audio(fake, tmp_path, capsys, monkeypatch):
    from mlx_canary import transcribe as pipeline

    monkeypatch.setattr(pipeline, "LOOKAHEAD_SECONDS", 1.0)  # the first two files (0.25 + 0.75 s) fill a group
    files = [make_tone(tmp_path / f"{name}.wav", seconds) for name, seconds in
             (("short", 0.25), ("long", 0.75), ("middle", 0.5))]
    code, out, err = run_cli(capsys, "transcribe", *files, "-m", "m", "-o", tmp_path / "out", "-b", "2")
    assert code == 0, err
    assert fake[0].batches == [[12000, 4000], [8000]]
    assert [line for line in out.splitlines() if line.startswith("==> ")] == [f"==> {f} <==" for f in files]


def test_options_reach_the_model(fake, tones, tmp_path, capsys):
    code, _, err = run_cli(
        capsys, "transcribe", tones[0], "--model", "m", "-s", "de", "--no-pnc", "--timestamps",
        "--batch-size", "3", "--beam-size", "4", "--len-pen", "0.5", "--chunk-length", "20", "--dtype", "float16",
        "--quantize", "4", "--group-size", "32", "-o", tmp_path, "-f", "json",
    )
    assert code == 0, err
    (model,) = fake
    assert model.dtype == "float16"
    assert model.load_options == {"quantize": 4, "group_size": 32}
    assert model.calls[0][1] == TranscribeOptions(source_lang="de", target_lang=None, pnc=False, timestamps=True,
                                                  batch_size=3, beam_size=4, length_penalty=0.5, chunk_seconds=20.0)
    data = json.loads((tmp_path / "one.json").read_text())
    assert data["text"] == "heard 8000 samples."
    assert data["source_lang"] == "de" and data["model"] == "m"
    assert data["path"] == str(tones[0])
    assert data["segments"] == [{"start": 0.0, "end": 0.5, "text": "heard 8000 samples."}]


def test_unsupported_option_is_one_error(fake, tones, tmp_path, capsys):
    code, _, err = run_cli(capsys, "transcribe", *tones, "-m", "m", "-s", "xx", "-o", tmp_path / "out")
    assert code == 1
    assert err == "error: Unsupported language 'xx'. This model supports: en, de.\n"
    assert fake[0].calls == []  # failed before any audio was decoded or transcribed
    assert list((tmp_path / "out").iterdir()) == []


def test_quantize_default_group_size(fake, tones, tmp_path, capsys):
    code, _, err = run_cli(capsys, "transcribe", tones[0], "-m", "m", "--quantize", "8", "-o", tmp_path)
    assert code == 0, err
    assert fake[0].load_options == {"quantize": 8, "group_size": 64}


def test_group_size_needs_quantize(fake, tones, tmp_path, capsys):
    code, _, err = run_cli(capsys, "transcribe", tones[0], "-m", "m", "--group-size", "32", "-o", tmp_path)
    assert code == 1
    assert err == "error: --group-size only applies with --quantize 8 or --quantize 4\n"


def test_default_model(fake, tones, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MLX_CANARY_MODEL", raising=False)
    assert run_cli(capsys, "transcribe", tones[0], "-o", tmp_path, "-q")[0] == 0
    monkeypatch.setenv("MLX_CANARY_MODEL", "org/other")
    assert run_cli(capsys, "transcribe", tones[0], "-o", tmp_path, "-q")[0] == 0
    assert [m.name for m in fake] == ["nvidia/canary-1b-flash", "org/other"]


def test_auto_source_language(fake, tones, tmp_path, capsys):
    code, _, err = run_cli(capsys, "transcribe", tones[0], "-m", "m", "-s", "auto", "-o", tmp_path)
    assert code == 0, err
    assert fake[0].calls[0][1].source_lang == "auto" and fake[0].calls[0][1].target_lang is None


def test_translate_needs_target_lang(fake, tones, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["translate", str(tones[0]), "--model", "m"])
    assert exit_.value.code == 2
    assert "--target-lang" in capsys.readouterr().err


def test_translate(fake, tones, tmp_path, capsys):
    code, _, err = run_cli(capsys, "translate", tones[0], "-m", "m", "-s", "en", "-t", "de", "-o", tmp_path)
    assert code == 0, err
    assert fake[0].calls[0][1].target_lang == "de"


def test_translate_to_the_spoken_language_is_refused(fake, tones, tmp_path, capsys):
    # The model's default source language is en: translating "to en" would silently be a transcription. The model
    # is loaded to learn its default, but nothing is transcribed.
    code, _, err = run_cli(capsys, "translate", tones[0], "-m", "m", "-t", "en", "-o", tmp_path)
    assert code == 1
    assert err.startswith("error: translate: the source and target language are both 'en'; name the spoken")
    assert [m.calls for m in fake] == [[]] and list(tmp_path.glob("*.txt")) == []
    code, _, err = run_cli(capsys, "translate", tones[0], "-m", "m", "-s", "de", "-t", "de", "-o", tmp_path)
    assert code == 1 and "both 'de'" in err


def test_all_formats_and_timestamps(fake, tones, tmp_path, capsys):
    out_dir = tmp_path / "out"
    code, _, err = run_cli(capsys, "transcribe", tones[0], "-m", "m", "--timestamps", "-f", "all", "-o", out_dir)
    assert code == 0, err
    assert sorted(p.name for p in out_dir.iterdir()) == ["one.json", "one.srt", "one.tsv", "one.txt", "one.vtt"]
    assert (out_dir / "one.srt").read_text() == "1\n00:00:00,000 --> 00:00:00,500\nheard 8000 samples.\n"


def test_recursive_directories_mirror_the_input_tree(fake, tmp_path, capsys):
    root = tmp_path / "in"
    (root / "talks" / "day1").mkdir(parents=True)
    (root / ".hidden").mkdir()
    make_tone(root / "x.wav", 0.5)
    make_tone(root / "x.mp3", 0.25)  # same stem in one folder: both keep their extension in the output name
    make_tone(root / "talks" / "x.wav", 0.5)
    make_tone(root / "talks" / "day1" / "y.flac", 0.25)
    make_tone(root / "talks" / ".skipped.wav", 0.25)
    out_dir = tmp_path / "out"
    code, _, err = run_cli(capsys, "transcribe", root, "-r", "-m", "m", "-o", out_dir, "-q")
    assert code == 0, err
    written = sorted(str(p.relative_to(out_dir)) for p in out_dir.rglob("*.txt"))
    assert written == ["talks/day1/y.txt", "talks/x.txt", "x.mp3.txt", "x.wav.txt"]
    # the names do not depend on what else is transcribed in the same run
    other = tmp_path / "other.wav"
    make_tone(other, 0.25)
    again = tmp_path / "again"
    code, _, err = run_cli(capsys, "transcribe", other, root, "--recursive", "-m", "m", "-o", again, "-q")
    assert code == 0, err
    assert sorted(str(p.relative_to(again)) for p in again.rglob("*.txt")) == sorted(written + ["other.txt"])
    # without -r only the directory's own files are used
    flat = tmp_path / "flat"
    assert run_cli(capsys, "transcribe", root / "talks", "-m", "m", "-o", flat, "-q")[0] == 0
    assert sorted(p.name for p in flat.iterdir()) == ["x.txt"]


def test_directory_input_and_name_clashes(fake, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    make_tone(a / "x.wav", 0.5)
    make_tone(a / "x.mp3", 0.5)
    (a / "readme.txt").write_text("not audio")
    make_tone(b / "x.wav", 0.25)
    out_dir = tmp_path / "out"
    # a/x.wav is named twice (directly and through a/): it is transcribed once
    code, _, err = run_cli(capsys, "transcribe", a, b / "x.wav", a / "x.wav", "-m", "m", "-o", out_dir, "-q")
    assert code == 0, err
    assert sorted(p.name for p in out_dir.iterdir()) == ["x-2.txt", "x-3.txt", "x.txt"]
    assert (out_dir / "x-3.txt").read_text() == "heard 4000 samples.\n"


def test_stdin(fake, tones, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", types.SimpleNamespace(buffer=io.BytesIO(tones[0].read_bytes())))
    code, out, err = run_cli(capsys, "transcribe", "-", "-m", "m", "-o", tmp_path)
    assert code == 0, err
    assert (tmp_path / "stdin.txt").read_text() == "heard 8000 samples.\n"
    assert out == "heard 8000 samples.\n"


def test_stdin_only_once(fake, capsys):
    code, _, err = run_cli(capsys, "transcribe", "-", "-", "-m", "m")
    assert code == 1
    assert err == "error: '-' (stdin) can be given only once\n"


def test_bad_file_among_good_ones(fake, tones, tmp_path, capsys):
    bad = tmp_path / "in" / "bad.wav"
    bad.write_text("not audio")
    missing = tmp_path / "in" / "missing.wav"
    out_dir = tmp_path / "out"
    code, out, err = run_cli(capsys, "transcribe", tones[0], bad, missing, tones[1], "-m", "m", "-o", out_dir)
    assert code == 1
    assert sorted(p.name for p in out_dir.iterdir()) == ["one.txt", "two.txt"]
    lines = err.splitlines()
    assert lines[0] == "error: 2 of 4 inputs failed:"
    assert lines[1].startswith(f"  {bad}: could not decode audio from {bad}: ")
    assert lines[2] == f"  {missing}: audio file not found: {missing}"
    assert len(lines) == 3


def test_failing_input_in_a_group_fails_alone(fake, tones, tmp_path, capsys):
    fake.settings["fail_on_samples"] = 4000  # the model rejects the second tone
    code, _, err = run_cli(capsys, "transcribe", *tones, "-m", "m", "-o", tmp_path)
    assert code == 1
    assert (tmp_path / "one.txt").exists() and not (tmp_path / "two.txt").exists()
    assert f"  {tones[1]}: audio of 4000 samples is not supported" in err.splitlines()


def test_unexpected_error_fails_only_its_input(fake, tones, tmp_path, capsys):
    fake.settings["crash_on_samples"] = 4000
    code, _, err = run_cli(capsys, "transcribe", *tones, "-m", "m", "-o", tmp_path)
    assert code == 1
    assert (tmp_path / "one.txt").exists() and not (tmp_path / "two.txt").exists()
    assert f"  {tones[1]}: unexpected error (ValueError: a bug); please report it, with --verbose output" in err


def test_empty_audio_is_a_failed_input(fake, tmp_path, capsys):
    import wave

    empty = tmp_path / "empty.wav"
    with wave.open(str(empty), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
    code, _, err = run_cli(capsys, "transcribe", empty, "-m", "m", "-o", tmp_path)
    assert code == 1
    assert f"  {empty}: no audio samples in {empty} (the file holds no audio)" in err


def test_directory_without_audio(fake, tmp_path, capsys):
    empty_dir = tmp_path / "nothing"
    empty_dir.mkdir()
    code, _, err = run_cli(capsys, "transcribe", empty_dir, "-m", "m", "-o", tmp_path)
    assert code == 1
    assert "no audio or video files in directory" in err
    assert fake == []  # nothing to do: the model is not even loaded


def test_model_error_is_one_line(fake, tones, capsys):
    code, out, err = run_cli(capsys, "transcribe", tones[0], "-m", "missing-model")
    assert code == 1
    assert err == "error: model not found: missing-model\n"


def test_empty_model_name(fake, tones, capsys):
    code, _, err = run_cli(capsys, "transcribe", tones[0], "--model", "")
    assert code == 1
    assert err.startswith("error: no model given")


def test_keyboard_interrupt_exits_130(fake, tones, tmp_path, capsys):
    fake.settings["interrupt"] = True
    code, _, err = run_cli(capsys, "transcribe", tones[0], "-m", "m", "-o", tmp_path)
    assert code == 130
    assert err == "interrupted\n"
    assert not (tmp_path / "one.txt").exists()


def test_verbose_prints_blas_status_once(fake, tones, tmp_path, capsys):
    code, _, err = run_cli(capsys, "transcribe", *tones, "-m", "m", "-o", tmp_path, "--verbose")
    assert code == 0
    assert err.count("BLAS:") == 1
    assert err.splitlines()[0] == mlx_canary._blas.blas_status()


def test_verbose_progress_over_files_and_chunks(fake, tones, tmp_path, capsys):
    fake.settings["long_samples"] = 5000  # one.wav (8000 samples) is "long": chunked, with progress
    code, out, err = run_cli(capsys, "transcribe", *tones, "-m", "m", "-o", tmp_path, "-v")
    assert code == 0, err
    lines = err.splitlines()
    assert "loading model m" in lines
    assert f"[1/2] {tones[0]}" in lines and f"[2/2] {tones[1]}" in lines
    assert [line for line in lines if "chunk" in line] == [f"[1/2] {tones[0]}: chunk {i}/3" for i in (1, 2, 3)]
    # the short input was batched alone, the long one decoded on its own with a progress callback
    assert [(n, progress is not None) for n, _, progress in fake[0].calls] == [(1, False), (1, True)]
    # a group's short inputs are written first (in input order), then its long ones as each ends
    assert out.index(str(tones[1])) < out.index(str(tones[0]))


class _TTY(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_on_a_terminal(fake, tones, tmp_path, capsys, monkeypatch):
    fake.settings["long_samples"] = 5000
    monkeypatch.setenv("COLUMNS", "120")
    terminal = _TTY()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert cli.main(["transcribe", *map(str, tones), "-m", "m", "-o", str(tmp_path)]) == 0
    shown = terminal.getvalue()
    assert "\n" not in shown  # one line, rewritten in place
    frames = [frame.strip() for frame in shown.split("\r") if frame.strip()]
    assert frames[0] == "loading model m"
    bar = "[" + "-" * 20 + "]"
    assert f"{bar} 0/2 files | one.wav" in frames
    assert "[" + "#" * 10 + "-" * 10 + "] 1/2 files | one.wav" in frames  # two.flac is done; one.wav goes on
    assert "[" + "#" * 13 + "-" * 7 + "] 1/2 files | one.wav (chunk 1/3)" in frames  # chunks move the bar
    assert frames[-1] == "[" + "#" * 20 + "] 2/2 files"
    assert shown.endswith("\r" + " " * len(frames[-1]) + "\r")  # cleared at the end
    assert capsys.readouterr().out.count("heard") == 2


def test_progress_line_fits_a_narrow_terminal(fake, tmp_path, capsys, monkeypatch):
    fake.settings["long_samples"] = 5000
    long_name = make_tone(tmp_path / ("a-very-long-recording-name-" * 3 + ".wav"), 0.5)
    monkeypatch.setenv("COLUMNS", "61")
    terminal = _TTY()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert cli.main(["transcribe", str(long_name), "-m", "m", "-o", str(tmp_path), "-q"]) == 0
    assert terminal.getvalue() == ""  # --quiet: nothing
    assert cli.main(["transcribe", str(long_name), "-m", "m", "-o", str(tmp_path)]) == 0
    frames = [frame.strip() for frame in terminal.getvalue().split("\r") if frame.strip()]
    assert all(len(frame) <= 60 for frame in frames)
    assert any(frame.endswith("-name-.wav (chunk 2/3)") and "| ..." in frame for frame in frames)


def test_quiet_prints_nothing(fake, tones, tmp_path, capsys):
    code, out, err = run_cli(capsys, "transcribe", *tones, "-m", "m", "-o", tmp_path, "--quiet")
    assert (code, out, err) == (0, "", "")


@pytest.mark.parametrize("argv", [
    ["transcribe", "x.wav", "-m", "m", "-f", "docx"],
    ["transcribe", "x.wav", "-m", "m", "--batch-size", "0"],
    ["transcribe", "x.wav", "-m", "m", "--verbose", "--quiet"],
    ["transcribe", "x.wav", "-m", "m", "--channel", "-1"],
    ["transcribe", "x.wav", "-m", "m", "--channel", "left"],
    ["transcribe"],
    [],
])
def test_usage_errors_exit_2(fake, capsys, argv):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_unwritable_output_dir(fake, tones, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, _, err = run_cli(capsys, "transcribe", tones[0], "-m", "m", "-o", blocker / "sub")
    assert code == 1
    assert err.startswith("error: cannot create output directory")


# -- convert -----------------------------------------------------------------------------------------------


@pytest.fixture
def fake_convert(monkeypatch):
    calls = []

    def convert(source, out_dir, dtype="float32", overwrite=False, progress=None, **quantize):
        calls.append((source, out_dir, dtype, overwrite, *([quantize] if quantize else [])))
        if source == "bad.nemo":
            raise CanaryError("bad.nemo is not a Canary checkpoint")
        progress("reading checkpoint")
        progress("converting tensors", 0, 3)
        progress("converting tensors", 3, 3)
        return {"model_name": "canary-test", "parameters": 1234567, "dtype": dtype, "size_bytes": 2_500_000}

    monkeypatch.setattr(cli, "convert", convert)
    return calls


def test_convert_prints_summary(fake_convert, tmp_path, capsys):
    code, out, err = run_cli(capsys, "convert", "model.nemo", tmp_path / "m", "--dtype", "bfloat16", "--overwrite")
    assert code == 0
    assert fake_convert == [("model.nemo", str(tmp_path / "m"), "bfloat16", True)]  # no quantization
    assert "reading checkpoint" in err and "converting tensors 3/3" in err
    assert "model name" in out and "canary-test" in out
    assert "1,234,567" in out and "2.5 MB" in out and "bfloat16" in out


def test_convert_error(fake_convert, tmp_path, capsys):
    code, out, err = run_cli(capsys, "convert", "bad.nemo", tmp_path / "m")
    assert code == 1
    assert err.endswith("error: bad.nemo is not a Canary checkpoint\n")
    assert fake_convert[0][2] == "float32"


def test_convert_summary_with_its_own_rendering(fake_convert, monkeypatch, tmp_path, capsys):
    class Summary:
        def __str__(self):
            return "converted model.nemo -> out\n  parameters: 1.2 M"

    monkeypatch.setattr(cli, "convert", lambda *a, **k: Summary())
    code, out, _ = run_cli(capsys, "convert", "model.nemo", tmp_path / "m")
    assert code == 0
    assert out == "converted model.nemo -> out\n  parameters: 1.2 M\n"


def test_convert_quiet(fake_convert, tmp_path, capsys):
    assert run_cli(capsys, "convert", "model.nemo", tmp_path / "m", "-q") == (0, "", "")


def test_convert_quantize(fake_convert, tmp_path, capsys):
    assert run_cli(capsys, "convert", "model.nemo", tmp_path / "m", "--quantize", "4", "-q")[0] == 0
    assert run_cli(capsys, "convert", "model.nemo", tmp_path / "m", "--quantize", "8", "--group-size", "128",
                   "-q")[0] == 0
    assert [call[4] for call in fake_convert] == [{"quantize": 4, "group_size": 64},
                                                  {"quantize": 8, "group_size": 128}]
    with pytest.raises(SystemExit) as exit_:
        cli.main(["convert", "model.nemo", str(tmp_path / "m"), "--quantize", "3"])
    assert exit_.value.code == 2


@pytest.fixture
def fake_upload(monkeypatch):
    from mlx_canary import hub

    calls = []

    def upload_model(model_dir, repo_id, **kwargs):
        calls.append((model_dir, repo_id))
        if repo_id == "org/denied":
            raise CanaryError("not allowed to write to Hugging Face repo org/denied")
        return f"https://huggingface.co/{repo_id}"

    monkeypatch.setattr(hub, "upload_model", upload_model)
    return calls


def test_convert_and_upload(fake_convert, fake_upload, tmp_path, capsys):
    code, out, err = run_cli(capsys, "convert", "model.nemo", tmp_path / "m", "--upload-repo", "org/canary-mlx")
    assert code == 0, err
    assert fake_upload == [(str(tmp_path / "m"), "org/canary-mlx")]
    assert out.endswith("uploaded to https://huggingface.co/org/canary-mlx\n")
    code, _, err = run_cli(capsys, "convert", "model.nemo", tmp_path / "m", "--upload-repo", "org/denied")
    assert code == 1 and err.endswith("error: not allowed to write to Hugging Face repo org/denied\n")


def test_bad_upload_repo_is_refused_before_converting(fake_convert, fake_upload, tmp_path, capsys):
    code, _, err = run_cli(capsys, "convert", "model.nemo", tmp_path / "m", "--upload-repo", "not a repo")
    assert code == 1
    assert err.startswith("error: 'not a repo' is not a Hugging Face repo id; use ORG/NAME")
    assert fake_convert == [] and fake_upload == []


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


def test_convert_overwrite_never_deletes_the_source_or_a_users_file(tmp_path, capsys):
    """Issue 12: `convert --overwrite ~/models/x.nemo ~/models` deleted the .nemo and the user's file beside it.
    The real converter runs: the refusal comes before the archive is read, so any bytes do as the source."""
    models = tmp_path / "models"
    models.mkdir()
    (models / "x.nemo").write_bytes(b"the user's only copy of the checkpoint")
    (models / "notes.txt").write_text("mine")
    before = _tree(tmp_path)
    code, out, err = run_cli(capsys, "convert", "--overwrite", models / "x.nemo", models)
    assert (code, out) == (1, "")
    assert err == (f"error: the source {models / 'x.nemo'} is inside the output directory {models}; converting "
                   "there could delete it: choose another output directory\n")
    (tmp_path / "elsewhere.nemo").write_bytes(b"x")
    before = _tree(tmp_path)
    code, _, err = run_cli(capsys, "convert", "--overwrite", tmp_path / "elsewhere.nemo", models)
    assert code == 1 and err.startswith(f"error: {models} is not an mlx-canary model directory (it has no config.json)")
    assert _tree(tmp_path) == before
    proc = subprocess.run([sys.executable, "-m", "mlx_canary", "convert", "--overwrite", "x.nemo", "."],
                          cwd=models, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 1 and proc.stderr.startswith("error: the source x.nemo is inside the output")
    assert "Traceback" not in proc.stderr
    assert _tree(tmp_path) == before


# -- as a real process -------------------------------------------------------------------------------------


def _run_process(*argv, **kwargs):
    return subprocess.run([sys.executable, "-m", "mlx_canary", *map(str, argv)], capture_output=True, text=True,
                          cwd=REPO, timeout=120, **kwargs)


def test_process_errors_have_no_traceback(tmp_path):
    proc = _run_process("transcribe", tmp_path / "nope.wav", "--model", "whatever", "-o", tmp_path)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr == f"error: 1 of 1 inputs failed:\n  {tmp_path / 'nope.wav'}: audio file not found: " \
                          f"{tmp_path / 'nope.wav'}\n"


def test_process_model_error_is_one_line(tmp_path):
    tone = make_tone(tmp_path / "a.wav")
    proc = _run_process("transcribe", tone, "--model", tmp_path / "no-such-model", "-o", tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr


def test_process_usage_and_version():
    proc = _run_process("transcribe")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    proc = _run_process("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"mlx-canary {mlx_canary.__version__}"


def test_public_api():
    import inspect

    import mlx_canary.convert  # noqa: F401  (importing the submodule must not shadow the function)

    assert inspect.isfunction(mlx_canary.convert) and mlx_canary.convert.__name__ == "convert"
    assert callable(mlx_canary.load_model)
    assert mlx_canary.Transcript is Transcript
    assert mlx_canary.CanaryError is CanaryError
    assert isinstance(mlx_canary.__version__, str)
    assert set(mlx_canary.__all__) >= {"load_model", "convert", "Transcript", "CanaryError", "__version__"}


# -- with a real tiny model --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    model_fixtures = pytest.importorskip("model_fixtures")  # skips when torch is missing
    return model_fixtures.build_tiny_model(tmp_path_factory.mktemp("cli-model"))


def test_real_model_options_and_chunk_progress(tiny_model, tmp_path, capsys):
    clip = make_tone(tmp_path / "long.wav", 7.0)
    out_dir = tmp_path / "out"
    code, out, err = run_cli(capsys, "transcribe", clip, "-m", tiny_model, "--chunk-length", "3", "--timestamps",
                             "--beam-size", "2", "--len-pen", "0.5", "--quantize", "8", "--group-size", "32",
                             "-f", "json", "-o", out_dir, "-v")
    assert code == 0, err
    chunk_lines = [line for line in err.splitlines() if ": chunk " in line]
    assert chunk_lines and chunk_lines[0].startswith(f"[1/1] {clip}: chunk ")
    done, total = chunk_lines[-1].rsplit(" ", 1)[1].split("/")
    assert done == total and int(total) > 1
    data = json.loads((out_dir / "long.json").read_text())
    assert data["duration"] == pytest.approx(7.0) and data["model"] == str(tiny_model)
    assert isinstance(data["segments"], list) and isinstance(data["words"], list)
    assert sorted(p.name for p in out_dir.iterdir()) == ["long.json"]


def test_channel_picks_one_channel_of_a_file(tmp_path, capsys):
    """--channel N is NeMo's channel_selector; without it the channels are averaged (the demo model, for real)."""
    import soundfile as sf

    from mlx_canary.loading import DEMO_MODEL_DIR

    speech, rate = sf.read(DEMO_MODEL_DIR / "sample.wav", dtype="float32")
    stereo = tmp_path / "stereo.wav"
    sf.write(stereo, np.stack([np.zeros_like(speech), speech], axis=1), rate, subtype="FLOAT")
    code, _, err = run_cli(capsys, "transcribe", DEMO_MODEL_DIR / "sample.wav", "-m", "demo", "-o", tmp_path / "mono")
    assert code == 0, err
    code, _, err = run_cli(capsys, "transcribe", stereo, "-m", "demo", "--channel", "1", "-o", tmp_path / "ch1")
    assert code == 0, err
    assert (tmp_path / "ch1" / "stereo.txt").read_text() == (tmp_path / "mono" / "sample.txt").read_text()
    code, _, err = run_cli(capsys, "transcribe", stereo, "-m", "demo", "--channel", "2", "-o", tmp_path / "ch2")
    assert code == 1 and f"channel 2 does not exist: {stereo} has 2 channels (0-1)" in err
    assert not (tmp_path / "ch2" / "stereo.txt").exists()
