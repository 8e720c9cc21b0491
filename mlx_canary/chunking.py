"""Long-form audio: chunk planning, batched chunk decoding and merging of the chunk results into one transcript.

What NeMo does and we reproduce (reference §11.1; NeMo 3.0.0 ``PromptedAudioToTextLhotseDataset._chunk_waveform`` /
``_find_optimal_chunk_size`` and ``chunking_utils.merge_parallel_chunks``; NeMo applies it to canary-1b-v2 only):

* Planning (``plan_chunks``): an input shorter than 40 s is one chunk. Otherwise the chunk length is the whole
  number of seconds in 30..40 that makes the last chunk longest (first best wins); consecutive chunks overlap by
  1 s, so they start at 0, step, 2·step, … (step = chunk − 1 s) while ``start + 1 s < total``. Each chunk keeps its
  true length (NeMo zero-pads it to the full chunk length in the batch). A user-set chunk length
  (``chunk_seconds``) uses the same overlap rule. NeMo first cuts inputs into 3600 s windows that are chunked and
  merged independently and joined with a space; that is opt-in here (``window_seconds=3600``) because it cuts
  words at the hour marks.
* Token merge (``merge_chunk_tokens``): the generated ids of chunk 0, then for each next chunk its first
  ``int(delay·0.6)`` ids (the "head", delay = ``int(1/(subsampling/100))`` = 12) are aligned against the last
  ``2·delay`` merged ids with NeMo's longest-common-substring merge (``lcs_alignment``, a faithful port of
  ``longest_common_subsequence_merge`` with its leftmost-match search and diagonal expansion); with an alignment
  of length ≥ 1 the merged ids are cut after the aligned run and the head continues after its aligned run,
  otherwise the whole head is appended; the rest of the chunk is appended as is.

Our design for predicted timestamps (canary-1b-flash / 180m-flash, ``merge_timed_chunks``; NeMo does not chunk
these models). A chunk's ids look like ``<|s|> pieces <|e|> <|s|> pieces <|e|> …`` with s/e encoder-frame indices
relative to the chunk start:

1. Each chunk is split into *groups* exactly as ``timestamps.parse_timestamps`` pairs brackets (left to right,
   alternate open/close, a newline inside the content restarts at the closing token, empty content dropped,
   ids outside brackets dropped). A chunk without any bracket pair keeps all its non-timestamp ids as one
   *untimed* group spanning the whole chunk. When no chunk has a bracket pair at all the result is the plain
   merge (``merge_chunks_text``) without words, as ``parse_timestamps`` leaves text without timestamps alone.
2. The LCS merge above runs on the text ids only (timestamp ids removed), tracking for every id its
   (chunk, group, position). So the merged text ids equal ``merge_chunk_tokens`` on the text ids, except at seams
   where the timestamps show the text alignment is wrong:
   * a seam alignment is accepted only if the last kept id and the last dropped head id, which the alignment says
     are the same token, belong to groups that agree in time: starts and ends within ``jitter_seconds`` (0.16 s,
     two frames) or spans sharing at least half of the shorter one (a shared "." or suffix piece of two different
     words is rejected; NeMo would drop the head's words before it, or double words);
   * otherwise (no common run, or a rejected one: NeMo appends the whole head, doubling any word that the two
     chunks recognised differently) the overlap is resolved by time: the previous chunk's trailing groups that
     reach into the overlap and the next chunk's leading groups that start inside it are aligned one to one and in
     order by time agreement (most pairs, then best fit; spans widened by the jitter when the ids are equal or a
     group touches the chunk edge that may have cut it), each pair keeps the copy from the previous chunk if it
     starts before the middle of the overlap, else the next chunk's; unpaired groups are kept (only one chunk
     heard them) and the overlap's groups are interleaved by start time.
   Untimed groups are never dropped by time and never veto an alignment.
3. Re-timing: a group's global frame = chunk start in encoder frames (``chunk_start_samples / hop /
   subsampling``, fractional when the chunk start is not on the 80 ms grid) + its chunk-relative frame. Words are
   rebuilt from runs of merged ids of one group: a run that starts at a group's first id opens a new word, a run
   that starts inside a group (a word split by the seam cut) continues the previous word and takes its end.
   Untimed groups span their chunk. Times are then made monotonic: ``start = max(start, previous end)``,
   ``end = max(end, start)``.
4. Words have the keys of ``parse_timestamps`` (``text``, ``start``, ``end``, ``start_offset``, ``end_offset``;
   offsets in encoder frames, ints when whole); time = offset × window_stride × subsampling; text = word texts
   joined by single spaces; segments close at words ending with ``. ? !`` as NeMo's ``get_segment_offsets``.
   The returned ids are the merged text ids (global times cannot be written back as ``<|N|>`` tokens).

canary-1b-v2 with its CTC aligner and timestamps (``merge_aligned_chunks``; NeMo's own path, §11.1): each chunk's
text is force-aligned token by token (``timestamp_type='char'``), the aligned token ids are merged with the LCS
merge above, the kept tokens are placed on the file's timeline by NeMo's chunk offsets (``aligned_chunk_offsets``:
``(encoder length · 8 − 100) // 8`` per previous chunk, not the true 29 s step), pushed to the previous token's end
when they overlap it, and words and segments are rebuilt from them as NeMo rebuilds them
(``timestamps.words_from_tokens`` / ``segments_from_words``).

Without timestamps the token merge is NeMo's; a model whose config says ``decoding.chunk_merge: "timestamps"``
(the bundled demo model, one id per word) is decoded with timestamps instead and merged by time, and only the text
is returned: NeMo's 7-id head and 24-id window reach far past the 1 s overlap when ids are few per second.

Everything here is a pure function of planned chunks and their token ids; the loop that decodes the chunks
(``CanaryModel.decode_long`` in ``transcribe.py``) feeds them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from typing import Optional, Sequence, Union

import numpy as np

from .errors import CanaryError
from .audio import SAMPLE_RATE
from .timestamps import build_segments, segments_from_words, words_from_tokens

MIN_CHUNK_SECONDS = 30  # NeMo's dynamic chunk length search range (whole seconds)
MAX_CHUNK_SECONDS = 40  # also the length below which an input is a single chunk
OVERLAP_SECONDS = 1.0
NEMO_WINDOW_SECONDS = 3600  # NeMo's transcribe() cuts longer inputs into independent windows of this length
HEAD_FRACTION = 0.6  # NeMo: "only approximately 60% of the tokens are non blank"
SEARCH_STEPS = 2  # NeMo's max_steps_per_timestep: the merged tail searched is 2 * delay ids
MIN_PARTIAL_MATCH = 1  # NeMo's MIN_MERGE_SUBSEQUENCE_LEN: a partial (not at the tail end) match must be longer
JITTER_SECONDS = 0.16  # two frames: how far two chunks' timestamps of one word may disagree

Number = Union[int, float]


# ----------------------------------------------------------------------------------------------------------------
# Planning
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Chunk:
    """One piece of the input: samples ``[start, start + length)``; ``size`` is the full (padded) chunk length."""

    index: int
    start: int
    length: int
    size: int
    window: int = 0  # chunks merge only with neighbours of the same window

    @property
    def end(self) -> int:
        return self.start + self.length


def optimal_chunk_size(
    num_samples: int,
    sample_rate: int = SAMPLE_RATE,
    *,
    min_seconds: int = MIN_CHUNK_SECONDS,
    max_seconds: int = MAX_CHUNK_SECONDS,
    overlap_seconds: float = OVERLAP_SECONDS,
) -> int:
    """NeMo's chunk length in samples: ``num_samples`` itself below ``max_seconds``, else the whole number of
    seconds in ``[min_seconds, max_seconds]`` whose last chunk is longest (the shortest such length wins ties)."""
    if num_samples < max_seconds * sample_rate:
        return num_samples
    overlap = int(overlap_seconds * sample_rate)
    best_size, best_last = min_seconds * sample_rate, 0
    for seconds in range(min_seconds, max_seconds + 1):
        size = seconds * sample_rate
        step = size - overlap
        if step <= 0 or size > num_samples:
            continue
        # Length of the last chunk if chunks were placed until they cover the input (NeMo's estimate).
        last = num_samples - step * ((num_samples - 1) // step)
        if last > best_last:
            best_size, best_last = size, last
    return best_size


def _plan_window(num_samples: int, size: int, overlap: int) -> list[tuple[int, int]]:
    if size >= num_samples:
        return [(0, num_samples)]  # NeMo passes a single chunk through unpadded
    step = size - overlap
    spans = []
    start = 0
    # The last chunk is longer than the overlap: audio that the previous chunk already saw is not re-decoded alone.
    while start + overlap < num_samples:
        spans.append((start, min(size, num_samples - start)))
        start += step
    return spans


def plan_chunks(
    num_samples: int,
    sample_rate: int = SAMPLE_RATE,
    *,
    chunk_seconds: Optional[float] = None,
    overlap_seconds: float = OVERLAP_SECONDS,
    window_seconds: Optional[float] = None,
) -> list[Chunk]:
    """Chunks of an input of ``num_samples`` samples, in order.

    ``chunk_seconds=None`` is NeMo's dynamic planner (canary-1b-v2 ``transcribe()``); a number sets the chunk
    length (an input no longer than it is one chunk). ``window_seconds`` (NeMo: 3600) first cuts the input into
    independent windows, each planned on its own.
    """
    if num_samples < 0:
        raise CanaryError(f"Cannot plan chunks for a negative number of samples ({num_samples}).")
    overlap = int(overlap_seconds * sample_rate)
    fixed_size = None
    if chunk_seconds is not None:
        fixed_size = int(round(float(chunk_seconds) * sample_rate))
        if fixed_size <= overlap:
            raise CanaryError(
                f"Chunk length {chunk_seconds} s must be longer than the {overlap_seconds} s overlap between chunks."
            )
    windows = [(0, num_samples)]
    if window_seconds is not None:
        window = int(round(float(window_seconds) * sample_rate))
        if window <= 0:
            raise CanaryError(f"Window length must be positive, got {window_seconds} s.")
        windows = [(w, min(window, num_samples - w)) for w in range(0, num_samples, window)] or [(0, 0)]

    chunks: list[Chunk] = []
    for window_index, (window_start, window_length) in enumerate(windows):
        if fixed_size is None:
            size = optimal_chunk_size(window_length, sample_rate, overlap_seconds=overlap_seconds)
        else:
            size = fixed_size
        spans = _plan_window(window_length, size, overlap)
        for start, length in spans:
            padded = size if len(spans) > 1 else length
            chunks.append(Chunk(len(chunks), window_start + start, length, padded, window_index))
    return chunks


# ----------------------------------------------------------------------------------------------------------------
# NeMo's LCS token merge
# ----------------------------------------------------------------------------------------------------------------


def merge_delay(subsampling_factor: int = 8) -> int:
    """NeMo's merge delay: the number of encoder frames in one second (``int(1 / (subsampling / 100))``)."""
    return int(1 / (subsampling_factor / 100))


