"""Forced alignment of a known text against CTC log-probs: NeMo's forced aligner (NFA) as pure numpy functions.

canary-1b-v2 gives timestamps this way (NeMo 3.0 ``get_forced_aligned_timestamps_with_external_model``): the AED's
text is split into segments (after ``. ? !`` followed by a space) and words (at spaces), tokenised with the
aligner's SentencePiece vocabulary, blanks interleaved (``blank t1 blank t2 blank ... tN blank``), and the best CTC
path through that trellis is found by Viterbi (``viterbi``). A token, word or segment starts at the first frame the
path enters its first trellis position and ends after the last frame it leaves its last one; seconds = frames x the
aligner's frame duration (window stride x subsampling), rounded to 2 decimals, offsets ``int(seconds / duration)``.
Punctuation pieces (``, . ! ?``) take no time of their own: they are moved onto the end of the token before them,
and a word or segment ending on one ends where that token ends.

Everything here mirrors NeMo's arithmetic (float32 Viterbi with its ties, float64 seconds, Python's ``round``) so
that the times are equal, not close. Nothing here knows MLX or files: ``aligner.py`` supplies log-probs and the
vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Protocol, Sequence

import numpy as np

SEGMENT_SEPARATORS = (".", "?", "!", "...")  # NeMo's default; "..." never matches (it compares single characters)
WORD_SEPARATOR = " "
PUNCTUATION = frozenset({",", ".", "!", "?"})  # pieces that take no time of their own
PADDING = np.float32(-3.4e38)  # NeMo's "impossible" log-prob (about float32's lowest)


class AlignmentVocab(Protocol):
    """What alignment needs of the aligner's SentencePiece tokenizer (NeMo's ``SentencePieceTokenizer`` calls)."""

    blank_id: int  # the CTC blank: the last column of the log-probs (= vocabulary size)
    unk_id: int

    def pieces(self, text: str) -> list[str]:  # text_to_tokens
        ...

    def ids(self, text: str) -> list[int]:  # text_to_ids
        ...

    def id_text(self, token_id: int) -> str:  # ids_to_text([id])
        ...

    def id_piece(self, token_id: int) -> str:  # ids_to_tokens([id])[0]
        ...


# ---------------------------------------------------------------------------------------------------------------
# The trellis: text -> segments / words / tokens with their positions in the blank-interleaved target sequence


@dataclass
class Span:
    """A token, word or segment: positions ``s_start..s_end`` in the target sequence, and times once aligned."""

    text: str
    s_start: int
    s_end: int
    token_id: int = -1  # tokens only
    blank: bool = False  # a blank between tokens / words / segments
    t_start: float = -1.0
    t_end: float = -1.0
    children: list = field(default_factory=list)  # segment -> words and blanks; word -> tokens and blanks


@dataclass
class Utterance:
    targets: list  # token ids with blanks, starting and ending with a blank
    segments: list  # Span (segments) and blank Spans between them


def split_segments(text: str, separators: Optional[Sequence[str]] = SEGMENT_SEPARATORS) -> list[str]:
    """NeMo's segment split: after a separator character that a space follows (so "a.m." stays whole)."""
    if not separators:
        segments = [text.strip()]
    else:
        segments, last = [], -1
        for i, letter in enumerate(text):
            following = text[i + 1] if i + 1 < len(text) else ""
            if letter in separators and following == " ":
                segments.append(text[last + 1 : i + 1].strip())
                last = i + 1
        if last < len(text):
            segments.append(text[last + 1 :].strip())
    return [s for s in segments if s]


def _word_tokens(word: str, vocab: AlignmentVocab, unk_text: str) -> tuple[list[str], list[int]]:
    """Pieces and ids of one word; a word holding the unknown-token text keeps an <unk> id there (as NeMo)."""
    unk_piece = vocab.id_piece(vocab.unk_id)
    if word == unk_text:
        return [unk_piece], [vocab.unk_id]
    if unk_text not in word:
        return vocab.pieces(word), vocab.ids(word)
    pieces, ids = [], []
    for part in word.split(unk_text):
        pieces += vocab.pieces(part) + [unk_piece]
        ids += vocab.ids(part) + [vocab.unk_id]
    return pieces[:-1], ids[:-1]


def _segment_token_count(segment: str, vocab: AlignmentVocab, unk_text: str) -> int:
    # NeMo sizes a segment from its own tokenisation (not the sum of its words'): kept, even where they differ.
    parts = segment.split(unk_text)
    return sum(len(vocab.pieces(p.strip())) for p in parts) + len(parts) - 1


