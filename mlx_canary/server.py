"""The HTTP server (``mlx-canary serve``): OpenAI's audio transcription/translation API over one loaded model.

Install with ``pip install 'mlx-canary[server]'`` (FastAPI, uvicorn, python-multipart). Endpoints:

* ``POST /v1/audio/transcriptions`` and ``POST /v1/audio/translations``: OpenAI's multipart form.
  ``file`` (required; any format ffmpeg decodes), ``model`` (any value is accepted: the server serves the one model
  it loaded, so clients that hard-code e.g. ``whisper-1`` work), ``language`` (ISO code of the speech; missing = the
  model's default source language, as in NeMo; ``auto`` = the model's experimental language identification, which
  falls back to the default language for audio whose language the model does not name),
  ``response_format`` = ``json`` (default) | ``text`` | ``srt`` | ``vtt`` | ``verbose_json``,
  ``timestamp_granularities[]`` = ``segment`` | ``word`` (verbose_json only; default segment), and ``prompt``,
  ``temperature`` (accepted and ignored: decoding is deterministic) and ``stream``: ``true`` answers (json/text
  formats) with server-sent events in OpenAI's shape, ``transcript.text.delta`` as NeMo's streaming decoding
  (Wait-k, NeMo's defaults) decides the text, then ``transcript.text.done`` (``live.py``).
  Canary extras, sent as extra form fields (``extra_body=`` in the openai client): ``target_language`` (the
  output language; transcriptions default to the spoken language, i.e. plain ASR; translations default to
  ``en``, as OpenAI's translation endpoint translates into English), ``pnc`` (punctuation and capitalization,
  default true) and ``beam_size`` (1 = greedy; default: the model's setting). For translations ``language``
  names the *source* language. Any other field is refused (400) so a misspelt option is never silently ignored.
* ``GET /v1/models`` (the loaded model; its id is the model directory's name, or the repo id),
  ``GET /v1/models/{id}``, ``GET /health``.
* ``GET /`` is a local web page (transcribe a file; live captions from the microphone) and ``/v1/audio/stream`` a
  WebSocket for live audio (protocol in ``live.py``).

Responses follow OpenAI: ``json`` = ``{"text", "usage"}``; ``text`` = the text and a newline; ``srt`` / ``vtt``
from ``writers``; ``verbose_json`` = ``{"task", "language", "duration", "text", "segments", "words", "usage"}``
(``segments`` unless only ``word`` was asked for, ``words`` only when asked for). Segment fields Canary does not
compute are fixed: ``seek`` 0, ``temperature`` 0.0, ``avg_logprob`` 0.0, ``no_speech_prob`` 0.0; ``tokens`` are
the segment text's ids in the model's vocabulary and ``compression_ratio`` is Whisper's (text bytes / zlib bytes).
``language`` is the model's language code (``en``), not OpenAI's English name; for translations it is the output
language, as in OpenAI. Timestamps (srt, vtt, verbose_json) are given when the model can: predicted by
canary-1b-flash / 180m-flash, force-aligned by canary-1b-v2's aligner (transcriptions only, not translations);
otherwise each transcript is one segment spanning the audio, and ``word`` granularity is refused.

Errors are OpenAI-shaped, ``{"error": {"message", "type", "param", "code"}}``: 400 for bad or unknown fields,
unsupported languages and audio that cannot be decoded, 401 for a wrong API key, 404 for unknown paths/models,
413 for uploads over ``--max-upload-mb``, 408 for requests read too slowly and 503 when the queue is full or
too many connections are open (``server_limits``; that one is uvicorn's plain-text 503), 500 for anything
unexpected. No request can stop the server: every failure is answered and the worker goes on with the next
request.

Design: handlers decode uploads in the thread pool (``audio.load_audio``: libsndfile as NeMo, ffmpeg for other
formats) and submit ``(samples, TranscribeOptions)`` jobs to the shared ``scheduler.Scheduler``, whose worker thread loads and owns the model,
batches waiting jobs of equal options, retries a failed batch one request at a time (so only the bad request
fails), runs long uploads alone through the chunked path, and refuses work past its queue bound (503).

Use: ``mlx-canary serve --model DIR`` then e.g.
``OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused").audio.transcriptions.create(model="canary",
file=open("talk.wav", "rb"), language="en", response_format="srt")``.

The server listens on 127.0.0.1 unless told otherwise; with ``--api-key`` (or ``MLX_CANARY_API_KEY``) the
``/v1`` endpoints require ``Authorization: Bearer <key>``.
"""