def lcs_alignment(previous: Sequence, current: Sequence) -> tuple[int, int, int]:
    """NeMo's ``longest_common_subsequence_merge(X=previous, Y=current)`` slice indices ``(i, j, length)``.

    Despite the name it is a longest common *substring* table (``run[i][j]`` = length of the common run ending at
    ``previous[i-1]``, ``current[j-1]``). If the longest run (the last one in row-major order) ends at the end of
    ``previous`` the alignment is that run. Otherwise NeMo picks the leftmost-in-``current`` longest run scanning
    ``previous`` from its end, ignores it when not longer than 1, else extends it diagonally towards the end of
    ``previous`` tolerating skipped tokens and backtracks to count the slice.
    """
    m, n = len(previous), len(current)
    run = [[0] * (n + 1) for _ in range(m + 1)]
    best, best_i, best_j = 0, 0, 0
    for i in range(1, m + 1):
        above, row, token = run[i - 1], run[i], previous[i - 1]
        for j in range(1, n + 1):
            if token == current[j - 1]:
                row[j] = above[j - 1] + 1
                if row[j] >= best:
                    best, best_i, best_j = row[j], i, j

    if best_i == m:
        # NeMo walks the run back to its first cell and steps once more: the start of the run, full length.
        return best_i - best, best_j - best, best

    # (1) Leftmost longest run, scanning `previous` from its end.
    longest, longest_j = 0, n
    i_part, j_part = m, -1
    for i in range(m, -1, -1):
        for j in range(n + 1):
            if run[i][j] > longest and j <= longest_j:
                longest, longest_j = run[i][j], j
                i_part, j_part = i, j
    if longest <= MIN_PARTIAL_MATCH:
        return i_part, 0, 0

    # (2) Extend along the diagonal towards the end of `previous`; each row without a match on its (widening)
    # diagonal band widens the band by one column. Only j moves; i stays where the run ended (as in NeMo).
    extension, skipped, j_next = 0, 0, j_part + 1
    for i in range(i_part + 1, m + 1):
        missed = 0
        for j in range(j_next, j_next + skipped + 1):
            if j <= n:
                if run[i][j] == 0:
                    missed = 1
                else:
                    extension = 1 + skipped + missed
        skipped += missed
        j_next += 1
    j_part += extension

    # (3) Backtrack diagonally, stepping one extra column left at every cell off the run.
    sliced, skips = 0, 0
    while i_part > 0 and j_part > 0:
        if run[i_part][j_part] == 0:
            j_part -= 1
            skips += 1
        if j_part > 0:
            sliced += 1
            i_part -= 1
            j_part -= 1
    return max(0, i_part), max(0, j_part), sliced + skips


