"""Live transcription over HTTP, for real: a uvicorn server on loopback with the bundled demo model. Server-sent
events for ``stream=true`` uploads, the WebSocket protocol (results equal to the Python streaming session, bad
frames, capacity, stalled and vanishing clients) and the page at ``/``."""

from __future__ import annotations

import contextlib
import http.client as httplib
import json
import socket
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
ws_client = pytest.importorskip("websockets.sync.client")
from websockets.exceptions import ConnectionClosed  # noqa: E402

import mlx_canary  # noqa: E402
from mlx_canary.loading import DEMO_MODEL_DIR  # noqa: E402
from mlx_canary.scheduler import Scheduler  # noqa: E402
from mlx_canary.server_limits import ConnectionLimits  # noqa: E402
from mlx_canary.streaming_policy import StreamingOptions  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from server_load import ServerThread  # noqa: E402

SAMPLE = DEMO_MODEL_DIR / "sample.wav"
LIVE = StreamingOptions(policy="alignatt", chunk_secs=1.0, right_context_secs=0.5)  # the WebSocket's defaults


@pytest.fixture(scope="module")
def demo():
    return mlx_canary.load_model("demo")


@pytest.fixture(scope="module")
def live(demo):
    worker = Scheduler(lambda: demo, max_batch_size=4).start()
    limits = ConnectionLimits(max_streams=2, stream_idle_timeout=2.0)
    with ServerThread(worker, model_id="demo", limits=limits) as running:
        yield running
    worker.stop()


@pytest.fixture(scope="module")
def pcm16():
    samples, rate = sf.read(SAMPLE, dtype="int16")
    assert rate == 16000 and samples.ndim == 1
    return samples


def ws_url(live, **params) -> str:
    query = "&".join(f"{k}={v}" for k, v in params.items())
    return f"ws://{live.host}:{live.port}/v1/audio/stream" + (f"?{query}" if query else "")


def stream_pcm(live, samples: np.ndarray, frame: int = 1600, **params) -> list:
    """Send ``samples`` as a live client would, then end; every event the server sent."""
    events = []
    with ws_client.connect(ws_url(live, **params), open_timeout=10) as ws:
        ws.send(json.dumps({"type": "start", "sample_rate": 16000, "encoding": "pcm_s16le"}))
        for start in range(0, len(samples), frame):
            ws.send(samples[start : start + frame].astype("<i2").tobytes())
        ws.send(json.dumps({"type": "end"}))
        try:
            while True:
                events.append(json.loads(ws.recv(timeout=60)))
        except ConnectionClosed:
            pass
    return events


def test_websocket_stream_equals_the_python_session(live, demo, pcm16):
    events = stream_pcm(live, pcm16)
    deltas = [e for e in events if e["type"] == "transcript.text.delta"]
    done = events[-1]
    assert done["type"] == "transcript.text.done" and len(deltas) >= 2  # text arrived while audio was streaming
    expected = demo.transcribe(pcm16.astype(np.float32) / 32768.0, streaming=LIVE)
    assert done["text"] == expected.text == "Up big white house dog car."
    assert done["tokens"] == expected.tokens == [t for e in deltas for t in e["tokens"]]
    assert "".join(e["delta"] for e in deltas).strip() == done["text"]
    assert all(a["time"] <= b["time"] for a, b in zip(deltas, deltas[1:]))


def test_websocket_options_and_translation(live, demo, pcm16):
    events = stream_pcm(live, pcm16, frame=5000, policy="waitk", chunk_secs=2, right_context_secs=1,
                        target_language="de")
    expected = demo.transcribe(pcm16.astype(np.float32) / 32768.0, target_lang="de",
                               streaming=StreamingOptions(policy="waitk", chunk_secs=2.0, right_context_secs=1.0))
    assert events[-1]["type"] == "transcript.text.done" and events[-1]["tokens"] == expected.tokens


def expect_error(live, messages, code, fragment, **params):
    with ws_client.connect(ws_url(live, **params), open_timeout=10) as ws:
        for message in messages:
            ws.send(message)
        event = json.loads(ws.recv(timeout=10))
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
    assert event["type"] == "error" and fragment in event["message"], event
    assert closed.value.rcvd.code == code


