"""Scoring (mlx_canary/evaluation.py): our WER equals NeMo's cal_write_wer on the same predictions manifest, for
each of its normalisation options; BLEU per language pair; rows without references left out."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from itertools import combinations

import pytest
from test_corpus import make_corpus

from mlx_canary import cli, evaluation
from mlx_canary.errors import CanaryError

# Texts that tell the options apart: punctuation glued and spaced, capitals, digits (and a zero), curly quotes,
# extra whitespace, an empty prediction (a failed item), tabs.
ROWS = [
    {"text": "Hello, world!", "pred_text": "hello world"},
    {"text": "It's 12 o'clock .", "pred_text": "It's twelve o'clock."},
    {"text": "“Quoted”   words: here", "pred_text": "quoted words here"},
    {"text": "Room 0 and 7", "pred_text": "room and seven"},
    {"text": "A reference with no prediction", "pred_text": ""},
    {"text": "tabs\tand  spaces", "pred_text": " tabs and spaces "},
    {"text": "Mr. Smith-Jones paid $5 (five).", "pred_text": "Mr Smith Jones paid five dollars , five ."},
    {"text": "ok ?", "pred_text": "OK?"},
]

# NeMo's option name for each of ours.
NEMO_OPTIONS = {"clean": "clean_groundtruth_text", "punctuation": "ignore_punctuation",
                "punct-space": "strip_punc_space", "case": "ignore_capitalization"}

NEMO_SCRIPT = r"""
import json, sys, logging
logging.disable(logging.WARNING)
from nemo.collections.asr.parts.utils.eval_utils import cal_write_wer
results = []
for manifest, out, kwargs in json.loads(sys.argv[1]):
    _, total, _ = cal_write_wer(pred_manifest=manifest, output_filename=out, **kwargs)
    results.append(total["wer"])
print("RESULT " + json.dumps(results))
"""


def nemo_wer(jobs: list) -> list:
    """NeMo's cal_write_wer on ``[(manifest, kwargs)]``, in a subprocess (the pytest process never imports NeMo)."""
    args = [[str(manifest), str(manifest) + f".scored{i}", kwargs] for i, (manifest, kwargs) in enumerate(jobs)]
    done = subprocess.run([sys.executable, "-c", NEMO_SCRIPT, json.dumps(args)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads([line for line in done.stdout.splitlines() if line.startswith("RESULT ")][-1][7:])


def _combos():
    names = list(NEMO_OPTIONS)
    return [list(c) for n in range(len(names) + 1) for c in combinations(names, n)]


@pytest.mark.parity
@pytest.mark.skipif(importlib.util.find_spec("nemo") is None, reason="NeMo is not installed (the oracle)")
def test_wer_equals_nemo_cal_write_wer(tmp_path, capsys):
    manifest = tmp_path / "pred.jsonl"
    manifest.write_text("".join(json.dumps(dict(r, audio_filepath=f"{i}.wav")) + "\n" for i, r in enumerate(ROWS)))
    combos = _combos()
    # and a corpus job's own predictions manifest (tokens lists, a failed item), as NeMo's scripts would read it
    job = make_corpus(tmp_path / "job", 5, [{"audio_filepath": "audio/missing.wav", "text": "lost words"}])
    cli.main(["transcribe", "--manifest", str(job), "-o", str(tmp_path / "out"), "-m", "demo", "-q"])
    capsys.readouterr()
    predictions = tmp_path / "out" / "in_predictions.jsonl"
    nemo = nemo_wer([(manifest, {NEMO_OPTIONS[n]: True for n in combo}) for combo in combos]
                    + [(predictions, {}), (predictions, {"ignore_punctuation": True, "ignore_capitalization": True})])
    ours = [evaluation.evaluate(ROWS, [("en", "en")] * len(ROWS), combo).wer.value for combo in combos]
    assert ours == pytest.approx(nemo[: len(combos)], abs=1e-12), list(zip(combos, ours, nemo))
    assert len(set(nemo[: len(combos)])) > 4  # the options do change the figures on these rows
    metrics = json.loads((tmp_path / "out" / "in_metrics.json").read_text())
    assert metrics["wer"]["value"] == pytest.approx(nemo[-2], abs=1e-12)
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    normalized = evaluation.evaluate(rows, [("en", "en")] * len(rows), ("punctuation", "case")).wer.value
    assert normalized == pytest.approx(nemo[-1], abs=1e-12) and normalized < nemo[-2]


def test_per_language_wer_and_bleu():
    rows = [
        {"text": "a b c d", "pred_text": "a b c d"},
        {"answer": "eins zwei", "pred_text": "eins drei"},
        {"text": "the cat sat on the mat", "pred_text": "the cat sat on the mat"},
        {"pred_text": "no reference"},
    ]
    languages = [("en", "en"), ("de", "de"), ("de", "en"), ("en", "en")]
    scores = evaluation.evaluate(rows, languages)
    assert scores.per_language["en"].value == 0 and scores.per_language["de"].value == 0.5
    assert scores.wer.value == pytest.approx(1 / 6) and scores.wer.items == 2 and scores.wer.words == 6
    assert scores.per_language["de>en"].metric == "bleu" and scores.bleu.value == pytest.approx(100.0)
    assert any("WER 16.67%" in line for line in scores.lines())


def test_no_references_no_scores():
    assert evaluation.evaluate([{"pred_text": "x"}], [("en", "en")]) is None


def test_unknown_normalisation():
    with pytest.raises(CanaryError, match="unknown normalisation"):
        evaluation.parse_normalizations("case,stemming")
    assert evaluation.parse_normalizations(" case, punctuation ,case") == ("case", "punctuation")


def test_job_without_the_eval_extra_writes_its_manifest_and_says_why_not_scored(tmp_path, capsys, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_jiwer(name, *args, **kwargs):
        if name == "jiwer":
            raise ImportError("No module named 'jiwer'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_jiwer)
    job = make_corpus(tmp_path, 2)
    assert cli.main(["transcribe", "--manifest", str(job), "-o", str(tmp_path / "out"), "-m", "demo"]) == 0
    assert "not scored: scoring needs the eval extra" in capsys.readouterr().err
    assert len((tmp_path / "out" / "in_predictions.jsonl").read_text().splitlines()) == 2
