"""The OpenAI-compatible server with a canary-1b-v2-style model (a CTC aligner in its archive): verbose_json,
srt and timestamp_granularities carry the force-aligned times, translations stay untimed (one segment), and word
timestamps for a translation are refused (400)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from mlx_canary.scheduler import Scheduler  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from server_load import ServerThread  # noqa: E402

pytestmark = pytest.mark.parity


def wav_bytes(wave) -> bytes:
    import io

    import soundfile

    buf = io.BytesIO()
    soundfile.write(buf, wave, 16000, format="WAV", subtype="FLOAT")  # float: the server decodes the same samples
    return buf.getvalue()


@pytest.fixture(scope="module")
def served(v2_oracle_dir, v2_converted):
    import mlx_canary
    from mlx_canary import audio

    ref, _arrays, model_dir = v2_converted
    model = mlx_canary.load_model(model_dir)
    wave = audio.load(str(v2_oracle_dir / next(f for f in ref["files"] if f["name"] == "en_stella")["file"]))
    worker = Scheduler(lambda: model, max_batch_size=4).start()
    with ServerThread(worker, model_id="tiny-v2") as running:
        with openai.OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0, timeout=60) as client:
            yield client, model, wave
    worker.stop()


def test_verbose_json_words_are_the_aligned_ones(served):
    client, model, wave = served
    want = model.transcribe(wave, source_lang="en", timestamps=True)
    assert len(want.words) > 1 and len(want.segments) > 1
    got = client.audio.transcriptions.create(model="tiny-v2", file=("a.wav", wav_bytes(wave)), language="en",
                                             response_format="verbose_json",
                                             timestamp_granularities=["word", "segment"])
    assert [w.word for w in got.words] == [w["text"] for w in want.words]
    assert [(w.start, w.end) for w in got.words] == [(w["start"], w["end"]) for w in want.words]
    assert [(s.start, s.end) for s in got.segments] == [(s["start"], s["end"]) for s in want.segments]


def test_translation_is_served_without_times(served):
    client, _model, wave = served
    srt = client.audio.transcriptions.create(model="tiny-v2", file=("a.wav", wav_bytes(wave)), language="en",
                                             response_format="srt", extra_body={"target_language": "de"})
    assert srt.strip().startswith("1\n00:00:00,000 -->")  # one cue spanning the audio
    with pytest.raises(openai.BadRequestError, match="transcriptions only"):
        client.audio.transcriptions.create(model="tiny-v2", file=("a.wav", wav_bytes(wave)), language="en",
                                           response_format="verbose_json", timestamp_granularities=["word"],
                                           extra_body={"target_language": "de"})