def _seam_cut(
    merged_ids: Sequence, head: Sequence, delay: int, min_lcs_length: int = 1
) -> Optional[tuple[int, int]]:
    """``(keep, skip)``: keep ``merged[:keep]``, continue with ``chunk[skip:]``; None: append the whole chunk."""
    if delay < 1 or len(merged_ids) == 0:
        return None
    search = int(delay * SEARCH_STEPS)
    tail = merged_ids[-search:]
    i, j, length = lcs_alignment(tail, head)
    if length < min_lcs_length:
        return None
    base = len(merged_ids) - len(tail)
    return base + i + length, j + length


def merge_buffer(buffer: Sequence, data: Sequence, delay: int, min_lcs_length: int = 1) -> list:
    """NeMo's ``lcs_alignment_merge_buffer(buffer, data, delay, max_steps_per_timestep=2, min_lcs_length,
    parallel_chunking=True)``: the merged list, with the tail of ``buffer`` after the aligned run replaced by the
    rest of ``data``."""
    cut = _seam_cut(buffer, data, delay, min_lcs_length)
    if cut is None:
        return list(buffer) + list(data)
    keep, skip = cut
    return list(buffer[:keep]) + list(data[skip:])


def head_length(delay: int) -> int:
    return int(delay * HEAD_FRACTION)


