"""Tests for mlx_canary.server and ``mlx-canary serve``: the real server (uvicorn on 127.0.0.1, a free port) called
with the official ``openai`` client and with raw HTTP (http.client) for the error cases.

Two servers: one over a tiny random-weight Canary converted from a synthetic ``.nemo`` (built here with torch, no
NeMo; its tokenizer has the canary2 prompt tokens and ``<|timestamp|>`` / ``<|0|>``..``<|63|>``, so timestamps
work) whose responses are compared with the model called directly; and one over a scripted fake model, for what
random weights cannot show deterministically (word timestamps, language identification, batching, a request
that crashes the model). The load test uses benchmarks/server_load.py's ``run_load`` and asserts zero failures
only, never timing.
"""

import concurrent.futures
import contextlib
import http.client as httplib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
if not any(importlib.util.find_spec(m) for m in ("python_multipart", "multipart")):
    pytest.skip("python-multipart is not installed", allow_module_level=True)

from model_fixtures import MODEL_ID, build_tiny_model  # noqa: E402  (skips this module when torch is missing)

from mlx_canary import audio, cli, server, writers  # noqa: E402
from mlx_canary.engine import Capabilities  # noqa: E402
from mlx_canary.errors import CanaryError  # noqa: E402
from mlx_canary.options import TranscribeOptions  # noqa: E402
from mlx_canary.scheduler import QueueFull, Scheduler  # noqa: E402
from mlx_canary.transcript import Transcript  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import server_load  # noqa: E402
from server_load import ServerThread, wav_bytes  # noqa: E402

# The openai client marks audio.translations deprecated; it is still OpenAI's documented endpoint.
pytestmark = pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")

UPLOAD_MB = 2.0


def clip(seconds: float, seed: int = 0) -> bytes:
    return wav_bytes(seconds, freq=180 + 40 * seed, seed=seed)


EN = clip(1.5, 1)
DE = clip(2.2, 2)
LONG = clip(45.0, 3)  # over the 40 s single-chunk limit: the long-audio path


def decode(data: bytes) -> np.ndarray:
    from mlx_canary import audio

    return audio.load_audio(data)


# -- raw HTTP ----------------------------------------------------------------------------------------------------


def multipart(fields: dict, files: dict) -> tuple:
    """(body, content type) of a multipart form; field values may be lists (repeated fields)."""
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in fields.items():
        for item in value if isinstance(value, list) else [value]:
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{item}\r\n'.encode())
    for name, (filename, data) in files.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                     f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def http(url: str, method: str, path: str, body=None, headers=None, chunked: bool = False):
    """(status, headers, parsed JSON or text) of one request over a fresh connection."""
    host, port = url.split("//")[1].split(":")
    conn = httplib.HTTPConnection(host, int(port), timeout=60)
    try:
        if chunked:
            conn.putrequest(method, path)
            for key, value in (headers or {}).items():
                conn.putheader(key, value)
            conn.putheader("Transfer-Encoding", "chunked")
            conn.endheaders()
            for start in range(0, len(body), 65536):
                piece = body[start : start + 65536]
                conn.send(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            conn.send(b"0\r\n\r\n")
        else:
            conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        raw = response.read()
        kind = response.getheader("content-type", "")
        return response.status, response, json.loads(raw) if kind.startswith("application/json") else raw.decode()
    finally:
        conn.close()


def post_form(url: str, fields: dict, files=None, *, path="/v1/audio/transcriptions", headers=None, chunked=False):
    body, content_type = multipart(fields, files if files is not None else {"file": ("a.wav", EN)})
    return http(url, "POST", path, body, {"Content-Type": content_type, **(headers or {})}, chunked)


def assert_openai_error(body, param=None, code=None) -> dict:
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] in ("invalid_request_error", "server_error")
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


# -- the real server ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("server-model"))


@pytest.fixture(scope="module")
def refs(model_dir):
    """What the model itself returns, computed before the server starts (one thread uses MLX at a time)."""
    import mlx_canary

    model = mlx_canary.load_model(model_dir)
    en, de = decode(EN), decode(DE)
    out = SimpleNamespace(model=model)
    out.en = model.transcribe(en, source_lang="en")
    out.en_timed = model.transcribe(en, source_lang="en", timestamps=True)
    out.de_en = model.transcribe(de, source_lang="de", target_lang="en")
    out.de_en_timed = model.transcribe(de, source_lang="de", target_lang="en", timestamps=True)
    out.en_de_nopnc_beam = model.transcribe(en, source_lang="en", target_lang="de", pnc=False, beam_size=2)
    out.long = model.transcribe(decode(LONG), source_lang="en")
    assert model.needs_chunking(decode(LONG)) and not model.needs_chunking(decode(DE))
    return out


