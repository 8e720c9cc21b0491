"""Live transcription over HTTP: server-sent events for ``stream=true`` uploads, the WebSocket protocol for live
audio, and the local web page at ``/``. Added to the OpenAI app by ``server.create_app``.

Every piece of model work (opening a session, feeding it audio, finishing it) runs on the scheduler's worker thread
through ``Scheduler.call``, in turn with the batched offline requests, so MLX is only ever used from one thread.

WebSocket protocol (``/v1/audio/stream``; query parameters ``language``, ``target_language``, ``pnc``, ``policy``
= ``alignatt`` | ``waitk``, ``chunk_secs``, ``left_context_secs``, ``right_context_secs``, and ``api_key`` when
the server has one):

* client -> server: first a text frame ``{"type": "start", "sample_rate": 16000, "encoding": "pcm_s16le"}``
  (both fields optional, but only these values are accepted), then binary frames of 16 kHz mono PCM16
  little-endian samples (any size, an even number of bytes), then ``{"type": "end"}`` (or just close).
* server -> client: ``{"type": "transcript.text.delta", "delta": str, "tokens": [int], "time": s}`` whenever tokens
  become final (``time``: the seconds of audio they were decided on), ``{"type": "transcript.text.done",
  "text": str, "tokens": [int], "duration": s}`` after ``end``, and ``{"type": "error", "message": str,
  "code": str}`` for a bad frame (the connection is then closed with code 1007, or 1008 for a policy violation).
* Capacity: at most ``max_streams`` connections stream at once; one more is accepted and closed at once with code
  1013 ("try again later") and a reason. A client that sends nothing for ``idle_seconds`` is closed with 1008.
"""

# No ``from __future__ import annotations`` here: FastAPI reads the WebSocket handler's parameter annotation at
# route creation, and WebSocket is imported inside add_live_routes (FastAPI is the optional server extra).
import asyncio
import hmac
import json
import math
from importlib import resources
from typing import Any, Callable, Optional

import numpy as np

from .audio import SAMPLE_RATE
from .errors import CanaryError
from .options import TranscribeOptions
from .scheduler import QueueFull, Scheduler, WorkerStopped
from .streaming_policy import StreamingOptions

# Query parameters of the WebSocket that are not the REST endpoint's fields.
LIVE_FIELDS = frozenset({"policy", "chunk_secs", "left_context_secs", "right_context_secs", "api_key"})
SSE_PIECE_SECONDS = 1.0  # an upload streamed with stream=true is fed to its session in pieces of this length
MAX_FRAME_BYTES = 10 * SAMPLE_RATE * 2  # 10 s of PCM16 in one frame is more than any client should send


class StreamRefused(Exception):
    """A live-stream request the server will not start (bad parameters); carries the client-facing message."""

    def __init__(self, message: str, code: str = "invalid_value"):
        super().__init__(message)
        self.code = code


def web_page() -> str:
    return resources.files("mlx_canary").joinpath("web/index.html").read_text(encoding="utf-8")


def delta_event(event) -> dict:
    return {"type": "transcript.text.delta", "delta": event.text, "tokens": list(event.tokens),
            "time": round(float(event.time), 3)}


def done_event(result) -> dict:
    return {"type": "transcript.text.done", "text": result.text.strip(), "tokens": list(result.tokens),
            "duration": round(float(result.duration), 3)}


def sse(event: dict) -> str:
    return f"data: {json.dumps(event, ensure_ascii=False)}\n\n"


def streaming_options(params: Callable[[str], Optional[str]]) -> StreamingOptions:
    """``StreamingOptions`` from request parameters (NeMo's defaults for what is not given)."""
    changes: dict[str, Any] = {}
    policy = params("policy")
    if policy:
        if policy not in ("alignatt", "waitk"):
            raise StreamRefused(f"'policy' must be alignatt or waitk, got {policy!r}")
        changes["policy"] = policy
    for name, field in (("chunk_secs", "chunk_secs"), ("left_context_secs", "left_context_secs"),
                        ("right_context_secs", "right_context_secs")):
        value = params(name)
        if value:
            try:
                number = float(value)
            except ValueError:
                number = float("nan")
            if not math.isfinite(number) or number < 0 or (field == "chunk_secs" and number <= 0):
                raise StreamRefused(f"'{name}' must be a non-negative number of seconds, got {value!r}")
            changes[field] = number
    changes.setdefault("policy", "alignatt")  # live defaults: NeMo's recommended 1 s chunk, 0.5 s look-ahead
    changes.setdefault("chunk_secs", 1.0)
    changes.setdefault("right_context_secs", 0.5)
    try:
        return StreamingOptions(**changes)
    except (CanaryError, ValueError) as e:
        raise StreamRefused(str(e)) from None


async def run_on_worker(worker: Scheduler, fn: Callable, *args):
    return await asyncio.wrap_future(worker.call(fn, *args))


