"""canary-1b-v2's timestamps model: conversion from the archive, the MLX CTC aligner against NeMo, and timestamps
through the pipeline (prompt <|notimestamp|>, then forced alignment), as NeMo's transcribe(timestamps=True) does.

The aligner is a tiny random-weight ``EncDecCTCModelBPE`` built and run by NeMo in a subprocess
(tests/nemo_aligner_oracle.py, cached); its members are packed into a tiny Canary archive the way canary-1b-v2
carries them (``timestamps_asr_model_config.yaml``, ``timestamps_asr_model_weights.ckpt``, the tokenizer artifact
the config names).
"""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest

import model_fixtures
import nemo_aligner_oracle
from mlx_canary import load_model
from mlx_canary.config import ModelConfig
from mlx_canary.convert import convert
from mlx_canary.errors import CanaryError, UnsupportedOption
from mlx_canary.options import Task

pytestmark = pytest.mark.parity


@pytest.fixture(scope="module")
def oracle():
    out = nemo_aligner_oracle.oracle_dir_for_tests()
    return out, json.loads((out / "reference.json").read_text()), np.load(out / "clips.npz")


def aligner_members(oracle_out) -> dict:
    return {p.name: p.read_bytes() for p in (oracle_out / "aligner").iterdir()}


@pytest.fixture(scope="module")
def v2_dir(oracle, tmp_path_factory):
    root = tmp_path_factory.mktemp("v2")
    return model_fixtures.build_tiny_model(root, "tiny-v2", extra_files=aligner_members(oracle[0]))


@pytest.fixture(scope="module")
def v2(v2_dir):
    return load_model(v2_dir)


def _nemo(entries, key):
    return [{"text": e[key], "start": e["start"], "end": e["end"], "start_offset": e["start_offset"],
             "end_offset": e["end_offset"]} for e in entries]


# -- conversion ---------------------------------------------------------------------------------------------------


def test_conversion_stores_the_aligner_beside_the_model(v2_dir, oracle):
    config = ModelConfig.load(v2_dir)
    aligner = config.aligner
    assert aligner is not None and not config.aligner_unknown
    assert aligner.vocab_size == oracle[1]["vocab_size"]
    assert aligner.encoder.n_layers == 2 and not aligner.encoder.use_bias and not aligner.encoder.xscaling
    assert aligner.preprocessor.n_mels == 128 and aligner.frame_seconds == pytest.approx(0.08)
    assert (v2_dir / aligner.weights_file).is_file()
    tokenizer = next((oracle[0] / "aligner").glob("*_tokenizer.model")).read_bytes()
    assert (v2_dir / aligner.tokenizer_file).read_bytes() == tokenizer
    assert set(config.required_files) >= {aligner.weights_file, aligner.tokenizer_file}


def test_reconversion_with_overwrite_replaces_the_aligner_files(v2_dir, tmp_path):
    nemo = v2_dir.parent / "tiny-v2.nemo"
    out = tmp_path / "m"
    convert(nemo, out)
    summary = convert(nemo, out, overwrite=True)
    assert any("timestamps model" in n for n in summary.notes)
    assert ModelConfig.load(out).aligner is not None


def test_quantized_conversion_quantizes_the_aligner(v2_dir, oracle, tmp_path):
    out = tmp_path / "q8"
    convert(v2_dir.parent / "tiny-v2.nemo", out, quantize=8, group_size=32)
    config = ModelConfig.load(out)
    assert config.aligner.quantization == {"bits": 8, "group_size": 32}
    model = load_model(out)
    wave = oracle[2]["wave2"]
    got = model.engine.aligner.log_probs(wave)
    want = oracle[2]["log_probs2"]
    assert got.shape == want.shape
    assert np.mean(np.argmax(got, -1) == np.argmax(want, -1)) > 0.8  # 8-bit: close, not equal


def test_incomplete_timestamps_model_is_ignored_like_nemo(tmp_path, oracle):
    members = aligner_members(oracle[0])
    del members["timestamps_asr_model_weights.ckpt"]
    nemo = model_fixtures.build_tiny_nemo(tmp_path, "half", extra_files=members)
    summary = convert(nemo, tmp_path / "out")
    assert any("incomplete timestamps model" in n for n in summary.notes)
    assert ModelConfig.load(tmp_path / "out").aligner is None