def merge_chunk_tokens(chunks_tokens: Sequence[Sequence[int]], *, subsampling_factor: int = 8) -> list[int]:
    """Merge the generated ids of consecutive overlapping chunks as NeMo's ``merge_parallel_chunks`` merges them."""
    if not chunks_tokens:
        return []
    delay = merge_delay(subsampling_factor)
    head = head_length(delay)
    merged = [int(t) for t in chunks_tokens[0]]
    for tokens in chunks_tokens[1:]:
        data = [int(t) for t in tokens]
        cut = _seam_cut(merged, data[:head], delay)
        if cut is None:
            merged += data
        else:
            keep, skip = cut
            merged = merged[:keep] + data[skip:]
    return merged


def merge_chunks_text(
    chunks_tokens: Sequence[Sequence[int]], chunks: Sequence[Chunk], tokenizer, *, subsampling_factor: int = 8
) -> tuple[list[int], str]:
    """Merged ids and text of planned chunks as NeMo's ``transcribe()`` gives them: ``merge_chunk_tokens`` within
    each window, ``tokenizer.decode(ids).strip()`` per window, windows' texts joined with a space."""
    if len(chunks_tokens) != len(chunks):
        raise ValueError(f"{len(chunks_tokens)} token lists for {len(chunks)} chunks")
    ids: list[int] = []
    texts: list[str] = []
    for window in sorted({chunk.window for chunk in chunks}):
        window_ids = merge_chunk_tokens(
            [tokens for tokens, chunk in zip(chunks_tokens, chunks) if chunk.window == window],
            subsampling_factor=subsampling_factor,
        )
        ids += window_ids
        text = tokenizer.decode_text(window_ids).strip()
        if text:
            texts.append(text)
    return ids, " ".join(texts)


