"""The CPU arithmetic exp behind sigmoid / SiLU / GLU / softmax (activations.py): accuracy over the whole float32
range, and the built-ins where it does not apply."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_canary import activations


@pytest.fixture(autouse=True)
def on_cpu():
    previous = mx.default_device()
    mx.set_default_device(mx.cpu)
    yield
    mx.set_default_device(previous)


def _sigmoid64(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x.astype(np.float64)))


def test_sigmoid_and_silu_match_float64_over_the_float32_range():
    x = np.concatenate([np.linspace(-120, 120, 200_001), [-np.inf, np.inf, 0.0, -0.0, 1e-30, -1e-30]])
    x = x.astype(np.float32)
    assert activations.arith_path(mx.array(x))
    sig = np.asarray(activations.sigmoid(mx.array(x))).astype(np.float64)
    silu = np.asarray(activations.silu(mx.array(x[np.isfinite(x)]))).astype(np.float64)
    ref_sig = _sigmoid64(x)
    finite = x[np.isfinite(x)]
    ref_silu = finite * _sigmoid64(finite)
    assert np.all(np.isfinite(sig)) and np.all(np.isfinite(silu))
    assert np.max(np.abs(sig - ref_sig)) < 2e-7
    big = np.abs(ref_silu) > 1e-30
    assert np.max(np.abs(silu - ref_silu)[big] / np.abs(ref_silu[big])) < 5e-7
    assert np.max(np.abs(silu - ref_silu)) < 2e-6


def test_exp_relative_error_at_rounding_ties_and_clip_ends():
    """The range reduction rounds y / ln 2 to the nearest integer by adding 1.5 * 2**23: exp stays within 2e-7
    relative where y / ln 2 is a half-integer (either neighbour reduces correctly) and at the clip ends."""
    k = np.arange(-125, 127, dtype=np.float64)
    ties = ((k + 0.5) * np.log(2.0)).astype(np.float32)
    x = np.concatenate([ties, np.nextafter(ties, np.float32(0)), [-87.0, 88.0, 0.0, 1e-20, -1e-20]]).astype(np.float32)
    x = x[(x >= -87.0) & (x <= 88.0)]
    got = np.asarray(mx.compile(activations._exp_arith)(mx.array(x))).astype(np.float64)
    ref = np.exp(x.astype(np.float64))
    assert np.max(np.abs(got - ref) / ref) < 2e-7


def test_glu_and_softmax():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((3, 50, 64)).astype(np.float32) * 4
    gate = rng.standard_normal((3, 50, 64)).astype(np.float32) * 4
    np.testing.assert_allclose(np.asarray(activations.glu(mx.array(a), mx.array(gate))), a * _sigmoid64(gate),
                               rtol=1e-6, atol=1e-6)
    scores = rng.standard_normal((2, 4, 30, 30)).astype(np.float32) * 20
    scores[..., 5] = -10000.0  # masked keys, as the encoder adds them
    got = np.asarray(activations.softmax(mx.array(scores), axis=-1))
    e = np.exp(scores.astype(np.float64) - scores.max(-1, keepdims=True))
    np.testing.assert_allclose(got, e / e.sum(-1, keepdims=True), rtol=1e-6, atol=1e-7)
    assert np.all(got[..., 5] == 0.0)
    along_rows = np.asarray(activations.softmax(mx.array(scores), axis=2))
    e = np.exp(scores.astype(np.float64) - scores.max(2, keepdims=True))
    np.testing.assert_allclose(along_rows, e / e.sum(2, keepdims=True), rtol=1e-6, atol=1e-7)


def test_large_arrays_take_the_arithmetic_path_too():
    """Measured faster inside the encoder at every size (module docstring), and as accurate past a million elements."""
    x = np.linspace(-20, 20, 3_000_001, dtype=np.float32)
    assert activations.arith_path(mx.array(x))
    silu = np.asarray(activations.silu(mx.array(x))).astype(np.float64)
    ref = x * _sigmoid64(x)
    big = np.abs(ref) > 1e-30
    assert np.max(np.abs(silu - ref)[big] / np.abs(ref[big])) < 5e-7
    # bounded for the memory of its intermediates: huge arrays (a long input's attention scores) use the built-ins
    assert not activations.arith_path(mx.zeros((activations.ARITH_MAX_ELEMENTS + 1,)))


def test_half_precision_uses_the_builtins():
    x = mx.array(np.linspace(-8, 8, 101, dtype=np.float32)).astype(mx.float16)
    assert not activations.arith_path(x)
    out = activations.silu(x)
    assert out.dtype == mx.float16
    np.testing.assert_allclose(np.asarray(out.astype(mx.float32)), np.asarray((x * mx.sigmoid(x)).astype(mx.float32)))