@pytest.fixture(scope="module")
def live(model_dir, refs):
    import mlx_canary

    worker = Scheduler(lambda: mlx_canary.load_model(model_dir), max_batch_size=8).start()
    with ServerThread(worker, model_id=MODEL_ID, max_upload_mb=UPLOAD_MB) as running:
        yield running
    worker.stop()


@pytest.fixture
def client(live):
    with openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def test_health_and_models(live, client):
    status, _, body = http(live.url, "GET", "/health")
    assert status == 200 and body["status"] == "ok" and body["model"] == MODEL_ID
    assert [m.id for m in client.models.list().data] == [MODEL_ID]
    assert client.models.retrieve(MODEL_ID).owned_by == "mlx-canary"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("whisper-1")
    status, _, body = http(live.url, "GET", "/v1/models/whisper-1")
    assert status == 404
    assert_openai_error(body, "model", "model_not_found")
    status, _, schema = http(live.url, "GET", "/openapi.json")  # the Canary extras are documented there
    form = schema["paths"]["/v1/audio/translations"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert {"file", "language", "target_language", "pnc", "beam_size"} <= set(form["schema"]["properties"])


@pytest.mark.parametrize("fmt", server.RESPONSE_FORMATS)
def test_transcription_formats(client, refs, fmt):
    result = client.audio.transcriptions.create(model="whisper-1", file=("en.wav", EN), language="en",
                                                response_format=fmt)
    if fmt == "json":
        assert result.text == refs.en.text
    elif fmt == "text":
        assert result == writers.render(refs.en, "txt")
    elif fmt in ("srt", "vtt"):
        assert result == writers.render(refs.en_timed, fmt)  # subtitles ask the model for timestamps
    else:
        assert result.text == refs.en_timed.text
        assert result.task == "transcribe" and result.language == "en"
        assert result.duration == pytest.approx(1.5)
        assert result.words is None  # only with timestamp_granularities=["word"]
        expected = refs.en_timed.segments or ([{"start": 0.0, "end": 1.5, "text": refs.en_timed.text}]
                                              if refs.en_timed.text else [])
        assert [(s.start, s.end, s.text) for s in result.segments] == [
            (pytest.approx(s["start"]), pytest.approx(s["end"]), s["text"].strip()) for s in expected]


@pytest.mark.parametrize("fmt", server.RESPONSE_FORMATS)
def test_translation_formats(client, refs, fmt):
    # OpenAI's translation endpoint has no language field: Canary's source language is an extra field.
    result = client.audio.translations.create(model=MODEL_ID, file=("de.wav", DE), response_format=fmt,
                                              extra_body={"language": "de"})
    if fmt == "json":
        assert result.text == refs.de_en.text
    elif fmt == "text":
        assert result == writers.render(refs.de_en, "txt")
    elif fmt in ("srt", "vtt"):
        assert result == writers.render(refs.de_en_timed, fmt)
    else:
        assert result.text == refs.de_en_timed.text
        assert result.language == "en"  # OpenAI reports the output language for translations
        assert result.duration == pytest.approx(2.2)
        assert isinstance(result.segments, list)


def test_canary_extras(client, refs):
    result = client.audio.transcriptions.create(
        model=MODEL_ID, file=("en.wav", EN), language="en", response_format="verbose_json",
        extra_body={"target_language": "de", "pnc": False, "beam_size": 2},
    )
    assert result.task == "translate" and result.language == "en"  # language: what was spoken
    plain = client.audio.transcriptions.create(
        model=MODEL_ID, file=("en.wav", EN), language="en", extra_body={"target_language": "de", "pnc": "false",
                                                                        "beam_size": "2"})
    assert plain.text == refs.en_de_nopnc_beam.text


def test_timestamp_granularities(client, refs):
    both = client.audio.transcriptions.create(model=MODEL_ID, file=("en.wav", EN), language="en",
                                              response_format="verbose_json",
                                              timestamp_granularities=["word", "segment"])
    assert isinstance(both.segments, list)
    assert [(w.word, w.start, w.end) for w in both.words] == [
        (w["text"], pytest.approx(w["start"]), pytest.approx(w["end"])) for w in refs.en_timed.words]
    words_only = client.audio.transcriptions.create(model=MODEL_ID, file=("en.wav", EN), language="en",
                                                    response_format="verbose_json", timestamp_granularities=["word"])
    assert words_only.segments is None and isinstance(words_only.words, list)


def test_long_upload_uses_the_long_audio_path(live, client, refs):
    before = live.worker.stats.long_requests
    result = client.audio.transcriptions.create(model=MODEL_ID, file=("long.wav", LONG), language="en",
                                                response_format="verbose_json")
    assert live.worker.stats.long_requests == before + 1
    assert result.duration == pytest.approx(45.0)
    plain = client.audio.transcriptions.create(model=MODEL_ID, file=("long.wav", LONG), language="en")
    assert plain.text == refs.long.text


def test_other_audio_formats_are_decoded(client, refs):
    stereo = wav_bytes(1.0, rate=44100, channels=2, seed=5)
    assert isinstance(client.audio.transcriptions.create(model=MODEL_ID, file=("s.wav", stereo),
                                                         language="en").text, str)


ERROR_CASES = [
    # (form fields, files or None for the default clip, status, param, code)
    ({"model": "x"}, {}, 400, "file", "missing_required_parameter"),
    ({"response_format": "diarized_json"}, None, 400, "response_format", "invalid_value"),
    ({"language": "xx"}, None, 400, "language", "unsupported_language"),
    ({"language": "en", "target_language": "klingon"}, None, 400, "target_language", "unsupported_language"),
    ({"language": "en", "pnc": "maybe"}, None, 400, "pnc", "invalid_value"),
    ({"language": "en", "beam_size": "0"}, None, 400, "beam_size", "invalid_value"),
    ({"language": "en", "beam_size": "wide"}, None, 400, "beam_size", "invalid_value"),
    ({"language": "en", "temperature": "hot"}, None, 400, "temperature", "invalid_value"),
    ({"language": "en", "target_lang": "de"}, None, 400, "target_lang", "unknown_parameter"),
    ({"language": "en", "timestamp_granularities[]": "word"}, None, 400, "timestamp_granularities[]",
     "invalid_value"),
    ({"language": "en", "response_format": "verbose_json", "timestamp_granularities[]": ["word", "line"]}, None,
     400, "timestamp_granularities[]", "invalid_value"),
    ({"language": "en", "stream": "true", "response_format": "srt"}, None, 400, "stream", "unsupported_value"),
    ({"language": ["en", "de"]}, None, 400, "language", "invalid_value"),
    ({"language": "en"}, {"file": ("noise.mp3", os.urandom(4000))}, 400, "file", "invalid_audio"),
    ({"language": "en"}, {"file": ("empty.wav", b"")}, 400, "file", "invalid_audio"),
    ({"language": "en"}, {"file": ("a.wav", EN), "other": ("b.wav", EN)}, 400, None, None),
]


@pytest.mark.parametrize("fields, files, status, param, code", ERROR_CASES)
def test_bad_requests_get_openai_errors(live, fields, files, status, param, code):
    got, _, body = post_form(live.url, fields, files)
    assert got == status, body
    assert_openai_error(body, param, code)


def test_openai_client_sees_the_error(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.audio.transcriptions.create(model=MODEL_ID, file=("en.wav", EN), language="tlh")
    assert e.value.status_code == 400
    assert "Unsupported language" in str(e.value) and "en, de" in str(e.value)


@pytest.mark.parametrize("excess", [1000, 1_000_000], ids=["just-over", "far-over"])
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_upload_over_the_limit_is_413(live, chunked, excess):
    big = os.urandom(int(UPLOAD_MB * 1e6) + excess)
    status, _, body = post_form(live.url, {"language": "en"}, {"file": ("big.wav", big)}, chunked=chunked)
    assert status == 413
    assert_openai_error(body, "file", "file_too_large")
    assert "2 MB" in body["error"]["message"]


def test_unknown_paths_and_methods(live):
    status, _, body = http(live.url, "GET", "/v1/nothing")
    assert status == 404
    assert_openai_error(body, code="not_found")
    status, _, body = http(live.url, "GET", "/v1/audio/transcriptions")
    assert status == 405
    assert_openai_error(body, code="method_not_allowed")


def test_translation_defaults_to_english(client, refs):
    result = client.audio.translations.create(model=MODEL_ID, file=("de.wav", DE), extra_body={"language": "de"})
    assert result.text == refs.de_en.text


def test_concurrent_load_has_no_failures(live, capsys):
    """8 clients x 25 requests, mixed clips, formats and endpoints: every request must succeed."""
    # One request of each clip first: errors then are the server's, not first-call warm-up.
    clips = server_load.default_clips(1.5)
    server_load.run_load(live.url + "/v1", clips, clients=1, per_client=len(clips))
    calls = live.worker.stats.batches
    t0 = time.perf_counter()
    outcomes = server_load.run_load(live.url + "/v1", clips, clients=8, per_client=25)
    summary = server_load.summarize(outcomes, time.perf_counter() - t0, clips)
    with capsys.disabled():
        print(f"\nserver load: {summary['requests']} requests, {summary['failed']} failed, "
              f"{summary['throughput_rps']:.1f} req/s, p50 {summary['latency_p50_ms']:.0f} ms, "
              f"p95 {summary['latency_p95_ms']:.0f} ms, {live.worker.stats.batches - calls} model calls")
    assert len(outcomes) == 200
    assert summary["failed"] == 0, summary["first_errors"]
    for outcome in outcomes:
        fmt = outcome.request.response_format
        assert isinstance(outcome.output, str) if fmt in ("text", "srt", "vtt") else isinstance(outcome.output.text,
                                                                                                  str)
    status, _, body = http(live.url, "GET", "/health")
    assert status == 200 and body["waiting"] == 0


# -- a scripted model: batching, failures, language identification, word timestamps ----------------------------


class FakeTokenizer:
    languages = ("en", "de")
    supports_timestamps = True

    def resolve_language(self, lang):
        if lang in self.languages:
            return lang
        raise CanaryError(f"Unsupported language {lang!r}. This model supports: en, de.")

    def encode(self, text, lang=None):
        return [len(word) for word in text.split()]


CRASH_SECONDS = 0.7  # audio of this length makes the fake model raise a RuntimeError (a bug, not a user error)


class FakeModel:
    capabilities = Capabilities(languages=("en", "de"), timestamps=True, translation=True, language_id=True,
                                default_source_lang="en")

    def __init__(self):
        self.tokenizer = FakeTokenizer()
        self.calls: list = []
        self.gate = threading.Event()
        self.gate.set()

    def prepare(self, options):
        for lang in (options.source_lang, options.target_lang):
            if lang not in (None, "auto", "en", "de"):
                raise CanaryError(f"Unsupported language {lang!r}")

    def needs_chunking(self, wave, chunk_seconds=None):
        return False

    def transcribe(self, audio, options, progress=None):
        self.prepare(options)
        source_lang, target_lang, timestamps = options.source_lang, options.target_lang, options.timestamps
        pnc, beam_size = options.pnc, options.beam_size
        if not audio:
            return []
        self.calls.append((len(audio), source_lang, target_lang))
        self.gate.wait(30)
        seconds = [round(len(w) / 16000, 2) for w in audio]
        if CRASH_SECONDS in seconds:
            raise RuntimeError("the fake model crashed")
        out = []
        for duration in seconds:
            lang = "de" if source_lang == "auto" else source_lang
            words = [{"text": "Hallo", "start": 0.08, "end": 0.4}, {"text": "Welt.", "start": 0.48, "end": 0.64},
                     {"text": "Tschüss!", "start": 0.72, "end": 0.8}] if timestamps else []
            segments = [{"text": "Hallo Welt.", "start": 0.08, "end": 0.64},
                        {"text": "Tschüss!", "start": 0.72, "end": 0.8}] if timestamps else []
            out.append(Transcript(text=f"Hallo Welt. Tschüss! ({duration} s, pnc={pnc}, beam={beam_size})",
                                  source_lang=lang, target_lang=target_lang or lang, duration=duration,
                                  words=words, segments=segments,
                                  language=lang if source_lang == "auto" else None))
        return out


@pytest.fixture
def fake_live():
    model = FakeModel()
    worker = Scheduler(lambda: model, max_batch_size=4, long_audio_seconds=40).start()
    with ServerThread(worker, model_id="fake", api_key="sesame") as running:
        running.model = model
        yield running
    worker.stop()


def fake_post(live, seconds: float, fields=None, path="/v1/audio/transcriptions"):
    return post_form(live.url, fields or {}, {"file": ("a.wav", clip(seconds))}, path=path,
                     headers={"Authorization": "Bearer sesame"})


def wait_for(predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_waiting_requests_with_equal_options_are_batched(fake_live):
    model, worker = fake_live.model, fake_live.worker
    model.gate.clear()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        first = pool.submit(fake_post, fake_live, 1.0, {"language": "en"})
        wait_for(lambda: len(model.calls) == 1)  # the worker is inside the first call
        same = [pool.submit(fake_post, fake_live, 1.0 + i / 10, {"language": "en"}) for i in range(5)]
        wait_for(lambda: worker.waiting == 5)
        other = pool.submit(fake_post, fake_live, 1.0, {"language": "de"})
        wait_for(lambda: worker.waiting == 6)
        model.gate.set()
        responses = [f.result() for f in [first, *same, other]]
    assert all(status == 200 for status, _, _ in responses), responses
    # oldest first; at most max_batch_size (4) of the same options per call; the odd one out waits its turn
    assert [(n, src) for n, src, _ in model.calls] == [(1, "en"), (4, "en"), (1, "en"), (1, "de")]
    assert [body["text"].split("(")[1].split(" s")[0] for _, _, body in responses[1:6]] == [
        "1.0", "1.1", "1.2", "1.3", "1.4"]  # every request gets its own result back


def test_a_crashing_request_fails_alone_and_the_server_goes_on(fake_live):
    model, worker = fake_live.model, fake_live.worker
    model.gate.clear()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        first = pool.submit(fake_post, fake_live, 1.0, {"language": "en"})
        wait_for(lambda: len(model.calls) == 1)
        crash = pool.submit(fake_post, fake_live, CRASH_SECONDS, {"language": "en"})
        good = pool.submit(fake_post, fake_live, 1.2, {"language": "en"})
        wait_for(lambda: worker.waiting == 2)
        model.gate.set()
        statuses = [f.result()[0] for f in (first, crash, good)]
        crash_body = crash.result()[2]
    assert statuses == [200, 500, 200]
    error = assert_openai_error(crash_body, code="internal_error")
    assert error["type"] == "server_error"
    # the batch of two failed, then each was retried alone
    assert [n for n, _, _ in model.calls] == [1, 2, 1, 1]
    assert fake_post(fake_live, 1.0, {"language": "en"})[0] == 200
    assert http(fake_live.url, "GET", "/health")[0] == 200


def test_missing_language_means_the_models_default(fake_live):
    status, _, body = fake_post(fake_live, 1.0, {"response_format": "verbose_json"})
    assert status == 200 and body["language"] == "en" and body["task"] == "transcribe"
    assert fake_live.model.calls[-1][1:] == ("en", None)
    # OpenAI's translation endpoint has no language field: the default source, translated into English (= ASR here)
    status, _, body = fake_post(fake_live, 1.0, {}, path="/v1/audio/translations")
    assert status == 200 and fake_live.model.calls[-1][1:] == ("en", None)


def test_auto_language_is_identified(fake_live):
    status, _, body = fake_post(fake_live, 1.0, {"language": "auto", "response_format": "verbose_json"})
    assert status == 200 and body["language"] == "de" and body["task"] == "transcribe"
    assert fake_live.model.calls[-1][1:] == ("auto", None)


@pytest.fixture(scope="module")
def demo_live():
    import mlx_canary

    worker = Scheduler(lambda: mlx_canary.load_model("demo"), max_batch_size=4).start()
    with ServerThread(worker, model_id="demo") as running:
        yield running
    worker.stop()


DEMO_SAMPLE = (Path(__file__).resolve().parent.parent / "mlx_canary" / "demo" / "sample.wav").read_bytes()


@pytest.mark.parametrize("path", ["/v1/audio/transcriptions", "/v1/audio/translations"])
@pytest.mark.parametrize("fmt", ["json", "text", "srt", "vtt", "verbose_json"])
def test_stock_requests_without_language_work_with_the_trained_demo_model(demo_live, path, fmt):
    """What a stock OpenAI client sends (no language; the translation endpoint has no such field) gets the demo
    sample's transcript in the model's default language, never a language-identification error."""
    status, _, body = post_form(demo_live.url, {"response_format": fmt}, {"file": ("sample.wav", DEMO_SAMPLE)},
                                path=path)
    assert status == 200, body
    text = body if isinstance(body, str) else body["text"]
    assert "Up big white house dog car." in text


def test_verbose_json_words_and_segments_over_http(fake_live):
    status, _, body = fake_post(fake_live, 1.0, {"language": "de", "response_format": "verbose_json",
                                                 "timestamp_granularities[]": ["word", "segment"]})
    assert status == 200
    assert body["words"] == [{"word": "Hallo", "start": 0.08, "end": 0.4},
                             {"word": "Welt.", "start": 0.48, "end": 0.64},
                             {"word": "Tschüss!", "start": 0.72, "end": 0.8}]
    assert [(s["id"], s["start"], s["end"], s["text"], s["tokens"]) for s in body["segments"]] == [
        (0, 0.08, 0.64, "Hallo Welt.", [5, 5]), (1, 0.72, 0.8, "Tschüss!", [8])]
    assert set(body["segments"][0]) == {"id", "seek", "start", "end", "text", "tokens", "temperature", "avg_logprob",
                                        "compression_ratio", "no_speech_prob"}
    assert body["usage"] == {"type": "duration", "seconds": 1}
    status, _, text = fake_post(fake_live, 1.0, {"language": "de", "response_format": "srt"})
    assert text.startswith("1\n00:00:00,080 --> 00:00:00,640\nHallo Welt.\n\n2\n00:00:00,720 --> ")


def test_api_key(fake_live):
    status, response, body = post_form(fake_live.url, {"language": "en"})
    assert status == 401 and response.getheader("www-authenticate") == "Bearer"
    assert_openai_error(body, code="invalid_api_key")
    assert post_form(fake_live.url, {"language": "en"}, headers={"Authorization": "Bearer wrong"})[0] == 401
    assert http(fake_live.url, "GET", "/v1/models")[0] == 401
    assert http(fake_live.url, "GET", "/health")[0] == 200  # health stays open
    with openai.OpenAI(base_url=fake_live.url + "/v1", api_key="sesame", max_retries=0) as good:
        assert good.audio.transcriptions.create(model="m", file=("a.wav", EN), language="en").text.startswith("Hallo")


# -- slow, idle and too many clients (server_limits) -------------------------------------------------------------


@contextlib.contextmanager
def limited_server(api_key=None, **limits):
    """A fake-model server on loopback with the given ``ConnectionLimits`` (short, so the tests are quick)."""
    worker = Scheduler(FakeModel, max_batch_size=4, long_audio_seconds=40).start()
    try:
        with ServerThread(worker, model_id="fake", api_key=api_key,
                          limits=server.ConnectionLimits(**limits)) as running:
            yield running
    finally:
        worker.stop()


class _Connection(socket.socket):
    opened_at = 0.0


def raw_connection(live) -> socket.socket:
    sock = _Connection(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect((live.host, live.port))
    sock.opened_at = time.monotonic()  # the server's timers start at (or after) this point
    return sock


def read_until_closed(sock: socket.socket) -> tuple:
    """(everything the server sent until it closed the connection, seconds since the connection opened); at most
    30 s of reading."""
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    return data, time.monotonic() - sock.opened_at


def trickle(sock: socket.socket, pieces, every: float, stop: threading.Event) -> threading.Thread:
    """Send ``pieces`` one per ``every`` seconds in the background, until they run out, ``stop`` or an error."""
    def run():
        for piece in pieces:
            if stop.wait(every):
                return
            try:
                sock.sendall(piece)
            except OSError:  # the server closed the connection
                return

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def slow_upload_head(length: int) -> bytes:
    return (f"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
            f"boundary=b\r\nContent-Length: {length}\r\n\r\n").encode()


def test_slow_and_idle_clients_are_dropped_while_others_are_served():
    """Issue 12: 23 trickling connections stayed open indefinitely. Each kind of slow client is cut within its
    timeout (read 1 s, upload 3 s), and a normal request is answered while they are pending."""
    stop = threading.Event()
    with limited_server(read_timeout=1.0, upload_timeout=3.0) as live:
        idle = raw_connection(live)  # connects and sends nothing
        slow_head = raw_connection(live)  # a header line every 0.3 s, never the end of the head
        slow_head.sendall(b"POST /v1/audio/transcriptions HTTP/1.1\r\n")
        trickle(slow_head, [b"X-Pad: %d\r\n" % i for i in range(200)], 0.3, stop)
        slow_body = raw_connection(live)  # 100 bytes every 0.3 s: never idle for 1 s, but slower than 3 s in all
        slow_body.sendall(slow_upload_head(1_000_000) + b"--b\r\n")
        trickle(slow_body, [b"x" * 100] * 200, 0.3, stop)
        stalled = raw_connection(live)  # part of a body, then silence
        stalled.sendall(slow_upload_head(1_000_000) + b"--b\r\n" + b"x" * 1000)
        pending = [idle, slow_head, slow_body, stalled]
        try:
            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                results = list(pool.map(read_until_closed, pending))
                status, _, body = post_form(live.url, {"language": "en"})  # served meanwhile
        finally:
            stop.set()
            for sock in pending:
                sock.close()
        assert status == 200 and body["text"].startswith("Hallo Welt."), body
        (idle_data, idle_s), (head_data, head_s), (body_data, body_s), (stalled_data, stalled_s) = results
        assert idle_data == b"" and 0.8 <= idle_s < 10  # closed without a word, as after keep-alive
        assert head_data.startswith(b"HTTP/1.1 408 ") and 0.8 <= head_s < 10
        assert json.loads(head_data.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"
        assert body_data.startswith(b"HTTP/1.1 408 ") and 2.8 <= body_s < 12
        assert b"did not complete within 3 s" in body_data
        assert stalled_data.startswith(b"HTTP/1.1 408 ") and 0.8 <= stalled_s < 10
        assert b"nothing arrived for 1 s" in stalled_data
        status, _, body = http(live.url, "GET", "/health")
        assert status == 200 and body["waiting"] == 0


def test_keep_alive_connection_cannot_trickle_its_next_request():
    with limited_server(read_timeout=1.0) as live:
        sock = raw_connection(live)
        try:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            first = b""
            while not first.endswith(b"}"):  # the whole first response (/health's JSON body ends the message)
                first += sock.recv(65536)
            assert first.startswith(b"HTTP/1.1 200 ")
            stop = threading.Event()
            sock.sendall(b"GET /health HTTP/1.1\r\n")  # the next request's head, trickled
            trickle(sock, [b"X-Pad: %d\r\n" % i for i in range(200)], 0.3, stop)
            data, seconds = read_until_closed(sock)
            stop.set()
        finally:
            sock.close()
        assert data.startswith(b"HTTP/1.1 408 ") and seconds < 10


def test_unread_body_trickling_after_an_early_answer_is_cut():
    """A request answered before its body is read (401 here) cannot keep the connection by trickling the rest."""
    with limited_server(api_key="sesame", read_timeout=1.0) as live:
        sock = raw_connection(live)
        stop = threading.Event()
        try:
            sock.sendall(slow_upload_head(1_000_000) + b"--b\r\n")
            trickle(sock, [b"x" * 100] * 200, 0.3, stop)
            data, seconds = read_until_closed(sock)
        finally:
            stop.set()
            sock.close()
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 401 ") and seconds < 10
        assert json.loads(body)["error"]["code"] == "invalid_api_key"  # and nothing after it


def test_connections_over_the_cap_get_503():
    with limited_server(read_timeout=30.0, max_connections=4) as live:
        connections = live.server.server_state.connections
        held = [raw_connection(live) for _ in range(3)]
        try:
            wait_for(lambda: len(connections) == 3)
            assert post_form(live.url, {"language": "en"})[0] == 200  # the 4th connection: within the cap
            held.append(raw_connection(live))
            wait_for(lambda: len(connections) == 4)
            status, _, text = post_form(live.url, {"language": "en"})  # a 5th
            assert (status, text) == (503, "Service Unavailable")
            assert http(live.url, "GET", "/health")[0] == 503
        finally:
            for sock in held:
                sock.close()
        wait_for(lambda: len(connections) == 0)
        assert post_form(live.url, {"language": "en"})[0] == 200


def test_connection_limits_are_checked_and_reach_serve():
    for bad in ({"read_timeout": 0}, {"upload_timeout": -1}, {"max_connections": 0}):
        with pytest.raises(CanaryError):
            server.ConnectionLimits(**bad)
    args = cli.build_parser().parse_args(["serve", "-m", "m"])
    assert (args.read_timeout, args.upload_timeout, args.max_connections) == (30.0, 300.0, 64)
    assert server.ConnectionLimits() == server.ConnectionLimits(30.0, 300.0, 64)
    args = cli.build_parser().parse_args(["serve", "-m", "m", "--read-timeout", "5", "--upload-timeout", "60",
                                          "--max-connections", "8"])
    assert (args.read_timeout, args.upload_timeout, args.max_connections) == (5.0, 60.0, 8)
    for bad in (["--read-timeout", "0"], ["--max-connections", "0"]):
        with pytest.raises(SystemExit):
            cli.build_parser().parse_args(["serve", "-m", "m", *bad])


def test_worker_refuses_work_after_stop():
    worker = Scheduler(FakeModel).start()
    worker.stop()
    with pytest.raises(QueueFull):
        worker.submit(np.zeros(16000, np.float32), TranscribeOptions("en", None))


def test_full_queue_is_refused():
    model = FakeModel()
    model.gate.clear()
    worker = Scheduler(lambda: model, max_queue=1).start()
    try:
        key = TranscribeOptions("en", None)
        running = worker.submit(np.zeros(16000, np.float32), key)
        wait_for(lambda: len(model.calls) == 1)
        waiting = worker.submit(np.zeros(16000, np.float32), key)
        with pytest.raises(QueueFull):
            worker.submit(np.zeros(16000, np.float32), key)
        model.gate.set()
        assert running.result(10).text and waiting.result(10).text
    finally:
        model.gate.set()
        worker.stop()


def test_worker_reports_load_errors():
    def broken():
        raise CanaryError("model not found: nowhere")

    with pytest.raises(CanaryError, match="nowhere"):
        Scheduler(broken).start()


def test_uploaded_pcm16_wav_is_its_samples_over_32768():
    """Uploads decode as files do (libsndfile, as NeMo): a 16 kHz 16-bit WAV is exactly s16 / 32768."""
    extreme = wav_bytes(0.1)[:44] + np.array([-32768, 32767, 0, 1], "<i2").tobytes()
    extreme = extreme[:40] + (8).to_bytes(4, "little") + extreme[44:]  # data chunk size: 4 samples
    extreme = extreme[:4] + (len(extreme) - 8).to_bytes(4, "little") + extreme[8:]
    np.testing.assert_array_equal(decode(extreme), np.array([-32768, 32767, 0, 1], np.float32) / np.float32(32768))
    for data in (EN, wav_bytes(0.3, seed=9)):
        assert decode(data).dtype == np.float32 and len(decode(data)) == (len(data) - 44) // 2


# -- helpers and the CLI -----------------------------------------------------------------------------------------


def test_verbose_json_without_timestamps_is_one_segment():
    t = Transcript(text=" hello hello hello hello ", source_lang="en", target_lang="en", duration=2.5)
    options = server.RequestOptions("transcribe", TranscribeOptions("en", None), "verbose_json")
    body = server.verbose_json(t, options, FakeTokenizer())
    assert body["text"] == "hello hello hello hello" and body["duration"] == 2.5
    assert [(s["start"], s["end"], s["text"]) for s in body["segments"]] == [(0.0, 2.5, "hello hello hello hello")]
    assert body["segments"][0]["compression_ratio"] == pytest.approx(server.compression_ratio(body["text"]))
    assert "words" not in body and body["usage"]["seconds"] == 3


def test_is_loopback_and_model_ids(tmp_path):
    assert server.is_loopback("127.0.0.1") and server.is_loopback("::1") and server.is_loopback("localhost")
    assert not server.is_loopback("0.0.0.0") and not server.is_loopback("192.168.1.2")
    (tmp_path / "my-model").mkdir()
    assert server.model_id_for(tmp_path / "my-model") == "my-model"
    assert server.model_id_for(str(tmp_path / "my-model") + "/") == "my-model"
    assert server.model_id_for("nvidia/canary-1b-flash") == "nvidia/canary-1b-flash"


def test_serve_arguments():
    args = cli.build_parser().parse_args(["serve", "--model", "m"])
    assert (args.host, args.port, args.max_upload_mb, args.max_batch_size) == ("127.0.0.1", 8000, 25.0, 8)
    args = cli.build_parser().parse_args(["serve", "-m", "m", "--host", "0.0.0.0", "--port", "9", "--max-upload-mb",
                                          "0.5", "--max-batch-size", "2", "--api-key", "k"])
    assert (args.host, args.port, args.max_upload_mb, args.max_batch_size, args.api_key) == (
        "0.0.0.0", 9, 0.5, 2, "k")
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["serve", "-m", "m", "--max-upload-mb", "0"])


def test_serve_without_model(monkeypatch, capsys):
    monkeypatch.delenv("MLX_CANARY_MODEL", raising=False)
    assert cli.main(["serve"]) == 1
    assert "no model given" in capsys.readouterr().err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_serve_process(model_dir):
    """``python -m mlx_canary serve`` loads the model, answers on loopback, and stops cleanly on Ctrl-C."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "mlx_canary", "serve", "--model", str(model_dir), "--port",
                             str(port), "-q"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.communicate()
            try:
                if http(url, "GET", "/health")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.1)
        with openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0) as c:
            assert [m.id for m in c.models.list().data] == [MODEL_ID]
            assert isinstance(c.audio.transcriptions.create(model=MODEL_ID, file=("en.wav", EN), language="en",
                                                            response_format="text"), str)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert "warning" not in err  # loopback: no exposure warning
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