def plan_utterance(
    text: str,
    vocab: AlignmentVocab,
    num_frames: Optional[int],
    segment_separators: Optional[Sequence[str]] = SEGMENT_SEPARATORS,
    word_separator: Optional[str] = WORD_SEPARATOR,
) -> Utterance:
    """NeMo's ``get_utt_obj`` for a SentencePiece aligner: the target sequence and the segment/word/token tree.

    ``text`` is whitespace-normalised first (as ``get_batch_variables`` does). Empty text, or more tokens than
    ``num_frames`` (not checked when None), gives an utterance with no segments (NeMo then returns no timestamps).
    """
    text = " ".join(text.split())
    blank = vocab.blank_id
    utt = Utterance(targets=[blank], segments=[])
    if not text or (num_frames is not None and len(vocab.ids(text)) > num_frames):
        return utt
    unk_text = vocab.id_text(vocab.unk_id).strip()
    utt.segments.append(Span("", 0, 0, blank, blank=True))
    segment_s = word_s = 1  # position 0 is the leading blank
    for segment_text in split_segments(text, segment_separators):
        s_end = segment_s + 2 * _segment_token_count(segment_text, vocab, unk_text) - 2
        segment = Span(segment_text, segment_s, s_end)
        utt.segments.append(segment)
        segment_s = s_end + 2
        words = segment_text.split(word_separator) if word_separator else [segment_text]
        for word_i, word_text in enumerate(words):
            pieces, ids = _word_tokens(word_text, vocab, unk_text)
            word_end = word_s + 2 * len(pieces) - 2
            word = Span(word_text, word_s, word_end)
            segment.children.append(word)
            word_s = word_end + 2
            for token_i, (piece, token_id) in enumerate(zip(pieces, ids)):
                utt.targets += [token_id, blank]
                word.children.append(Span(piece, len(utt.targets) - 2, len(utt.targets) - 2, token_id))
                if token_i < len(pieces) - 1:
                    word.children.append(Span("", len(utt.targets) - 1, len(utt.targets) - 1, blank, blank=True))
            if word_i < len(words) - 1:
                segment.children.append(Span("", len(utt.targets) - 1, len(utt.targets) - 1, blank, blank=True))
        utt.segments.append(Span("", len(utt.targets) - 1, len(utt.targets) - 1, blank, blank=True))
    return utt


# ---------------------------------------------------------------------------------------------------------------
# Viterbi


VITERBI_BACKPOINTER_BYTES = 64 << 20  # backpointers held at once; longer trellises are recomputed block by block