async def sse_events(worker: Scheduler, samples: np.ndarray, options: TranscribeOptions):
    """The ``stream=true`` answer to an upload: deltas as the session decides tokens, then the whole text."""
    try:
        session = await run_on_worker(worker, worker.model.stream, options)
        piece = int(SSE_PIECE_SECONDS * SAMPLE_RATE)
        for start in range(0, len(samples), piece):
            for event in await run_on_worker(worker, session.feed, samples[start : start + piece]):
                yield sse(delta_event(event))
        result = await run_on_worker(worker, session.finish)
        for event in result.events:
            yield sse(delta_event(event))
        yield sse(done_event(result))
    except (CanaryError, QueueFull, WorkerStopped) as e:
        yield sse({"type": "error", "message": str(e) or type(e).__name__, "code": "transcription_failed"})


def add_live_routes(app, worker: Scheduler, *, api_key: Optional[str], parse_task: Callable,
                    max_streams: int, idle_seconds: float) -> None:
    """The web page at ``/`` and the WebSocket endpoint. ``parse_task(query_params)`` turns the query string into
    the stream's ``TranscribeOptions`` (the REST endpoint's own checks), raising with a client-facing message."""
    from fastapi import WebSocket, WebSocketDisconnect
    from fastapi.responses import HTMLResponse

    page = web_page()
    slots = asyncio.Semaphore(max_streams)

    @app.get("/", include_in_schema=False)
    async def index():
        return HTMLResponse(page)

    @app.websocket("/v1/audio/stream")
    async def live_stream(ws: WebSocket):
        await ws.accept()
        if api_key is not None and not hmac.compare_digest(
                (ws.query_params.get("api_key") or "").encode(), api_key.encode()):
            await _refuse(ws, 1008, "incorrect or missing api_key", "invalid_api_key")
            return
        if slots.locked():
            await ws.close(code=1013, reason=f"server busy: {max_streams} live streams already; try again later")
            return
        async with slots:
            await _serve_stream(ws, worker, parse_task, idle_seconds, WebSocketDisconnect)


async def _refuse(ws, code: int, message: str, error_code: str) -> None:
    await ws.send_json({"type": "error", "message": message, "code": error_code})
    await ws.close(code=code, reason=message[:120])


async def _serve_stream(ws, worker: Scheduler, parse_task: Callable, idle_seconds: float, disconnect) -> None:
    try:
        options = parse_task(ws.query_params).replace(streaming=streaming_options(ws.query_params.get))
    except StreamRefused as e:
        await _refuse(ws, 1008, str(e), e.code)
        return
    except (CanaryError, ValueError) as e:
        await _refuse(ws, 1008, str(e), "invalid_value")
        return
    except Exception as e:  # noqa: BLE001  (the REST parser's ApiError: its message is for the client)
        await _refuse(ws, 1008, getattr(e, "message", None) or str(e), getattr(e, "code", None) or "invalid_value")
        return
    session = None
    try:
        session = await run_on_worker(worker, worker.model.stream, options)
        while True:
            try:
                message = await asyncio.wait_for(ws.receive(), idle_seconds)
            except asyncio.TimeoutError:
                await _refuse(ws, 1008, f"no audio for {idle_seconds:g} s; closing", "idle_timeout")
                return
            if message["type"] == "websocket.disconnect":
                return
            if message.get("bytes") is not None:
                problem = _frame_problem(message["bytes"])
                if problem:
                    await _refuse(ws, 1007, problem, "invalid_audio")
                    return
                samples = np.frombuffer(message["bytes"], dtype="<i2").astype(np.float32) / np.float32(32768.0)
                for event in await run_on_worker(worker, session.feed, samples):
                    await ws.send_json(delta_event(event))
                continue
            problem, end = _control_problem(message.get("text"))
            if problem:
                await _refuse(ws, 1007, problem, "invalid_message")
                return
            if end:
                result = await run_on_worker(worker, session.finish)
                for event in result.events:
                    await ws.send_json(delta_event(event))
                await ws.send_json(done_event(result))
                await ws.close(code=1000)
                return
    except disconnect:
        return  # the client went away: the session is dropped with this frame
    except (QueueFull, WorkerStopped) as e:
        await _refuse(ws, 1013, f"server busy ({e}); try again later", "server_overloaded")
    except CanaryError as e:
        await _refuse(ws, 1008, str(e), "transcription_failed")


def _frame_problem(data: bytes) -> Optional[str]:
    if len(data) % 2:
        return f"a binary frame must hold 16-bit samples (an even number of bytes), got {len(data)} bytes"
    if len(data) > MAX_FRAME_BYTES:
        return f"a binary frame holds at most {MAX_FRAME_BYTES} bytes (10 s of audio), got {len(data)}"
    return None


def _control_problem(text: Optional[str]) -> tuple[Optional[str], bool]:
    """(problem, is_end) of a text frame."""
    try:
        message = json.loads(text or "")
    except ValueError:
        return "text frames must be JSON control messages such as {\"type\": \"end\"}", False
    if not isinstance(message, dict) or message.get("type") not in ("start", "end"):
        return "unknown control message; expected {\"type\": \"start\"} or {\"type\": \"end\"}", False
    if message["type"] == "start":
        rate = message.get("sample_rate", SAMPLE_RATE)
        if rate != SAMPLE_RATE:
            return f"audio must be {SAMPLE_RATE} Hz mono PCM16; the client declared sample_rate {rate!r}", False
        encoding = message.get("encoding", "pcm_s16le")
        if encoding != "pcm_s16le":
            return f"audio must be PCM16 little-endian (encoding 'pcm_s16le'), not {encoding!r}", False
    return None, message["type"] == "end"
