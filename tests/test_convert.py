"""Tests for mlx_canary.convert and mlx_canary.hub: config derivation, weight mapping, strict check, output
directory handling, Hugging Face resolution (with a local stand-in, never the network).

Synthetic ``.nemo`` archives are built here with torch (hand-written YAML + state dict with NeMo's names and
shapes); the parity tests at the end convert real NeMo-built archives from the oracle (``oracle_dir``).
"""

from __future__ import annotations

import collections
import io
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml

import importlib

from mlx_canary import hub
from mlx_canary.config import ModelConfig
from mlx_canary.convert import (
    build_config,
    check_weights,
    convert,
    decoding_config,
    encoder_config,
    expected_shapes,
    map_weights,
    preprocessor_config,
)
from mlx_canary.errors import CanaryError

# The package exports the function ``convert``, which shadows the submodule as an attribute.
convert_mod = importlib.import_module("mlx_canary.convert")

torch = pytest.importorskip("torch")
spm = pytest.importorskip("sentencepiece")
mx = pytest.importorskip("mlx.core")

# ---------------------------------------------------------------------------------------------------------------
# Synthetic tiny Canary archives (NeMo key names and torch layouts as listed in canary-reference.md §3)

DIMS = dict(n_mels=16, d=32, heads=4, ff=4, kernel=9, channels=8, enc_layers=2, factor=8,
            dec_d=48, dec_heads=4, dec_inner=192, dec_layers=2, max_seq=64)

EN_TEXT = ["the quick brown fox jumps over the lazy dog", "hello world this is a test", "good morning and night"]
DE_TEXT = ["guten morgen wie geht es ihnen", "die strasse hat zwoelf haeuser", "hallo welt das ist ein test"]
SPECIALS = ["<|nospeech|>", "<pad>", "<|endoftext|>", "<|startoftranscript|>", "<|pnc|>", "<|nopnc|>",
            "<|startofcontext|>", "<|en|>", "<|de|>"]


def train_spm(lines, vocab, user_symbols=()) -> bytes:
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines * 4), model_writer=buf, vocab_size=vocab, model_type="bpe",
        hard_vocab_limit=False, user_defined_symbols=list(user_symbols), character_coverage=1.0,
        bos_id=-1, eos_id=-1, minloglevel=2,
    )
    return buf.getvalue()


@pytest.fixture(scope="module")
def spm_models():
    return {
        "spl_tokens": train_spm(["a"], 20, SPECIALS),
        "en": train_spm(EN_TEXT, 40),
        "de": train_spm(DE_TEXT, 40),
        "spe": train_spm(EN_TEXT + DE_TEXT, 60, SPECIALS),
    }


def pieces(model: bytes) -> int:
    return spm.SentencePieceProcessor(model_proto=model).get_piece_size()


def tiny_yaml(kind: str = "agg", dims=DIMS) -> dict:
    d = dims
    if kind == "agg":
        tokenizer = {
            "dir": None,
            "type": "agg",
            "langs": {
                lang: {"dir": f"/stale/train/{lang}", "type": "bpe", "model_path": f"nemo:{i:032x}_tokenizer.model"}
                for i, lang in enumerate(["spl_tokens", "en", "de"])
            },
            "custom_tokenizer": {"_target_": "nemo.collections.common.tokenizers.canary_tokenizer.CanaryTokenizer"},
        }
    else:
        tokenizer = {"dir": "/stale", "type": "bpe", "model_path": "nemo:" + "f" * 32 + "_tokenizer.model",
                     "custom_tokenizer": {"_target_": "CanaryBPETokenizer"}}
    return {
        "sample_rate": 16000,
        "prompt_format": "canary2",
        "model_defaults": {"asr_enc_hidden": d["d"], "lm_enc_hidden": d["dec_d"], "lm_dec_hidden": d["dec_d"]},
        "tokenizer": tokenizer,
        "preprocessor": {
            "_target_": "nemo.collections.asr.modules.AudioToMelSpectrogramPreprocessor",
            "sample_rate": 16000, "normalize": "per_feature", "window_size": 0.025, "window_stride": 0.01,
            "window": "hann", "features": d["n_mels"], "n_fft": 512, "log": True, "frame_splicing": 1,
            "dither": 1e-5, "pad_to": 0, "pad_value": 0.0,
        },
        "encoder": {
            "_target_": "nemo.collections.asr.modules.ConformerEncoder",
            "feat_in": d["n_mels"], "feat_out": -1, "n_layers": d["enc_layers"], "d_model": d["d"],
            "subsampling": "dw_striding", "subsampling_factor": d["factor"],
            "subsampling_conv_channels": d["channels"], "causal_downsampling": False,
            "ff_expansion_factor": d["ff"], "self_attention_model": "rel_pos", "n_heads": d["heads"],
            "att_context_size": [-1, -1], "xscaling": False, "untie_biases": True, "pos_emb_max_len": 5000,
            "conv_kernel_size": d["kernel"], "conv_norm_type": "batch_norm", "conv_context_size": None,
            "use_bias": True,
        },
        "transf_encoder": {"num_layers": 0, "hidden_size": d["dec_d"]},
        "transf_decoder": {
            "_target_": "nemo.collections.asr.modules.transformer.get_nemo_transformer",
            "encoder": False, "pre_ln_final_layer_norm": True,
            "config_dict": {
                "max_sequence_length": d["max_seq"], "num_token_types": 0, "learn_positional_encodings": False,
                "hidden_size": d["dec_d"], "inner_size": d["dec_inner"], "num_layers": d["dec_layers"],
                "num_attention_heads": d["dec_heads"], "hidden_act": "relu", "pre_ln": True, "vocab_size": None,
            },
        },
        "head": {"_target_": "nemo.collections.asr.parts.submodules.token_classifier.TokenClassifier",
                 "num_layers": 1, "activation": "relu", "log_softmax": True, "hidden_size": d["dec_d"]},
        "decoding": {"strategy": "beam", "beam": {"beam_size": 1, "len_pen": 0.0, "max_generation_delta": 50}},
        "nemo_version": "3.0.0",
    }