# ----------------------------------------------------------------------------------------------------------------
# Merging chunks with predicted timestamps
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class _Group:
    ids: list[int]
    start: Fraction  # global encoder frames
    end: Fraction
    untimed: bool = False  # from a chunk without timestamps: spans the chunk, never cut or checked by time


@dataclass
class TimedMerge:
    """Result of ``merge_timed_chunks``: merged text ids, clean text, words and segments on the global timeline."""

    ids: list[int]
    text: str
    words: list[dict] = field(default_factory=list)
    segments: list[dict] = field(default_factory=list)


def timed_groups(tokens: Sequence[int], tokenizer) -> tuple[list[tuple[list[int], int, int]], bool]:
    """Split one chunk's ids into ``(text_ids, start_frame, end_frame)`` groups, pairing ``<|N|>`` tokens as
    ``parse_timestamps`` pairs them in text. The flag says whether any bracket pair (even empty) was found."""
    groups: list[tuple[list[int], int, int]] = []
    found = False
    opened: Optional[int] = None
    content: list[int] = []
    for token in tokens:
        if tokenizer.is_timestamp(token):
            value = tokenizer.timestamp_value(token)
            if opened is None:
                opened, content = value, []
                continue
            text = tokenizer.decode(content)
            if "\n" in text:
                # NeMo's regex content cannot cross a newline: the match restarts at this token.
                opened, content = value, []
                continue
            found = True
            if text.strip():
                groups.append((content, opened, value))
            opened, content = None, []
        elif opened is not None:
            content.append(int(token))
    return groups, found


def _chunk_groups(tokens: Sequence[int], tokenizer, offset: Fraction, span: Fraction) -> tuple[list[_Group], bool]:
    groups, found = timed_groups(tokens, tokenizer)
    if found:
        return [_Group(ids, offset + start, offset + end) for ids, start, end in groups], True
    # No timestamps at all (NeMo keeps such text unchanged): one untimed group.
    ids = [int(t) for t in tokens if not tokenizer.is_timestamp(t)]
    if not tokenizer.decode(ids).strip():
        return [], False
    return [_Group(ids, offset, offset + span, untimed=True)], False


def _as_number(value: Fraction) -> Number:
    return int(value) if value.denominator == 1 else float(value)


Item = tuple[int, int, int]  # (chunk, group, position in group) of one merged text id


def _word_match(
    first: _Group, second: _Group, seam: Optional[tuple[Fraction, Fraction]], tolerance: Fraction
) -> Optional[Fraction]:
    """How well ``first`` (earlier chunk) and ``second`` (next chunk) fit as the same speech heard twice, or None.

    Strictly: their starts and ends agree within ``tolerance`` frames (timestamp jitter) or their spans share at
    least half of the shorter one. With a ``seam`` (the overlap ``(next chunk start, earlier chunk end)`` in frames)
    the spans are first widened by ``tolerance`` when both say the same ids or one touches the chunk edge that may
    have cut it (a word fragment, whose times are least reliable). The score is the shared fraction of the shorter
    span, plus 1 for the same ids. Untimed groups cannot be checked and score 0.
    """
    if first.untimed or second.untimed:
        return Fraction(0)
    first_end = max(first.end, first.start + 1)  # zero-length spans still take one frame
    second_end = max(second.end, second.start + 1)
    lenient = False
    if seam is not None:
        start, end = seam
        lenient = first.ids == second.ids or end - first.end <= tolerance or second.start - start <= tolerance
    widen = tolerance if lenient else 0
    shared = min(first_end, second_end) - max(first.start, second.start) + 2 * widen
    shorter = min(first_end - first.start, second_end - second.start) + 2 * widen
    close = abs(first.start - second.start) <= tolerance and abs(first_end - second_end) <= tolerance
    if not close and not (shared > 0 and 2 * shared >= shorter):
        return None
    return max(shared, Fraction(0)) / shorter + (1 if first.ids == second.ids else 0)


