"""Output formats for transcripts (txt, json, srt, vtt, tsv) and atomic file writing.

Every file is written to a temporary file in the destination directory and moved into place with
``os.replace``, so an output file is either the complete new content or untouched (an interrupted run never
leaves a half-written transcript that looks finished).

Subtitles (srt, vtt) and tsv rows come from the transcript's segments, else its words; without timestamps the
whole text becomes one cue from 0 to the audio's duration. Text is written in UTF-8 with ``\\n`` newlines.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Union

from mlx_canary.errors import CanaryError

FORMATS = ("txt", "json", "srt", "vtt", "tsv")

# Read once at import: the umask can only be read by setting it, which is not thread-safe later on.
_UMASK = os.umask(0)
os.umask(_UMASK)


def _as_dict(transcript: Any) -> dict:
    """Accept a ``Transcript``, a dict of its fields, or any object with the same attributes."""
    if isinstance(transcript, dict):
        return dict(transcript)
    if hasattr(transcript, "to_dict"):
        return transcript.to_dict()
    fields = ("text", "tokens", "source_lang", "target_lang", "language", "duration", "model", "path",
              "segments", "words")
    return {name: getattr(transcript, name) for name in fields if hasattr(transcript, name)}


def _json_default(value: Any) -> Any:
    # numpy / MLX scalars and arrays that slipped into segments or tokens
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _one_line(text: Any) -> str:
    """Cue and row text on a single line: a blank line ends an SRT/VTT cue, a tab or newline breaks a TSV row."""
    return " ".join(str(text).split())


def cues(transcript: Any) -> list[tuple[float, float, str]]:
    """(start, end, text) in seconds for subtitle-like formats; end is never before start."""
    data = _as_dict(transcript)
    items = data.get("segments") or data.get("words") or []
    out = []
    for item in items:
        text = _one_line(item.get("text", item.get("segment", item.get("word", ""))))
        if not text:
            continue
        start = max(0.0, float(item.get("start", 0.0)))
        end = max(start, float(item.get("end", start)))
        out.append((start, end, text))
    if not items:
        text = _one_line(data.get("text", ""))
        if text:
            out.append((0.0, max(0.0, float(data.get("duration") or 0.0)), text))
    return out


def _timestamp(seconds: float, decimal_marker: str) -> str:
    ms = max(0, round(seconds * 1000))
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal_marker}{ms:03d}"


def format_txt(transcript: Any) -> str:
    text = str(_as_dict(transcript).get("text", "")).strip()
    return text + "\n" if text else ""


def format_json(transcript: Any, model: Optional[str] = None) -> str:
    data = _as_dict(transcript)
    if model is not None and not data.get("model"):
        data["model"] = model
    ordered = {key: data.get(key) for key in ("text", "tokens", "source_lang", "target_lang", "language",
                                              "duration", "model", "path")}
    ordered["segments"] = data.get("segments") or []
    ordered["words"] = data.get("words") or []
    ordered.update({k: v for k, v in data.items() if k not in ordered})

    def dump(value: Any) -> str:
        return json.dumps(value, ensure_ascii=False, default=_json_default)

    # One key per line, one segment/word per line, token ids on one line: readable and diff-friendly
    # without json's indent=2 putting every token id on a line of its own.
    lines = []
    for key, value in ordered.items():
        if key in ("segments", "words") and value:
            rendered = "[\n" + ",\n".join("    " + dump(item) for item in value) + "\n  ]"
        else:
            rendered = dump(value)
        lines.append(f"  {dump(key)}: {rendered}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def format_srt(transcript: Any) -> str:
    blocks = [
        f"{i}\n{_timestamp(start, ',')} --> {_timestamp(end, ',')}\n{text}\n"
        for i, (start, end, text) in enumerate(cues(transcript), start=1)
    ]
    return "\n".join(blocks)


def _vtt_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def format_vtt(transcript: Any) -> str:
    blocks = [
        f"{_timestamp(start, '.')} --> {_timestamp(end, '.')}\n{_vtt_escape(text)}\n"
        for start, end, text in cues(transcript)
    ]
    return "WEBVTT\n\n" + "\n".join(blocks)


def format_tsv(transcript: Any) -> str:
    """``start<TAB>end<TAB>text`` with integer milliseconds (the layout Whisper's tools use)."""
    rows = ["start\tend\ttext"]
    rows += [f"{round(start * 1000)}\t{round(end * 1000)}\t{text}" for start, end, text in cues(transcript)]
    return "\n".join(rows) + "\n"


_FORMATTERS: dict[str, Callable[[Any], str]] = {
    "txt": format_txt,
    "json": format_json,
    "srt": format_srt,
    "vtt": format_vtt,
    "tsv": format_tsv,
}


def render(transcript: Any, fmt: str, model: Optional[str] = None) -> str:
    """The transcript as the text of one output format."""
    if fmt not in _FORMATTERS:
        raise CanaryError(f"unknown output format {fmt!r}; choose from {', '.join(FORMATS)}")
    if fmt == "json":
        return format_json(transcript, model=model)
    return _FORMATTERS[fmt](transcript)


def atomic_write(path: Union[str, os.PathLike], data: Union[str, bytes]) -> None:
    """Write ``data`` to ``path`` whole or not at all (temp file in the same directory, fsync, os.replace).

    On any failure the temp file is removed and an existing file at ``path`` keeps its old content.
    """
    path = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        mode = 0o666 & ~_UMASK
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # mkstemp creates 0600; give the file the permissions a plain open() would
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_transcript(transcript: Any, path: Union[str, os.PathLike], fmt: Optional[str] = None,
                     model: Optional[str] = None) -> Path:
    """Write one format to ``path`` atomically; ``fmt`` defaults to the path's extension."""
    path = Path(path)
    fmt = fmt or path.suffix.lstrip(".").lower()
    text = render(transcript, fmt, model=model)
    try:
        atomic_write(path, text)
    except OSError as e:
        raise CanaryError(f"could not write {path}: {e.strerror or e}") from None
    return path


def expand_formats(formats: Union[str, Iterable[str]]) -> list[str]:
    """``"all"`` or a comma-separated string or list of formats → a de-duplicated list of known formats."""
    if isinstance(formats, str):
        formats = [formats]
    out: list[str] = []
    for item in formats:
        for fmt in str(item).split(","):
            fmt = fmt.strip().lower()
            if not fmt:
                continue
            for one in FORMATS if fmt == "all" else (fmt,):
                if one not in FORMATS:
                    raise CanaryError(f"unknown output format {one!r}; choose from {', '.join(FORMATS)} or all")
                if one not in out:
                    out.append(one)
    return out


def write_outputs(transcript: Any, output_dir: Union[str, os.PathLike], stem: str,
                  formats: Union[str, Iterable[str]] = "txt", model: Optional[str] = None) -> list[Path]:
    """Write ``output_dir/<stem>.<ext>`` for each format (``"all"`` for every one); returns the paths."""
    output_dir = Path(output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CanaryError(f"could not create output directory {output_dir}: {e.strerror or e}") from None
    return [
        write_transcript(transcript, output_dir / f"{stem}.{fmt}", fmt, model=model)
        for fmt in expand_formats(formats)
    ]