import asyncio
import dataclasses
import hmac
import ipaddress
import json
import logging
import math
import os
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from . import writers
from ._version import __version__
from . import audio as audio_io
from .errors import CanaryError
from .loading import load_model
from .live import LIVE_FIELDS, add_live_routes, sse_events
from .options import TranscribeOptions
from .scheduler import DEFAULT_MAX_BATCH, QueueFull, Scheduler, WorkerStopped
from .server_limits import ConnectionLimits, ReadDeadline, uvicorn_options
from .streaming_policy import StreamingOptions

log = logging.getLogger("mlx_canary.server")

RESPONSE_FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
GRANULARITIES = ("word", "segment")
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_MAX_UPLOAD_MB = 25.0  # OpenAI's own upload limit
MAX_BEAM_SIZE = 16  # a bound so one request cannot make the shared worker arbitrarily slow
AUDIO_PATHS = ("/v1/audio/transcriptions", "/v1/audio/translations")
# Room for the form's other fields and the multipart framing on top of the file itself.
FORM_OVERHEAD_BYTES = 256 * 1024
# An over-limit body is read and thrown away (so the client reads our 413 instead of a reset connection), but
# only up to this much; past it the connection is simply closed.
MAX_DRAIN_BYTES = 1 << 30

KNOWN_FIELDS = frozenset(
    {"file", "model", "language", "prompt", "response_format", "temperature", "timestamp_granularities[]",
     "timestamp_granularities", "stream", "target_language", "pnc", "beam_size"}
)
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


# -- errors ----------------------------------------------------------------------------------------------------


