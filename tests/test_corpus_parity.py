"""A corpus job reads a NeMo manifest as NeMo's own ``transcribe(manifest)`` does: relative paths, per-row
languages and pnc, offset segments; tokens compared with NeMo's on the oracle's random-weight Canary (NeMo in a
subprocess, batch 1: its batched results depend on the batch)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf

from mlx_canary import cli
from mlx_canary.convert import convert

pytestmark = pytest.mark.parity

VARIANT = "agg_canary2_proj"

NEMO_SCRIPT = r"""
import json, sys, logging
logging.disable(logging.WARNING)
sys.path.insert(0, sys.argv[3])
from nemo_support import quiet_nemo
from nemo.collections.asr.models import EncDecMultiTaskModel
quiet_nemo(python_warnings=True)
model = EncDecMultiTaskModel.restore_from(sys.argv[1], map_location="cpu").eval()
hyps = model.transcribe(sys.argv[2], batch_size=1, return_hypotheses=True, verbose=False, num_workers=0)
ends = {int(model.tokenizer.eos_id), int(model.tokenizer.pad_id)}
out = []
for h in hyps:
    y = [int(t) for t in h.y_sequence.tolist()]
    while y and y[-1] in ends:
        y.pop()
    out.append(y)
print("RESULT " + json.dumps(out))
"""


def test_manifest_job_equals_nemo_transcribe_of_the_same_manifest(oracle_dir, tmp_path, capsys):
    audio = oracle_dir / "audio"
    (tmp_path / "clips").mkdir()
    for name in ("en_fox.wav", "de_morgen.wav", "es_tiempo.wav", "en_stella.wav"):
        shutil.copy(audio / name, tmp_path / "clips" / name)
    rows = [
        {"audio_filepath": "clips/en_fox.wav"},  # defaults: English, pnc
        {"audio_filepath": "clips/de_morgen.wav", "source_lang": "de", "target_lang": "de", "pnc": "no"},
        {"audio_filepath": "clips/es_tiempo.wav", "source_lang": "es", "target_lang": "en"},  # translation
        {"audio_filepath": "clips/en_stella.wav", "offset": 0.75, "duration": 2.5},  # a segment
        {"audio_filepath": str(tmp_path / "clips" / "en_fox.wav"), "pnc": "no"},  # absolute path
        # NeMo fills a missing target_lang with "en" (its legacy default): this German row is translated by NeMo;
        # a corpus job transcribes it in German (the README says so). Compared below with an explicit row.
        {"audio_filepath": "clips/de_morgen.wav", "source_lang": "de"},
        {"audio_filepath": "clips/de_morgen.wav", "source_lang": "de", "target_lang": "en"},
    ]
    for row in rows:  # NeMo needs every row's duration (ours reads it from the file when it is missing)
        if "duration" not in row:
            row["duration"] = sf.info(str(tmp_path / row["audio_filepath"])).duration
    manifest = tmp_path / "m.json"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))

    model_dir = tmp_path / "mlx"
    convert(str(oracle_dir / VARIANT / "model.nemo"), model_dir, progress=lambda _line: None)
    # NeMo's side runs at batch 1 (its batched results depend on the batch); ours is batch-invariant anyway
    code = cli.main(["transcribe", "--manifest", str(manifest), "-o", str(tmp_path / "out"), "-m", str(model_dir),
                     "-b", "1", "-q"])
    capsys.readouterr()
    assert code == 0
    predictions = (tmp_path / "out" / "m_predictions.jsonl").read_text().splitlines()
    ours = [json.loads(line)["tokens"] for line in predictions]

    scripts = Path(__file__).resolve().parents[1] / "scripts"
    done = subprocess.run([sys.executable, "-c", NEMO_SCRIPT, str(oracle_dir / VARIANT / "model.nemo"), str(manifest),
                           str(scripts)], capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    nemo = json.loads([line for line in done.stdout.splitlines() if line.startswith("RESULT ")][-1][7:])

    assert ours[:5] == nemo[:5]
    assert len({tuple(t) for t in ours[:5]}) == 5  # the rows' options and audio really differ
    assert nemo[5] == nemo[6] == ours[6]  # NeMo: a row without target_lang is translated to English
    assert ours[5] != ours[6]  # ours: transcribed in its own language