def test_broken_timestamps_model_is_refused_by_name(tmp_path, oracle):
    members = aligner_members(oracle[0])
    members["timestamps_asr_model_config.yaml"] = members["timestamps_asr_model_config.yaml"].replace(
        b"ConvASRDecoder", b"RNNTDecoder")
    nemo = model_fixtures.build_tiny_nemo(tmp_path, "bad", extra_files=members)
    with pytest.raises(CanaryError, match="timestamps model.*decoder._target_"):
        convert(nemo, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# -- the MLX aligner against NeMo ---------------------------------------------------------------------------------


def test_log_probs_equal_nemo(v2, oracle):
    _, ref, clips = oracle
    for i, frames in enumerate(ref["clip_frames"]):
        got = v2.engine.aligner.log_probs(clips[f"wave{i}"])
        want = clips[f"log_probs{i}"]
        assert got.shape == want.shape == (frames, ref["vocab_size"] + 1)
        np.testing.assert_allclose(got, want, atol=2e-4, rtol=0)


def test_alignment_from_the_audio_equals_nemo(v2, oracle):
    """The aligner's own log-probs (MLX) -> words, segments and chars equal NeMo's, from the waveform on."""
    _, ref, clips = oracle
    checked = 0
    for case in ref["audio_cases"]:
        wave = clips[f"wave{case['clip']}"]
        got = v2.engine.aligner.align(wave, case["text"])
        assert got.words == _nemo(case["words_segments"]["word"], "word"), case["text"]
        assert got.segments == _nemo(case["words_segments"]["segment"], "segment"), case["text"]
        assert v2.engine.aligner.align(wave, case["text"], level="chars").chars == case["chars"]["char"]
        checked += bool(got.words)
    assert checked >= 5


# -- the pipeline -------------------------------------------------------------------------------------------------


def test_timestamps_prompt_notimestamp_and_align(v2, oracle):
    engine = v2.engine
    assert v2.capabilities.timestamps
    assert engine.prompt(Task("en", "en", True, True)) == engine.prompt(Task("en", "en", True, False))
    wave = oracle[2]["wave3"]
    plain = v2.transcribe(wave, source_lang="en")
    timed = v2.transcribe(wave, source_lang="en", timestamps=True)
    assert timed.tokens == plain.tokens and timed.text == plain.text  # the same decoding as without timestamps
    want = engine.align(wave, plain.text)
    assert timed.words == want.words and timed.segments == want.segments
    assert timed.timestamps
    # (this tiny random model writes more tokens than the aligner has frames, so both are empty here, as NeMo's
    # would be; test_v2_timestamps_parity.py checks real alignments through the pipeline against NeMo's)


def test_short_inputs_are_aligned_as_nemo_pads_them(v2, oracle):
    short = oracle[2]["wave3"][:9000]  # < 1 s: NeMo pads it to 1 s before both models
    padded = np.pad(short, (3500, 3500))
    text = "aa ll oo"
    got = v2.engine.align(short, text)
    assert got.words and got.words == v2.engine.aligner.align(padded, text).words


def test_translation_with_timestamps_is_refused(v2):
    with pytest.raises(UnsupportedOption, match="translation"):
        v2.prepare(source_lang="en", target_lang="de", timestamps=True)
    v2.prepare(source_lang="en", target_lang="de")  # without timestamps it translates


def test_directory_converted_before_the_aligner_asks_for_reconversion(v2, v2_dir, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(v2_dir, old)
    data = json.loads((old / "config.json").read_text())
    del data["aligner"]
    data["tokenizer"]["type"] = "spe"  # a canary-1b-v2 (the one canary2 model with one SentencePiece vocabulary)
    (old / "config.json").write_text(json.dumps(data))
    config = ModelConfig.load(old)
    assert config.aligner_unknown and config.aligner is None
    from mlx_canary.aed import AEDEngine

    engine = AEDEngine(v2.engine.net, v2.tokenizer, config)  # what load_model builds from that config.json
    with pytest.raises(CanaryError, match="convert the .nemo again"):
        engine.prompt(Task("en", "en", True, True))
    engine.prompt(Task("en", "en", True, False))  # everything else still works


def test_old_directory_still_loads(v2_dir, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(v2_dir, old)
    data = json.loads((old / "config.json").read_text())
    del data["aligner"]
    (old / "config.json").write_text(json.dumps(data))
    model = load_model(old)
    assert model.engine.aligner is None
    model.transcribe(np.zeros(16000, np.float32), source_lang="en")


# -- forced alignment as a feature: CanaryModel.align and `mlx-canary align` ----------------------------------------


def _worded_case(ref):
    return next(c for c in ref["audio_cases"] if len(c["words_segments"]["segment"]) > 1)


def test_align_api_equals_nemo(v2, oracle):
    _, ref, clips = oracle
    case = _worded_case(ref)
    from mlx_canary.transcribe import AlignmentWarning

    with pytest.warns(AlignmentWarning, match="'C'"):  # the tiny vocabulary has no capital C: NeMo aligns <unk>
        result = v2.align(clips[f"wave{case['clip']}"], case["text"])
    assert result.words == _nemo(case["words_segments"]["word"], "word")
    assert result.segments == _nemo(case["words_segments"]["segment"], "segment")
    assert result.text == " ".join(case["text"].split()) and result.timestamps


def test_align_refuses_what_it_cannot_do(v2, oracle, tmp_path):
    wave = oracle[2]["wave1"]
    with pytest.raises(CanaryError, match="empty"):
        v2.align(wave, "  \n ")
    with pytest.raises(CanaryError, match="too long"):
        v2.align(wave[:16000], "hello world " * 40)
    plain = load_model(model_fixtures.build_tiny_model(tmp_path, "plain"))
    assert not plain.capabilities.alignment
    with pytest.raises(UnsupportedOption, match="no aligner"):
        plain.align(wave, "hello")


def test_align_warns_about_characters_outside_the_vocabulary(v2, oracle):
    from mlx_canary.transcribe import AlignmentWarning

    with pytest.warns(AlignmentWarning, match="'ẞ'"):
        result = v2.align(oracle[2]["wave2"], "Hello ẞ world.")
    assert [w["text"] for w in result.words] == ["Hello", "ẞ", "world."]


@pytest.fixture(scope="module")
def clip_file(oracle, tmp_path_factory):
    import soundfile

    path = tmp_path_factory.mktemp("clip") / "clip.wav"
    case = _worded_case(oracle[1])
    soundfile.write(path, oracle[2][f"wave{case['clip']}"], 16000, subtype="FLOAT")
    return path, case


def test_align_cli_writes_subtitles(v2_dir, clip_file, tmp_path, capsys):
    from mlx_canary.cli import main

    path, case = clip_file
    out = tmp_path / "out"
    assert main(["align", str(path), case["text"], "-m", str(v2_dir), "-o", str(out), "-f", "srt,json"]) == 0
    data = json.loads((out / "clip.json").read_text())
    assert data["words"] == _nemo(case["words_segments"]["word"], "word")
    srt = (out / "clip.srt").read_text()
    assert srt.startswith("1\n00:00:") and case["words_segments"]["segment"][0]["segment"] in srt
    assert "-->" in capsys.readouterr().out


def test_align_cli_reads_text_and_subtitle_files(v2_dir, clip_file, tmp_path):
    from mlx_canary.cli import main

    path, case = clip_file
    srt = tmp_path / "old.srt"
    cue_text = re.split(r"(?<=[.!?]) ", case["text"])  # one cue per sentence
    srt.write_text("".join(f"{i + 1}\n00:00:0{i},000 --> 00:00:0{i + 1},000\n<i>{t}</i>\n\n"
                           for i, t in enumerate(cue_text)))
    out = tmp_path / "out"
    assert main(["align", str(path), str(srt), "-m", str(v2_dir), "-o", str(out), "-f", "json"]) == 0
    data = json.loads((out / "clip.json").read_text())
    assert data["segments"] == _nemo(case["words_segments"]["segment"], "segment")


def test_align_cli_errors(v2_dir, clip_file, tmp_path, capsys):
    from mlx_canary.cli import main

    path, _ = clip_file
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    plain = model_fixtures.build_tiny_model(tmp_path, "plain")
    cases = [
        ([str(path), str(empty), "-m", str(v2_dir)], "is empty"),
        ([str(path), str(tmp_path / "missing.txt"), "-m", str(v2_dir)], "text file not found"),
        ([str(tmp_path / "missing.wav"), "hello", "-m", str(v2_dir)], "audio file not found"),
        ([str(path), "hello", "-m", str(plain)], "has no aligner"),
    ]
    for argv, message in cases:
        assert main(["align", *argv, "-o", str(tmp_path / "o")]) == 1
        assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_cache_reconverts_a_conversion_made_before_the_aligner(v2_dir, tmp_path, monkeypatch):
    from mlx_canary.cache import converted_cache_dir

    monkeypatch.setenv("MLX_CANARY_CACHE", str(tmp_path / "cache"))
    nemo = v2_dir.parent / "tiny-v2.nemo"
    cached = converted_cache_dir(str(nemo))
    data = json.loads((cached / "config.json").read_text())
    assert data["aligner"] is not None
    for name in (data["aligner"]["weights_file"], data["aligner"]["tokenizer_file"]):
        (cached / name).unlink()
    del data["aligner"]  # what an older mlx-canary left in the cache
    (cached / "config.json").write_text(json.dumps(data))
    assert converted_cache_dir(str(nemo)) == cached
    assert load_model(nemo).capabilities.alignment
