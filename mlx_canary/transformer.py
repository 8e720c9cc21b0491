"""The Transformer decoder (NeMo ``TransformerDecoderNM``, pre-LN) with a key/value cache.

NeMo caches the hidden states entering each layer and recomputes keys/values of the whole prefix at every step;
caching the keys/values themselves is the same computation done once. Cross-attention keys/values depend only
on the encoder output, so they are computed once per utterance.

The one-token steps after the prompt pass (``TransformerDecoder.step``) have fixed shapes: the new keys/values
are written at a position given as an array and attention runs over the whole preallocated cache, later slots
masked. ``mx.compile`` then traces a step once per utterance shape and fuses its small element-wise operations,
which bound a step's time on GPUs (kernel launches) and take a tenth of it on the CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import mlx.core as mx
import mlx.nn as nn

from . import activations
from .config import DecoderConfig

LAYER_NORM_EPS = 1e-5
# Shapes (batch, cache slots, encoder frames) one compiled step keeps traced; past this the step is compiled
# afresh, releasing the old traces, so that a long-running server's memory stays bounded.
STEP_SHAPES_KEPT = 32
# NeMo's decoder masks are additive (1 - keep) * -10000, never -inf.
MASK_VALUE = -10000.0


class MultiHeadAttention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.head_dim = hidden // heads
        self.query_net = nn.Linear(hidden, hidden)
        self.key_net = nn.Linear(hidden, hidden)
        self.value_net = nn.Linear(hidden, hidden)
        self.out_projection = nn.Linear(hidden, hidden)

    def split(self, x: mx.array) -> mx.array:
        b, t, _ = x.shape
        return x.reshape(b, t, self.heads, self.head_dim).transpose(0, 2, 1, 3)

    def project_kv(self, x: mx.array) -> tuple[mx.array, mx.array]:
        # Stored head-major and contiguous: the attention products then read them in place, where the transposed
        # view would be copied by every one-token step (the cross-attention keys/values are read by all of them).
        return mx.contiguous(self.split(self.key_net(x))), mx.contiguous(self.split(self.value_net(x)))

    def attend(self, x: mx.array, keys: mx.array, values: mx.array, mask) -> mx.array:
        b, t, _ = x.shape
        q = self.split(self.query_net(x))
        out = mx.fast.scaled_dot_product_attention(q, keys, values, scale=1.0 / math.sqrt(self.head_dim), mask=mask)
        return self.out_projection(out.transpose(0, 2, 1, 3).reshape(b, t, -1))

    def attend_with_probs(self, x: mx.array, keys: mx.array, values: mx.array, mask) -> tuple[mx.array, mx.array]:
        """``attend`` spelled out, also returning the attention probabilities averaged over heads (B, t, T):
        what streaming's AlignAtt policy reads (NeMo's xatt_scores, mean over heads)."""
        b, t, _ = x.shape
        q = self.split(self.query_net(x))
        scores = (q * (1.0 / math.sqrt(self.head_dim))) @ keys.transpose(0, 1, 3, 2)
        if mask is not None:
            scores = scores + mask
        probs = mx.softmax(scores.astype(mx.float32), axis=-1)
        out = probs.astype(values.dtype) @ values
        return self.out_projection(out.transpose(0, 2, 1, 3).reshape(b, t, -1)), probs.mean(axis=1)


class FeedForward(nn.Module):
    def __init__(self, hidden: int, inner: int, act: str):
        super().__init__()
        self.dense_in = nn.Linear(hidden, inner)
        self.dense_out = nn.Linear(inner, hidden)
        self.act = _activation(act)

    def __call__(self, x: mx.array) -> mx.array:
        return self.dense_out(self.act(self.dense_in(x)))


def _activation(name: str):
    acts = {"relu": nn.relu, "gelu": nn.gelu, "swish": activations.silu, "silu": activations.silu}
    if name not in acts:
        raise ValueError(f"unsupported decoder activation {name!r}")
    return acts[name]


@dataclass
class LayerCache:
    """Per-layer cache: self-attention K/V preallocated to the maximum length, cross-attention K/V."""

    keys: mx.array  # (B, H, L_max, d_h)
    values: mx.array
    cross_keys: mx.array  # (B, H, T_enc, d_h)
    cross_values: mx.array


class DecoderCache:
    def __init__(self, layers: list[LayerCache]):
        self.layers = layers
        self.length = 0  # positions filled

    def reorder_self(self, index: mx.array) -> None:
        """Select self-attention rows (beam search parents; cross-attention rows are equal within a beam)."""
        for c in self.layers:
            c.keys, c.values = c.keys[index], c.values[index]


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        d = cfg.hidden_size
        self.layer_norm_1 = nn.LayerNorm(d, eps=LAYER_NORM_EPS)
        self.self_attn = MultiHeadAttention(d, cfg.num_heads)
        self.layer_norm_2 = nn.LayerNorm(d, eps=LAYER_NORM_EPS)
        self.cross_attn = MultiHeadAttention(d, cfg.num_heads)
        self.layer_norm_3 = nn.LayerNorm(d, eps=LAYER_NORM_EPS)
        self.ffn = FeedForward(d, cfg.inner_size, cfg.hidden_act)

    def __call__(self, x, cache: LayerCache, start: int, self_mask, cross_mask, with_probs: bool = False):
        """``x`` (B, t, D) at positions start ... start+t-1, attending to the filled part of the cache.

        ``with_probs``: also return the head-averaged cross-attention probabilities (B, t, T_enc)."""
        t = x.shape[1]
        y = self.layer_norm_1(x)
        k, v = self.self_attn.project_kv(y)
        cache.keys[:, :, start : start + t] = k
        cache.values[:, :, start : start + t] = v
        keys = cache.keys[:, :, : start + t]
        values = cache.values[:, :, : start + t]
        return self._after_projection(x, y, keys, values, self_mask, cache.cross_keys, cache.cross_values,
                                      cross_mask, with_probs)

    def step(self, x, position, keys, values, cross_keys, cross_values, self_mask, cross_mask,
             with_probs: bool = False):
        """One token per row (x: (B, 1, D)) written at ``position`` ((1,) int32) of the whole-length ``keys`` /
        ``values``; returns the output and the updated keys/values (and, ``with_probs``, the head-averaged
        cross-attention probabilities (B, 1, T_enc))."""
        y = self.layer_norm_1(x)
        k, v = self.self_attn.project_kv(y)
        keys = mx.slice_update(keys, k, position, axes=(2,))
        values = mx.slice_update(values, v, position, axes=(2,))
        out = self._after_projection(x, y, keys, values, self_mask, cross_keys, cross_values, cross_mask, with_probs)
        if with_probs:
            return out[0], keys, values, out[1]
        return out, keys, values

    def _after_projection(self, x, y, keys, values, self_mask, cross_keys, cross_values, cross_mask,
                          with_probs: bool = False):
        x = x + self.self_attn.attend(y, keys, values, self_mask)
        y = self.layer_norm_2(x)
        if with_probs:
            attended, probs = self.cross_attn.attend_with_probs(y, cross_keys, cross_values, cross_mask)
        else:
            attended, probs = self.cross_attn.attend(y, cross_keys, cross_values, cross_mask), None
        x = x + attended
        x = x + self.ffn(self.layer_norm_3(x))
        return (x, probs) if with_probs else x


class Embedding(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        # Fixed sinusoids already divided by sqrt(hidden), stored in the checkpoint.
        self.position_embedding = mx.zeros((cfg.max_sequence_length, cfg.hidden_size))
        self.layer_norm = nn.LayerNorm(cfg.hidden_size, eps=LAYER_NORM_EPS)

    def __call__(self, ids: mx.array, start) -> mx.array:
        """``ids`` (B, t) at positions start ...; ``start`` an int, or a (1,) int32 array when t is 1."""
        if isinstance(start, mx.array):
            pos = mx.take(self.position_embedding, start, axis=0)
        else:
            pos = self.position_embedding[start : start + ids.shape[1]]
        return self.layer_norm(self.token_embedding(ids) + pos)


class TransformerDecoder(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.embedding = Embedding(cfg)
        self.layers = [DecoderLayer(cfg) for _ in range(cfg.num_layers)]
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=LAYER_NORM_EPS)
        # head -> (compiled one-token step, shapes it has traced); see step. Set past nn.Module.__setattr__,
        # which would file a dict among the module's children (and so walk it as parameters).
        object.__setattr__(self, "_compiled_steps", {})

    def new_cache(self, encoded: mx.array, max_length: int) -> DecoderCache:
        """Cross-attention K/V for ``encoded`` (B, T_enc, D) and empty self-attention slots."""
        b = encoded.shape[0]
        heads = self.cfg.num_heads
        head_dim = self.cfg.hidden_size // heads
        layers = []
        for layer in self.layers:
            ck, cv = layer.cross_attn.project_kv(encoded)
            shape = (b, heads, max_length, head_dim)
            layers.append(LayerCache(mx.zeros(shape, encoded.dtype), mx.zeros(shape, encoded.dtype), ck, cv))
        return DecoderCache(layers)

    def __call__(self, ids: mx.array, cache: DecoderCache, self_mask, cross_mask, probs_layer=None):
        """Run ``ids`` (B, t) at positions cache.length ... and return final hidden states (B, t, D).

        ``probs_layer`` (a layer index): also return that layer's head-averaged cross-attention (B, t, T_enc)."""
        start = cache.length
        x = self.embedding(ids, start)
        probs = None
        chosen = _layer_index(probs_layer, len(self.layers))
        for index, (layer, layer_cache) in enumerate(zip(self.layers, cache.layers)):
            if index == chosen:
                x, probs = layer(x, layer_cache, start, self_mask, cross_mask, with_probs=True)
            else:
                x = layer(x, layer_cache, start, self_mask, cross_mask)
        cache.length = start + ids.shape[1]
        hidden = self.final_layer_norm(x)
        return hidden if probs_layer is None else (hidden, probs)

    def step(self, ids: mx.array, cache: DecoderCache, cross_mask: mx.array, head, probs_layer=None):
        """``head`` (hidden -> scores) of one new token per row, ``ids`` (B,), appended to ``cache``.

        ``probs_layer`` (a layer index): return (scores, that layer's head-averaged cross-attention (B, T_enc))."""
        layers = cache.layers
        shape = (ids.shape[0], layers[0].keys.shape[2], layers[0].cross_keys.shape[2], layers[0].keys.dtype)
        chosen = _layer_index(probs_layer, len(self.layers))
        key = head if chosen is None else (head, chosen)
        compiled, shapes = self._compiled_steps.get(key, (None, set()))
        if compiled is None or (shape not in shapes and len(shapes) >= STEP_SHAPES_KEPT):
            compiled, shapes = mx.compile(partial(_one_token_step, self, head, chosen)), set()
        shapes.add(shape)
        self._compiled_steps[key] = (compiled, shapes)
        position = mx.array([cache.length], dtype=mx.int32)
        outputs = compiled(
            ids[:, None], position, [c.keys for c in layers], [c.values for c in layers],
            [c.cross_keys for c in layers], [c.cross_values for c in layers], cross_mask,
        )
        scores, keys, values = outputs[:3]
        for c, k, v in zip(layers, keys, values):
            c.keys, c.values = k, v
        cache.length += 1
        return scores if chosen is None else (scores, outputs[3][:, -1])


