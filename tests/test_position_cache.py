"""The encoder's cached relative-position projections (ConformerEncoder.projected_positions): equal to projecting
per call, a function of the input length only, and never stale after the weights are replaced or quantized."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_canary import conformer
from mlx_canary.quantize import quantize_network
from mlx_canary.config import EncoderConfig


class _Holder(nn.Module):
    """A parent module, so that weights are replaced from above, as load_weights and quantization do."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder


@pytest.fixture
def encoder():
    mx.random.seed(0)
    enc = conformer.ConformerEncoder(EncoderConfig(d_model=128, n_layers=2, n_heads=4, subsampling_conv_channels=32))
    enc.update(nn.utils.tree_map(lambda p: mx.random.normal(p.shape) * 0.1, enc.parameters()))
    for layer in enc.layers:
        layer.conv.batch_norm.running_var = mx.ones_like(layer.conv.batch_norm.running_var)
    return enc


def _encode(enc, frames: int, cache: bool, monkeypatch) -> np.ndarray:
    monkeypatch.setattr(conformer, "POSITION_CACHE_FRAMES", 512 if cache else 0)
    features = mx.random.normal((1, frames, 128), key=mx.random.key(frames))
    out, _ = enc(features, mx.array([frames]))
    return np.array(out)


def test_cached_equals_per_call_for_any_length(encoder, monkeypatch):
    for frames in (300, 97, 520, 1000):  # buckets 64 and 128, and lengths sharing them in either order
        cached = _encode(encoder, frames, True, monkeypatch)
        direct = _encode(encoder, frames, False, monkeypatch)
        np.testing.assert_allclose(cached, direct, rtol=0, atol=1e-5)
        # the same length gives the same result whatever ran before it
        np.testing.assert_array_equal(cached, _encode(encoder, frames, True, monkeypatch))


def test_not_stale_after_weights_change(encoder, monkeypatch):
    holder = _Holder(encoder)
    before = _encode(encoder, 300, True, monkeypatch)
    new = [{"self_attn": {"linear_pos": {"weight": mx.random.normal((128, 128)) * 0.5}}} for _ in encoder.layers]
    holder.update({"encoder": {"layers": new}})
    cached = _encode(encoder, 300, True, monkeypatch)
    assert np.abs(cached - before).max() > 1e-4  # the new weights matter
    np.testing.assert_allclose(cached, _encode(encoder, 300, False, monkeypatch), rtol=0, atol=1e-5)


def test_not_stale_after_quantization(encoder, monkeypatch):
    holder = _Holder(encoder)
    _encode(encoder, 300, True, monkeypatch)
    quantize_network(holder, bits=8, group_size=64)  # as `--quantize 8` does
    np.testing.assert_allclose(_encode(encoder, 300, True, monkeypatch), _encode(encoder, 300, False, monkeypatch),
                               rtol=0, atol=1e-5)