class ApiError(Exception):
    """An error answered as OpenAI's ``{"error": {...}}`` JSON with an HTTP status."""

    def __init__(self, status: int, message: str, *, param: Optional[str] = None, code: Optional[str] = None,
                 type: Optional[str] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or ("server_error" if status >= 500 else "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# -- request options -------------------------------------------------------------------------------------------


@dataclass
class RequestOptions:
    task: str  # "transcribe" | "translate" (the endpoint)
    options: TranscribeOptions
    response_format: str = "json"
    granularities: tuple = ()
    stream: bool = False  # answer with server-sent transcript.text events


def _single(form, name: str) -> Optional[str]:
    values = form.getlist(name)
    if not values:
        return None
    if len(values) > 1:
        raise ApiError(400, f"'{name}' was given {len(values)} times; give it once.", param=name,
                       code="invalid_value")
    value = values[0]
    if not isinstance(value, str):
        raise ApiError(400, f"'{name}' must be a form field, not a file.", param=name, code="invalid_value")
    return value.strip()


def parse_bool(value: str, name: str) -> bool:
    word = value.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ApiError(400, f"'{name}' must be true or false, got {value!r}.", param=name, code="invalid_value")


def resolve_language(tokenizer, value: str, name: str) -> str:
    """A language code of the model for ``value`` (exact, then lower-cased), or a 400 naming the choices."""
    for candidate in dict.fromkeys((value, value.lower())):
        try:
            return tokenizer.resolve_language(candidate)
        except CanaryError:
            continue
    raise ApiError(
        400, f"Unsupported {name} {value!r}; this model supports: {', '.join(tokenizer.languages)}.",
        param=name, code="unsupported_language",
    )


def parse_options(form, task: str, model, default_source: str) -> RequestOptions:
    """Read and check the form fields (everything but the file) against the loaded model."""
    for name in form.keys():
        if name not in KNOWN_FIELDS:
            raise ApiError(400, f"Unrecognized request argument supplied: {name}.", param=name,
                           code="unknown_parameter")
    tokenizer = model.tokenizer

    fmt = (_single(form, "response_format") or "json").lower()
    if fmt not in RESPONSE_FORMATS:
        raise ApiError(400, f"Unsupported response_format {fmt!r}; use one of {', '.join(RESPONSE_FORMATS)}.",
                       param="response_format", code="invalid_value")

    granularities: list = []
    for name in ("timestamp_granularities[]", "timestamp_granularities"):
        for value in form.getlist(name):
            if not isinstance(value, str):
                raise ApiError(400, f"'{name}' must be a form field.", param=name, code="invalid_value")
            for item in value.split(","):
                item = item.strip().lower()
                if item not in GRANULARITIES:
                    raise ApiError(400, f"Unsupported timestamp granularity {item!r}; use word and/or segment.",
                                   param="timestamp_granularities[]", code="invalid_value")
                if item not in granularities:
                    granularities.append(item)
    if granularities and fmt != "verbose_json":
        raise ApiError(400, "timestamp_granularities needs response_format=verbose_json.",
                       param="timestamp_granularities[]", code="invalid_value")

    stream_field = _single(form, "stream")
    stream = stream_field is not None and parse_bool(stream_field, "stream")
    if stream and fmt not in ("json", "text"):
        raise ApiError(400, "stream=true answers with transcript.text events: use response_format json or text.",
                       param="stream", code="unsupported_value")
    temperature = _single(form, "temperature")
    if temperature is not None:
        try:
            number = float(temperature)
        except ValueError:
            number = float("nan")
        if not 0.0 <= number <= 1.0:
            raise ApiError(400, f"'temperature' must be a number between 0 and 1, got {temperature!r}.",
                           param="temperature", code="invalid_value")
    _single(form, "prompt")  # accepted for compatibility and ignored
    _single(form, "model")  # any model name is accepted: the server has one model

    language = _single(form, "language")
    if not language:
        source = default_source
    elif language.lower() == "auto":
        if not model.capabilities.language_id:
            raise ApiError(400, "This model knows one language only; leave 'language' out.", param="language",
                           code="unsupported_value")
        source = "auto"
    else:
        source = resolve_language(tokenizer, language, "language")
    target_field = _single(form, "target_language")
    if target_field:
        target: Optional[str] = resolve_language(tokenizer, target_field, "target_language")
    elif task == "translate":
        target = resolve_language(tokenizer, "en", "target_language")
    else:
        target = None
    if target is not None and target == source:
        target = None

    pnc_field = _single(form, "pnc")
    pnc = True if not pnc_field else parse_bool(pnc_field, "pnc")
    beam_field = _single(form, "beam_size")
    beam_size = None
    if beam_field:
        try:
            beam_size = int(beam_field)
        except ValueError:
            beam_size = 0
        if not 1 <= beam_size <= MAX_BEAM_SIZE:
            raise ApiError(400, f"'beam_size' must be a whole number from 1 to {MAX_BEAM_SIZE}, got {beam_field!r}.",
                           param="beam_size", code="invalid_value")

    capabilities = model.capabilities
    can_time = capabilities.timestamps
    if "word" in granularities and not can_time:
        raise ApiError(400, "This model does not predict timestamps, so word timestamps are unavailable.",
                       param="timestamp_granularities[]", code="unsupported_value")
    if target is not None and not capabilities.translation_timestamps:
        # canary-1b-v2 times its transcripts by aligning them to the speech; a translation's words were not spoken.
        if "word" in granularities and can_time:
            raise ApiError(400, "This model times transcriptions only (by aligning the text to the speech): word "
                           "timestamps are unavailable for translations.", param="timestamp_granularities[]",
                           code="unsupported_value")
        can_time = False
    timestamps = can_time and fmt in ("srt", "vtt", "verbose_json")
    if stream and (source == "auto" or (beam_size or 1) > 1):
        raise ApiError(400, "stream=true decodes greedily in the named (or default) language: omit "
                       "language=auto and beam_size.", param="stream", code="unsupported_value")
    try:
        options = TranscribeOptions(source, target, pnc, timestamps, beam_size=beam_size,
                                    streaming=StreamingOptions() if stream else None)
        model.prepare(options)  # checks the options against the model without touching the network
    except CanaryError as e:
        raise ApiError(400, str(e), code="invalid_value") from None
    return RequestOptions(task, options, fmt, tuple(granularities), stream)


# -- responses -------------------------------------------------------------------------------------------------


def compression_ratio(text: str) -> float:
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


def _segment_tokens(tokenizer, text: str, lang: Optional[str]) -> list:
    try:
        return [int(t) for t in tokenizer.encode(text, lang)]
    except (CanaryError, TypeError, ValueError):
        return []


def verbose_json(transcript, options: RequestOptions, tokenizer=None) -> dict:
    """OpenAI's verbose_json (transcription or translation) for a ``Transcript``."""
    source = getattr(transcript, "language", None) or transcript.source_lang
    target = transcript.target_lang or source
    translated = options.task == "translate" or target != source
    text = str(transcript.text).strip()
    duration = float(transcript.duration)
    body: dict = {
        "task": "translate" if translated else "transcribe",
        "language": target if options.task == "translate" else source,
        "duration": duration,
        "text": text,
    }
    granularities = options.granularities or ("segment",)
    if "segment" in granularities:
        spans = transcript.segments or ([{"start": 0.0, "end": duration, "text": text}] if text else [])
        segments = []
        for index, span in enumerate(spans):
            seg_text = str(span.get("text", "")).strip()
            segments.append({
                "id": index,
                "seek": 0,
                "start": float(span.get("start", 0.0)),
                "end": float(span.get("end", 0.0)),
                "text": seg_text,
                "tokens": _segment_tokens(tokenizer, seg_text, target) if tokenizer is not None else [],
                "temperature": 0.0,
                "avg_logprob": 0.0,
                "compression_ratio": compression_ratio(seg_text),
                "no_speech_prob": 0.0,
            })
        body["segments"] = segments
    if "word" in granularities:
        body["words"] = [
            {"word": str(w.get("text", "")).strip(), "start": float(w.get("start", 0.0)),
             "end": float(w.get("end", 0.0))}
            for w in transcript.words
        ]
    body["usage"] = _usage(duration)
    return body


def _usage(duration: float) -> dict:
    return {"type": "duration", "seconds": int(math.ceil(duration))}


def render_response(transcript, options: RequestOptions, tokenizer=None) -> tuple:
    """``(body, media_type)``: a dict for the JSON formats, else text."""
    fmt = options.response_format
    if fmt == "json":
        return {"text": str(transcript.text).strip(), "usage": _usage(float(transcript.duration))}, None
    if fmt == "verbose_json":
        return verbose_json(transcript, options, tokenizer), None
    text = writers.render(transcript, {"text": "txt"}.get(fmt, fmt))
    return text, "text/plain; charset=utf-8"


# -- the ASGI app ----------------------------------------------------------------------------------------------


def model_id_for(path_or_repo: Any) -> str:
    """The id ``/v1/models`` reports: a directory's or .nemo file's name, or the repo id as given."""
    text = str(path_or_repo).rstrip("/\\")
    path = Path(text).expanduser()
    if path.exists():
        return path.stem if path.suffix == ".nemo" else path.name
    return text


class _BodyLimit:
    """ASGI middleware: answers 413 for audio uploads over the limit without keeping their bytes anywhere."""

    def __init__(self, app, max_body: int):
        self.app = app
        self.max_body = max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path") not in AUDIO_PATHS:
            await self.app(scope, receive, send)
            return
        declared = None
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = None
        if declared is not None and declared > self.max_body:
            await _drain(receive, 0)
            await _send_json(send, _too_large(self.max_body))
            return

        received = 0
        over = False

        async def counting_receive():
            nonlocal received, over
            if over:
                return {"type": "http.request", "body": b"", "more_body": False}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    # Stop feeding the app; the handler sees the flag and answers 413.
                    over = True
                    scope.setdefault("state", {})["upload_too_large"] = True
                    if message.get("more_body", False):
                        await _drain(receive, received)
                    return {"type": "http.request", "body": b"", "more_body": False}
            return message

        await self.app(scope, counting_receive, send)


async def _drain(receive, already: int) -> None:
    total = already
    while total <= MAX_DRAIN_BYTES:
        message = await receive()
        if message["type"] != "http.request":
            return
        total += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


def _too_large(max_body: int) -> ApiError:
    limit_mb = (max_body - FORM_OVERHEAD_BYTES) / 1e6
    return ApiError(413, f"The uploaded file is larger than this server's limit of {limit_mb:g} MB.",
                    param="file", code="file_too_large")


async def _send_json(send, error: ApiError) -> None:
    payload = json.dumps(error.body()).encode("utf-8")
    await send({"type": "http.response.start", "status": error.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})


_FORM_SCHEMA = {
    "type": "object",
    "required": ["file"],
    "properties": {
        "file": {"type": "string", "format": "binary", "description": "audio or video in any format ffmpeg reads"},
        "model": {"type": "string", "description": "accepted and ignored: the server serves its one model"},
        "language": {"type": "string", "description": "spoken language (ISO code); missing: the model's default; 'auto': identified (experimental)"},
        "response_format": {"type": "string", "enum": list(RESPONSE_FORMATS), "default": "json"},
        "timestamp_granularities[]": {"type": "array", "items": {"type": "string", "enum": list(GRANULARITIES)},
                                      "description": "verbose_json only; default segment"},
        "prompt": {"type": "string", "description": "accepted and ignored"},
        "temperature": {"type": "number", "description": "accepted and ignored (deterministic decoding)"},
        "target_language": {"type": "string", "description": "Canary extra: output language (translations: en)"},
        "pnc": {"type": "boolean", "default": True, "description": "Canary extra: punctuation and capitals"},
        "beam_size": {"type": "integer", "minimum": 1, "maximum": MAX_BEAM_SIZE,
                      "description": "Canary extra: beam width (default: the model's setting)"},
    },
}


def create_app(worker: Scheduler, *, model_id: str = "canary",
               max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB, api_key: Optional[str] = None,
               limits: Optional[ConnectionLimits] = None):
    """The FastAPI app over a started ``Scheduler`` (the caller starts and stops the worker).
    ``limits``: the upload read timeouts (``server_limits``; the head timeout and connection cap are the
    uvicorn side, ``uvicorn_options``)."""
    _server_modules()
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    if max_upload_mb <= 0:
        raise CanaryError("max_upload_mb must be positive")
    max_file = int(max_upload_mb * 1e6)
    created = int(time.time())
    model = worker.model
    default_source = model.capabilities.default_source_lang
    # ffmpeg processes started at once: more than the CPUs can run only makes every request slower.
    decode_slots = asyncio.Semaphore(max(2, os.cpu_count() or 2))

    app = FastAPI(title="mlx-canary", version=__version__,
                  description="OpenAI-compatible speech-to-text API serving an NVIDIA Canary model on MLX.")
    app.state.worker = worker
    app.state.model_id = model_id

    def error_response(error: ApiError):
        headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
        return JSONResponse(error.body(), status_code=error.status, headers=headers)

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        codes = {404: "not_found", 405: "method_not_allowed"}
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404:
            message = f"Unknown path {request.method} {request.url.path}."
        return error_response(ApiError(exc.status_code, message, code=codes.get(exc.status_code)))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc):
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(x) for x in first.get("loc", ()) if x not in ("body", "query", "path")]
        return error_response(ApiError(400, first.get("msg", "invalid request"), param=".".join(loc) or None,
                                       code="invalid_value"))

    @app.exception_handler(Exception)
    async def _unexpected(request, exc):
        log.error("unhandled error for %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(ApiError(500, f"Internal server error: {type(exc).__name__}", code="internal_error"))

    def check_key(request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "Incorrect or missing API key (send 'Authorization: Bearer <key>').",
                           code="invalid_api_key")

    capabilities = dataclasses.asdict(model.capabilities)

    def model_card() -> dict:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "mlx-canary",
                "capabilities": capabilities}

    @app.get("/health")
    async def health():
        ok = worker.alive
        body = {"status": "ok" if ok else "unavailable", "model": model_id, "waiting": worker.waiting}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def list_models(request: Request):
        check_key(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str, request: Request):
        check_key(request)
        if name != model_id:
            raise ApiError(404, f"The model {name!r} does not exist; this server serves {model_id!r}.",
                           param="model", code="model_not_found")
        return model_card()

    async def handle(request: Request, task: str):
        check_key(request)
        too_large = _too_large(max_file + FORM_OVERHEAD_BYTES)
        form = None
        try:
            try:
                form = await request.form(max_files=1, max_fields=64, max_part_size=64 * 1024)
                problem = None
            except StarletteHTTPException as e:  # Starlette's answer to a malformed multipart body
                problem = e.detail
            except ValueError as e:  # python-multipart's parse errors
                problem = str(e) or type(e).__name__
            # A body cut short by _BodyLimit may parse or not; either way the answer is 413.
            if request.scope.get("state", {}).get("upload_too_large"):
                raise too_large
            if problem is not None:
                raise ApiError(400, f"Invalid multipart form: {problem}", code="invalid_request")
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise ApiError(400, "Missing the audio 'file' (a multipart file field).", param="file",
                               code="missing_required_parameter")
            options = parse_options(form, task, model, default_source)
            if upload.size is not None and upload.size > max_file:
                raise too_large
            data = await upload.read()
            if len(data) > max_file:
                raise too_large
        finally:
            if form is not None:
                await form.close()
        label = f"<{upload.filename or 'upload'}>"
        try:
            async with decode_slots:
                samples = await run_in_threadpool(_decode_upload, data, label)
        except CanaryError as e:
            raise ApiError(400, str(e), param="file", code="invalid_audio") from None
        if samples.size == 0:
            raise ApiError(400, "The uploaded file holds no audio samples.", param="file", code="invalid_audio")
        if options.stream:
            return StreamingResponse(sse_events(worker, samples, options.options), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            future = worker.submit(samples, options.options)
        except QueueFull as e:
            raise ApiError(503, f"The server is busy ({e}); retry later.", code="server_overloaded") from None
        try:
            transcript = await asyncio.wrap_future(future)
        except CanaryError as e:
            raise ApiError(400, str(e), code="transcription_failed") from None
        except WorkerStopped:
            raise ApiError(503, "The server is shutting down.", code="server_shutting_down") from None
        body, media_type = render_response(transcript, options, model.tokenizer)
        if media_type is None:
            return JSONResponse(body)
        return Response(body, media_type=media_type)

    form_doc = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": _FORM_SCHEMA}}}}

    @app.post("/v1/audio/transcriptions", openapi_extra=form_doc)
    async def transcriptions(request: Request):
        """Speech to text; with ``target_language`` (Canary extra) speech translation."""
        return await handle(request, "transcribe")

    @app.post("/v1/audio/translations", openapi_extra=form_doc)
    async def translations(request: Request):
        """Speech to English text (or to ``target_language``); ``language`` names the spoken language."""
        return await handle(request, "translate")

    def live_options(params) -> TranscribeOptions:
        """A WebSocket stream's options from its query string: the REST endpoint's own fields and checks."""
        fields = _QueryFields(params, exclude=LIVE_FIELDS)
        options = parse_options(fields, "transcribe", model, default_source).options
        if options.identifies_language:
            raise ApiError(400, "live streams need the spoken language: omit language=auto", param="language")
        return options

    limits = limits or ConnectionLimits()
    add_live_routes(app, worker, api_key=api_key, parse_task=live_options, max_streams=limits.max_streams,
                    idle_seconds=limits.stream_idle_timeout)
    app.add_middleware(_BodyLimit, max_body=max_file + FORM_OVERHEAD_BYTES)
    # Added last, so outermost: its deadline also bounds _BodyLimit's draining of an over-limit upload.
    app.add_middleware(ReadDeadline, limits=limits)
    return app


class _QueryFields:
    """Query parameters seen as the form ``parse_options`` reads (``keys`` and ``getlist``), minus ``exclude``."""

    def __init__(self, params, exclude: frozenset):
        self.params, self.exclude = params, exclude

    def keys(self):
        return [k for k in self.params.keys() if k not in self.exclude]

    def getlist(self, name: str) -> list:
        return [] if name in self.exclude else list(self.params.getlist(name))


def _decode_upload(data: bytes, label: str) -> np.ndarray:
    try:
        return audio_io.load_audio(data)
    except CanaryError as e:
        raise CanaryError(str(e).replace("<bytes>", label)) from None


def _server_modules() -> None:
    """Fail with an install hint when the ``server`` extra is missing."""
    import importlib.util

    needed = {"fastapi": ("fastapi",), "uvicorn": ("uvicorn",), "python-multipart": ("python_multipart", "multipart")}
    missing = [name for name, modules in needed.items()
               if not any(importlib.util.find_spec(module) for module in modules)]
    if missing:
        raise CanaryError(
            f"the server needs optional dependencies that are not installed ({', '.join(missing)}); "
            "install them with: pip install 'mlx-canary[server]'"
        )


def is_loopback(host: str) -> bool:
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def serve(model: str, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
          max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB, max_batch_size: int = DEFAULT_MAX_BATCH,
          dtype: Optional[str] = None, api_key: Optional[str] = None, log_level: str = "info",
          limits: Optional[ConnectionLimits] = None) -> int:
    """Load ``model`` once and serve it until interrupted (the ``mlx-canary serve`` command). ``limits``: read
    timeouts and the connection cap (``server_limits.ConnectionLimits``; defaults when None)."""
    limits = limits or ConnectionLimits()
    _server_modules()
    import uvicorn

    worker = Scheduler(lambda: load_model(model, dtype=dtype), max_batch_size=max_batch_size)
    if log_level in ("info", "debug", "trace"):
        print(f"loading model {model}", file=sys.stderr, flush=True)
    worker.start()
    try:
        app = create_app(worker, model_id=model_id_for(model), max_upload_mb=max_upload_mb, api_key=api_key,
                         limits=limits)
        if not is_loopback(host):
            warning = "requests need the API key" if api_key else "anyone who can reach it can use it (no --api-key)"
            print(f"warning: listening on {host}, not loopback: {warning}", file=sys.stderr, flush=True)
        try:
            uvicorn.run(app, host=host, port=port, log_level=log_level, **uvicorn_options(limits))
        except SystemExit as e:  # uvicorn exits when it cannot listen (it has logged why)
            if e.code not in (None, 0):
                raise CanaryError(f"the server could not start on {host}:{port}") from None
    finally:
        worker.stop()
    return 0


__all__ = [
    "ApiError", "ConnectionLimits", "RequestOptions", "create_app", "serve", "parse_options",
    "render_response", "verbose_json", "model_id_for", "is_loopback",
]