@pytest.mark.parametrize("messages, code, fragment", [
    ([b"\x00\x01\x02"], 1007, "even number of bytes"),
    ([json.dumps({"type": "start", "sample_rate": 44100})], 1007, "declared sample_rate 44100"),
    ([json.dumps({"type": "start", "encoding": "opus"})], 1007, "PCM16"),
    (["hello"], 1007, "JSON control messages"),
    ([json.dumps({"type": "pause"})], 1007, "unknown control message"),
])
def test_bad_frames_get_an_error_event(live, messages, code, fragment):
    expect_error(live, messages, code, fragment)


@pytest.mark.parametrize("params, fragment", [({"language": "xx"}, "Unsupported language"),
                                              ({"policy": "greedy"}, "'policy' must be"),
                                              ({"chunk_secs": "-1"}, "'chunk_secs'"),
                                              ({"language": "auto"}, "spoken language")])
def test_bad_stream_parameters_are_refused(live, params, fragment):
    expect_error(live, [], 1008, fragment, **params)


def test_capacity_stalled_and_vanished_clients(live, pcm16):
    # two streams fill the server (max_streams=2): a third is closed at once with 1013 and a reason
    with contextlib.ExitStack() as stack:
        first = stack.enter_context(ws_client.connect(ws_url(live), open_timeout=10))
        second = stack.enter_context(ws_client.connect(ws_url(live), open_timeout=10))
        first.send(pcm16[:1600].tobytes())
        with ws_client.connect(ws_url(live), open_timeout=10) as third:
            with pytest.raises(ConnectionClosed) as closed:
                third.recv(timeout=10)
        assert closed.value.rcvd.code == 1013 and "busy" in closed.value.rcvd.reason
        # the first vanishes without a word (TCP closed under it); the second stalls: closed after the idle timeout
        first.socket.shutdown(socket.SHUT_RDWR)
        started = time.monotonic()
        event = json.loads(second.recv(timeout=10))
        assert event["type"] == "error" and event["code"] == "idle_timeout"
        assert time.monotonic() - started < 5
    # their slots are free again: a full stream works
    time.sleep(0.3)
    assert stream_pcm(live, pcm16)[-1]["type"] == "transcript.text.done"


def post_stream(live, data: bytes, fields: dict) -> tuple:
    boundary = "x-live-test"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
                 "Content-Type: audio/wav\r\n\r\n".encode() + data + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    conn = httplib.HTTPConnection(live.host, live.port, timeout=60)
    conn.request("POST", "/v1/audio/transcriptions", body,
                 {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    response = conn.getresponse()
    text = response.read().decode()
    conn.close()
    return response.status, response.getheader("content-type"), text


def test_sse_stream_of_an_upload(live, demo):
    status, content_type, text = post_stream(live, SAMPLE.read_bytes(), {"stream": "true", "model": "m"})
    assert status == 200 and content_type.startswith("text/event-stream")
    events = [json.loads(line[len("data: "):]) for line in text.splitlines() if line.startswith("data: ")]
    assert [e["type"] for e in events[:-1]] == ["transcript.text.delta"] * (len(events) - 1)
    expected = demo.transcribe(str(SAMPLE), streaming=StreamingOptions())
    assert events[-1] == {"type": "transcript.text.done", "text": expected.text, "tokens": expected.tokens,
                          "duration": round(expected.duration, 3)}
    assert "".join(e["delta"] for e in events[:-1]).strip() == expected.text
    # what OpenAI's streaming does not offer is refused
    status, _, body = post_stream(live, SAMPLE.read_bytes(), {"stream": "true", "response_format": "srt"})
    assert status == 400 and "response_format json or text" in body


def test_the_page_and_the_model_card(live):
    conn = httplib.HTTPConnection(live.host, live.port, timeout=10)
    conn.request("GET", "/")
    response = conn.getresponse()
    page = response.read().decode()
    assert response.status == 200 and "Live captions" in page and "/v1/audio/stream" in page
    conn.request("GET", "/v1/models")
    card = json.loads(conn.getresponse().read())["data"][0]
    assert card["capabilities"]["languages"] == ["en", "de", "es", "fr"]
    conn.close()
