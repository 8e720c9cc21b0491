"""NeMo ``.nemo`` -> MLX model directory: config derivation, weight-name/layout mapping, strict check, writing.

``convert(source, out_dir)`` reads a local ``.nemo`` (or downloads one from a Hugging Face repo), derives a
``ModelConfig`` from ``model_config.yaml`` and tensor shapes, maps every checkpoint tensor through one rule
table (``WEIGHT_RULES``, the contract written down in WEIGHTS.md), checks the result against the parameter
tree of ``Canary(config)`` (same keys, same shapes, nothing left over) and writes ``config.json``,
``model.safetensors``, the SentencePiece files and the original YAML (``nemo_config.yaml``); canary-1b-v2's
timestamps model (a CTC aligner, ``read_aligner``) goes beside it as ``aligner.safetensors`` + its SentencePiece
file, described by config.json's ``aligner`` section (null when the archive has none). Everything is
written to a hidden sibling directory first and renamed into place at the end, so a failed run leaves no
partial model directory; ``model_dir`` decides what an existing output directory may be (``overwrite`` replaces
only a converted model, never the input or anything else).

Unsupported architectures (anything a released Canary does not use and the MLX engine does not implement)
are refused with a ``CanaryError`` naming the YAML key, rather than converted into a model that would run
differently from NeMo.

dtype: float weights are stored in the requested dtype, except the preprocessor's window and mel filterbank
(``preprocessor.*``), which stay float32 because the front end runs in float32 (as NeMo's does).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional, Union

import numpy as np
import yaml

from .config import (
    WEIGHTS_FILE,
    AlignerConfig,
    DecoderConfig,
    DecodingConfig,
    EncoderConfig,
    ModelConfig,
    PreprocessorConfig,
    TokenizerConfig,
)
from .errors import CanaryError
from .model import Canary
from .model_dir import NEMO_CONFIG_COPY, check_out_dir, check_outside, install, output_path
from .nemo_archive import ALIGNER_CONFIG_MEMBER, ALIGNER_WEIGHTS_MEMBER, CONFIG_MEMBER, NemoArchive
from .quantize import check_settings as check_quantization
from .quantize import quantize_weights

logger = logging.getLogger(__name__)

DTYPES = ("float32", "float16", "bfloat16")
ProgressFn = Callable[[str], None]

# Architectures of the released models, to name what was converted (never used to fill the config).
KNOWN_VARIANTS = {
    # name: (encoder layers, encoder width, decoder layers, tokenizer type, prompt format)
    "canary-1b": (24, 1024, 24, "aggregate", "canary"),
    "canary-1b-flash": (32, 1024, 4, "aggregate", "canary2"),
    "canary-180m-flash": (17, 512, 4, "aggregate", "canary2"),
    "canary-1b-v2": (32, 1024, 8, "spe", "canary2"),
}


# ---------------------------------------------------------------------------------------------------------------
# Weight mapping: one table of (NeMo key pattern, MLX key template or None = same key, layout transform).

DROP = "drop"
TIED = "tied"  # the head weight: must equal the token embedding; not stored (the model reuses the embedding)


def _same(w: np.ndarray, ctx: dict) -> np.ndarray:
    return w


def _squeeze_batch(w: np.ndarray, ctx: dict) -> np.ndarray:
    # (1, n_mels, n_fft/2+1) -> (n_mels, n_fft/2+1)
    return w.reshape(w.shape[1:]) if w.ndim == 3 and w.shape[0] == 1 else w


def _conv2d(w: np.ndarray, ctx: dict) -> np.ndarray:
    if w.ndim != 4:
        return w  # shape check reports it
    if w.shape[2:] == (1, 1) and w.shape[1] != 1:
        return w.reshape(w.shape[0], w.shape[1])  # pointwise 1x1 conv applied as a matmul: (O, I)
    return w.transpose(0, 2, 3, 1)  # torch (O, I/g, kH, kW) -> MLX (O, kH, kW, I/g)


def _pre_encode_out(w: np.ndarray, ctx: dict) -> np.ndarray:
    # NeMo flattens (C, F') channel-major (c*F' + f); the NHWC MLX stack yields (F', C): permute the columns.
    channels = ctx["channels"]
    if w.ndim != 2 or channels <= 0 or w.shape[1] % channels:
        return w
    d, cf = w.shape
    return w.reshape(d, channels, cf // channels).transpose(0, 2, 1).reshape(d, cf)


def _conv1d_pointwise(w: np.ndarray, ctx: dict) -> np.ndarray:
    return w.reshape(w.shape[:-1]) if w.ndim == 3 and w.shape[-1] == 1 else w  # (O, I, 1) -> (O, I)


def _conv1d_depthwise(w: np.ndarray, ctx: dict) -> np.ndarray:
    return w.transpose(0, 2, 1) if w.ndim == 3 else w  # (d, 1, K) -> (d, K, 1)


_ENC = r"encoder\.layers\.(\d+)\."
_DEC = r"transf_decoder\._decoder\.layers\.(\d+)\."
_ATTN = r"(query_net|key_net|value_net|out_projection)\.(weight|bias)"

WEIGHT_RULES: list[tuple[str, Optional[str], Union[Callable, str]]] = [
    # preprocessor buffers
    (r"preprocessor\.featurizer\.window", "preprocessor.window", _same),
    (r"preprocessor\.featurizer\.fb", "preprocessor.filterbank", _squeeze_batch),
    # dw_striding subsampling
    (r"encoder\.pre_encode\.conv\.\d+\.weight", None, _conv2d),
    (r"encoder\.pre_encode\.conv\.\d+\.bias", None, _same),
    (r"encoder\.pre_encode\.out\.weight", None, _pre_encode_out),
    (r"encoder\.pre_encode\.out\.bias", None, _same),
    # conformer layers
    (_ENC + r"(norm_feed_forward1|norm_conv|norm_self_att|norm_feed_forward2|norm_out)\.(weight|bias)", None, _same),
    (_ENC + r"feed_forward[12]\.linear[12]\.(weight|bias)", None, _same),
    (_ENC + r"conv\.pointwise_conv[12]\.weight", None, _conv1d_pointwise),
    (_ENC + r"conv\.depthwise_conv\.weight", None, _conv1d_depthwise),
    (_ENC + r"conv\.(pointwise_conv[12]|depthwise_conv)\.bias", None, _same),
    (_ENC + r"conv\.batch_norm\.(weight|bias|running_mean|running_var)", None, _same),
    (_ENC + r"conv\.batch_norm\.num_batches_tracked", None, DROP),
    (_ENC + r"self_attn\.linear_(q|k|v|out)\.(weight|bias)", None, _same),
    (_ENC + r"self_attn\.linear_pos\.weight", None, _same),
    (_ENC + r"self_attn\.pos_bias_[uv]", None, _same),
    (r"encoder\.pos_bias_[uv]", None, _same),
    # (the preprocessor and encoder rules end here: ALIGNER_RULES reuses them)
    # projection encoder width -> decoder width (only when they differ)
    (r"encoder_decoder_proj\.(weight|bias)", None, _same),
    # decoder embedding
    (r"transf_decoder\._embedding\.token_embedding\.weight", "decoder.embedding.token_embedding.weight", _same),
    (r"transf_decoder\._embedding\.position_embedding\.pos_enc", "decoder.embedding.position_embedding", _same),
    (r"transf_decoder\._embedding\.layer_norm\.(weight|bias)", r"decoder.embedding.layer_norm.\1", _same),
    (r"transf_decoder\._embedding\.token_type_embedding\.weight", None, DROP),  # training only
    # decoder blocks
    (_DEC + r"(layer_norm_[123])\.(weight|bias)", r"decoder.layers.\1.\2.\3", _same),
    (_DEC + r"first_sub_layer\." + _ATTN, r"decoder.layers.\1.self_attn.\2.\3", _same),
    (_DEC + r"second_sub_layer\." + _ATTN, r"decoder.layers.\1.cross_attn.\2.\3", _same),
    (_DEC + r"third_sub_layer\.(dense_in|dense_out)\.(weight|bias)", r"decoder.layers.\1.ffn.\2.\3", _same),
    (r"transf_decoder\._decoder\.final_layer_norm\.(weight|bias)", r"decoder.final_layer_norm.\1", _same),
    # head
    (r"log_softmax\.mlp\.layer0\.weight", None, TIED),
    (r"log_softmax\.mlp\.layer0\.bias", "head.bias", _same),
]
_ENCODER_RULES_END = next(i for i, (p, _, _) in enumerate(WEIGHT_RULES) if p.startswith("encoder_decoder_proj"))
_COMPILED_RULES = [(re.compile(p), t, f) for p, t, f in WEIGHT_RULES]

# canary-1b-v2's timestamps model: the same preprocessor and FastConformer names, and a ConvASRDecoder head whose
# 1x1 convolution (V+1, d, 1) is a Linear (V+1, d).
ALIGNER_HEAD_RULES = [
    (r"decoder\.decoder_layers\.0\.weight", "head.weight", _conv1d_pointwise),
    (r"decoder\.decoder_layers\.0\.bias", "head.bias", _same),
]
_COMPILED_ALIGNER_RULES = [(re.compile(p), t, f) for p, t, f in WEIGHT_RULES[:_ENCODER_RULES_END] + ALIGNER_HEAD_RULES]

TOKEN_EMBEDDING = "transf_decoder._embedding.token_embedding.weight"
HEAD_WEIGHT = "log_softmax.mlp.layer0.weight"
POS_ENC = "transf_decoder._embedding.position_embedding.pos_enc"


def _key_list(keys, limit: int = 12) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def map_weights(state: Mapping[str, np.ndarray], *, shared_pos_bias: bool = False, rules=None) -> dict[str, np.ndarray]:
    """NeMo state dict -> MLX names and layouts (numpy; views where possible).

    ``shared_pos_bias`` (encoder ``untie_biases: false``): NeMo shares one pos_bias_u/v Parameter between all
    layers, and its state dict repeats it under every ``encoder.layers.i.self_attn.`` prefix; the MLX model
    holds it once as ``encoder.pos_bias_u/v``. ``rules``: another compiled rule table (the aligner's).
    Raises CanaryError for checkpoint keys no rule covers and for an untied output head.
    """
    first_conv = state.get("encoder.pre_encode.conv.0.weight")
    ctx = {"channels": int(first_conv.shape[0]) if first_conv is not None and first_conv.ndim else 0}
    out: dict[str, np.ndarray] = {}
    unmapped = []
    for key, value in state.items():
        for pattern, target, transform in rules or _COMPILED_RULES:
            match = pattern.fullmatch(key)
            if match is None:
                continue
            if transform == DROP:
                break
            if transform == TIED:
                _check_tied(state)
                break
            name = key if target is None else match.expand(target)
            if name in out:
                raise CanaryError(f"two checkpoint tensors map to the MLX parameter {name}")
            out[name] = transform(value, ctx)
            break
        else:
            unmapped.append(key)
    if unmapped:
        raise CanaryError(
            f"the checkpoint has tensors this converter does not know (unsupported architecture?): "
            f"{_key_list(unmapped)}"
        )
    if shared_pos_bias:
        _merge_shared_pos_bias(out)
    return out


_LAYER_POS_BIAS = re.compile(r"encoder\.layers\.\d+\.self_attn\.pos_bias_([uv])")


def _merge_shared_pos_bias(weights: dict) -> None:
    for which in ("u", "v"):
        keys = [k for k in weights if (m := _LAYER_POS_BIAS.fullmatch(k)) and m.group(1) == which]
        if not keys:
            continue
        first = weights[keys[0]]
        if any(weights[k].shape != first.shape or not np.array_equal(weights[k], first) for k in keys[1:]):
            raise CanaryError(
                f"encoder.untie_biases is false but the layers' pos_bias_{which} tensors differ "
                f"(model_config.yaml and model_weights.ckpt disagree)"
            )
        if f"encoder.pos_bias_{which}" in weights:
            raise CanaryError(f"the checkpoint has both encoder.pos_bias_{which} and per-layer copies")
        for k in keys:
            del weights[k]
        weights[f"encoder.pos_bias_{which}"] = first


def _check_tied(state: Mapping[str, np.ndarray]) -> None:
    head, embedding = state[HEAD_WEIGHT], state.get(TOKEN_EMBEDDING)
    if embedding is None:
        return  # the strict check reports the missing embedding
    if head.shape != embedding.shape or not np.array_equal(head, embedding):
        raise CanaryError(
            f"{HEAD_WEIGHT} differs from {TOKEN_EMBEDDING}: Canary ties the output head to the token "
            "embedding and this converter only supports tied checkpoints"
        )


def expected_shapes(config: ModelConfig, network=Canary) -> dict[str, tuple]:
    """Parameter names and shapes of ``network(config)`` (MLX builds arrays lazily: nothing is allocated)."""
    from mlx.utils import tree_flatten

    return {name: tuple(value.shape) for name, value in tree_flatten(network(config).parameters())}


def check_weights(weights: Mapping[str, np.ndarray], expected: Mapping[str, tuple]) -> None:
    """Strict check: the same parameter names and shapes as the model, nothing missing, nothing extra."""
    extra = set(weights) - set(expected)
    missing = set(expected) - set(weights)
    wrong = [
        f"{k} {tuple(weights[k].shape)} (model expects {tuple(expected[k])})"
        for k in sorted(set(weights) & set(expected))
        if tuple(weights[k].shape) != tuple(expected[k])
    ]
    problems = []
    if extra:
        problems.append(f"tensors the model has no parameter for: {_key_list(extra)}")
    if missing:
        problems.append(f"model parameters missing from the checkpoint: {_key_list(missing)}")
    if wrong:
        problems.append(f"shape mismatches: {'; '.join(wrong[:12])}" + (" ..." if len(wrong) > 12 else ""))
    if problems:
        raise CanaryError(
            "the checkpoint does not match the model built from its config ("
            + " | ".join(problems)
            + "); model_config.yaml and model_weights.ckpt disagree or the architecture is unsupported"
        )


# ---------------------------------------------------------------------------------------------------------------
# Config derivation


def _unsupported(key: str, value, why: str = "") -> CanaryError:
    return CanaryError(
        f"unsupported model: {key} = {value!r} in {CONFIG_MEMBER}" + (f" ({why})" if why else "")
    )


def _section(cfg: dict, key: str, required: bool = True) -> dict:
    value = cfg.get(key)
    if value is None:
        if required:
            raise CanaryError(f"{CONFIG_MEMBER} has no '{key}' section: not a NeMo Canary (multitask AED) model")
        return {}
    if not isinstance(value, dict):
        raise CanaryError(f"{CONFIG_MEMBER}: '{key}' is not a mapping")
    return value


def _target_is(section: dict, *class_names: str) -> bool:
    target = section.get("_target_")
    return target is None or str(target).rsplit(".", 1)[-1] in class_names


def _seconds_to_samples(pre: dict, seconds_key: str, samples_key: str, default: float, sr: int) -> int:
    # AudioToMelSpectrogramPreprocessor: a window in seconds wins and is truncated to int samples.
    seconds = pre.get(seconds_key, default)
    samples = pre.get(samples_key)
    if seconds and samples:
        raise _unsupported(f"preprocessor.{samples_key}", samples, f"both {seconds_key} and {samples_key} are set")
    value = int(seconds * sr) if seconds else samples
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise _unsupported(f"preprocessor.{seconds_key}", seconds, "must give a positive number of samples")
    return value


def preprocessor_config(cfg: dict) -> PreprocessorConfig:
    """PreprocessorConfig from the YAML ``preprocessor`` block (NeMo class defaults for absent keys)."""
    pre = _section(cfg, "preprocessor")
    if not _target_is(pre, "AudioToMelSpectrogramPreprocessor"):
        raise _unsupported("preprocessor._target_", pre.get("_target_"), "only AudioToMelSpectrogramPreprocessor")
    sr = pre.get("sample_rate", 16000)
    if cfg.get("sample_rate") is not None and cfg["sample_rate"] != sr:
        raise _unsupported("sample_rate", cfg["sample_rate"], f"differs from preprocessor.sample_rate {sr}")
    win = _seconds_to_samples(pre, "window_size", "n_window_size", 0.02, sr)
    hop = _seconds_to_samples(pre, "window_stride", "n_window_stride", 0.01, sr)
    n_fft = pre.get("n_fft") or 2 ** math.ceil(math.log2(win))

    window = pre.get("window", "hann")
    if window != "hann":
        raise _unsupported("preprocessor.window", window, "only hann")
    if pre.get("frame_splicing", 1) != 1:
        raise _unsupported("preprocessor.frame_splicing", pre.get("frame_splicing"), "only 1")
    for key in ("exact_pad", "stft_exact_pad", "stft_conv"):
        if pre.get(key, False):
            raise _unsupported(f"preprocessor.{key}", pre.get(key), "only false (centred STFT)")

    normalize = pre.get("normalize", "per_feature")
    if not normalize or normalize == "none":
        normalize = "none"  # NeMo skips normalisation for a falsy value
    elif normalize not in ("per_feature", "all_features"):
        raise _unsupported("preprocessor.normalize", normalize, "only per_feature, all_features or none")

    guard_type = pre.get("log_zero_guard_type", "add")
    if guard_type not in ("add", "clamp"):
        raise _unsupported("preprocessor.log_zero_guard_type", guard_type)
    guard = pre.get("log_zero_guard_value", 2.0**-24)
    if isinstance(guard, str):
        # NeMo resolves these names with torch.finfo of the (float32) features.
        if guard not in ("tiny", "eps"):
            raise _unsupported("preprocessor.log_zero_guard_value", guard)
        guard = float(getattr(np.finfo(np.float32), guard))

    pad_to = pre.get("pad_to", 16)
    if not isinstance(pad_to, int) or isinstance(pad_to, bool) or pad_to < 0:
        raise _unsupported("preprocessor.pad_to", pad_to, "only a non-negative integer")

    preemph = pre.get("preemph", 0.97)
    return PreprocessorConfig(
        sample_rate=int(sr),
        n_mels=int(pre.get("features", 64)),
        n_fft=int(n_fft),
        win_length=win,
        hop_length=hop,
        preemph=None if preemph is None else float(preemph),
        normalize=normalize,
        log=bool(pre.get("log", True)),
        log_zero_guard_type=guard_type,
        log_zero_guard_value=float(guard),
        mag_power=float(pre.get("mag_power", 2.0)),
        pad_to=pad_to,
        pad_value=float(pre.get("pad_value", 0.0)),
    )


def _full_context(value) -> bool:
    if value is None:
        return True
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], (list, tuple)):
        return all(_full_context(v) for v in value)  # multi-lookahead list: every entry must be full
    return isinstance(value, (list, tuple)) and [int(v) for v in value] == [-1, -1]


def encoder_config(cfg: dict) -> EncoderConfig:
    """EncoderConfig from the YAML ``encoder`` block (ConformerEncoder's defaults for absent keys)."""
    enc = _section(cfg, "encoder")
    if not _target_is(enc, "ConformerEncoder"):
        raise _unsupported("encoder._target_", enc.get("_target_"), "only ConformerEncoder (FastConformer)")
    for key in ("feat_in", "n_layers", "d_model"):
        if key not in enc:
            raise CanaryError(f"{CONFIG_MEMBER}: encoder.{key} is missing")
    d_model = int(enc["d_model"])
    checks = [
        ("self_attention_model", enc.get("self_attention_model", "rel_pos") == "rel_pos", "only rel_pos"),
        ("subsampling", enc.get("subsampling", "striding") == "dw_striding", "only dw_striding"),
        ("causal_downsampling", not enc.get("causal_downsampling", False), "only false"),
        ("att_context_size", _full_context(enc.get("att_context_size")), "only full context [-1, -1]"),
        ("feat_out", enc.get("feat_out", -1) in (-1, 0, None, d_model), "no encoder output projection"),
        ("reduction", not enc.get("reduction") or enc.get("reduction_factor", 1) <= 1, "no reduction"),
        ("conv_norm_type", enc.get("conv_norm_type", "batch_norm") in ("batch_norm", "layer_norm"),
         "only batch_norm or layer_norm"),
    ]
    for key, ok, why in checks:
        if not ok:
            raise _unsupported(f"encoder.{key}", enc.get(key), why)
    kernel = int(enc.get("conv_kernel_size", 31))
    conv_context = enc.get("conv_context_size")
    if conv_context is not None and (
        not isinstance(conv_context, (list, tuple)) or [int(v) for v in conv_context] != [(kernel - 1) // 2] * 2
    ):
        raise _unsupported("encoder.conv_context_size", conv_context, "only symmetric (non-causal) convolutions")
    factor = int(enc.get("subsampling_factor", 4))
    if factor < 2 or factor & (factor - 1):
        raise _unsupported("encoder.subsampling_factor", factor, "dw_striding needs a power of 2")
    channels = int(enc.get("subsampling_conv_channels", -1))
    return EncoderConfig(
        feat_in=int(enc["feat_in"]),
        d_model=d_model,
        n_layers=int(enc["n_layers"]),
        n_heads=int(enc.get("n_heads", 4)),
        ff_expansion_factor=int(enc.get("ff_expansion_factor", 4)),
        conv_kernel_size=kernel,
        conv_norm_type=enc.get("conv_norm_type", "batch_norm"),
        subsampling="dw_striding",
        subsampling_factor=factor,
        subsampling_conv_channels=d_model if channels == -1 else channels,
        xscaling=bool(enc.get("xscaling", True)),
        untie_biases=bool(enc.get("untie_biases", True)),
        use_bias=bool(enc.get("use_bias", True)),
        pos_emb_max_len=int(enc.get("pos_emb_max_len", 5000)),
    )


def decoder_config(cfg: dict, state: Mapping[str, np.ndarray]) -> DecoderConfig:
    """DecoderConfig: width and max length from ``pos_enc``, vocabulary from the embedding, the rest from
    ``transf_decoder.config_dict``."""
    transf_encoder = cfg.get("transf_encoder")
    if isinstance(transf_encoder, dict) and (transf_encoder.get("num_layers") or 0) > 0:
        raise _unsupported("transf_encoder.num_layers", transf_encoder["num_layers"], "only 0")
    td = _section(cfg, "transf_decoder")
    dc = td.get("config_dict", td)
    if not isinstance(dc, dict):
        raise CanaryError(f"{CONFIG_MEMBER}: transf_decoder.config_dict is not a mapping")
    if not dc.get("pre_ln", False):
        raise _unsupported("transf_decoder.config_dict.pre_ln", dc.get("pre_ln", False), "only pre-LN decoders")
    if not td.get("pre_ln_final_layer_norm", True):
        raise _unsupported("transf_decoder.pre_ln_final_layer_norm", False, "the final LayerNorm is required")
    if dc.get("learn_positional_encodings", False):
        raise _unsupported("transf_decoder.config_dict.learn_positional_encodings", True, "only fixed sinusoids")
    act = dc.get("hidden_act", "relu")
    if act not in ("relu", "gelu"):
        raise _unsupported("transf_decoder.config_dict.hidden_act", act)
    for key in ("num_layers", "inner_size", "num_attention_heads"):
        if dc.get(key) is None:
            raise CanaryError(f"{CONFIG_MEMBER}: transf_decoder.config_dict.{key} is missing")

    head = cfg.get("head") or {}
    if not _target_is(head, "TokenClassifier"):
        raise _unsupported("head._target_", head.get("_target_"), "only TokenClassifier")
    if head.get("num_layers", 1) != 1:
        raise _unsupported("head.num_layers", head.get("num_layers"), "only 1")
    if not head.get("log_softmax", True):
        raise _unsupported("head.log_softmax", False, "only true")

    pos_enc, embedding = state.get(POS_ENC), state.get(TOKEN_EMBEDDING)
    if pos_enc is None or pos_enc.ndim != 2 or embedding is None or embedding.ndim != 2:
        raise CanaryError(f"the checkpoint lacks {POS_ENC} or {TOKEN_EMBEDDING}: not a Canary decoder")
    max_len, hidden = (int(n) for n in pos_enc.shape)
    if dc.get("hidden_size") not in (None, hidden):
        raise CanaryError(
            f"transf_decoder.config_dict.hidden_size {dc['hidden_size']} disagrees with the checkpoint ({hidden})"
        )
    return DecoderConfig(
        hidden_size=hidden,
        num_layers=int(dc["num_layers"]),
        num_heads=int(dc["num_attention_heads"]),
        inner_size=int(dc["inner_size"]),
        max_sequence_length=max_len,
        hidden_act=act,
        vocab_size=int(embedding.shape[0]),
    )


def _decoding(strategy: str, **values) -> DecodingConfig:
    # NeMo's greedy search allows one token fewer than a beam search of size 1: keep the strategy when
    # DecodingConfig has a field for it.
    known = {f.name for f in dataclasses.fields(DecodingConfig)}
    values["strategy"] = strategy
    return DecodingConfig(**{k: v for k, v in values.items() if k in known})


def decoding_config(cfg: dict) -> DecodingConfig:
    """The YAML ``decoding`` block as NeMo's MultiTaskDecoding reads it at restore time.

    NeMo's beam search reads ``beam.length_penalty`` (default 0.0); the ``len_pen`` key found in configs is
    never read, so it is ignored here too. greedy/greedy_batch take ``greedy.max_generation_delta``.
    """
    dec = cfg.get("decoding") or {}
    strategy = dec.get("strategy", "beam")
    if strategy in ("greedy", "greedy_batch"):
        greedy = dec.get("greedy") or {}
        return _decoding(strategy, beam_size=1, length_penalty=0.0,
                         max_generation_delta=int(greedy.get("max_generation_delta", -1)))
    if strategy != "beam":
        raise _unsupported("decoding.strategy", strategy, "greedy, greedy_batch or beam")
    beam = dec.get("beam") or {}
    return _decoding(
        strategy,
        beam_size=int(beam.get("beam_size", 1)),
        length_penalty=float(beam.get("length_penalty", 0.0)),
        max_generation_delta=int(beam.get("max_generation_delta", -1)),
    )


_LANG_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _piece_count(model: bytes, what: str) -> int:
    import sentencepiece

    try:
        return int(sentencepiece.SentencePieceProcessor(model_proto=model).get_piece_size())
    except Exception as exc:  # sentencepiece raises RuntimeError/OSError on a bad proto
        raise CanaryError(f"{what} is not a valid SentencePiece model ({exc})") from None


def read_tokenizers(cfg: dict, archive: NemoArchive) -> tuple[TokenizerConfig, dict[str, bytes]]:
    """TokenizerConfig plus the SentencePiece files to write (output file name -> bytes).

    Aggregate tokenizers keep the YAML order of ``tokenizer.langs`` (it fixes the id offsets).
    """
    tok = _section(cfg, "tokenizer")
    kind = str(tok.get("type", "")).lower()
    files: dict[str, bytes] = {}
    entries = []
    if kind == "agg":
        langs = tok.get("langs")
        if not isinstance(langs, dict) or not langs:
            raise CanaryError(f"{CONFIG_MEMBER}: tokenizer.langs is missing for an aggregate tokenizer")
        for lang, sub in langs.items():
            lang = str(lang)
            if not _LANG_NAME.match(lang):
                raise _unsupported("tokenizer.langs", lang, "language names must be plain identifiers")
            sub = sub or {}
            if str(sub.get("type", "bpe")).lower() != "bpe" or not sub.get("model_path"):
                raise _unsupported(f"tokenizer.langs.{lang}.type", sub.get("type"), "only SentencePiece (bpe)")
            data = archive.read_artifact(sub["model_path"])
            name = f"tokenizer_{lang}.model"
            files[name] = data
            entries.append({"lang": lang, "model_file": name, "vocab_size": _piece_count(data, name)})
        return TokenizerConfig(type="aggregate", langs=entries), files
    if kind == "bpe":
        if not tok.get("model_path"):
            raise CanaryError(f"{CONFIG_MEMBER}: tokenizer.model_path is missing")
        data = archive.read_artifact(tok["model_path"])
        files["tokenizer.model"] = data
        entries.append({"lang": "all", "model_file": "tokenizer.model", "vocab_size": _piece_count(data, "tokenizer")})
        return TokenizerConfig(type="spe", langs=entries), files
    raise _unsupported("tokenizer.type", tok.get("type"), "only agg (CanaryTokenizer) or bpe (SentencePiece)")


def build_config(cfg: dict, state: Mapping[str, np.ndarray], tokenizer: TokenizerConfig) -> ModelConfig:
    """ModelConfig from the parsed ``model_config.yaml``, the checkpoint tensors and the tokenizer."""
    target = cfg.get("target")
    if target is not None and str(target).rsplit(".", 1)[-1] != "EncDecMultiTaskModel":
        raise CanaryError(
            f"not a Canary checkpoint: {CONFIG_MEMBER} describes a {target}, not an EncDecMultiTaskModel"
        )
    prompt_format = cfg.get("prompt_format")
    if prompt_format not in ("canary", "canary2"):
        raise _unsupported("prompt_format", prompt_format, "only canary or canary2")
    config = ModelConfig(
        preprocessor=preprocessor_config(cfg),
        encoder=encoder_config(cfg),
        decoder=decoder_config(cfg, state),
        tokenizer=tokenizer,
        decoding=decoding_config(cfg),
        prompt_format=prompt_format,
        nemo_version=str(cfg.get("nemo_version") or ""),
    )
    if config.encoder.feat_in != config.preprocessor.n_mels:
        raise CanaryError(
            f"encoder.feat_in {config.encoder.feat_in} differs from preprocessor.features {config.preprocessor.n_mels}"
        )
    total = sum(int(e["vocab_size"]) for e in tokenizer.langs)
    if 8 * math.ceil(total / 8) != config.decoder.vocab_size:
        raise CanaryError(
            f"the tokenizer has {total} tokens but the decoder has {config.decoder.vocab_size} embedding rows "
            f"(expected {8 * math.ceil(total / 8)}): tokenizer files and weights do not belong together"
        )
    return config


def english_pivot_pairs(languages: list) -> Optional[list]:
    """en -> X and X -> en for every other language: the directions every released Canary was trained on."""
    if "en" not in languages:
        return None
    others = [lang for lang in languages if lang != "en"]
    return [["en", lang] for lang in others] + [[lang, "en"] for lang in others]


def guess_variant(config: ModelConfig) -> str:
    """Released model with this architecture, or "custom"."""
    shape = (
        config.encoder.n_layers,
        config.encoder.d_model,
        config.decoder.num_layers,
        config.tokenizer.type,
        config.prompt_format,
    )
    for name, known in KNOWN_VARIANTS.items():
        if known == shape:
            return name
    return "custom"


# ---------------------------------------------------------------------------------------------------------------
# canary-1b-v2's timestamps model (NeMo restores it with ASRModel.restore_from from the same archive, reading
# timestamps_asr_model_config.yaml / _weights.ckpt and the artifacts its config names, e.g. its tokenizer)


@dataclass
class ConvertedAligner:
    config: AlignerConfig
    weights: dict  # MLX names -> numpy
    tokenizer: bytes  # its SentencePiece model


def read_aligner(archive: NemoArchive, config_member: str = ALIGNER_CONFIG_MEMBER,
                 weights_member: str = ALIGNER_WEIGHTS_MEMBER) -> ConvertedAligner:
    """The archive's CTC timestamps model, mapped to ``aligner.CTCAligner``'s names and strictly checked (the member
    names of a stand-alone CTC ``.nemo`` may be given instead: ``model_config.yaml``, ``model_weights.ckpt``)."""
    from .aligner import CTCAligner

    try:
        cfg = yaml.safe_load(archive.read(config_member))
    except yaml.YAMLError as exc:
        raise CanaryError(f"{config_member} is not valid YAML: {exc}") from None
    try:
        if not isinstance(cfg, dict):
            raise CanaryError("it is not a mapping")
        target = str(cfg.get("target") or "").rsplit(".", 1)[-1]
        if target not in ("", "EncDecCTCModelBPE"):
            raise CanaryError(f"it describes a {target}; only a CTC model with a SentencePiece tokenizer "
                              "(EncDecCTCModelBPE) is supported")
        decoder = _section(cfg, "decoder")
        if not _target_is(decoder, "ConvASRDecoder"):
            raise _unsupported("decoder._target_", decoder.get("_target_"), "only ConvASRDecoder (a CTC head)")
        tok = _section(cfg, "tokenizer")
        if str(tok.get("type", "")).lower() != "bpe" or not tok.get("model_path"):
            raise _unsupported("tokenizer.type", tok.get("type"), "only a SentencePiece (bpe) tokenizer")
        tokenizer = archive.read_artifact(tok["model_path"])
        config = AlignerConfig(preprocessor=preprocessor_config(cfg), encoder=encoder_config(cfg),
                               vocab_size=_piece_count(tokenizer, "the timestamps model's tokenizer"))
        if config.encoder.feat_in != config.preprocessor.n_mels:
            raise CanaryError(f"encoder.feat_in {config.encoder.feat_in} differs from preprocessor.features "
                              f"{config.preprocessor.n_mels}")
        state = archive.state_dict(weights_member)
        weights = map_weights(state, shared_pos_bias=not config.encoder.untie_biases, rules=_COMPILED_ALIGNER_RULES)
        check_weights(weights, expected_shapes(config, CTCAligner))
    except CanaryError as exc:
        raise CanaryError(f"the archive's timestamps model ({config_member}, {weights_member}) "
                          f"cannot be converted: {exc}") from None
    return ConvertedAligner(config, weights, tokenizer)


# ---------------------------------------------------------------------------------------------------------------
# Conversion driver


@dataclass
class ConversionSummary:
    out_dir: Path
    model_name: str
    variant: str
    source: str
    nemo_version: str
    dtype: str
    num_parameters: int  # elements stored, excluding the preprocessor's window and filterbank
    size_bytes: int  # of the whole output directory
    languages: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    def __str__(self) -> str:
        lines = [
            f"converted {self.source} -> {self.out_dir}",
            f"  model: {self.model_name} (architecture: {self.variant}), NeMo {self.nemo_version or '?'}",
            f"  parameters: {self.num_parameters / 1e6:.1f} M, dtype {self.dtype}, "
            f"{self.size_bytes / 2**20:.1f} MiB on disk",
            f"  languages: {', '.join(self.languages) or '-'}",
        ]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def resolve_source(
    source: Union[str, os.PathLike],
    *,
    revision: Optional[str] = None,
    cache_dir: Optional[str] = None,
    token: Optional[str] = None,
    progress: Optional[ProgressFn] = None,
) -> tuple[Path, str, str]:
    """(local .nemo path, source description, model name) for a path or a Hugging Face repo id."""
    from . import hub

    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.is_file():
        return path, str(path.resolve()), _name_from_path(path)
    if path.is_dir():
        found = sorted(path.glob("*.nemo"))
        if len(found) == 1:
            return found[0], str(found[0].resolve()), _name_from_path(found[0])
        raise CanaryError(f"{path} is a directory with {len(found)} .nemo files; pass the .nemo file itself")
    if hub.looks_like_repo_id(text):
        if progress:
            progress(f"downloading the .nemo file of {text} from Hugging Face (cached after the first time)")
        local = hub.download_nemo(text, revision=revision, cache_dir=cache_dir, token=token)
        return local, text + (f"@{revision}" if revision else ""), text.split("/")[-1]
    raise CanaryError(f"{text}: no such file, and not a Hugging Face repo id like nvidia/canary-1b-flash")


def _name_from_path(path: Path) -> str:
    # A generic file name says less than the directory it sits in (.../canary-1b-flash/model.nemo).
    if path.stem.lower() in ("model", "checkpoint", "weights") and path.resolve().parent.name:
        return path.resolve().parent.name
    return path.stem


def to_stored_dtype(weights: dict, dtype: str) -> dict:
    """MLX arrays of ``weights`` (numpy or MLX), float tensors in ``dtype`` (the front end's buffers stay float32,
    as NeMo computes them), one tensor at a time, each source tensor released from ``weights`` as its copy is
    made: the converted model and its source are never both held whole."""
    import mlx.core as mx

    target = getattr(mx, dtype)
    arrays = {}
    for name in list(weights):
        value = weights.pop(name)
        if isinstance(value, np.ndarray):
            value = np.ascontiguousarray(value.astype(np.float32) if value.dtype == np.float64 else value)
        array = mx.array(value)
        if mx.issubdtype(array.dtype, mx.floating):
            array = array.astype(mx.float32 if name.startswith("preprocessor.") else target)
        mx.eval(array)
        arrays[name] = array
    return arrays


def convert(
    source: Union[str, os.PathLike],
    out_dir: Union[str, os.PathLike],
    dtype: str = "float32",
    *,
    overwrite: bool = False,
    progress: Optional[ProgressFn] = None,
    revision: Optional[str] = None,
    cache_dir: Optional[str] = None,
    token: Optional[str] = None,
    quantize: Optional[int] = None,
    group_size: int = 64,
) -> ConversionSummary:
    """Convert a NeMo Canary ``.nemo`` (local path or Hugging Face repo id) into an MLX model directory.

    ``quantize`` (8 or 4 bits, groups of ``group_size``) stores the Linear and embedding weights quantized.
    ``progress`` receives one line per long step (default: ``logging`` at INFO). Raises CanaryError for
    anything wrong with the inputs; on any failure ``out_dir`` is left as it was.
    """
    report = progress or logger.info
    if dtype not in DTYPES:
        raise CanaryError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if quantize is not None:
        check_quantization(quantize, group_size)
    out = output_path(out_dir)
    # Before any work: the input must not be where the output goes (--overwrite would delete it).
    if Path(os.fspath(source)).expanduser().exists():
        check_outside(Path(os.fspath(source)), out, "the source")
    if cache_dir:
        check_outside(Path(cache_dir), out, "the download cache")
    check_out_dir(out, overwrite)

    nemo_path, source_text, model_name = resolve_source(
        source, revision=revision, cache_dir=cache_dir, token=token, progress=report
    )
    check_outside(nemo_path, out, "the source")
    notes: list[str] = []
    report(f"reading {nemo_path}")
    with NemoArchive(nemo_path) as archive:
        nemo_yaml = archive.read(CONFIG_MEMBER)
        cfg = archive.config()
        tokenizer, tokenizer_files = read_tokenizers(cfg, archive)
        aligner = None
        if archive.has_timestamps_model:
            report(f"reading the timestamps model ({ALIGNER_WEIGHTS_MEMBER})")
            aligner = read_aligner(archive)
        elif archive.extras:  # NeMo needs both members and ignores a lone one
            notes.append(f"the archive holds an incomplete timestamps model ({', '.join(archive.extras)}); "
                         "ignored, as NeMo ignores it")
        report("reading model_weights.ckpt")
        state = archive.state_dict()
    report(f"{len(state)} tensors read; deriving the config")
    config = build_config(cfg, state, tokenizer)
    config.translation_pairs = english_pivot_pairs(config.tokenizer.languages)
    config.model_name = model_name
    config.source = source_text
    config.dtype = dtype
    variant = guess_variant(config)

    report("mapping weights to MLX names and layouts")
    weights = map_weights(state, shared_pos_bias=not config.encoder.untie_biases)
    check_weights(weights, expected_shapes(config))
    num_parameters = sum(int(v.size) for k, v in weights.items() if not k.startswith("preprocessor."))

    report(f"converting to {dtype}")
    arrays = to_stored_dtype(weights, dtype)
    del weights, state
    if quantize is not None:
        report(f"quantizing to {quantize} bits (group size {group_size})")
        arrays, config.quantization = quantize_weights(Canary(config), arrays, quantize, group_size)
    aligner_arrays = None
    if aligner is not None:
        aligner_parameters = sum(int(v.size) for k, v in aligner.weights.items() if not k.startswith("preprocessor."))
        aligner_arrays = _store_aligner(aligner, config, dtype, quantize, group_size)
        notes.append(f"the timestamps model (CTC aligner, {aligner_parameters / 1e6:.1f} M parameters) is converted "
                     "too: timestamps come from forced alignment, as in NeMo")

    tmp = out.parent / f".{out.name}.partial-{secrets.token_hex(4)}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as exc:
        raise CanaryError(f"cannot create {out}: {exc}") from exc
    try:
        report(f"writing {out}")
        config.save(tmp)
        _save_safetensors(tmp / WEIGHTS_FILE, arrays)
        if aligner is not None:
            _save_safetensors(tmp / aligner.config.weights_file, aligner_arrays)
            (tmp / aligner.config.tokenizer_file).write_bytes(aligner.tokenizer)
        for name, data in tokenizer_files.items():
            (tmp / name).write_bytes(data)
        (tmp / NEMO_CONFIG_COPY).write_bytes(nemo_yaml)
        install(tmp, out, overwrite, report)
    except OSError as exc:  # disk full, permissions...: the user's to fix
        shutil.rmtree(tmp, ignore_errors=True)
        raise CanaryError(f"cannot write the model to {out}: {exc}") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    summary = ConversionSummary(
        out_dir=out,
        model_name=model_name,
        variant=variant,
        source=source_text,
        nemo_version=config.nemo_version,
        dtype=dtype if quantize is None else f"{dtype}, {quantize}-bit",
        num_parameters=num_parameters,
        size_bytes=size,
        languages=config.tokenizer.languages,
        notes=notes,
    )
    report(f"done: {num_parameters / 1e6:.1f} M parameters, {size / 2**20:.1f} MiB")
    return summary


def _store_aligner(aligner: ConvertedAligner, config: ModelConfig, dtype: str, quantize: Optional[int],
                   group_size: int) -> dict:
    """The aligner's arrays as stored (dtype, quantization like the main model); records it in ``config``."""
    from .aligner import CTCAligner

    config.aligner = aligner.config
    config.aligner.dtype = dtype
    arrays = to_stored_dtype(aligner.weights, dtype)
    if quantize is not None:
        arrays, config.aligner.quantization = quantize_weights(CTCAligner(config.aligner), arrays, quantize,
                                                               group_size)
    return arrays


def _save_safetensors(path: Path, arrays: dict) -> None:
    import mlx.core as mx

    mx.save_safetensors(str(path), arrays, metadata={"format": "mlx"})