def _dedup_by_time(
    merged: list[Item],
    data: list[Item],
    groups: list[list[_Group]],
    chunks: Sequence[Chunk],
    c: int,
    frame_samples: int,
    tolerance: Fraction,
) -> list[Item]:
    """Join the items of chunk ``c`` to ``merged`` without a text alignment, using the timestamps.

    Only groups inside the overlap take part: the previous chunk's trailing groups ending after this chunk starts
    and this chunk's leading groups starting before the previous one ends. The two sides are aligned one to one
    and in order (most pairs, then best ``_word_match`` scores), as two transcripts of the same second of audio;
    each pair is one word heard twice and is kept from the previous chunk when that copy starts before the middle
    of the overlap, else from this chunk. Unpaired groups (heard by one chunk only) are kept, and the overlap's
    survivors are interleaved by start time.
    """
    overlap_start = Fraction(chunks[c].start, frame_samples)
    overlap_end = Fraction(chunks[c - 1].end, frame_samples)
    middle = (overlap_start + overlap_end) / 2

    def group(item: Item) -> _Group:
        return groups[item[0]][item[1]]

    cut = len(merged)
    while cut and merged[cut - 1][0] == c - 1 and not group(merged[cut - 1]).untimed:
        if group(merged[cut - 1]).end <= overlap_start:
            break
        cut -= 1
    lead = 0
    while lead < len(data) and not group(data[lead]).untimed and group(data[lead]).start < overlap_end:
        lead += 1
    tail, head = merged[cut:], data[:lead]

    # Pair the two sides' groups one to one, in order (most pairs, then best fit), like aligning two short
    # transcripts of the same second of audio.
    earlier = list(dict.fromkeys((x[0], x[1]) for x in tail))
    later = list(dict.fromkeys((x[0], x[1]) for x in head))
    seam = (overlap_start, overlap_end)
    best = [[(0, Fraction(0), ())] * (len(later) + 1) for _ in range(len(earlier) + 1)]
    for i in range(1, len(earlier) + 1):
        for j in range(1, len(later) + 1):
            options = [best[i - 1][j], best[i][j - 1]]
            score = _word_match(groups[c - 1][earlier[i - 1][1]], groups[c][later[j - 1][1]], seam, tolerance)
            if score is not None:
                count, total, pairs = best[i - 1][j - 1]
                options.append((count + 1, total + score, pairs + ((i - 1, j - 1),)))
            best[i][j] = max(options, key=lambda option: option[:2])
    dropped = set()
    for i, j in best[-1][-1][2]:
        # Keep the copy from the chunk that heard the word's start farther from its edge.
        keep_earlier = groups[c - 1][earlier[i][1]].start < middle
        dropped.add(later[j] if keep_earlier else earlier[i])

    # Interleave what is left of both sides by start time, each side keeping its own order.
    tail = [x for x in tail if x[:2] not in dropped]
    head = [x for x in head if x[:2] not in dropped]
    joined: list[Item] = []
    while tail and head:
        joined.append(tail.pop(0) if group(tail[0]).start <= group(head[0]).start else head.pop(0))
    return merged[:cut] + joined + tail + head + data[lead:]