def tiny_state(vocab_rows: int, dims=DIMS, *, proj: bool = True, seed: int = 0) -> dict:
    d = dims
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    E, C, K, H = d["d"], d["channels"], d["kernel"], d["heads"]
    F = d["n_mels"]
    for _ in range(int(math.log2(d["factor"]))):
        F = (F - 1) // 2 + 1
    s = collections.OrderedDict()
    s["preprocessor.featurizer.window"] = torch.hann_window(400, periodic=False)
    s["preprocessor.featurizer.fb"] = r(1, d["n_mels"], 257).abs()
    s["encoder.pre_encode.out.weight"] = r(E, C * F)
    s["encoder.pre_encode.out.bias"] = r(E)
    s["encoder.pre_encode.conv.0.weight"], s["encoder.pre_encode.conv.0.bias"] = r(C, 1, 3, 3), r(C)
    for i in range(1, int(math.log2(d["factor"]))):
        s[f"encoder.pre_encode.conv.{3 * i - 1}.weight"] = r(C, 1, 3, 3)
        s[f"encoder.pre_encode.conv.{3 * i - 1}.bias"] = r(C)
        s[f"encoder.pre_encode.conv.{3 * i}.weight"] = r(C, C, 1, 1)
        s[f"encoder.pre_encode.conv.{3 * i}.bias"] = r(C)
    for i in range(d["enc_layers"]):
        p = f"encoder.layers.{i}."
        for norm in ("norm_feed_forward1", "norm_conv", "norm_self_att", "norm_feed_forward2", "norm_out"):
            s[p + norm + ".weight"], s[p + norm + ".bias"] = r(E), r(E)
        for ff in ("feed_forward1", "feed_forward2"):
            s[p + ff + ".linear1.weight"], s[p + ff + ".linear1.bias"] = r(E * d["ff"], E), r(E * d["ff"])
            s[p + ff + ".linear2.weight"], s[p + ff + ".linear2.bias"] = r(E, E * d["ff"]), r(E)
        s[p + "conv.pointwise_conv1.weight"], s[p + "conv.pointwise_conv1.bias"] = r(2 * E, E, 1), r(2 * E)
        s[p + "conv.depthwise_conv.weight"], s[p + "conv.depthwise_conv.bias"] = r(E, 1, K), r(E)
        for stat in ("weight", "bias", "running_mean"):
            s[p + "conv.batch_norm." + stat] = r(E)
        s[p + "conv.batch_norm.running_var"] = r(E).abs() + 0.5
        s[p + "conv.batch_norm.num_batches_tracked"] = torch.tensor(1234)
        s[p + "conv.pointwise_conv2.weight"], s[p + "conv.pointwise_conv2.bias"] = r(E, E, 1), r(E)
        s[p + "self_attn.pos_bias_u"], s[p + "self_attn.pos_bias_v"] = r(H, E // H), r(H, E // H)
        for lin in ("linear_q", "linear_k", "linear_v", "linear_out"):
            s[p + f"self_attn.{lin}.weight"], s[p + f"self_attn.{lin}.bias"] = r(E, E), r(E)
        s[p + "self_attn.linear_pos.weight"] = r(E, E)
    D = d["dec_d"]
    if proj:
        s["encoder_decoder_proj.weight"], s["encoder_decoder_proj.bias"] = r(D, E), r(D)
    emb = r(vocab_rows, D)
    s["transf_decoder._embedding.token_embedding.weight"] = emb
    s["transf_decoder._embedding.position_embedding.pos_enc"] = r(d["max_seq"], D)
    s["transf_decoder._embedding.layer_norm.weight"] = r(D)
    s["transf_decoder._embedding.layer_norm.bias"] = r(D)
    for j in range(d["dec_layers"]):
        p = f"transf_decoder._decoder.layers.{j}."
        for n in (1, 2, 3):
            s[p + f"layer_norm_{n}.weight"], s[p + f"layer_norm_{n}.bias"] = r(D), r(D)
        for sub in ("first_sub_layer", "second_sub_layer"):
            for net in ("query_net", "key_net", "value_net", "out_projection"):
                s[p + f"{sub}.{net}.weight"], s[p + f"{sub}.{net}.bias"] = r(D, D), r(D)
        s[p + "third_sub_layer.dense_in.weight"] = r(d["dec_inner"], D)
        s[p + "third_sub_layer.dense_in.bias"] = r(d["dec_inner"])
        s[p + "third_sub_layer.dense_out.weight"] = r(D, d["dec_inner"])
        s[p + "third_sub_layer.dense_out.bias"] = r(D)
    s["transf_decoder._decoder.final_layer_norm.weight"] = r(D)
    s["transf_decoder._decoder.final_layer_norm.bias"] = r(D)
    s["log_softmax.mlp.layer0.weight"] = emb  # tied: one storage, as NeMo saves it
    s["log_softmax.mlp.layer0.bias"] = r(vocab_rows)
    return s


def _add(tar, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_nemo(path: Path, cfg: dict, state, files: dict, mode: str = "w:") -> Path:
    buf = io.BytesIO()
    torch.save(state, buf)
    with tarfile.open(path, mode) as tar:
        _add(tar, "./model_config.yaml", yaml.safe_dump(cfg, sort_keys=False).encode())
        _add(tar, "./model_weights.ckpt", buf.getvalue())
        for name, data in files.items():
            _add(tar, "./" + name, data)
    return path


def tokenizer_files(cfg: dict, spm_models: dict) -> dict:
    tok = cfg["tokenizer"]
    if tok["type"] == "agg":
        return {sub["model_path"][5:]: spm_models[lang] for lang, sub in tok["langs"].items()}
    return {tok["model_path"][5:]: spm_models["spe"]}


def vocab_rows(kind: str, spm_models: dict) -> int:
    total = sum(pieces(spm_models[k]) for k in (["spl_tokens", "en", "de"] if kind == "agg" else ["spe"]))
    return 8 * math.ceil(total / 8)


def make_nemo(tmp_path: Path, spm_models: dict, kind: str = "agg", *, edit_cfg=None, edit_state=None,
              proj: bool = True, name: str = "tiny.nemo", mode: str = "w:") -> Path:
    cfg = tiny_yaml(kind)
    if not proj:
        cfg["model_defaults"]["lm_dec_hidden"] = cfg["model_defaults"]["asr_enc_hidden"]
    state = tiny_state(vocab_rows(kind, spm_models), proj=proj)
    files = tokenizer_files(cfg, spm_models)
    if edit_cfg:
        edit_cfg(cfg)
    if edit_state:
        edit_state(state)
    return write_nemo(tmp_path / name, cfg, state, files, mode)


@pytest.fixture
def tiny_nemo(tmp_path, spm_models) -> Path:
    return make_nemo(tmp_path, spm_models)


def contract_shapes(config: ModelConfig) -> dict:
    """The parameter contract written in WEIGHTS.md, derived from the config alone (independent of model.py)."""
    e, dec, p = config.encoder, config.decoder, config.preprocessor
    C, E, D, K, H = e.subsampling_conv_channels, e.d_model, dec.hidden_size, e.conv_kernel_size, e.n_heads
    s = {"preprocessor.window": (p.win_length,), "preprocessor.filterbank": (p.n_mels, p.n_fft // 2 + 1)}
    s["encoder.pre_encode.conv.0.weight"], s["encoder.pre_encode.conv.0.bias"] = (C, 3, 3, 1), (C,)
    for i in range(1, e.subsampling_stages):
        s[f"encoder.pre_encode.conv.{3 * i - 1}.weight"] = (C, 3, 3, 1)
        s[f"encoder.pre_encode.conv.{3 * i - 1}.bias"] = (C,)
        s[f"encoder.pre_encode.conv.{3 * i}.weight"] = (C, C)
        s[f"encoder.pre_encode.conv.{3 * i}.bias"] = (C,)
    s["encoder.pre_encode.out.weight"], s["encoder.pre_encode.out.bias"] = (E, C * e.subsampled_feat), (E,)
    for i in range(e.n_layers):
        p_ = f"encoder.layers.{i}."
        for norm in ("norm_feed_forward1", "norm_conv", "norm_self_att", "norm_feed_forward2", "norm_out"):
            s[p_ + norm + ".weight"] = s[p_ + norm + ".bias"] = (E,)
        for ff in ("feed_forward1", "feed_forward2"):
            s[p_ + ff + ".linear1.weight"], s[p_ + ff + ".linear2.weight"] = (e.d_ff, E), (E, e.d_ff)
            if e.use_bias:
                s[p_ + ff + ".linear1.bias"], s[p_ + ff + ".linear2.bias"] = (e.d_ff,), (E,)
        s[p_ + "conv.pointwise_conv1.weight"] = (2 * E, E)
        s[p_ + "conv.depthwise_conv.weight"] = (E, K, 1)
        s[p_ + "conv.pointwise_conv2.weight"] = (E, E)
        if e.use_bias:
            s[p_ + "conv.pointwise_conv1.bias"] = (2 * E,)
            s[p_ + "conv.depthwise_conv.bias"] = s[p_ + "conv.pointwise_conv2.bias"] = (E,)
        stats = ("weight", "bias", "running_mean", "running_var") if e.conv_norm_type == "batch_norm" else (
            "weight", "bias")
        for stat in stats:
            s[p_ + "conv.batch_norm." + stat] = (E,)
        if e.untie_biases:
            s[p_ + "self_attn.pos_bias_u"] = s[p_ + "self_attn.pos_bias_v"] = (H, E // H)
        for lin in ("linear_q", "linear_k", "linear_v", "linear_out"):
            s[p_ + f"self_attn.{lin}.weight"] = (E, E)
            if e.use_bias:
                s[p_ + f"self_attn.{lin}.bias"] = (E,)
        s[p_ + "self_attn.linear_pos.weight"] = (E, E)
    if not e.untie_biases:
        s["encoder.pos_bias_u"] = s["encoder.pos_bias_v"] = (H, E // H)
    if config.has_projection:
        s["encoder_decoder_proj.weight"], s["encoder_decoder_proj.bias"] = (D, E), (D,)
    s["decoder.embedding.token_embedding.weight"] = (dec.vocab_size, D)
    s["decoder.embedding.position_embedding"] = (dec.max_sequence_length, D)
    s["decoder.embedding.layer_norm.weight"] = s["decoder.embedding.layer_norm.bias"] = (D,)
    for j in range(dec.num_layers):
        p_ = f"decoder.layers.{j}."
        for n in (1, 2, 3):
            s[p_ + f"layer_norm_{n}.weight"] = s[p_ + f"layer_norm_{n}.bias"] = (D,)
        for sub in ("self_attn", "cross_attn"):
            for net in ("query_net", "key_net", "value_net", "out_projection"):
                s[p_ + f"{sub}.{net}.weight"], s[p_ + f"{sub}.{net}.bias"] = (D, D), (D,)
        s[p_ + "ffn.dense_in.weight"], s[p_ + "ffn.dense_in.bias"] = (dec.inner_size, D), (dec.inner_size,)
        s[p_ + "ffn.dense_out.weight"], s[p_ + "ffn.dense_out.bias"] = (D, dec.inner_size), (D,)
    s["decoder.final_layer_norm.weight"] = s["decoder.final_layer_norm.bias"] = (D,)
    s["head.bias"] = (dec.vocab_size,)
    return s


# ---------------------------------------------------------------------------------------------------------------
# Conversion of a synthetic archive


def test_convert_tiny_aggregate(tmp_path, spm_models):
    nemo = make_nemo(tmp_path, spm_models)
    state = tiny_state(vocab_rows("agg", spm_models))
    messages = []
    out = tmp_path / "mlx"
    summary = convert(nemo, out, progress=messages.append)

    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["config.json", "model.safetensors", "nemo_config.yaml", "tokenizer_spl_tokens.model",
         "tokenizer_en.model", "tokenizer_de.model"])
    assert messages and any("writing" in m for m in messages)
    assert summary.out_dir == out.absolute() and summary.dtype == "float32" and summary.variant == "custom"
    assert summary.model_name == "tiny" and summary.source == str(nemo.resolve())
    assert summary.languages == ["en", "de"] and summary.notes == []
    assert summary.size_bytes == sum(p.stat().st_size for p in out.iterdir())
    assert "tiny" in str(summary)

    config = ModelConfig.load(out)
    assert config.prompt_format == "canary2" and config.nemo_version == "3.0.0" and config.dtype == "float32"
    assert config.tokenizer.type == "aggregate"
    assert config.tokenizer.langs == [
        {"lang": lang, "model_file": f"tokenizer_{lang}.model", "vocab_size": pieces(spm_models[lang])}
        for lang in ("spl_tokens", "en", "de")
    ]
    for lang in ("spl_tokens", "en", "de"):
        assert (out / f"tokenizer_{lang}.model").read_bytes() == spm_models[lang]
    with tarfile.open(nemo) as tar:
        assert (out / "nemo_config.yaml").read_bytes() == tar.extractfile("./model_config.yaml").read()
    p, e, d = config.preprocessor, config.encoder, config.decoder
    assert (p.sample_rate, p.n_mels, p.n_fft, p.win_length, p.hop_length, p.pad_to) == (16000, 16, 512, 400, 160, 0)
    assert (e.feat_in, e.d_model, e.n_layers, e.n_heads, e.conv_kernel_size, e.subsampling_conv_channels) == (
        16, 32, 2, 4, 9, 8)
    assert (e.subsampling_factor, e.xscaling, e.untie_biases, e.use_bias) == (8, False, True, True)
    assert (d.hidden_size, d.num_layers, d.num_heads, d.inner_size, d.max_sequence_length) == (48, 2, 4, 192, 64)
    assert d.vocab_size == vocab_rows("agg", spm_models) and config.has_projection
    assert (config.decoding.beam_size, config.decoding.length_penalty, config.decoding.max_generation_delta) == (
        1, 0.0, 50)

    weights, metadata = mx.load(str(out / "model.safetensors"), return_metadata=True)
    assert metadata.get("format") == "mlx"
    assert set(weights) == set(contract_shapes(config)) == set(expected_shapes(config))
    assert summary.num_parameters == sum(v.size for k, v in weights.items() if not k.startswith("preprocessor."))
    w = {k: np.array(v) for k, v in weights.items()}
    src = {k: v.numpy() for k, v in state.items()}

    np.testing.assert_array_equal(w["preprocessor.window"], src["preprocessor.featurizer.window"])
    np.testing.assert_array_equal(w["preprocessor.filterbank"], src["preprocessor.featurizer.fb"][0])
    for i in (0, 2, 5):
        np.testing.assert_array_equal(w[f"encoder.pre_encode.conv.{i}.weight"],
                                      src[f"encoder.pre_encode.conv.{i}.weight"].transpose(0, 2, 3, 1))
    for i in (3, 6):
        np.testing.assert_array_equal(w[f"encoder.pre_encode.conv.{i}.weight"],
                                      src[f"encoder.pre_encode.conv.{i}.weight"][:, :, 0, 0])
    # pre_encode.out: NeMo feeds (C, F') flattened channel-major, MLX (F', C) flattened frequency-major.
    x = np.random.default_rng(0).standard_normal((8, 2)).astype(np.float32)  # (C, F')
    np.testing.assert_allclose(w["encoder.pre_encode.out.weight"] @ x.T.reshape(-1),
                               src["encoder.pre_encode.out.weight"] @ x.reshape(-1), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(w["encoder.layers.1.conv.depthwise_conv.weight"],
                                  src["encoder.layers.1.conv.depthwise_conv.weight"].transpose(0, 2, 1))
    np.testing.assert_array_equal(w["encoder.layers.1.conv.pointwise_conv1.weight"],
                                  src["encoder.layers.1.conv.pointwise_conv1.weight"][..., 0])
    for key in ("encoder.layers.0.self_attn.pos_bias_u", "encoder.layers.1.conv.batch_norm.running_var",
                "encoder.layers.0.self_attn.linear_pos.weight", "encoder_decoder_proj.weight"):
        np.testing.assert_array_equal(w[key], src[key])
    np.testing.assert_array_equal(w["decoder.embedding.token_embedding.weight"],
                                  src["transf_decoder._embedding.token_embedding.weight"])
    np.testing.assert_array_equal(w["decoder.embedding.position_embedding"],
                                  src["transf_decoder._embedding.position_embedding.pos_enc"])
    np.testing.assert_array_equal(w["decoder.layers.1.cross_attn.key_net.weight"],
                                  src["transf_decoder._decoder.layers.1.second_sub_layer.key_net.weight"])
    np.testing.assert_array_equal(w["decoder.layers.0.ffn.dense_out.bias"],
                                  src["transf_decoder._decoder.layers.0.third_sub_layer.dense_out.bias"])
    np.testing.assert_array_equal(w["head.bias"], src["log_softmax.mlp.layer0.bias"])


def test_converted_model_loads_into_canary(tmp_path, tiny_nemo):
    from mlx_canary.model import Canary

    out = tmp_path / "mlx"
    convert(tiny_nemo, out)
    config = ModelConfig.load(out)
    model = Canary(config)
    model.load_weights(str(out / "model.safetensors"), strict=True)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_dtype_cast_keeps_front_end_float32(tmp_path, tiny_nemo, dtype):
    out = tmp_path / dtype
    assert convert(tiny_nemo, out, dtype=dtype).dtype == dtype
    weights = mx.load(str(out / "model.safetensors"))
    for name, value in weights.items():
        want = mx.float32 if name.startswith("preprocessor.") else getattr(mx, dtype)
        assert value.dtype == want, name
    assert ModelConfig.load(out).dtype == dtype


def test_compute_dtype_defaults_per_device(tmp_path, tiny_nemo):
    """float32 on the CPU whatever is stored (half-precision CPU matmuls are slow); half precision on a GPU."""
    from mlx_canary.loading import default_compute_dtype, load_model

    out = tmp_path / "half"
    convert(tiny_nemo, out, dtype="float16")
    config = ModelConfig.load(out)
    cpu, gpu = mx.Device(mx.DeviceType.cpu), mx.Device(mx.DeviceType.gpu)
    assert default_compute_dtype(config, cpu) == "float32"
    assert default_compute_dtype(config, gpu) == "float16"
    config.dtype = "float32"
    assert default_compute_dtype(config, gpu) == "bfloat16"
    previous = mx.default_device()
    mx.set_default_device(mx.cpu)
    try:
        assert load_model(out).engine.net.dtype == mx.float32
        assert load_model(out, dtype="float16").engine.net.dtype == mx.float16
    finally:
        mx.set_default_device(previous)


def test_bad_dtype(tmp_path, tiny_nemo):
    with pytest.raises(CanaryError, match="dtype must be one of"):
        convert(tiny_nemo, tmp_path / "x", dtype="int8")
    assert not (tmp_path / "x").exists()


def test_single_sentencepiece_tokenizer(tmp_path, spm_models):
    out = tmp_path / "spe"
    convert(make_nemo(tmp_path, spm_models, "spe"), out)
    config = ModelConfig.load(out)
    assert config.tokenizer.type == "spe"
    assert config.tokenizer.langs == [{"lang": "all", "model_file": "tokenizer.model",
                                       "vocab_size": pieces(spm_models["spe"])}]
    assert (out / "tokenizer.model").read_bytes() == spm_models["spe"]
    assert config.tokenizer.languages == ["all"]


def test_no_projection_and_gzipped_archive(tmp_path, spm_models):
    nemo = make_nemo(tmp_path, spm_models, proj=False, mode="w:gz",
                     edit_cfg=lambda c: c["transf_decoder"]["config_dict"].update(hidden_size=32, inner_size=128),
                     edit_state=lambda s: s.update(_resize_decoder(s, 32, 128)))
    out = tmp_path / "noproj"
    convert(nemo, out)
    config = ModelConfig.load(out)
    assert not config.has_projection and config.decoder.hidden_size == 32
    assert not any(k.startswith("encoder_decoder_proj") for k in mx.load(str(out / "model.safetensors")))


def _resize_decoder(state, hidden, inner):
    """Decoder tensors rebuilt at another width (keeping the embedding tied)."""
    g = torch.Generator().manual_seed(1)
    new = {}
    for k, v in state.items():
        if k.startswith(("transf_decoder.", "log_softmax.")):
            shape = [hidden if n == 48 else inner if n == 192 else n for n in v.shape]
            new[k] = torch.randn(*shape, generator=g)
    new["log_softmax.mlp.layer0.weight"] = new["transf_decoder._embedding.token_embedding.weight"]
    return new


def test_unreadable_timestamp_model_is_refused_by_name(tmp_path, spm_models):
    # canary-1b-v2's timestamps model is converted too (tests/test_aligner.py); a broken one stops the conversion
    # with a message naming it, rather than giving a model whose timestamps silently differ from NeMo's.
    cfg = tiny_yaml("spe")
    files = tokenizer_files(cfg, spm_models)
    files["timestamps_asr_model_config.yaml"] = b"x: 1\n"
    files["timestamps_asr_model_weights.ckpt"] = b"0" * 10
    nemo = write_nemo(tmp_path / "v2.nemo", cfg, tiny_state(vocab_rows("spe", spm_models)), files)
    with pytest.raises(CanaryError, match="timestamps model .*timestamps_asr_model_config.yaml"):
        convert(nemo, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------
# Strict checks


def test_untied_head_is_refused(tmp_path, spm_models):
    def untie(s):
        s["log_softmax.mlp.layer0.weight"] = s["log_softmax.mlp.layer0.weight"].clone() + 1.0

    with pytest.raises(CanaryError, match="log_softmax.mlp.layer0.weight differs"):
        convert(make_nemo(tmp_path, spm_models, edit_state=untie), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_equal_but_unshared_head_is_accepted(tmp_path, spm_models):
    def copy_head(s):
        s["log_softmax.mlp.layer0.weight"] = s["log_softmax.mlp.layer0.weight"].clone()

    convert(make_nemo(tmp_path, spm_models, edit_state=copy_head), tmp_path / "out")


def test_unknown_checkpoint_key_is_named(tmp_path, spm_models):
    def extra(s):
        s["encoder.layers.0.adapter.linear.weight"] = torch.zeros(2, 2)

    with pytest.raises(CanaryError, match=r"does not know.*encoder\.layers\.0\.adapter\.linear\.weight"):
        convert(make_nemo(tmp_path, spm_models, edit_state=extra), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_parameter_is_named(tmp_path, spm_models):
    with pytest.raises(CanaryError, match=r"missing from the checkpoint: encoder\.layers\.1\.norm_out\.bias"):
        convert(make_nemo(tmp_path, spm_models, edit_state=lambda s: s.pop("encoder.layers.1.norm_out.bias")),
                tmp_path / "out")


def test_shape_mismatch_is_named(tmp_path, spm_models):
    # 8 heads in the YAML but (4, 8) pos_bias tensors in the checkpoint
    nemo = make_nemo(tmp_path, spm_models, edit_cfg=lambda c: c["encoder"].update(n_heads=8))
    with pytest.raises(CanaryError, match=r"shape mismatches: encoder\.layers\.0\.self_attn\.pos_bias_u \(4, 8\)"):
        convert(nemo, tmp_path / "out")


def test_layer_count_mismatch(tmp_path, spm_models):
    nemo = make_nemo(tmp_path, spm_models, edit_cfg=lambda c: c["encoder"].update(n_layers=1))
    with pytest.raises(CanaryError, match=r"no parameter for: encoder\.layers\.1\."):
        convert(nemo, tmp_path / "out")


def test_dropped_keys():
    state = {
        "encoder.layers.3.conv.batch_norm.num_batches_tracked": np.array(5),
        "transf_decoder._embedding.token_type_embedding.weight": np.zeros((2, 4), np.float32),
        "log_softmax.mlp.layer0.weight": np.ones((8, 4), np.float32),
        "transf_decoder._embedding.token_embedding.weight": np.ones((8, 4), np.float32),
    }
    assert set(map_weights(state)) == {"decoder.embedding.token_embedding.weight"}


def test_shared_pos_bias_is_stored_once(tmp_path, spm_models):
    """untie_biases=false: NeMo's state dict repeats the one shared Parameter under every layer."""

    def share(s):
        for which in ("u", "v"):
            shared = s[f"encoder.layers.0.self_attn.pos_bias_{which}"]
            for i in range(DIMS["enc_layers"]):
                s[f"encoder.layers.{i}.self_attn.pos_bias_{which}"] = shared

    out = tmp_path / "out"
    nemo = make_nemo(tmp_path, spm_models, edit_cfg=lambda c: c["encoder"].update(untie_biases=False),
                     edit_state=share)
    convert(nemo, out)
    weights = mx.load(str(out / "model.safetensors"))
    assert not any("self_attn.pos_bias" in k for k in weights)
    assert weights["encoder.pos_bias_u"].shape == (4, 8)
    # the same config with per-layer values that differ cannot be a NeMo untie_biases=false checkpoint
    nemo = make_nemo(tmp_path, spm_models, edit_cfg=lambda c: c["encoder"].update(untie_biases=False),
                     name="bad.nemo")
    with pytest.raises(CanaryError, match="pos_bias_u tensors differ"):
        convert(nemo, tmp_path / "out2")


def test_check_weights_reports_all_problems():
    weights = {"a": np.zeros((2, 3)), "b": np.zeros(4), "extra": np.zeros(1)}
    with pytest.raises(CanaryError) as err:
        check_weights(weights, {"a": (3, 2), "b": (4,), "missing": (1,)})
    msg = str(err.value)
    assert "no parameter for: extra" in msg and "missing from the checkpoint: missing" in msg
    assert "a (2, 3) (model expects (3, 2))" in msg
    check_weights({"a": np.zeros((3, 2))}, {"a": (3, 2)})


@pytest.mark.parametrize("variant", ["proj", "layer_norm_no_bias", "untied_biases_false"])
def test_model_parameter_tree_matches_weights_contract(spm_models, variant):
    """Canary(config) (model.py) exposes exactly the WEIGHTS.md contract the converter produces."""
    cfg = tiny_yaml("agg")
    if variant == "layer_norm_no_bias":
        cfg["encoder"].update(conv_norm_type="layer_norm", use_bias=False)
    if variant == "untied_biases_false":
        cfg["encoder"].update(untie_biases=False, xscaling=True)
    state = {k: v.numpy() for k, v in tiny_state(vocab_rows("agg", spm_models)).items()}
    from mlx_canary.config import TokenizerConfig

    langs = [{"lang": lang, "model_file": "", "vocab_size": pieces(spm_models[lang])}
             for lang in ("spl_tokens", "en", "de")]
    tok = TokenizerConfig(type="aggregate", langs=langs)
    config = build_config(cfg, state, tok)
    assert expected_shapes(config) == contract_shapes(config)


# ---------------------------------------------------------------------------------------------------------------
# Config derivation


def _set(cfg: dict, dotted: str, value):
    node = cfg
    *path, last = dotted.split(".")
    for key in path:
        node = node[key]
    if value is _DELETE:
        node.pop(last, None)
    else:
        node[last] = value


_DELETE = object()


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("encoder.self_attention_model", "abs_pos", "encoder.self_attention_model"),
        ("encoder.subsampling", "striding", "encoder.subsampling"),
        ("encoder.att_context_size", [70, 1], "encoder.att_context_size"),
        ("encoder.att_context_size", [[70, 13], [70, 1]], "encoder.att_context_size"),
        ("encoder.causal_downsampling", True, "encoder.causal_downsampling"),
        ("encoder.conv_context_size", "causal", "encoder.conv_context_size"),
        ("encoder.conv_norm_type", "group_norm", "encoder.conv_norm_type"),
        ("encoder.subsampling_factor", 6, "encoder.subsampling_factor"),
        ("encoder.feat_out", 64, "encoder.feat_out"),
        ("encoder._target_", "nemo.collections.asr.modules.SqueezeformerEncoder", "encoder._target_"),
        ("preprocessor.window", "hamming", "preprocessor.window"),
        ("preprocessor.frame_splicing", 3, "preprocessor.frame_splicing"),
        ("preprocessor.exact_pad", True, "preprocessor.exact_pad"),
        ("preprocessor.normalize", "fixed", "preprocessor.normalize"),
        ("preprocessor.pad_to", "max", "preprocessor.pad_to"),
        ("preprocessor.log_zero_guard_type", "mul", "preprocessor.log_zero_guard_type"),
        ("preprocessor._target_", "nemo.collections.asr.modules.AudioToMFCCPreprocessor", "preprocessor._target_"),
        ("sample_rate", 8000, "sample_rate"),
        ("transf_encoder.num_layers", 2, "transf_encoder.num_layers"),
        ("transf_decoder.config_dict.pre_ln", False, "pre_ln"),
        ("transf_decoder.config_dict.learn_positional_encodings", True, "learn_positional_encodings"),
        ("transf_decoder.config_dict.hidden_act", "swish", "hidden_act"),
        ("transf_decoder.pre_ln_final_layer_norm", False, "pre_ln_final_layer_norm"),
        ("transf_decoder.config_dict.num_attention_heads", _DELETE, "num_attention_heads is missing"),
        ("head.num_layers", 2, "head.num_layers"),
        ("prompt_format", "llama", "prompt_format"),
        ("decoding.strategy", "maes", "decoding.strategy"),
        ("tokenizer.type", "wpe", "tokenizer.type"),
        ("encoder.feat_in", 80, "feat_in"),
        ("encoder", _DELETE, "no 'encoder' section"),
        ("target", "nemo.collections.asr.models.EncDecRNNTBPEModel", "not a Canary checkpoint"),
    ],
)
def test_unsupported_config_is_refused(tmp_path, spm_models, key, value, match):
    nemo = make_nemo(tmp_path, spm_models, edit_cfg=lambda c: _set(c, key, value))
    with pytest.raises(CanaryError, match=match):
        convert(nemo, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_tokenizer_vocab_must_match_embedding(tmp_path, spm_models):
    def swap(c):
        c["tokenizer"]["langs"]["de"]["model_path"] = c["tokenizer"]["langs"]["spl_tokens"]["model_path"]

    with pytest.raises(CanaryError, match="tokenizer has .* tokens but the decoder has"):
        convert(make_nemo(tmp_path, spm_models, edit_cfg=swap), tmp_path / "out")


def test_missing_tokenizer_file_is_named(tmp_path, spm_models):
    def rename(c):
        c["tokenizer"]["langs"]["en"]["model_path"] = "nemo:missing_tokenizer.model"

    with pytest.raises(CanaryError, match="missing_tokenizer.model"):
        convert(make_nemo(tmp_path, spm_models, edit_cfg=rename), tmp_path / "out")


def test_unsafe_language_name_is_refused(tmp_path, spm_models):
    def evil(c):
        c["tokenizer"]["langs"] = {("../x" if k == "en" else k): v for k, v in c["tokenizer"]["langs"].items()}

    with pytest.raises(CanaryError, match="language names"):
        convert(make_nemo(tmp_path, spm_models, edit_cfg=evil), tmp_path / "out")


def test_preprocessor_uses_nemo_class_defaults():
    cfg = {"preprocessor": {"features": 80, "window_size": 0.025}}
    p = preprocessor_config(cfg)
    # absent keys take AudioToMelSpectrogramPreprocessor's defaults, not released-model values
    assert (p.n_mels, p.win_length, p.hop_length, p.n_fft, p.pad_to) == (80, 400, 160, 512, 16)
    assert (p.normalize, p.preemph, p.log, p.log_zero_guard_type, p.mag_power) == ("per_feature", 0.97, True, "add",
                                                                                   2.0)
    assert p.log_zero_guard_value == 2.0**-24
    p = preprocessor_config({"preprocessor": {"window_size": None, "n_window_size": 320, "window_stride": None,
                                              "n_window_stride": 80, "log_zero_guard_value": "tiny",
                                              "normalize": None, "preemph": None, "n_fft": None}})
    assert (p.win_length, p.hop_length, p.n_fft, p.normalize, p.preemph) == (320, 80, 512, "none", None)
    assert p.log_zero_guard_value == float(np.finfo(np.float32).tiny)
    assert preprocessor_config({"preprocessor": {"window_size": 0.02, "sample_rate": 8000}}).win_length == 160
    with pytest.raises(CanaryError, match="both window_size and n_window_size"):
        preprocessor_config({"preprocessor": {"n_window_size": 400}})  # window_size defaults to 0.02 in NeMo


def test_encoder_uses_conformer_defaults():
    e = encoder_config({"encoder": {"feat_in": 80, "n_layers": 3, "d_model": 256, "subsampling": "dw_striding"}})
    assert (e.n_heads, e.conv_kernel_size, e.subsampling_factor, e.subsampling_conv_channels) == (4, 31, 4, 256)
    assert (e.xscaling, e.untie_biases, e.use_bias, e.ff_expansion_factor, e.pos_emb_max_len) == (
        True, True, True, 4, 5000)
    with pytest.raises(CanaryError, match="encoder.d_model is missing"):
        encoder_config({"encoder": {"feat_in": 80, "n_layers": 3}})


@pytest.mark.parametrize(
    "block,expected",
    [
        (None, (1, 0.0, -1)),  # NeMo falls back to MultiTaskDecodingConfig
        ({"strategy": "beam", "beam": {"beam_size": 1, "len_pen": 0.5, "max_generation_delta": 50}}, (1, 0.0, 50)),
        ({"strategy": "beam", "beam": {"beam_size": 4, "length_penalty": 0.5}}, (4, 0.5, -1)),
        ({"strategy": "greedy_batch", "greedy": {"max_generation_delta": 20},
          "beam": {"beam_size": 5, "max_generation_delta": 9}}, (1, 0.0, 20)),
        ({"strategy": "greedy"}, (1, 0.0, -1)),
    ],
)
def test_decoding_block(block, expected):
    d = decoding_config({"decoding": block})
    assert (d.beam_size, d.length_penalty, d.max_generation_delta) == expected


# ---------------------------------------------------------------------------------------------------------------
# Output directory handling


def test_refuses_non_empty_out_dir(tmp_path, tiny_nemo):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(CanaryError, match="not empty"):
        convert(tiny_nemo, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(CanaryError, match="not a directory"):
        convert(tiny_nemo, tmp_path / "file")


def test_empty_out_dir_and_overwrite(tmp_path, tiny_nemo):
    out = tmp_path / "out"
    out.mkdir()
    inode = out.stat().st_ino
    convert(tiny_nemo, out)
    assert out.stat().st_ino == inode  # an empty directory is filled, not swapped (it may be the shell's cwd)
    (out / "README.md").write_text("model card")  # what `convert --upload-repo` adds
    convert(tiny_nemo, out, dtype="float16", overwrite=True)
    assert not (out / "README.md").exists()
    assert ModelConfig.load(out).dtype == "float16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "tiny.nemo"]


def test_overwrite_keeps_a_users_file_beside_the_model(tmp_path, tiny_nemo):
    """A file convert did not write is someone's: --overwrite refuses instead of deleting it with the model."""
    out = tmp_path / "out"
    convert(tiny_nemo, out)
    (out / "stale.txt").write_text("mine")
    (out / "notes").mkdir()
    before = snapshot(tmp_path)
    with pytest.raises(CanaryError, match=r"holds a model but also notes/, stale\.txt, which --overwrite would"):
        convert(tiny_nemo, out, dtype="float16", overwrite=True)
    assert snapshot(tmp_path) == before


def snapshot(root: Path) -> dict:
    """Every path under ``root`` with its bytes (None for directories)."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("overwrite", [False, True])
def test_source_inside_out_dir_is_never_deleted(tmp_path, tiny_nemo, overwrite):
    """Issue 12: `convert --overwrite ~/models/x.nemo ~/models` deleted the source and the user's file beside it."""
    models = tmp_path / "models"
    models.mkdir()
    source = tiny_nemo.rename(models / "x.nemo")
    (models / "notes.txt").write_text("mine")
    link = tmp_path / "link"
    link.symlink_to(models, target_is_directory=True)
    before = snapshot(tmp_path)
    for out in (models, tmp_path, models / "x.nemo"):  # the source's directory, an ancestor, the source itself
        with pytest.raises(CanaryError, match="inside the output directory"):
            convert(source, out, overwrite=overwrite)
    with pytest.raises(CanaryError, match="inside the output directory"):
        convert(models, models, overwrite=overwrite)  # a directory source holding one .nemo
    with pytest.raises(CanaryError, match="inside the output directory"):
        convert(source, link, overwrite=overwrite)  # a symlink to the source's directory
    with pytest.raises(CanaryError, match="inside the output directory"):
        convert(link / "x.nemo", models, overwrite=overwrite)  # the source through a symlink
    assert snapshot(tmp_path) == before


def test_overwrite_refuses_what_is_not_a_converted_model(tmp_path, tiny_nemo, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    (home / "photo.jpg").write_bytes(b"\xff\xd8")
    (home / "config.json").write_text('{"model_type": "bert"}')  # another tool's model directory
    (home / "model.safetensors").write_bytes(b"x")
    before = snapshot(tmp_path)
    with pytest.raises(CanaryError, match=r"home is not an mlx-canary model directory \(its config\.json is not"):
        convert(tiny_nemo, home, overwrite=True)
    with pytest.raises(CanaryError, match="already exists and is not empty: choose a new or empty"):
        convert(tiny_nemo, home)
    assert snapshot(tmp_path) == before
    # An mlx-canary config beside weights some other program wrote (no MLX format marker) is not ours either.
    model = tmp_path / "model"
    convert(tiny_nemo, model)
    (home / "config.json").write_bytes((model / "config.json").read_bytes())
    (home / "photo.jpg").unlink()
    with pytest.raises(CanaryError, match="no model.safetensors written by mlx-canary"):
        convert(tiny_nemo, home, overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(CanaryError, match="exists and is not a directory"):
        convert(tiny_nemo, tmp_path / "file", overwrite=True)
    assert (tmp_path / "file").read_text() == "x"
    with pytest.raises(CanaryError, match="inside the output directory /;"):
        convert(tiny_nemo, "/", overwrite=True)  # every path is inside /
    monkeypatch.chdir(model)  # replacing the current directory would leave the shell in a deleted one
    with pytest.raises(CanaryError, match="is the current directory"):
        convert(tiny_nemo, ".", overwrite=True)
    assert (model / "config.json").is_file()
    assert (home / "config.json").is_file() and (home / "model.safetensors").read_bytes() == b"x"


def test_unlistable_out_dir(tmp_path, tiny_nemo, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    iterdir = Path.iterdir

    def refuse(self):  # as a directory without read permission answers (chmod 0 does not stop root)
        if self == locked:
            raise PermissionError(13, "Permission denied", str(self))
        return iterdir(self)

    monkeypatch.setattr(Path, "iterdir", refuse)
    with pytest.raises(CanaryError, match="cannot use .*locked as the output directory: .*Permission denied"):
        convert(tiny_nemo, locked, overwrite=True)


def test_symlink_loop_as_out_dir(tmp_path, tiny_nemo):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    with pytest.raises(CanaryError, match="cannot resolve .*loop"):
        convert(tiny_nemo, loop, overwrite=True)
    assert loop.is_symlink()


def test_overwrite_through_a_symlink_replaces_the_target(tmp_path, tiny_nemo):
    real = tmp_path / "real"
    convert(tiny_nemo, real)
    link = tmp_path / "current"
    link.symlink_to(real, target_is_directory=True)
    summary = convert(tiny_nemo, link, dtype="float16", overwrite=True)
    assert link.is_symlink() and summary.out_dir == real
    assert ModelConfig.load(real).dtype == "float16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current", "real", "tiny.nemo"]


def test_files_added_during_the_conversion_stop_the_replacement(tmp_path, tiny_nemo, monkeypatch):
    out = tmp_path / "out"
    convert(tiny_nemo, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    save = convert_mod._save_safetensors

    def save_then_user_writes(path, arrays):
        save(path, arrays)
        (out / "late.txt").write_text("written while converting")

    monkeypatch.setattr(convert_mod, "_save_safetensors", save_then_user_writes)
    with pytest.raises(CanaryError, match="late.txt"):
        convert(tiny_nemo, out, dtype="float16", overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {**before, "late.txt": b"written while converting"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "tiny.nemo"]  # no partial or old directory left


def _failing_save(path, arrays):
    Path(path).write_bytes(b"partial")
    raise OSError("No space left on device")


def test_failure_mid_write_leaves_no_out_dir(tmp_path, tiny_nemo, monkeypatch):
    monkeypatch.setattr(convert_mod, "_save_safetensors", _failing_save)
    out = tmp_path / "models" / "out"
    with pytest.raises(CanaryError, match="cannot write the model to .*No space left"):
        convert(tiny_nemo, out)
    assert not out.exists()
    assert list((tmp_path / "models").iterdir()) == []  # no hidden partial directory either


def test_failure_mid_write_keeps_previous_model(tmp_path, tiny_nemo, monkeypatch):
    out = tmp_path / "out"
    convert(tiny_nemo, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(convert_mod, "_save_safetensors", _failing_save)
    with pytest.raises(CanaryError, match="No space left"):
        convert(tiny_nemo, out, dtype="float16", overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "tiny.nemo"]


def test_malicious_checkpoint_in_nemo(tmp_path, spm_models):
    marker = tmp_path / "pwned"
    cmd = f"touch {marker}".encode()
    evil = b"\x80\x02cos\nsystem\nX" + len(cmd).to_bytes(4, "little") + cmd + b"\x85R."
    buf = io.BytesIO()
    import zipfile

    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("model_weights/data.pkl", evil)
        zf.writestr("model_weights/byteorder", "little")
    cfg = tiny_yaml("agg")
    path = tmp_path / "evil.nemo"
    with tarfile.open(path, "w:") as tar:
        _add(tar, "./model_config.yaml", yaml.safe_dump(cfg).encode())
        _add(tar, "./model_weights.ckpt", buf.getvalue())
        for name, data in tokenizer_files(cfg, spm_models).items():
            _add(tar, "./" + name, data)
    with pytest.raises(CanaryError, match=r"os\.system, which is not a tensor type"):
        convert(path, tmp_path / "out")
    assert not marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.nemo"]


@pytest.mark.parametrize("member", ["../evil", "symlink"])
def test_unsafe_nemo_writes_nothing(tmp_path, member):
    work = tmp_path / "work"
    work.mkdir()
    path = work / "bad.nemo"
    with tarfile.open(path, "w:") as tar:
        _add(tar, "./model_config.yaml", b"a: 1\n")
        if member == "symlink":
            info = tarfile.TarInfo("./model_weights.ckpt")
            info.type, info.linkname = tarfile.SYMTYPE, "../../outside"
            tar.addfile(info)
        else:
            _add(tar, member, b"owned")
    with pytest.raises(CanaryError, match="unsafe .nemo archive"):
        convert(path, work / "out")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["bad.nemo", "work"]


# ---------------------------------------------------------------------------------------------------------------
# Sources: local paths and Hugging Face repo ids (monkeypatched, never the network)


def test_missing_local_source(tmp_path):
    with pytest.raises(CanaryError, match="no such file"):
        convert(tmp_path / "nope.nemo", tmp_path / "out")
    with pytest.raises(CanaryError, match="not a Hugging Face repo id"):
        convert("not a repo id", tmp_path / "out")


def test_directory_source_with_one_nemo(tmp_path, tiny_nemo):
    summary = convert(tmp_path, tmp_path / "out")
    assert summary.model_name == "tiny"


def test_generic_file_name_uses_directory_name(tmp_path, tiny_nemo):
    (tmp_path / "canary-small").mkdir()
    nemo = tiny_nemo.rename(tmp_path / "canary-small" / "model.nemo")
    assert convert(nemo, tmp_path / "out").model_name == "canary-small"


def test_unwritable_parent(tmp_path, tiny_nemo):
    (tmp_path / "blocker").write_text("a file, not a directory")
    with pytest.raises(CanaryError, match="cannot create"):
        convert(tiny_nemo, tmp_path / "blocker" / "out")


def _hf_error(cls_name: str, message: str = "boom"):
    from huggingface_hub import errors

    cls = getattr(errors, cls_name)
    exc = cls.__new__(cls)
    Exception.__init__(exc, message)
    return exc


@pytest.fixture
def fake_hub(monkeypatch, tiny_nemo):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    calls = {"download": []}
    state = {"files": ["README.md", ".gitattributes", "canary-tiny.nemo"], "list_error": None,
             "snapshot": None}

    def list_repo_files(repo_id, revision=None, token=None, **kw):
        if state["list_error"] is not None:
            raise state["list_error"]
        if repo_id != "nvidia/canary-tiny":
            raise _hf_error("RepositoryNotFoundError", "404")
        return list(state["files"])

    def hf_hub_download(repo_id, filename, revision=None, cache_dir=None, token=None, **kw):
        calls["download"].append((repo_id, filename, revision))
        return str(tiny_nemo)

    def snapshot_download(repo_id, revision=None, cache_dir=None, allow_patterns=None, local_files_only=False, **kw):
        assert local_files_only
        if state["snapshot"] is None:
            raise _hf_error("LocalEntryNotFoundError", "not cached")
        return str(state["snapshot"])

    monkeypatch.setattr(huggingface_hub, "list_repo_files", list_repo_files)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return state, calls


def test_hf_repo_id_source(tmp_path, fake_hub):
    state, calls = fake_hub
    summary = convert("nvidia/canary-tiny", tmp_path / "out", revision="main")
    assert calls["download"] == [("nvidia/canary-tiny", "canary-tiny.nemo", "main")]
    assert summary.source == "nvidia/canary-tiny@main" and summary.model_name == "canary-tiny"
    config = ModelConfig.load(tmp_path / "out")
    assert config.source == "nvidia/canary-tiny@main" and config.model_name == "canary-tiny"


def test_hf_errors(tmp_path, fake_hub):
    state, calls = fake_hub
    with pytest.raises(CanaryError, match="nvidia/missing not found"):
        convert("nvidia/missing", tmp_path / "out")
    state["files"] = ["README.md", "model.safetensors"]
    with pytest.raises(CanaryError, match="has no .nemo file"):
        convert("nvidia/canary-tiny", tmp_path / "out")
    state["files"] = ["a.nemo", "b.nemo"]
    with pytest.raises(CanaryError, match=r"several \.nemo files \(a\.nemo, b\.nemo\)"):
        convert("nvidia/canary-tiny", tmp_path / "out")
    state["files"] = ["a.nemo", "canary-tiny.nemo"]
    convert("nvidia/canary-tiny", tmp_path / "out")  # the one named after the repo wins
    assert calls["download"][-1][1] == "canary-tiny.nemo"
    state["list_error"] = _hf_error("GatedRepoError", "403")
    with pytest.raises(CanaryError, match="gated"):
        convert("nvidia/canary-tiny", tmp_path / "out2")
    assert not (tmp_path / "out2").exists()


@pytest.mark.parametrize("error", ["oserror", "httpx", "offline"])
def test_hf_network_errors(tmp_path, fake_hub, error):
    state, _ = fake_hub
    if error == "httpx":
        httpx = pytest.importorskip("httpx")
        state["list_error"] = httpx.ConnectError("Name or service not known")
    elif error == "offline":
        state["list_error"] = _hf_error("OfflineModeIsEnabled", "HF_HUB_OFFLINE=1")
    else:
        state["list_error"] = ConnectionError("Network is unreachable")
    with pytest.raises(CanaryError, match="cannot download nvidia/canary-tiny"):
        convert("nvidia/canary-tiny", tmp_path / "out")


def test_hf_offline_uses_cached_copy(tmp_path, fake_hub, tiny_nemo):
    state, calls = fake_hub
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    (snapshot / "canary-tiny.nemo").write_bytes(tiny_nemo.read_bytes())
    state["snapshot"] = snapshot
    state["list_error"] = ConnectionError("offline")
    convert("nvidia/canary-tiny", tmp_path / "out")
    assert calls["download"] == []


def test_hub_non_network_bug_is_not_hidden(monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")

    def broken(*a, **k):
        raise TypeError("programming error")

    monkeypatch.setattr(huggingface_hub, "list_repo_files", broken)
    with pytest.raises(TypeError):
        hub.download_nemo("nvidia/canary-tiny")


def test_looks_like_repo_id(tmp_path):
    assert hub.looks_like_repo_id("nvidia/canary-1b-flash")
    assert not hub.looks_like_repo_id("model.nemo")
    assert not hub.looks_like_repo_id("dir/model.nemo")
    assert not hub.looks_like_repo_id("/abs/path")
    assert not hub.looks_like_repo_id("a/b/c")


# ---------------------------------------------------------------------------------------------------------------
# Parity: real NeMo-built archives from the oracle

ORACLE_VARIANTS = ["agg_canary2_proj", "agg_canary1", "spe_canary2"]


@pytest.mark.parity
@pytest.mark.parametrize("variant", ORACLE_VARIANTS)
def test_convert_nemo_built_archive(oracle_dir, variant, tmp_path):
    pytest.importorskip("nemo")
    nemo_file = Path(oracle_dir) / variant / "model.nemo"
    ref = json.loads((Path(oracle_dir) / variant / "reference.json").read_text())
    out = tmp_path / variant
    summary = convert(nemo_file, out)
    config = ModelConfig.load(out)

    c = ref["config"]
    assert config.prompt_format == c["prompt_format"]
    assert (config.preprocessor.n_mels, config.preprocessor.pad_to) == (c["n_mels"], c["pad_to"])
    e = c["encoder"]
    assert (config.encoder.d_model, config.encoder.n_layers, config.encoder.n_heads) == (
        e["d_model"], e["n_layers"], e["n_heads"])
    assert (config.encoder.subsampling_conv_channels, config.encoder.conv_kernel_size, config.encoder.xscaling) == (
        e["subsampling_conv_channels"], e["conv_kernel_size"], e["xscaling"])
    d = c["decoder"]
    assert (config.decoder.hidden_size, config.decoder.inner_size, config.decoder.num_layers,
            config.decoder.num_heads, config.decoder.max_sequence_length) == (
        d["hidden"], d["inner"], d["layers"], d["heads"], d["max_sequence_length"])
    assert config.has_projection == c["encoder_decoder_proj"]
    assert config.decoder.vocab_size == c["head_rows"]
    assert sum(x["vocab_size"] for x in config.tokenizer.langs) == c["vocab_size"]
    eff = ref["decoding"]["effective"]
    assert config.decoding.max_generation_delta == eff["max_delta_length"]
    if "beam_size" in eff:
        assert (config.decoding.beam_size, config.decoding.length_penalty) == (eff["beam_size"],
                                                                               eff["length_penalty"])
    assert summary.num_parameters > 0

    # Every stored tensor equals NeMo's, through the documented layout change.
    from mlx_canary.nemo_archive import NemoArchive

    with NemoArchive(nemo_file) as archive:
        state = archive.state_dict()
    weights = {k: np.array(v) for k, v in mx.load(str(out / "model.safetensors")).items()}
    expected = map_weights(state)
    assert set(weights) == set(expected)
    for k in weights:
        np.testing.assert_array_equal(weights[k], np.asarray(expected[k]), err_msg=k)
    _check_against_torch(nemo_file, state)


def _check_against_torch(nemo_file: Path, state: dict) -> None:
    """The allow-listed reader returns exactly what torch.load returns for the same checkpoint."""
    with tarfile.open(nemo_file) as tar:
        blob = tar.extractfile("./model_weights.ckpt").read()
    reference = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    assert list(reference) == list(state)
    for k, v in reference.items():
        np.testing.assert_array_equal(state[k], v.numpy(), err_msg=k)
