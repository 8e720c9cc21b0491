"""Beam search equal to NeMo's AED beam search (tests/nemo_beam_oracle.py), batch 1 and batched.

NeMo's batched beam search pairs hypotheses with another utterance's prompt states (see mlx_canary/beam.py);
``nemo_batch_quirk=True`` reproduces that for the batched comparison, and the default (correct) batched beam
search is checked to agree with one-at-a-time beam search instead.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from mlx_canary.audio import load_audio
from mlx_canary.beam import beam_decode
from mlx_canary.convert import convert
from mlx_canary.loading import load_model
from mlx_canary.options import Task, TranscribeOptions

pytestmark = pytest.mark.parity

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def beam_oracle(oracle_dir):
    import nemo_beam_oracle

    if not nemo_beam_oracle.is_fresh(oracle_dir):
        run = subprocess.run(
            [sys.executable, str(HERE / "nemo_beam_oracle.py"), "--oracle", str(oracle_dir)],
            capture_output=True,
            text=True,
        )
        if run.returncode != 0:
            pytest.fail(f"building NeMo's beam references failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
    return oracle_dir


@pytest.fixture(scope="module", params=["agg_canary2_proj", "agg_canary1"])
def case(request, beam_oracle, tmp_path_factory):
    variant_dir = beam_oracle / request.param
    out = tmp_path_factory.mktemp(request.param) / "mlx"
    convert(str(variant_dir / "model.nemo"), out, progress=lambda _line: None)
    model = load_model(out)
    ref = json.loads((variant_dir / "reference.json").read_text())
    beam = json.loads((variant_dir / "beam_reference.json").read_text())
    files = {c["name"]: str(beam_oracle / c["file"]) for c in ref["clips"]}
    return model, ref, beam, files


def _decode(model, waves, prompt_kwargs, beam_size, alpha, quirk):
    settings = Task(prompt_kwargs["source_lang"], prompt_kwargs["target_lang"],
                              prompt_kwargs.get("pnc", "yes") == "yes")
    options = model.engine.decode_options(TranscribeOptions(beam_size=beam_size, length_penalty=alpha))
    encoded = model.engine.encode(waves)
    prompts = mx.array([model.engine.prompt(settings)] * len(waves), dtype=mx.int32)
    return beam_decode(model.engine.net, encoded.states, encoded.lengths, prompts, options, nemo_batch_quirk=quirk,
                       budget_lengths=encoded.own_lengths)


def test_beam_tokens_equal_nemo(case):
    model, ref, beam, files = case
    assert model.engine.config.decoding.max_generation_delta == beam["runs"][0]["max_generation_delta"]
    compared = 0
    for run in beam["runs"]:
        kwargs = ref["prompts"][run["prompt"]]["kwargs"]
        waves = [load_audio(files[name]) for name in run["clips"]]
        if run["batch_size"] == 1:
            ours = [_decode(model, [w], kwargs, run["beam_size"], run["length_penalty"], False)[0] for w in waves]
        else:
            ours = _decode(model, waves, kwargs, run["beam_size"], run["length_penalty"], True)
        for name, mine, theirs in zip(run["clips"], ours, run["tokens"]):
            label = f"{name} beam {run['beam_size']} alpha {run['length_penalty']} {run['prompt']} B={run['batch_size']}"
            assert mine == theirs, label
            compared += 1
    assert compared >= 40


def test_public_api_beam_search_equals_nemo_one_at_a_time(case):
    model, ref, beam, files = case
    run = next(r for r in beam["runs"] if r["batch_size"] == 1 and r["beam_size"] == 4)
    kwargs = ref["prompts"][run["prompt"]]["kwargs"]
    results = model.transcribe([files[n] for n in run["clips"]], batch_size=1, beam_size=4,
                               length_penalty=run["length_penalty"], source_lang=kwargs["source_lang"],
                               target_lang=kwargs["target_lang"], pnc=kwargs.get("pnc", "yes") == "yes")
    assert [r.tokens for r in results] == run["tokens"]


def test_default_batched_beam_agrees_with_one_at_a_time(case):
    """Without NeMo's batching quirk, a batch decodes each utterance with its own states."""
    model, ref, beam, files = case
    kwargs = ref["prompts"]["asr_en_pnc"]["kwargs"]
    names = list(files)[:4]
    waves = [load_audio(files[n]) for n in names]
    batched = _decode(model, waves, kwargs, 2, 0.0, False)
    encoded_alone = [_decode(model, [w], kwargs, 2, 0.0, False)[0] for w in waves]
    # Padding can still change a token at an utterance's end (as in NeMo): compare the common prefix region.
    for name, a, b in zip(names, batched, encoded_alone):
        n = min(len(a), len(b))
        assert a[: n // 2] == b[: n // 2], name


def test_batched_beam_is_batch_invariant_and_equals_nemo_batch_1(case):
    """NeMo's batched beam search is batch-dependent: its results for a batch differ from its own batch-1 results
    (hypotheses attend to another utterance's prompt states). Ours is batch-invariant: a whole batch through the
    public API gives exactly NeMo's batch-1 tokens, for every beam run the oracle recorded."""
    model, ref, beam, files = case
    one = {(r["beam_size"], r["length_penalty"], r["prompt"]): r for r in beam["runs"] if r["batch_size"] == 1}
    nemo_self_inconsistent = compared = 0
    for run in beam["runs"]:
        if run["batch_size"] == 1:
            continue
        alone = one[(run["beam_size"], run["length_penalty"], run["prompt"])]
        assert alone["clips"] == run["clips"]
        nemo_self_inconsistent += sum(a != b for a, b in zip(run["tokens"], alone["tokens"]))
        kwargs = ref["prompts"][run["prompt"]]["kwargs"]
        results = model.transcribe([files[n] for n in run["clips"]], batch_size=run["batch_size"],
                                   beam_size=run["beam_size"], length_penalty=run["length_penalty"],
                                   source_lang=kwargs["source_lang"], target_lang=kwargs["target_lang"],
                                   pnc=kwargs.get("pnc", "yes") == "yes")
        for name, result, theirs in zip(run["clips"], results, alone["tokens"]):
            assert result.tokens == theirs, f"{name} beam {run['beam_size']} {run['prompt']} B={run['batch_size']}"
            compared += 1
    assert compared >= 10
    assert nemo_self_inconsistent > 0  # NeMo's own batched results differ from its batch-1 results
