"""The compiled one-token decoder step (TransformerDecoder.step) against the prefix path it replaces after the
prompt (tiny random-weight model; NeMo parity of whole transcripts is in test_engine_parity / test_beam_parity)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_canary import load_model
from mlx_canary import transformer
from mlx_canary.transformer import cross_mask, prompt_self_mask

torch = pytest.importorskip("torch")  # the tiny .nemo is written with torch.save


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    from model_fixtures import build_tiny_model

    return load_model(build_tiny_model(tmp_path_factory.mktemp("tiny")), dtype="float32").engine.net


def _start(net, batch: int, t_enc: int, slots: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    d = net.config.decoder.hidden_size
    encoded = mx.array(rng.standard_normal((batch, t_enc, d)).astype(np.float32))
    lengths = mx.array([t_enc] + [t_enc - 3] * (batch - 1), dtype=mx.int32)  # padded rows too
    prompts = mx.array(rng.integers(5, 60, (batch, 4)), dtype=mx.int32)
    xmask = cross_mask(lengths, t_enc, mx.float32)
    cache = net.decoder.new_cache(encoded, slots)
    net.decode(prompts, cache, prompt_self_mask(prompts, 2, mx.float32), xmask)
    return cache, xmask


def test_compiled_step_equals_the_prefix_path(net):
    compiled_cache, xmask = _start(net, batch=2, t_enc=11, slots=12)
    prefix_cache, _ = _start(net, batch=2, t_enc=11, slots=12)
    ids = mx.array([7, 9], dtype=mx.int32)
    for _ in range(8):  # up to the last slot
        got = net.decode_step(ids, compiled_cache, xmask)
        want = net.logits(net.decode(ids[:, None], prefix_cache, None, xmask)[:, -1])
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
        assert compiled_cache.length == prefix_cache.length
        ids = mx.argmax(got, axis=-1).astype(mx.int32)
    for c, p in zip(compiled_cache.layers, prefix_cache.layers):
        np.testing.assert_allclose(np.asarray(c.keys), np.asarray(p.keys), rtol=1e-5, atol=1e-6)


def test_the_compiled_steps_are_not_parameters(net):
    from mlx.utils import tree_flatten

    cache, xmask = _start(net, batch=1, t_enc=5, slots=6)
    net.decode_step(mx.array([3], dtype=mx.int32), cache, xmask)
    assert net.decoder._compiled_steps
    assert "_compiled_steps" not in net.decoder
    assert not [k for k, _ in tree_flatten(net.parameters()) if "compiled" in k]


def test_traced_shapes_stay_bounded(net, monkeypatch):
    monkeypatch.setattr(transformer, "STEP_SHAPES_KEPT", 2)
    net.decoder._compiled_steps.clear()
    seen = []
    for t_enc in (5, 6, 7):  # three utterance shapes
        cache, xmask = _start(net, batch=1, t_enc=t_enc, slots=8)
        net.decode_step(mx.array([3], dtype=mx.int32), cache, xmask)
        seen.append(net.decoder._compiled_steps[net.logits])
    assert seen[0][0] is seen[1][0] and len(seen[1][1]) == 2
    assert seen[2][0] is not seen[1][0] and len(seen[2][1]) == 1  # compiled afresh, old traces released