def merge_timed_chunks(
    chunks_tokens: Sequence[Sequence[int]],
    chunks: Sequence[Chunk],
    tokenizer,
    *,
    hop_length: int = 160,
    sample_rate: int = SAMPLE_RATE,
    subsampling_factor: int = 8,
    jitter_seconds: float = JITTER_SECONDS,
) -> TimedMerge:
    """Merge chunks decoded with timestamp tokens into global words and segments (design: module docstring).

    ``chunks_tokens[k]`` are the generated ids of ``chunks[k]`` (planned by ``plan_chunks``).
    """
    if len(chunks_tokens) != len(chunks):
        raise ValueError(f"{len(chunks_tokens)} token lists for {len(chunks)} chunks")
    frame_samples = hop_length * subsampling_factor
    window_stride = hop_length / sample_rate
    delay = merge_delay(subsampling_factor)
    head = head_length(delay)
    tolerance = Fraction(jitter_seconds).limit_denominator(10**6) * sample_rate / frame_samples

    groups: list[list[_Group]] = []
    items: list[list[Item]] = []  # per chunk, one item per text id
    any_timestamps = False
    for c, (tokens, chunk) in enumerate(zip(chunks_tokens, chunks)):
        offset = Fraction(chunk.start, frame_samples)
        chunk_groups, found = _chunk_groups(tokens, tokenizer, offset, Fraction(chunk.length, frame_samples))
        any_timestamps |= found
        groups.append(chunk_groups)
        items.append([(c, g, p) for g, group in enumerate(chunk_groups) for p in range(len(group.ids))])
    if not any_timestamps:
        # Like parse_timestamps on text without timestamps: the text as it is, no words or segments.
        ids, text = merge_chunks_text(chunks_tokens, chunks, tokenizer, subsampling_factor=subsampling_factor)
        return TimedMerge(ids, text)

    def token_id(item: Item) -> int:
        c, g, p = item
        return groups[c][g].ids[p]

    merged: list[Item] = list(items[0]) if items else []
    for c in range(1, len(chunks)):
        data = items[c]
        if chunks[c].window != chunks[c - 1].window or not merged or not data:
            merged += data  # windows do not overlap; nothing to align against
            continue
        cut = _seam_cut([token_id(x) for x in merged], [token_id(x) for x in data[:head]], delay)
        if cut is not None:
            keep, skip = cut
            kept, dropped = merged[min(keep, len(merged)) - 1], data[skip - 1]
            if _word_match(groups[kept[0]][kept[1]], groups[dropped[0]][dropped[1]], None, tolerance) is not None:
                merged = merged[:keep] + data[skip:]
                continue
        merged = _dedup_by_time(merged, data, groups, chunks, c, frame_samples, tolerance)

    # Words: runs of one group; a run entering a group past its first id continues the previous word.
    spans: list[tuple[list[int], Fraction, Fraction]] = []
    previous_key = None
    for c, g, p in merged:
        group = groups[c][g]
        token = group.ids[p]
        if (c, g) == previous_key:
            spans[-1][0].append(token)
        elif p > 0 and spans:
            ids, start, _ = spans[-1]
            ids.append(token)
            spans[-1] = (ids, start, group.end)
        else:
            spans.append(([token], group.start, group.end))
        previous_key = (c, g)

    words: list[dict] = []
    previous_end: Optional[Fraction] = None
    for ids, start, end in spans:
        text = tokenizer.decode_text(ids).strip()
        if not text:
            continue
        if previous_end is not None and start < previous_end:
            start = previous_end
        end = max(end, start)
        previous_end = end
        words.append(_timed_entry(text, start, end, window_stride, subsampling_factor))

    ids = [token_id(x) for x in merged]
    text = " ".join(w["text"] for w in words)
    return TimedMerge(ids, text, words, build_segments(words, window_stride, subsampling_factor))


def _timed_entry(text: str, start: Fraction, end: Fraction, window_stride: float, subsampling_factor: int) -> dict:
    start_offset, end_offset = _as_number(start), _as_number(end)
    return {
        "text": text,
        # Same float evaluation order as timestamps.parse_timestamps.
        "start": start_offset * window_stride * subsampling_factor,
        "end": end_offset * window_stride * subsampling_factor,
        "start_offset": start_offset,
        "end_offset": end_offset,
    }


# ----------------------------------------------------------------------------------------------------------------
# Merging chunks aligned by a CTC aligner (canary-1b-v2)
# ----------------------------------------------------------------------------------------------------------------