def viterbi(log_probs: np.ndarray, targets: Sequence[int],
            max_backpointer_bytes: Optional[int] = None) -> list[int]:
    """The best CTC path: for each frame, the index into ``targets`` it is at (NeMo's ``viterbi_decoding``, batch 1).

    ``log_probs`` (T, C) float32; ``targets`` the blank-interleaved columns of it (token ids when C = V+1). Each step
    may stay, advance one, or skip one blank unless that would join two equal tokens. Scores are float32 as in NeMo;
    a tie keeps the earliest candidate (stay, then advance one, then two), and the path ends on the last token when
    it ties with the final blank.

    Memory stays bounded on long inputs: the one-byte backpointers (T x targets) are kept whole only up to
    ``max_backpointer_bytes`` (default ``VITERBI_BACKPOINTER_BYTES``); beyond, the forward pass keeps the scores at the start of each block of frames and the
    backtrace recomputes one block's backpointers at a time (the same float32 steps, so the same path, for about
    twice the arithmetic).
    """
    lp = np.asarray(log_probs, dtype=np.float32)
    y = np.asarray(targets, dtype=np.int64)
    n_frames, n_targets = lp.shape[0], len(y)
    if n_frames == 0:
        return []
    repeats = np.zeros(n_targets, dtype=bool)
    repeats[2:] = y[2:] == y[:-2]
    score = np.full(n_targets, PADDING, dtype=np.float32)
    score[:2] = lp[0, y[:2]]
    budget = VITERBI_BACKPOINTER_BYTES if max_backpointer_bytes is None else max_backpointer_bytes
    block = max(1, int(budget) // n_targets)
    starts = list(range(1, n_frames, block)) or [1]
    whole = len(starts) == 1
    if whole:  # the whole trellis's backpointers at once
        back = np.zeros((n_frames - 1, n_targets), dtype=np.int8)
        score = _advance(score, lp, y, repeats, 1, n_frames, back)
    else:
        checkpoints = []  # the scores before each block
        for start in starts:
            checkpoints.append(score)
            score = _advance(score, lp, y, repeats, start, min(start + block, n_frames))
        buffer = np.zeros((block, n_targets), dtype=np.int8)  # one block's backpointers, reused
    u = 0 if n_targets == 1 else int(np.argmax(score[n_targets - 2 :])) + n_targets - 2
    path = [u]
    for i in range(len(starts) - 1, -1, -1):
        start, end = starts[i], min(starts[i] + block, n_frames)
        if not whole:
            back = buffer[: end - start]
            _advance(checkpoints[i], lp, y, repeats, start, end, back)
        for t in range(end - 1, start - 1, -1):
            u -= int(back[t - start, u])
            path.append(u)
    return path[::-1]


def _advance(score: np.ndarray, lp: np.ndarray, y: np.ndarray, repeats: np.ndarray, start: int, end: int,
             back: Optional[np.ndarray] = None) -> np.ndarray:
    """Viterbi scores after frames ``start..end-1`` from ``score`` (after frame ``start-1``); each frame's choice
    (0 stay, 1 advance, 2 skip a blank) goes to ``back[t - start]`` when given."""
    n_targets = len(y)
    candidates = np.empty((3, n_targets), dtype=np.float32)
    for t in range(start, end):
        candidates[0] = score
        candidates[1, 0] = PADDING
        candidates[1, 1:] = score[:-1]
        candidates[2, :2] = PADDING
        candidates[2, 2:] = score[:-2]
        candidates[2, repeats] = PADDING
        with np.errstate(over="ignore"):  # padding + padding overflows to -inf, as in NeMo
            totals = candidates + lp[t, y]
        if back is not None:
            back[t - start] = np.argmax(totals, axis=0)
        score = np.max(totals, axis=0)
    return score


# ---------------------------------------------------------------------------------------------------------------
# Path -> times -> NeMo's timestamp dicts


def _set_times(span: Span, first: dict, last: dict, frame_seconds: float) -> None:
    span.t_start = first[span.s_start] * frame_seconds if span.s_start in first else -1
    span.t_end = (last[span.s_end] + 1) * frame_seconds if span.s_end in last else -1
    for child in span.children:
        _set_times(child, first, last, frame_seconds)


def add_times(utt: Utterance, path: Sequence[int], frame_seconds: float) -> None:
    """NeMo's ``add_t_start_end_to_utt_obj``: first frame a position is entered, last frame it is held."""
    first: dict = {}
    last: dict = {}
    previous = -1
    for frame, u in enumerate(path):
        if u > previous:
            first[u] = frame
            if previous >= 0:
                last[previous] = frame - 1
        previous = u
    last[previous] = len(path) - 1
    for span in utt.segments:
        _set_times(span, first, last, frame_seconds)


def _offset(seconds: float, frame_seconds: float) -> int:
    return int(seconds / frame_seconds) if seconds != -1 else -1


def _entry(text: str, start: float, end: float, frame_seconds: float) -> dict:
    return {"text": text, "start": round(start, 2), "end": round(end, 2),
            "start_offset": _offset(start, frame_seconds), "end_offset": _offset(end, frame_seconds)}


def _end_at(entry: dict, seconds: float, frame_seconds: float) -> None:
    entry["end"] = seconds
    entry["end_offset"] = _offset(seconds, frame_seconds)


@dataclass
class AlignedText:
    words: list = field(default_factory=list)  # {"text", "start", "end", "start_offset", "end_offset"}
    segments: list = field(default_factory=list)  # same keys
    chars: list = field(default_factory=list)  # {"char", "token_id", "token", "start_offset", ...} (level="chars")
    unknown_characters: list = field(default_factory=list)  # of the text, aligned as <unk> (see SentencePieceVocab)


def read_timestamps(utt: Utterance, frame_seconds: float, vocab: AlignmentVocab, chars: bool = False) -> AlignedText:
    """NeMo's ``process_timestamps``: segment and word entries, punctuation moved onto the token before it, and
    (``chars``) one entry per non-blank token."""
    out = AlignedText()
    for segment in utt.segments:
        if segment.blank:
            continue
        if not chars:
            out.segments.append(_entry(segment.text, segment.t_start, segment.t_end, frame_seconds))
        for word in segment.children:
            if word.blank:
                continue
            if not chars:
                out.words.append(_entry(word.text, word.t_start, word.t_end, frame_seconds))
            for i, token in enumerate(word.children):
                if token.blank:
                    continue
                if token.text in PUNCTUATION:
                    _pin_punctuation(word.children[:i], token, segment, word, out, frame_seconds, chars)
                if chars:
                    out.chars.append({"char": vocab.id_text(token.token_id), "token_id": token.token_id,
                                      "token": token.text,
                                      "start_offset": _offset(token.t_start, frame_seconds),
                                      "end_offset": _offset(token.t_end, frame_seconds),
                                      "start": round(token.t_start, 2), "end": round(token.t_end, 2)})
    return out


def _pin_punctuation(before: list, token: Span, segment: Span, word: Span, out: AlignedText, frame_seconds: float,
                     chars: bool) -> None:
    """A punctuation piece takes the end time of the last non-blank token before it in its word (its own start
    when it has none); the word and segment it closes end there too."""
    previous = next((t for t in reversed(before) if not t.blank), None)
    end = round(previous.t_end, 2) if previous is not None else round(token.t_start, 2)
    if not chars:
        if segment.t_end == word.t_end:
            _end_at(out.segments[-1], end, frame_seconds)
        if word.t_end == token.t_end:
            _end_at(out.words[-1], end, frame_seconds)
    token.t_start = token.t_end = end


def _plan(text: str, vocab: AlignmentVocab, num_frames: Optional[int], level: str) -> Utterance:
    if level not in ("words", "chars"):
        raise ValueError(f"level must be 'words' or 'chars', not {level!r}")
    chars = level == "chars"
    return plan_utterance(text, vocab, num_frames, None if chars else SEGMENT_SEPARATORS,
                          None if chars else WORD_SEPARATOR)


def text_columns(text: str, vocab: AlignmentVocab, level: str = "words") -> np.ndarray:
    """The sorted token ids (blank included) whose log-probs aligning ``text`` reads: all ``align_text`` needs of
    the log-probs, so a long input can keep just these columns (``columns=``)."""
    return np.unique(np.asarray(_plan(text, vocab, None, level).targets + [vocab.blank_id], dtype=np.int64))


def align_text(
    log_probs: np.ndarray,
    text: str,
    vocab: AlignmentVocab,
    frame_seconds: float,
    level: str = "words",
    columns: Optional[np.ndarray] = None,
) -> AlignedText:
    """Word and segment times of ``text`` in ``log_probs`` (T, V+1), as NeMo's ``transcribe(timestamps=True)`` gives
    them for a model with an aligner; ``level="chars"``: per-token times of the whole text as one word (what NeMo
    computes for each chunk before merging long-form chunks). With ``columns`` (``text_columns(text, ...)``),
    ``log_probs`` (T, len(columns)) holds just those token ids' columns: the same floats, the same result."""
    utt = _plan(text, vocab, len(log_probs), level)
    if not utt.segments:
        return AlignedText()
    targets = utt.targets
    if columns is not None:
        columns = np.asarray(columns)
        targets = np.minimum(np.searchsorted(columns, utt.targets), len(columns) - 1)
        if not np.array_equal(columns[targets], utt.targets):
            raise ValueError("columns lack some of the text's token ids (use text_columns)")
    add_times(utt, viterbi(log_probs, targets), frame_seconds)
    return read_timestamps(utt, frame_seconds, vocab, level == "chars")


class SentencePieceVocab:
    """``AlignmentVocab`` over a ``sentencepiece.SentencePieceProcessor`` (NeMo's non-legacy SentencePiece wrapper:
    plain ``encode_as_pieces`` / ``encode_as_ids`` / ``decode_ids``); the blank is the id after the last piece."""

    def __init__(self, processor):
        self.sp = processor
        self.blank_id = int(processor.get_piece_size())
        self.unk_id = int(processor.unk_id())

    def pieces(self, text: str) -> list[str]:
        return list(self.sp.encode_as_pieces(text))

    def ids(self, text: str) -> list[int]:
        return [int(i) for i in self.sp.encode_as_ids(text)]

    def id_text(self, token_id: int) -> str:
        return self.sp.decode_ids([int(token_id)])

    def id_piece(self, token_id: int) -> str:
        return self.sp.id_to_piece(int(token_id))

    def unknown_characters(self, text: str) -> list[str]:
        """Characters of ``text`` the vocabulary cannot write (they become <unk>, aligned as one token)."""
        found = []
        for ch in dict.fromkeys(" ".join(text.split()).replace(" ", "")):
            if self.unk_id in self.ids(ch):
                found.append(ch)
        return found
