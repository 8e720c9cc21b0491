"""Timestamps: predicted ``<|N|>`` frame tokens in decoded text -> clean text, word and segment times.

Reproduces NeMo's ``process_aed_timestamp_outputs`` + ``get_segment_offsets`` (canary-1b-flash / 180m-flash,
reference §10.1). The model brackets each word (or group of words) with encoder-frame indices,
``<|s|> word <|e|>``. Only bracketed content survives; times are ``offset * window_stride * subsampling_factor``
evaluated left to right like NeMo so the floats are bit-identical (no rounding, no clamping, start may exceed end).
"""

from __future__ import annotations

import re
from typing import Callable, Optional

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


# NeMo's rebuild of words and segments from per-token times (``timestamp_utils.get_words_offsets`` /
# ``get_segment_offsets``), used after canary-1b-v2's long-form merge of aligned chunks.
WORD_PUNCTUATION = frozenset({",", ".", "!", "?"})  # NeMo's supported_punctuation there
SEGMENT_DELIMITER_TOKENS = frozenset({".", "!", "?", "..."})
SPACE_PIECES = (" ", "_", "\u2581")


def _next_text(tokens: list[dict], i: int) -> Optional[str]:
    """The text of the next token after ``i`` that is neither empty nor a space (NeMo's look-ahead; None if none)."""
    for token in tokens[i + 1 :]:
        if token["char"] and token["char"] != " ":
            return token["char"]
    return None


def words_from_tokens(tokens: list[dict], decode: Callable[[list[int]], str]) -> list[dict]:
    """NeMo's ``get_words_offsets`` (BPE, space delimiter, punctuation ``, . ! ?``) over per-token dicts
    ``{"char": text, "token": piece, "token_id", "start_offset", "end_offset", "start", "end"}``.

    A token whose piece differs from its text (a ``▁`` word start) opens a word, unless it is punctuation, which is
    glued to the word being built or, when none is, to the previous word (whose ``end_offset`` moves but whose
    ``end`` does not: NeMo's asymmetry, kept). ``decode`` turns a word's token ids into its text. The first word
    starts where the first token starts. Returns ``{"text", "start_offset", "end_offset", "start", "end"}``.
    """
    words: list[dict] = []
    built: list[tuple[str, int]] = []  # (piece, id)
    first = 0

    def close(end_index: int) -> None:
        words.append({"text": decode([i for _, i in built]), "start_offset": tokens[first]["start_offset"],
                      "end_offset": tokens[end_index]["end_offset"], "start": tokens[first]["start"],
                      "end": tokens[end_index]["end"]})

    for i, token in enumerate(tokens):
        text, piece = token["char"], token["token"]
        punctuation = text in WORD_PUNCTUATION
        upcoming = _next_text(tokens, i)
        starts_word = piece != text or (text == " " and upcoming not in WORD_PUNCTUATION)
        if starts_word and not punctuation:
            if built:
                close(i - 1)
            built = []
            if text != " ":
                built.append((piece, token["token_id"]))
                first = i
        elif punctuation and not built and words:
            last = words[-1]
            last["end_offset"] = token["end_offset"]
            if last["text"][-1:] == " ":
                last["text"] = last["text"][:-1]
            last["text"] += text
        elif punctuation and built:
            if built[-1][0] in SPACE_PIECES:
                built.pop()
            built.append((piece, token["token_id"]))
        else:
            if not built:
                first = i
            built.append((piece, token["token_id"]))

    if not words:
        if built:
            first = 0
            close(len(tokens) - 1)
        return words
    words[0]["start_offset"], words[0]["start"] = tokens[0]["start_offset"], tokens[0]["start"]
    if built:
        close(len(tokens) - 1)
    return words


def segments_from_words(words: list[dict]) -> list[dict]:
    """NeMo's ``get_segment_offsets`` (delimiters ``. ! ? ...``, no gap rule): a segment closes on a word ending
    with (or being) a delimiter; times and offsets are copied from its first and last word."""
    segments: list[dict] = []
    pending: list[dict] = []
    for word in words:
        pending.append(word)
        text = word["text"]
        if text and (text[-1] in SEGMENT_DELIMITER_TOKENS or text in SEGMENT_DELIMITER_TOKENS):
            segments.append(_copied_span(pending))
            pending = []
    if pending:
        segments.append(_copied_span(pending))
    return segments


def _copied_span(words: list[dict]) -> dict:
    return {"text": " ".join(w["text"] for w in words), "start_offset": words[0]["start_offset"],
            "end_offset": words[-1]["end_offset"], "start": words[0]["start"], "end": words[-1]["end"]}
