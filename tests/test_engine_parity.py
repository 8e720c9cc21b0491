"""Engine parity with NeMo, stage by stage, on the oracle's random-weight models (see tests/nemo_oracle.py).

Each variant's ``model.nemo`` is converted with our converter; then log-mels, every encoder stage, the
teacher-forced decoder log-probs and greedy tokens (batch 1 and batched with mixed lengths, through the public
``transcribe``) are compared with what NeMo computed on the same audio.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import mlx.core as mx

from mlx_canary.convert import convert
from mlx_canary.loading import load_model

pytestmark = pytest.mark.parity

VARIANTS = ["agg_canary2_proj", "agg_canary1", "spe_canary2"]
FEATURE_TOL = 1e-4
TENSOR_TOL = 1e-3


class Reference:
    def __init__(self, oracle_dir: Path, variant: str):
        self.root = Path(oracle_dir)
        self.dir = self.root / variant
        self.meta = json.loads((self.dir / "reference.json").read_text())
        self.arrays = np.load(self.dir / "reference.npz")
        self.clips = {c["name"]: c for c in self.meta["clips"]}

    def waveform(self, clip: str) -> np.ndarray:
        return np.load(self.root / self.clips[clip]["waveform"])

    def encoder_input(self, clip: str) -> np.ndarray:
        key = f"audio_padded1s/{clip}"
        return self.arrays[key] if key in self.arrays.files else self.waveform(clip)

    def audio_file(self, clip: str) -> str:
        return str(self.root / self.clips[clip]["file"])


@pytest.fixture(scope="module", params=VARIANTS)
def variant(request, oracle_dir, tmp_path_factory):
    ref = Reference(oracle_dir, request.param)
    out = tmp_path_factory.mktemp(request.param) / "mlx"
    convert(str(ref.dir / "model.nemo"), out, progress=lambda _line: None)
    return ref, load_model(out)


def _transcribe_kwargs(prompt_kwargs: dict) -> dict:
    return {
        "source_lang": prompt_kwargs["source_lang"],
        "target_lang": prompt_kwargs["target_lang"],
        "pnc": prompt_kwargs.get("pnc", "yes") == "yes",
        "timestamps": bool(prompt_kwargs.get("timestamps", False)),
    }


def _features(model, wave: np.ndarray):
    feats, lengths = model.engine.net.features(mx.array(wave)[None], mx.array([len(wave)]))
    return np.array(feats[0]).T, int(lengths[0])  # NeMo layout (n_mels, T)


def test_log_mel_features(variant):
    ref, model = variant
    for clip in ref.clips:
        ours, n = _features(model, ref.waveform(clip))
        theirs = ref.arrays[f"features/{clip}"]
        assert n == int(ref.arrays[f"features_len/{clip}"]), clip
        assert ours.shape == theirs.shape, clip
        err = np.abs(ours - theirs).max()
        assert err <= FEATURE_TOL, f"{clip}: features differ by {err}"


def test_audio_loader_gives_oracle_waveform(variant):
    ref, _ = variant
    from mlx_canary.audio import load_audio

    for clip in ref.clips:
        assert np.array_equal(load_audio(ref.audio_file(clip)), ref.waveform(clip)), clip


def test_encoder_stages(variant):
    """Every stage from NeMo's own features: subsampling, each conformer layer, encoder output, projection."""
    ref, model = variant
    net = model.engine.net
    for clip in ref.clips:
        padded = f"features_padded1s/{clip}" in ref.arrays.files
        feats = ref.arrays[f"features_padded1s/{clip}" if padded else f"features/{clip}"]
        frames = ref.arrays[f"features_padded1s_len/{clip}" if padded else f"features_len/{clip}"]
        n = int(ref.arrays[f"encoder/{clip}/length"])
        x = mx.array(feats.T)[None]
        lengths = mx.array([int(frames)])
        sub, sub_len = net.encoder.pre_encode(x, lengths)
        assert int(sub_len[0]) == int(ref.arrays[f"encoder/{clip}/pre_encode_len"])
        _close(np.array(sub[0]), ref.arrays[f"encoder/{clip}/pre_encode"], n, f"{clip} pre_encode")
        enc, enc_len = net.encode(x, lengths)
        assert int(enc_len[0]) == n
        raw, _ = net.encoder(x, lengths)
        _close(np.array(raw[0]), ref.arrays[f"encoder/{clip}/output"], n, f"{clip} encoder output")
        _close(np.array(enc[0]), ref.arrays[f"encoder/{clip}/enc_states"], n, f"{clip} encoder states")
        # layer by layer, to localise a divergence
        h, hl = net.encoder.pre_encode(x, lengths)
        t = h.shape[1]
        if net.encoder.cfg.xscaling:
            h = h * (net.encoder.cfg.d_model ** 0.5)
        pos = net.encoder.positions(t, h.dtype)
        keep = mx.arange(t)[None, :] < hl[:, None]
        mask = mx.where(keep[:, None, :, None] & keep[:, None, None, :], 0.0, -10000.0)
        biases = None if net.encoder.cfg.untie_biases else (net.encoder.pos_bias_u, net.encoder.pos_bias_v)
        for i, layer in enumerate(net.encoder.layers):
            h = layer(h, pos, mask, keep[:, :, None], biases)
            _close(np.array(h[0]), ref.arrays[f"encoder/{clip}/layer{i}"], n, f"{clip} layer {i}")