def _layer_index(index, num_layers: int):
    """A Python-style layer index (negative counts from the end) as 0..num_layers-1; None stays None."""
    if index is None:
        return None
    if not -num_layers <= index < num_layers:
        raise ValueError(f"decoder layer {index} does not exist (the decoder has {num_layers} layers)")
    return index % num_layers


def _one_token_step(decoder: TransformerDecoder, head, probs_layer, ids, position, keys, values, cross_keys,
                    cross_values, cross_mask):
    """The traced body of TransformerDecoder.step: fixed shapes whatever the position."""
    x = decoder.embedding(ids, position)
    slots = keys[0].shape[2]
    # Every filled slot is visible, pad tokens of the prompt too: NeMo's GreedySequenceGenerator._one_step_forward
    # builds the step's mask from the new token alone (mask_padded_tokens of one id), which broadcasts over all
    # cached positions. Only the prompt pass hides the prompt's pads.
    self_mask = mx.where(mx.arange(slots) <= position, 0.0, MASK_VALUE).astype(x.dtype).reshape(1, 1, 1, slots)
    new_keys, new_values, probs = [], [], None
    for index, (layer, k, v, ck, cv) in enumerate(zip(decoder.layers, keys, values, cross_keys, cross_values)):
        if index == probs_layer:
            x, k, v, probs = layer.step(x, position, k, v, ck, cv, self_mask, cross_mask, with_probs=True)
        else:
            x, k, v = layer.step(x, position, k, v, ck, cv, self_mask, cross_mask)
        new_keys.append(k)
        new_values.append(v)
    scores = head(decoder.final_layer_norm(x)[:, -1])
    if probs_layer is None:
        return scores, new_keys, new_values
    return scores, new_keys, new_values, probs


def prompt_self_mask(ids: mx.array, pad_id: int, dtype) -> mx.array:
    """(B, 1, P, P) additive mask for the prompt pass: causal, and pad tokens hidden as keys."""
    p = ids.shape[1]
    causal = mx.tril(mx.ones((p, p), dtype=mx.bool_))
    keep = causal[None, None] & (ids != pad_id)[:, None, None, :]
    return mx.where(keep, 0.0, MASK_VALUE).astype(dtype)


def cross_mask(enc_lengths: mx.array, t_enc: int, dtype) -> mx.array:
    """(B, 1, 1, T_enc) additive mask hiding padded encoder frames."""
    keep = mx.arange(t_enc)[None, :] < enc_lengths[:, None]
    return mx.where(keep, 0.0, MASK_VALUE).astype(dtype)[:, None, None, :]
