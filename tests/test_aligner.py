"""canary-1b-v2's timestamps model: conversion from the archive, the MLX CTC aligner against NeMo, and timestamps
through the pipeline (prompt <|notimestamp|>, then forced alignment), as NeMo's transcribe(timestamps=True) does.

The aligner is a tiny random-weight ``EncDecCTCModelBPE`` built and run by NeMo in a subprocess
(tests/nemo_aligner_oracle.py, cached); its members are packed into a tiny Canary archive the way canary-1b-v2
carries them (``timestamps_asr_model_config.yaml``, ``timestamps_asr_model_weights.ckpt``, the tokenizer artifact
the config names).
"""

from __future__ import annotations

import json
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


def test_short_inputs_are_aligned_as_nemo_pads_them(v2, oracle):
    short = oracle[2]["wave3"][:9000]  # < 1 s: NeMo pads it to 1 s before both models
    timed = v2.transcribe(short, source_lang="en", timestamps=True)
    padded = np.pad(short, (3500, 3500))
    assert timed.words == v2.engine.aligner.align(padded, timed.text).words


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
