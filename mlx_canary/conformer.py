"""The FastConformer encoder: dw_striding subsampling, relative-position self-attention, conformer blocks.

Follows NeMo's ``ConformerEncoder`` in eval mode, including its masking of padded frames, so that valid
outputs do not depend on batch padding. Tensors are time-major: (B, T, C). Parameter names mirror NeMo's
(see ``convert.py`` for the layout changes).
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import activations
from .config import EncoderConfig

LAYER_NORM_EPS = 1e-5
BATCH_NORM_EPS = 1e-5
# NeMo fills masked attention scores with -10000 (not -inf); after the softmax both give exact zeros.
ATTENTION_MASK_VALUE = -10000.0
# The relative-position projections (ConformerEncoder.projected_positions) are kept for inputs up to this many
# encoder frames (41 s at 8x subsampling of 10 ms frames), computed per power-of-two bucket from this size up.
POSITION_CACHE_FRAMES = 512
POSITION_BUCKET_MIN = 64


def _time_mask(lengths: mx.array, steps: int) -> mx.array:
    """(B, T) True where t < length."""
    return mx.arange(steps)[None, :] < lengths[:, None]


def _conv_length(lengths: mx.array) -> mx.array:
    """Output length of a kernel-3, stride-2, padding-1 convolution (NeMo's calc_length)."""
    return (lengths - 1) // 2 + 1


class Conv2dNHWC(nn.Module):
    """A 3x3 stride-2 Conv2d stored in MLX layout (O, kH, kW, I/groups).

    On the CPU the subsampling's two kinds are computed from the nine strided taps of the padded input, which
    MLX's CPU convolution runs 5-20x slower: the first conv (one input channel) as one matmul over the stacked
    taps, the depthwise ones as nine multiply-adds fused by ``mx.compile``. Elsewhere: ``mx.conv2d``.
    """

    def __init__(self, in_channels: int, out_channels: int, groups: int = 1):
        super().__init__()
        self.groups = groups
        self.weight = mx.zeros((out_channels, 3, 3, in_channels // groups))
        self.bias = mx.zeros((out_channels,))

    def __call__(self, x: mx.array) -> mx.array:
        if mx.default_device().type == mx.DeviceType.cpu:
            if x.shape[-1] == 1 and self.groups == 1:
                taps = mx.concatenate(_stride2_taps(x), axis=-1)  # (B, H', W', 9)
                return taps @ self.weight.reshape(self.weight.shape[0], 9).T + self.bias
            if self.groups == x.shape[-1] == self.weight.shape[0]:
                return _depthwise3x3_stride2(x, self.weight, self.bias)
        return mx.conv2d(x, self.weight, stride=2, padding=1, groups=self.groups) + self.bias


def _stride2_taps(x: mx.array) -> list:
    """The nine inputs of a 3x3, stride-2, padding-1 convolution: tap (i, j) is x_padded[2h + i, 2w + j]."""
    _, h, w, _ = x.shape
    h_out, w_out = (h - 1) // 2 + 1, (w - 1) // 2 + 1
    padded = mx.pad(x, [(0, 0), (1, 1), (1, 1), (0, 0)])
    return [
        padded[:, i : i + 2 * h_out - 1 : 2, j : j + 2 * w_out - 1 : 2, :]
        for i in range(3)
        for j in range(3)
    ]


@mx.compile
def _depthwise3x3_stride2(x: mx.array, weight: mx.array, bias: mx.array) -> mx.array:
    taps = _stride2_taps(x)
    kernel = weight.reshape(weight.shape[0], 9).T  # (9, C)
    y = taps[0] * kernel[0]
    for k in range(1, 9):
        y = y + taps[k] * kernel[k]
    return y + bias


class Pointwise(nn.Linear):
    """A 1x1 convolution: a Linear over the channel axis (weight (out, in)), so quantization treats it alike."""


class DwStridingSubsampling(nn.Module):
    """NeMo's dw_striding pre-encoder: conv, then (depthwise, pointwise) pairs, each stage halving time and
    frequency, ReLU after each stage, then a Linear over (freq x channels).

    Module list indices match NeMo's ``pre_encode.conv.N`` (ReLUs occupy the other indices and hold nothing).
    """

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        channels = cfg.subsampling_conv_channels
        stages = cfg.subsampling_stages
        layers: list = [Conv2dNHWC(1, channels), nn.ReLU()]
        for _ in range(stages - 1):
            layers += [Conv2dNHWC(channels, channels, groups=channels), Pointwise(channels, channels), nn.ReLU()]
        self.conv = layers
        # Input columns are ordered (freq, channel) to match NHWC flattening; the converter permutes NeMo's.
        self.out = nn.Linear(channels * cfg.subsampled_feat, cfg.d_model)

    def __call__(self, x: mx.array, lengths: mx.array, padded: bool = True) -> tuple[mx.array, mx.array]:
        """x: (B, T, F) features; returns (B, T', d_model) and lengths T'. ``padded=False`` promises that every
        row is full length, so the masks are all ones and are skipped."""
        x = x[..., None]  # (B, T, F, 1): time = H, freq = W, one input channel
        if padded:
            x = x * _time_mask(lengths, x.shape[1])[:, :, None, None]
        for layer in self.conv:
            if isinstance(layer, nn.ReLU):
                x = nn.relu(x)
                continue
            x = layer(x)
            if isinstance(layer, Conv2dNHWC):
                lengths = _conv_length(lengths)
            # NeMo zeroes the padded time rows before every module; zeroing right after each conv is the same.
            if padded:
                x = x * _time_mask(lengths, x.shape[1])[:, :, None, None].astype(x.dtype)
        b, t, f, c = x.shape
        return self.out(x.reshape(b, t, f * c)), lengths


def relative_positions(length: int, d_model: int) -> np.ndarray:
    """Sinusoids for relative distances length-1 ... -(length-1) (descending), float32 as NeMo computes them."""
    positions = np.arange(length - 1, -length, -1, dtype=np.float32)[:, None]
    exponent = np.arange(0, d_model, 2, dtype=np.float32) * np.float32(-(math.log(10000.0) / d_model))
    inv_freq = np.exp(exponent.astype(np.float64)).astype(np.float32)
    angles = positions * inv_freq  # float32 product, like torch
    table = np.zeros((2 * length - 1, d_model), dtype=np.float32)
    table[:, 0::2] = np.sin(angles)
    table[:, 1::2] = np.cos(angles)
    return table


class RelPositionAttention(nn.Module):
    """Transformer-XL style multi-head attention with per-layer content (u) and position (v) biases."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        d, h = cfg.d_model, cfg.n_heads
        self.n_heads = h
        self.d_k = d // h
        self.linear_q = nn.Linear(d, d, bias=cfg.use_bias)
        self.linear_k = nn.Linear(d, d, bias=cfg.use_bias)
        self.linear_v = nn.Linear(d, d, bias=cfg.use_bias)
        self.linear_out = nn.Linear(d, d, bias=cfg.use_bias)
        self.linear_pos = nn.Linear(d, d, bias=False)
        if cfg.untie_biases:
            self.pos_bias_u = mx.zeros((h, self.d_k))
            self.pos_bias_v = mx.zeros((h, self.d_k))

    def __call__(self, x: mx.array, pos_emb: mx.array, mask: mx.array, biases=None,
                 projected_pos: mx.array | None = None) -> mx.array:
        """x: (B, T, d); pos_emb: (2T-1, d); mask: (B, 1, T, T) additive, or None (no padding). biases: shared
        (u, v) if tied. projected_pos: ``linear_pos(pos_emb)`` if already computed
        (ConformerEncoder.projected_positions)."""
        b, t, _ = x.shape
        h, d_k = self.n_heads, self.d_k
        u, v = biases if biases is not None else (self.pos_bias_u, self.pos_bias_v)
        q = self.linear_q(x).reshape(b, t, h, d_k)
        k = self.linear_k(x).reshape(b, t, h, d_k).transpose(0, 2, 1, 3)
        val = self.linear_v(x).reshape(b, t, h, d_k).transpose(0, 2, 1, 3)
        if projected_pos is None:
            projected_pos = self.linear_pos(pos_emb)
        p = projected_pos.reshape(-1, h, d_k).transpose(1, 0, 2)  # (H, 2T-1, d_k)

        q_u = (q + u).transpose(0, 2, 1, 3)  # (B, H, T, d_k)
        q_v = (q + v).transpose(0, 2, 1, 3)
        scale = 1.0 / math.sqrt(d_k)
        # Position term BD[i, j] = q_v[i] . p[(T-1) - (i-j)], obtained by the rel-shift of q_v @ p^T.
        bd = _rel_shift(q_v @ p.swapaxes(-1, -2))  # (B, H, T, T)
        out = _attend(q_u, k, val, scale, bd * scale if mask is None else bd * scale + mask)
        return self.linear_out(out.transpose(0, 2, 1, 3).reshape(b, t, h * d_k))


def _attend(q: mx.array, k: mx.array, v: mx.array, scale: float, mask: mx.array) -> mx.array:
    """softmax(q k^T * scale + mask) v: MLX's fused kernel on GPUs; on the CPU, whose fused kernel is the same
    unfused graph with libm's exp, the arithmetic softmax (activations.py)."""
    # Chosen by q's size; the scores' memory is bounded by the softmax's own check (huge scores take MLX's softmax).
    if not activations.arith_path(q):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    scores = (q * scale) @ k.swapaxes(-1, -2) + mask
    return activations.softmax(scores, axis=-1) @ v


def _rel_shift(x: mx.array) -> mx.array:
    """(B, H, T, 2T-1) scores against descending relative positions -> (B, H, T, T) aligned to keys."""
    b, h, t, n = x.shape
    x = mx.pad(x, [(0, 0), (0, 0), (0, 0), (1, 0)])  # (B, H, T, 2T)
    x = x.reshape(b, h, n + 1, t)[:, :, 1:].reshape(b, h, t, n)
    return x[..., :t]


class FeedForward(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.linear1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.use_bias)
        self.linear2 = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.use_bias)

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear2(activations.silu(self.linear1(x)))


class ConvNorm(nn.Module):
    """BatchNorm in eval mode (running statistics), or a LayerNorm when conv_norm_type is layer_norm."""

    def __init__(self, d: int, kind: str):
        super().__init__()
        self.kind = kind
        self.weight = mx.ones((d,))
        self.bias = mx.zeros((d,))
        if kind == "batch_norm":
            self.running_mean = mx.zeros((d,))
            self.running_var = mx.ones((d,))

    def __call__(self, x: mx.array) -> mx.array:
        if self.kind == "layer_norm":
            return mx.fast.layer_norm(x, self.weight, self.bias, LAYER_NORM_EPS)
        return (x - self.running_mean) * mx.rsqrt(self.running_var + BATCH_NORM_EPS) * self.weight + self.bias


class DepthwiseConv1d(nn.Module):
    """Non-causal depthwise convolution over time, weight in MLX conv1d layout (d, K, 1).

    Applied as K shifted multiply-adds: on MLX's CPU backend that is several times faster than a grouped
    conv1d and it is exact arithmetic of the same products.
    """

    def __init__(self, d: int, kernel_size: int, bias: bool):
        super().__init__()
        self.weight = mx.zeros((d, kernel_size, 1))
        if bias:
            self.bias = mx.zeros((d,))

    def __call__(self, x: mx.array) -> mx.array:
        y = _depthwise_taps(x, self.weight)
        return y + self.bias if "bias" in self else y


class ConvModule(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        d = cfg.d_model
        self.pointwise_conv1 = Pointwise(d, 2 * d, bias=cfg.use_bias)
        self.depthwise_conv = DepthwiseConv1d(d, cfg.conv_kernel_size, bias=cfg.use_bias)
        self.batch_norm = ConvNorm(d, cfg.conv_norm_type)
        self.pointwise_conv2 = Pointwise(d, d, bias=cfg.use_bias)

    def __call__(self, x: mx.array, valid: mx.array) -> mx.array:
        """x: (B, T, d); valid: (B, T, 1) True on real frames, or None (no padding)."""
        x = self.pointwise_conv1(x)
        a, gate = mx.split(x, 2, axis=-1)
        x = activations.glu(a, gate, valid)
        if self.batch_norm.kind == "batch_norm" and activations.arith_path(x):
            # The depthwise taps, the batch norm and the SiLU as one compiled element-wise pass (same operations
            # in the same order as below; unfused, each of their ~25 operations is a pass over the activations).
            dw, norm = self.depthwise_conv, self.batch_norm
            bias = dw.bias if "bias" in dw else mx.zeros((x.shape[-1],), x.dtype)
            x = _depthwise_batch_norm_silu(x, dw.weight, bias, norm.running_mean, norm.running_var, norm.weight,
                                           norm.bias)
        else:
            x = activations.silu(self.batch_norm(self.depthwise_conv(x)))
        return self.pointwise_conv2(x)


@mx.compile
def _depthwise_batch_norm_silu(x, weight, bias, mean, var, scale, shift):
    """silu(batch_norm(depthwise_conv(x))) in eval mode, on the arithmetic SiLU path (CPU, float32)."""
    y = _depthwise_taps(x, weight) + bias
    return activations.silu_arith((y - mean) * mx.rsqrt(var + BATCH_NORM_EPS) * scale + shift)


def _depthwise_taps(x: mx.array, weight: mx.array) -> mx.array:
    """Non-causal depthwise convolution over time, ``weight`` (d, K, 1), as K shifted multiply-adds."""
    kernel = weight.shape[1]
    half = (kernel - 1) // 2
    t = x.shape[1]
    padded = mx.pad(x, [(0, 0), (half, kernel - 1 - half), (0, 0)])
    taps = weight[:, :, 0].T  # (K, d)
    y = padded[:, 0:t] * taps[0]
    for k in range(1, kernel):
        y = y + padded[:, k : k + t] * taps[k]
    return y


class ConformerLayer(nn.Module):
    """Macaron block: half FF, self-attention, convolution, half FF, final LayerNorm (all pre-LN)."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        d = cfg.d_model
        self.norm_feed_forward1 = nn.LayerNorm(d, eps=LAYER_NORM_EPS)
        self.feed_forward1 = FeedForward(cfg)
        self.norm_self_att = nn.LayerNorm(d, eps=LAYER_NORM_EPS)
        self.self_attn = RelPositionAttention(cfg)
        self.norm_conv = nn.LayerNorm(d, eps=LAYER_NORM_EPS)
        self.conv = ConvModule(cfg)
        self.norm_feed_forward2 = nn.LayerNorm(d, eps=LAYER_NORM_EPS)
        self.feed_forward2 = FeedForward(cfg)
        self.norm_out = nn.LayerNorm(d, eps=LAYER_NORM_EPS)

    def __call__(self, x, pos_emb, att_mask, valid, biases=None, projected_pos=None):
        x = x + 0.5 * self.feed_forward1(self.norm_feed_forward1(x))
        x = x + self.self_attn(self.norm_self_att(x), pos_emb, att_mask, biases, projected_pos)
        x = x + self.conv(self.norm_conv(x), valid)
        x = x + 0.5 * self.feed_forward2(self.norm_feed_forward2(x))
        return self.norm_out(x)


class ConformerEncoder(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.pre_encode = DwStridingSubsampling(cfg)
        self.layers = [ConformerLayer(cfg) for _ in range(cfg.n_layers)]
        if not cfg.untie_biases:
            d_k = cfg.d_model // cfg.n_heads
            self.pos_bias_u = mx.zeros((cfg.n_heads, d_k))
            self.pos_bias_v = mx.zeros((cfg.n_heads, d_k))
        self._pos_cache: dict[int, mx.array] = {}
        self._projected_cache: dict = {}  # (bucket, dtype) -> (linear_pos weights, their projections)

    def positions(self, length: int, dtype) -> mx.array:
        table = self._pos_cache.get(length)
        if table is None:
            table = mx.array(relative_positions(length, self.cfg.d_model))
            self._pos_cache = {length: table}  # keep one: lengths vary per batch
        return table.astype(dtype)

    def projected_positions(self, length: int, dtype) -> list | None:
        """Each layer's ``linear_pos`` of the relative-position table of ``length`` frames, or None past
        POSITION_CACHE_FRAMES.

        The projection depends on the length alone, not on the audio: it is computed once for a bucket of lengths
        (the next power of two from POSITION_BUCKET_MIN frames) and each length reads its rows (distances
        length-1 ... -(length-1)) from it, so the result depends on the length only, never on earlier calls.
        Memory: at most four buckets, (2 x 512 - 1) x d_model floats per layer for the largest (134 MB at
        canary-1b-flash's 32 x 1024)."""
        if length > POSITION_CACHE_FRAMES:
            return None
        bucket = POSITION_BUCKET_MIN
        while bucket < length:
            bucket *= 2
        # Valid for the weights it was computed from: loading or quantizing replaces these arrays.
        weights = [layer.self_attn.linear_pos.weight for layer in self.layers]
        key = (bucket, dtype)
        cached = self._projected_cache.get(key)
        if cached is None or any(a is not b for a, b in zip(cached[0], weights)):
            if cached is not None:
                self._projected_cache = {}
            table = mx.array(relative_positions(bucket, self.cfg.d_model)).astype(dtype)
            cached = (weights, [layer.self_attn.linear_pos(table) for layer in self.layers])
            mx.eval(cached[1])
            self._projected_cache[key] = cached
        return [p[bucket - length : bucket + length - 1] for p in cached[1]]

    def __call__(self, features: mx.array, lengths: mx.array) -> tuple[mx.array, mx.array]:
        """features: (B, T, n_mels); lengths: valid frames. Returns (B, T', d_model), lengths T'."""
        # Without padding (one input, or equal lengths) every mask is all ones: skip them. One small host sync.
        padded = not bool(mx.all(lengths == features.shape[1]).item())
        x, lengths = self.pre_encode(features, lengths, padded)
        if self.cfg.xscaling:
            x = x * math.sqrt(self.cfg.d_model)
        t = x.shape[1]
        pos_emb = self.positions(t, x.dtype)
        att_mask = valid = None
        if padded:
            keep = _time_mask(lengths, t)  # (B, T)
            pair = keep[:, None, :, None] & keep[:, None, None, :]  # (B, 1, T, T)
            att_mask = mx.where(pair, 0.0, ATTENTION_MASK_VALUE).astype(x.dtype)
            valid = keep[:, :, None]
        biases = None if self.cfg.untie_biases else (self.pos_bias_u, self.pos_bias_v)
        projected = self.projected_positions(t, x.dtype) or [None] * len(self.layers)
        for layer, projected_pos in zip(self.layers, projected):
            x = layer(x, pos_emb, att_mask, valid, biases, projected_pos)
        return x, lengths