OVERLAP_FEATURE_FRAMES = 100  # NeMo subtracts the 1 s overlap as 100 feature frames (10 ms) from each chunk


def aligned_chunk_offsets(encoded_lengths: Sequence[int], subsampling_factor: int = 8) -> list[int]:
    """Where each chunk's token times are placed on the file's timeline, in encoder frames, as NeMo's
    ``merge_parallel_chunks`` places them: chunk 0 at 0, each next one ``(len·sub − 100) // sub`` further, ``len``
    being the previous chunk's encoder length (so 29 s steps count 362 frames, not 362.5)."""
    offsets, total = [], 0
    for length in encoded_lengths:
        offsets.append(total)
        total += (int(length) * subsampling_factor - OVERLAP_FEATURE_FRAMES) // subsampling_factor
    return offsets


def join_aligned_tokens(
    chunks_tokens: Sequence[Sequence[dict]],
    offsets: Sequence[int],
    merged_ids: Sequence[int],
    *,
    window_stride: float = 0.01,
    subsampling_factor: int = 8,
) -> list[dict]:
    """NeMo's ``join_char_level_timestamps``: the chunks' per-token dicts in order, each kept only when its id is
    the next one of ``merged_ids`` (so the tokens the LCS merge dropped at a seam are skipped), shifted by its
    chunk's offset, pushed to the previous token's end when it would start before it (start and end both), and
    re-timed as ``offset · window_stride · subsampling`` (no rounding; -1 stays -1)."""
    joined: list[dict] = []
    cursor = 0
    for tokens, shift in zip(chunks_tokens, offsets):
        for token in tokens:
            if not token or cursor >= len(merged_ids) or token["token_id"] != merged_ids[cursor]:
                continue
            entry = dict(token)
            for key in ("start_offset", "end_offset"):
                if entry[key] != -1:
                    entry[key] = entry[key] + shift
            if joined and entry["start_offset"] != -1 and entry["start_offset"] < joined[-1]["end_offset"]:
                entry["start_offset"] = entry["end_offset"] = joined[-1]["end_offset"]
            for key in ("start", "end"):
                offset = entry[f"{key}_offset"]
                entry[key] = -1 if offset == -1 else offset * window_stride * subsampling_factor
            joined.append(entry)
            cursor += 1
    return joined


def merge_aligned_chunks(
    chunks_tokens: Sequence[Sequence[dict]],
    encoded_lengths: Sequence[int],
    decode,
    *,
    window_stride: float = 0.01,
    subsampling_factor: int = 8,
) -> TimedMerge:
    """canary-1b-v2's long-form merge with timestamps (NeMo's ``merge_parallel_chunks(timestamps=True)``).

    ``chunks_tokens[k]``: chunk k's text aligned token by token (the aligner's per-token dicts, ``level="chars"``
    of ``forced_alignment.align_text``: ``char``, ``token``, ``token_id``, offsets in the chunk's frames);
    ``encoded_lengths[k]``: chunk k's encoder length. The token ids are merged with NeMo's LCS merge
    (``merge_chunk_tokens``), the text is ``decode(merged ids)`` stripped, the kept tokens are placed on the file's
    timeline (``join_aligned_tokens``) and words and segments rebuilt from them (``timestamps.words_from_tokens``,
    ``segments_from_words``).
    """
    if len(chunks_tokens) != len(encoded_lengths):
        raise ValueError(f"{len(chunks_tokens)} aligned chunks for {len(encoded_lengths)} encoder lengths")
    ids = merge_chunk_tokens([[t["token_id"] for t in tokens] for tokens in chunks_tokens],
                             subsampling_factor=subsampling_factor)
    joined = join_aligned_tokens(chunks_tokens, aligned_chunk_offsets(encoded_lengths, subsampling_factor), ids,
                                 window_stride=window_stride, subsampling_factor=subsampling_factor)
    words = words_from_tokens(joined, decode) if joined else []
    return TimedMerge(ids, decode(ids).strip(), words, segments_from_words(words))
