"""Timestamps: predicted ``<|N|>`` frame tokens in decoded text -> clean text, word and segment times.

Reproduces NeMo's ``process_aed_timestamp_outputs`` + ``get_segment_offsets`` (canary-1b-flash / 180m-flash,
reference §10.1). The model brackets each word (or group of words) with encoder-frame indices,
``<|s|> word <|e|>``. Only bracketed content survives; times are ``offset * window_stride * subsampling_factor``
evaluated left to right like NeMo so the floats are bit-identical (no rounding, no clamping, start may exceed end).
"""

from __future__ import annotations

import re

# Same pattern as NeMo (non-greedy, '.' does not cross newlines, \d accepts any Unicode digit like int()).
_WORD_RE = re.compile(r"<\|(\d+)\|>(.*?)<\|(\d+)\|>")
SEGMENT_DELIMITERS = (".", "?", "!")


def _seconds(offset: int, window_stride: float, subsampling_factor: int) -> float:
    return offset * window_stride * subsampling_factor


def _span(text: str, first: dict, last: dict, window_stride: float, subsampling_factor: int) -> dict:
    start_offset, end_offset = first["start_offset"], last["end_offset"]
    return {
        "text": text,
        "start": _seconds(start_offset, window_stride, subsampling_factor),
        "end": _seconds(end_offset, window_stride, subsampling_factor),
        "start_offset": start_offset,
        "end_offset": end_offset,
    }


def build_segments(words: list[dict], window_stride: float = 0.01, subsampling_factor: int = 8) -> list[dict]:
    """NeMo's ``get_segment_offsets`` over word dicts: a segment closes at a word ending with (or being) one of
    ``. ? !``; the words after the last delimiter form the last segment."""
    segments = []
    pending: list[dict] = []
    for word in words:
        pending.append(word)
        text = word["text"]
        # A segment closes on a word that ends with (or is) a delimiter.
        if text and (text[-1] in SEGMENT_DELIMITERS or text in SEGMENT_DELIMITERS):
            joined = " ".join(w["text"] for w in pending)
            segments.append(_span(joined, pending[0], word, window_stride, subsampling_factor))
            pending = []
    if pending:
        joined = " ".join(w["text"] for w in pending)
        segments.append(_span(joined, pending[0], pending[-1], window_stride, subsampling_factor))
    return segments


def parse_timestamps(
    text: str, *, window_stride: float = 0.01, subsampling_factor: int = 8
) -> tuple[str, list[dict], list[dict]]:
    """Split decoded text with timestamp tokens into ``(clean_text, words, segments)``.

    ``window_stride`` is the preprocessor hop in seconds (``hop_length / sample_rate``) and
    ``subsampling_factor`` the encoder's, as NeMo passes them. Each word and segment is a dict
    ``{"text", "start", "end", "start_offset", "end_offset"}`` (NeMo names the text key ``word`` / ``segment``);
    offsets are encoder frames, times seconds. Without any ``<|a|>...<|b|>`` pair the stripped text comes back
    unchanged with empty lists; otherwise ``clean_text`` is the bracketed contents joined by single spaces and
    everything outside brackets (including empty brackets) is dropped.
    """
    text = text.strip()
    matches = list(_WORD_RE.finditer(text))
    if not matches:
        return text, [], []
    words = []
    for match in matches:
        content = match.group(2).strip()
        if not content:
            continue
        start_offset, end_offset = int(match.group(1)), int(match.group(3))
        words.append(
            {
                "text": content,
                "start": _seconds(start_offset, window_stride, subsampling_factor),
                "end": _seconds(end_offset, window_stride, subsampling_factor),
                "start_offset": start_offset,
                "end_offset": end_offset,
            }
        )
    clean_text = " ".join(word["text"] for word in words)
    return clean_text, words, build_segments(words, window_stride, subsampling_factor)