def _close(ours: np.ndarray, theirs: np.ndarray, valid: int, what: str) -> None:
    assert ours.shape[1:] == theirs.shape[1:] and min(len(ours), len(theirs)) >= valid, what
    err = np.abs(ours[:valid] - theirs[:valid]).max()
    assert err <= TENSOR_TOL, f"{what}: max abs error {err}"


def test_encoder_from_waveform(variant):
    """The whole front end + encoder from the waveform NeMo's transcribe() fed its model."""
    ref, model = variant
    for clip in ref.clips:
        encoded = model.engine.encode([ref.waveform(clip)])
        enc, enc_len = encoded.states, encoded.lengths
        n = int(ref.arrays[f"encoder/{clip}/length"])
        assert int(enc_len[0]) == n
        _close(np.array(enc[0]), ref.arrays[f"encoder/{clip}/enc_states"], n, f"{clip} encoder states")


def _teacher_forced(model, encoded: mx.array, enc_lengths: mx.array, ids: np.ndarray) -> np.ndarray:
    from mlx_canary.transformer import cross_mask, prompt_self_mask

    net = model.engine.net
    tokens = mx.array(ids.astype(np.int32))[None]
    cache = net.decoder.new_cache(encoded, len(ids))
    hidden = net.decode(tokens, cache, prompt_self_mask(tokens, model.tokenizer.pad_id, encoded.dtype),
                        cross_mask(enc_lengths, encoded.shape[1], encoded.dtype))
    logits = net.logits(hidden)[0]
    return np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))


def test_teacher_forced_log_probs(variant):
    """The decoder stage on NeMo's encoder states: full log-softmax matrices within 1e-3.

    End to end (our encoder states) the oracle's sharpened decoder amplifies float32 noise in the far tail of
    the distribution (log-probs down to -200), so there the check is the decision at every position.
    """
    ref, model = variant
    for item in ref.meta["teacher_forced"]:
        clip, prompt = item["clip"], item["prompt"]
        ids = ref.arrays[f"decoder/{clip}/{prompt}/input_ids"]
        theirs = ref.arrays[f"decoder/{clip}/{prompt}/log_probs"]
        n = int(ref.arrays[f"encoder/{clip}/length"])
        nemo_states = mx.array(ref.arrays[f"encoder/{clip}/enc_states"][:n])[None]
        ours = _teacher_forced(model, nemo_states, mx.array([n]), ids)
        err = np.abs(ours - theirs).max()
        assert err <= TENSOR_TOL, f"{clip}/{prompt}: log-probs differ by {err}"

        out = model.engine.encode([ref.waveform(clip)])
        encoded, enc_lengths = out.states, out.lengths
        end_to_end = _teacher_forced(model, encoded, enc_lengths, ids)
        assert (end_to_end.argmax(-1) == theirs.argmax(-1)).all(), f"{clip}/{prompt}: a decision differs"


def test_prompts_equal_nemo(variant):
    ref, model = variant
    from mlx_canary.options import Task, TranscribeOptions

    for name, prompt in ref.meta["prompts"].items():
        kw = _transcribe_kwargs(prompt["kwargs"])
        ours = model.engine.prompt(Task(kw["source_lang"], kw["target_lang"], kw["pnc"], kw["timestamps"]))
        assert ours == prompt["ids"], name


