"""Output formats for transcripts (txt, json, srt, vtt, tsv) and atomic file writing.

Every file is written to a temporary file in the destination directory and moved into place with
``os.replace``, so an output file is either the complete new content or untouched (an interrupted run never
leaves a half-written transcript that looks finished).

JSON always has ``text``, ``tokens``, ``source_lang``, ``target_lang``, ``duration`` and ``model``; ``language``
only when the spoken language was identified, ``path`` only when the input was a file, and ``segments`` and
``words`` (``{"start", "end", "text", ...}`` in seconds, extra keys kept) only when timestamps were requested or
produced.

Subtitles (srt, vtt) and tsv rows come from the transcript's segments (each keeps its own times; a long one is
wrapped onto lines of at most 42 characters), else its words. Without timestamps the text is split into cues of
at most two 42-character lines, at sentence ends where possible, then at clause punctuation, then between
words, and the audio's duration is shared out in proportion to each cue's characters: **those cue times are
estimates** (about right for evenly paced speech, not aligned to it); ask for timestamps for real ones.
Text is written in UTF-8 with ``\\n`` newlines.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Union

from .errors import CanaryError

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
              "segments", "words", "timestamps")
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


LINE_WIDTH = 42  # characters per subtitle line (a common broadcast/Netflix limit)
CUE_LINES = 2  # lines per cue: cues made from untimed text fit in CUE_LINES lines of LINE_WIDTH

_SENTENCE_END = (".", "!", "?", "…", "。", "！", "？")
_CLAUSE_END = (",", ";", ":", "，", "；", "：", "–", "—")
_CLOSERS = "\"'»”’)]"
# Cost, in squared characters of unused cue room, of splitting a long sentence between two words that no
# clause punctuation separates: a break after a comma wins unless it leaves one part far shorter (~40
# characters of imbalance) than a break in mid-phrase would.
_MID_CLAUSE_BREAK_COST = 40 ** 2
# Characters of extra line length worth paying for a line break after punctuation rather than mid-phrase.
_LINE_BREAK_BONUS = 12


def _item_text(item: dict) -> str:
    return str(item.get("text", item.get("segment", item.get("word", ""))))


def _has_timestamps(data: dict) -> bool:
    return bool(data.get("timestamps") or data.get("segments") or data.get("words"))


def _ends_with(word: str, marks: tuple) -> bool:
    return word.rstrip(_CLOSERS).endswith(marks)


def _after_punctuation(word: str) -> bool:
    return _ends_with(word, _SENTENCE_END + _CLAUSE_END)


def wrap_lines(text: str, width: int = LINE_WIDTH) -> list[str]:
    """``text`` on lines of at most ``width`` characters, broken between words (a longer word gets a line).

    Text that needs two lines is split where the longer line is shortest (balanced lines read best), after
    punctuation if that costs at most ``_LINE_BREAK_BONUS`` characters; longer text is filled line by line.
    """
    words = str(text).split()
    if not words:
        return []
    one = " ".join(words)
    if len(one) <= width:
        return [one]
    best = None
    for i in range(1, len(words) if len(one) <= 2 * width + 1 else 1):
        first, second = " ".join(words[:i]), " ".join(words[i:])
        if len(first) <= width and len(second) <= width:
            score = max(len(first), len(second)) - (_LINE_BREAK_BONUS if _after_punctuation(words[i - 1]) else 0)
            if best is None or score < best[0]:
                best = (score, [first, second])
    if best is not None:
        return best[1]
    lines: list[str] = []
    for word in words:
        if lines and len(lines[-1]) + 1 + len(word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines


def _fits(words: list[str]) -> bool:
    """The words make one cue: at most CUE_LINES lines of LINE_WIDTH (one over-long word alone always does)."""
    if len(words) == 1:
        return True
    # Filling lines greedily uses the fewest lines; this runs for every candidate cue, so no joining.
    lines, used = 1, -1
    for word in words:
        if len(word) > LINE_WIDTH:
            return False
        if used + 1 + len(word) <= LINE_WIDTH:
            used += 1 + len(word)
        else:
            lines, used = lines + 1, len(word)
            if lines > CUE_LINES:
                return False
    return True


def _sentences(text: str) -> list[list[str]]:
    sentences: list[list[str]] = [[]]
    for word in text.split():
        sentences[-1].append(word)
        if _ends_with(word, _SENTENCE_END):
            sentences.append([])
    return [s for s in sentences if s]


def _split_sentence(words: list[str]) -> list[list[str]]:
    """A sentence too long for one cue, in the fewest cues, balanced, preferring breaks after , ; : and dashes.

    Dynamic programming over break points: ``best[i]`` is the cheapest split of ``words[:i]`` as
    (number of cues, cost), cost being the squared unused room of each cue (so parts come out even) plus
    ``_MID_CLAUSE_BREAK_COST`` per break that is not after clause punctuation.
    """
    room = LINE_WIDTH * CUE_LINES
    n = len(words)
    best: list = [None] * (n + 1)
    best[0] = ((0, 0), 0)
    for i in range(n):
        if best[i] is None:
            continue
        (count, cost), _ = best[i]
        for j in range(i + 1, n + 1):
            piece = words[i:j]
            if j > i + 1 and not _fits(piece):
                break
            length = len(" ".join(piece))
            penalty = max(0, room - length) ** 2
            if j < n and not _ends_with(piece[-1], _CLAUSE_END):
                penalty += _MID_CLAUSE_BREAK_COST
            candidate = ((count + 1, cost + penalty), i)
            if best[j] is None or candidate[0] < best[j][0]:
                best[j] = candidate
    pieces = []
    j = n
    while j > 0:
        i = best[j][1]
        pieces.append(words[i:j])
        j = i
    return pieces[::-1]


def split_text(text: str) -> list[str]:
    """Untimed text as cue texts that each fit in CUE_LINES lines of LINE_WIDTH characters.

    Short sentences share a cue; a cue ends inside a sentence only when that sentence alone is too long.
    """
    cue_texts: list[str] = []
    packable = False  # the last cue holds whole sentences only, so the next short one may join it
    for sentence in _sentences(text):
        if _fits(sentence):
            joined = " ".join(sentence)
            if packable and _fits(cue_texts[-1].split() + sentence):
                cue_texts[-1] += " " + joined
            else:
                cue_texts.append(joined)
            packable = True
        else:
            # The parts of a split sentence keep their chosen breaks: nothing is packed onto them.
            cue_texts.extend(" ".join(piece) for piece in _split_sentence(sentence))
            packable = False
    return cue_texts


def estimated_cues(text: str, duration: float) -> list[tuple[float, float, str]]:
    """Cues for text without timestamps: ``split_text`` pieces, the duration shared by character count.

    The times are an estimate (speech rate assumed constant); consecutive cues touch and the last ends at
    ``duration``.
    """
    pieces = split_text(text)
    total = sum(len(piece) for piece in pieces)
    duration = max(0.0, float(duration or 0.0))
    out = []
    done = 0
    for piece in pieces:
        start = duration * done / total
        done += len(piece)
        out.append((start, duration * done / total, piece))
    return out


def cues(transcript: Any) -> list[tuple[float, float, str]]:
    """(start, end, text) in seconds for subtitle-like formats; text on one line, end never before start.

    From the segments, else the words; without either the times are estimates (see ``estimated_cues``).
    """
    data = _as_dict(transcript)
    items = data.get("segments") or data.get("words") or []
    out = []
    for item in items:
        text = _one_line(_item_text(item))
        if not text:
            continue
        start = max(0.0, float(item.get("start", 0.0)))
        end = max(start, float(item.get("end", start)))
        out.append((start, end, text))
    if not items:
        out = estimated_cues(_one_line(data.get("text", "")), data.get("duration") or 0.0)
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


def _timed_item(item: Any) -> dict:
    """A segment/word for JSON: ``start``, ``end``, ``text`` first, then its other keys as they are."""
    item = dict(item)
    out = {"start": item.pop("start", None), "end": item.pop("end", None), "text": _item_text(item)}
    item.pop("text", None)
    out.update(item)
    return out


def format_json(transcript: Any, model: Optional[str] = None) -> str:
    data = _as_dict(transcript)
    if model is not None and not data.get("model"):
        data["model"] = model
    ordered = {key: data.get(key) for key in ("text", "tokens", "source_lang", "target_lang")}
    if data.get("language") is not None:  # only when the spoken language was identified
        ordered["language"] = data["language"]
    ordered["duration"] = data.get("duration")
    ordered["model"] = data.get("model")
    if data.get("path") is not None:
        ordered["path"] = data["path"]
    if _has_timestamps(data):
        ordered["segments"] = [_timed_item(item) for item in data.get("segments") or []]
        ordered["words"] = [_timed_item(item) for item in data.get("words") or []]
    # Keys of a dict input that the Transcript does not know; the flag itself is implied by "segments".
    skip = {"language", "path", "segments", "words", "timestamps"}
    ordered.update({k: v for k, v in data.items() if k not in ordered and k not in skip})

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
        f"{i}\n{_timestamp(start, ',')} --> {_timestamp(end, ',')}\n" + "\n".join(wrap_lines(text)) + "\n"
        for i, (start, end, text) in enumerate(cues(transcript), start=1)
    ]
    return "\n".join(blocks)


def _vtt_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def format_vtt(transcript: Any) -> str:
    blocks = [
        f"{_timestamp(start, '.')} --> {_timestamp(end, '.')}\n" + "\n".join(map(_vtt_escape, wrap_lines(text)))
        + "\n"
        for start, end, text in cues(transcript)
    ]
    return "WEBVTT\n\n" + "\n".join(blocks)


def format_tsv(transcript: Any) -> str:
    """``start<TAB>end<TAB>text`` with integer milliseconds (the layout Whisper's tools use), one row per cue."""
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