def test_greedy_tokens_batch1(variant):
    ref, model = variant
    checked = 0
    by_prompt: dict[str, list] = {}
    for rec in ref.meta["greedy_b1"]:
        by_prompt.setdefault(rec["prompt"], []).append(rec)
    for pname, recs in by_prompt.items():
        kw = _transcribe_kwargs(ref.meta["prompts"][pname]["kwargs"])
        results = model.transcribe([ref.audio_file(r["clip"]) for r in recs], batch_size=1, **kw)
        for rec, res in zip(recs, results):
            assert res.tokens == rec["y_sequence"], f"{rec['clip']}/{pname}"
            if kw["timestamps"] and "timestamp" in rec:
                _check_timestamps(model, res, rec)
            else:
                assert res.text == _as_printed(model, rec, rec["text"]).strip(), f"{rec['clip']}/{pname}"
            checked += 1
    assert checked >= 20


def _as_printed(model, rec, nemo_text: str) -> str:
    """NeMo's text without the pieces mlx-canary never prints as text (``<unk>``, control pieces: see
    mlx_canary/tokenizer.py): a deliberate difference, tokens stay equal. The aggregate tokenizer's text is its
    pieces joined, so removing those pieces' strings from NeMo's text is exact."""
    tok = model.tokenizer
    hidden = {t for t in rec["y_sequence"] if t in tok.unprintable_ids}
    if hidden:
        assert tok.kind == "aggregate", "unprintable pieces in a SentencePiece-decoded text: compare another way"
        assert tok.decode(rec["y_sequence"]).strip() == rec["raw_text"].strip()  # decode is still NeMo's
        for token in hidden:
            nemo_text = nemo_text.replace(tok.decode([token]), "")
    return nemo_text


def _check_timestamps(model, res, rec) -> None:
    ts = rec["timestamp"]
    assert res.text == _as_printed(model, rec, rec["text"])
    words = [(w["word"], w["start"], w["end"]) for w in ts.get("word", [])]
    assert [(w["text"], w["start"], w["end"]) for w in res.words] == words
    segments = [(s["segment"], s["start"], s["end"]) for s in ts.get("segment", [])]
    assert [(s["text"], s["start"], s["end"]) for s in res.segments] == segments


def test_greedy_batched_mixed_lengths_equals_nemo_batch_1(variant):
    """NeMo's batched greedy decoding is batch-dependent: its token budget follows the batch's longest input, so a
    short input that has not ended decodes longer next to a long one (recorded: NeMo's batched tokens differ from its
    own batch-1 tokens). Ours keeps each input's own budget: a mixed-length batch gives exactly NeMo's batch-1
    tokens."""
    ref, model = variant
    alone = {(r["clip"], r["prompt"]): r["y_sequence"] for r in ref.meta["greedy_b1"]}
    compared = nemo_batch_dependent = 0
    for batch in ref.meta["greedy_batched"]:
        kw = _transcribe_kwargs(ref.meta["prompts"][batch["prompt"]]["kwargs"])
        files = [ref.audio_file(c) for c in batch["clips"]]
        results = model.transcribe(files, batch_size=batch["batch_size"], **kw)
        for rec, res in zip(batch["results"], results):
            b1 = alone[rec["clip"], batch["prompt"]]
            assert res.tokens == b1, f"{rec['clip']}/{batch['prompt']} batched"
            nemo_batch_dependent += rec["y_sequence"] != b1
            compared += 1
    assert compared >= 5
    NEMO_BATCH_DEPENDENT[ref.meta["variant"]] = nemo_batch_dependent


NEMO_BATCH_DEPENDENT: dict = {}


def test_nemo_batched_greedy_is_batch_dependent():
    """Recorded by the test above, over the variants: somewhere NeMo's batched tokens differ from its batch-1 ones
    (an input decoded past its own budget). Ours equal batch 1 everywhere."""
    if len(NEMO_BATCH_DEPENDENT) < 3:
        pytest.skip("needs the batched comparison of all three variants in this run")
    assert sum(NEMO_BATCH_DEPENDENT.values()) > 0, NEMO_BATCH_DEPENDENT


def test_outputs_are_not_degenerate(variant):
    """The comparison proves something only if NeMo's outputs are varied and unambiguous."""
    ref, _ = variant
    s = ref.meta["summary"]
    assert s["n_degenerate_b1"] == 0
    assert s["min_margin"] > 1e-3
    assert s["token_count_range_b1"][1] > 5
