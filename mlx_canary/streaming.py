"""Streaming decoding of Canary (AED) models: a session fed pieces of 16 kHz audio that emits final tokens.

The session re-runs NeMo 3.0.0's streaming driver (``speech_to_text_aed_streaming_infer.py`` with
``GreedyBatchedStreamingAEDComputer``) one stream at a time: audio windows ``[left | chunk | right]``
(``streaming_policy.Geometry``) -> log-mels of the window -> encoder -> the Wait-k or AlignAtt policy decides how
many tokens the decoder may emit on this window. Tokens are final once emitted (neither policy revises them).

State kept per stream, and why it stays bounded: the audio buffer holds one window plus the samples not yet
decoded; the decoder's self-attention cache is preallocated once (NeMo's 256 token positions, fewer when the
decoder's positional table is shorter) and never grows: with NeMo's history the stream stops at that capacity
(NeMo does too), with ``history="window"`` the prefix only holds tokens of audio still in the window. The list of
emitted tokens (ints) is the transcript itself. The decoder's cross-attention keys/values are recomputed for every
window (its encoder output changes); the self-attention keys/values of emitted tokens are kept, as NeMo keeps
their hidden states (``decoder_mems_list``).

Batches: NeMo's batched driver is not batch-invariant (its batch shares one decoder cache, where a file that waits
on a step gets a zeroed entry; see tests/test_streaming_parity.py); ``transcribe_streams`` gives each file its
batch-1 result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import mlx.core as mx
import numpy as np

from .errors import CanaryError
from .model import Canary
from .streaming_policy import (
    STATE_TOKEN_CAPACITY,
    Geometry,
    StreamingOptions,
    alignatt_laal,
    alignatt_may_continue,
    avgpool_peak,
    geometry,
    is_hallucination,
    must_wait,
    sink_frames,
    waitk_laal,
)
from .transcript import Transcript
from .transformer import DecoderCache, LayerCache, cross_mask, prompt_self_mask

# Previous tokens decoded together with new ones so that a text delta gets its word spacing right.
DELTA_CONTEXT_TOKENS = 8
# Caption lines (Transcript segments) end after sentence punctuation or when the speaker pauses this long.
SEGMENT_PUNCTUATION = (".", "?", "!", "。", "？", "！")
SEGMENT_PAUSE_S = 2.0


@dataclass(frozen=True)
class StreamEvent:
    """Tokens that became final on one window.

    ``time``: seconds of audio the decoder could see when it decided them (right context excluded; NeMo's token
    alignment); ``received``: seconds of audio read by then (``time`` + the right context, or the stream's end).
    """

    tokens: tuple[int, ...]
    text: str
    time: float
    received: float


@dataclass
class StreamResult:
    """The whole stream: token ids (prompt excluded), text, and per-token times (seconds)."""

    tokens: list[int]
    text: str
    token_times: list[float]
    duration: float  # seconds of audio
    events: list[StreamEvent] = field(default_factory=list)  # those decided by finish()
    _laal_inputs: tuple = field(default=None, repr=False)

    def to_transcript(self, events: Sequence[StreamEvent], *, source_lang: str = "", target_lang: str = "",
                      model: Optional[str] = None, path: Optional[str] = None) -> Transcript:
        """A ``Transcript`` (for the writers) whose segments are caption lines built from the stream's events.

        A segment's ``end`` is when its last words became final (the decision time), its ``start`` the end of the
        previous segment: captions as they appeared live, not word onsets."""
        segments, line, start = [], "", 0.0
        last_time = 0.0
        for event in events:
            if line and event.time - last_time > SEGMENT_PAUSE_S:
                segments.append({"start": start, "end": last_time, "text": line.strip()})
                line, start = "", last_time
            line += event.text
            last_time = event.time
            if line.rstrip().endswith(SEGMENT_PUNCTUATION):
                segments.append({"start": start, "end": last_time, "text": line.strip()})
                line, start = "", last_time
        if line.strip():
            segments.append({"start": start, "end": last_time, "text": line.strip()})
        return Transcript(text=self.text, tokens=list(self.tokens), source_lang=source_lang,
                          target_lang=target_lang or source_lang, duration=self.duration, segments=segments,
                          model=model, path=path)

    def laal(self, reference_words: Optional[int] = None) -> float:
        """NeMo's LAAL latency in ms (``compute_waitk_lagging`` / ``compute_alignatt_lagging``); NeMo counts the
        words of the reference text; by default the words of this transcript."""
        pieces, alignment, geo, options, eos_piece = self._laal_inputs
        words = len(self.text.split()) if reference_words is None else reference_words
        source_ms = self.duration * 1000
        if options.policy == "waitk":
            return waitk_laal(pieces, geo, options.waitk_lagging, source_ms, words, eos_piece)
        return alignatt_laal(pieces, alignment, geo, source_ms, words, eos_piece)


@dataclass
class _Window:
    encoded: mx.array  # (1, T, D) encoder output of the whole window
    frames: int  # T
    decoder_length: int  # frames the decoder may attend to
    shift: int  # NeMo's prev_encoder_shift
    is_last: bool


class _StreamDecoder:
    """One stream's decoder state and the two policies' token loops (batch 1, NeMo's order of checks)."""

    def __init__(self, net: Canary, prompt: Sequence[int], options: StreamingOptions, geo: Geometry,
                 eos_id: int, pad_id: int):
        self.net = net
        self.options = options
        self.geo = geo
        self.eos_id, self.pad_id = eos_id, pad_id
        self.prompt = [int(t) for t in prompt]
        # The decoder's prefix: prompt + emitted tokens (NeMo's pred_tokens_ids[:current_context_length]); with
        # history="window" only those decided on audio still inside the window (their alignment in row_frames).
        self.row = list(self.prompt)
        self.row_frames: list[int] = []
        self.emitted: list[int] = []  # every emitted token
        self.alignment: list[int] = []  # per emitted token: frames of audio visible when it was decided
        self.decoding_step = -1  # NeMo's counter: -1 until the prompt has run, then +P, then +1 per token
        self.active = True
        cfg = net.config.decoder
        self.max_positions = cfg.max_sequence_length
        self.capacity = STATE_TOKEN_CAPACITY
        self.probs_layer = options.xatt_scores_layer if options.policy == "alignatt" else None
        if self.probs_layer is not None and not -cfg.num_layers <= self.probs_layer < cfg.num_layers:
            raise CanaryError(f"xatt_scores_layer={self.probs_layer} does not exist: this model's decoder has "
                              f"{cfg.num_layers} layers (use -{cfg.num_layers}..{cfg.num_layers - 1}).")
        heads, head_dim = cfg.num_heads, cfg.hidden_size // cfg.num_heads
        slots = min(self.capacity, self.max_positions)
        self.windowed = options.history == "window"
        shape = (1, heads, slots, head_dim)
        self.keys = [mx.zeros(shape, net.dtype) for _ in range(cfg.num_layers)]
        self.values = [mx.zeros(shape, net.dtype) for _ in range(cfg.num_layers)]

    @property
    def started(self) -> bool:
        return self.decoding_step >= 0

    # -- one window ----------------------------------------------------------------------------------------

    def decode_window(self, w: _Window) -> list[int]:
        """Tokens the policy emits on this window (appended to ``emitted``)."""
        if must_wait(w.decoder_length, self.geo.chunk, self.options.waitk_lagging, w.is_last):
            return []
        if not self.active:
            return []
        cache = self._cache_for(w)
        if self.windowed:
            self._forget_before(w.shift, cache)
        before = len(self.emitted)
        if self.options.policy == "waitk":
            self._waitk(w, cache)
        else:
            self._alignatt(w, cache)
        self.keys = [c.keys for c in cache.layers]
        self.values = [c.values for c in cache.layers]
        return self.emitted[before:]

    def _cache_for(self, w: _Window) -> DecoderCache:
        layers = []
        for layer, k, v in zip(self.net.decoder.layers, self.keys, self.values):
            ck, cv = layer.cross_attn.project_kv(w.encoded)
            layers.append(LayerCache(k, v, ck, cv))
        cache = DecoderCache(layers)
        self._xmask = cross_mask(mx.array([w.decoder_length]), w.frames, w.encoded.dtype)
        return cache

    def _run(self, cache: DecoderCache, with_probs: bool):
        """One decoder call: the prompt pass, or one step with the last token. Returns (next id, attention rows
        (head-averaged, last <= 3 query rows, as lists) or None)."""
        layer = self.probs_layer if with_probs else None
        if not self.started:
            cache.length = 0
            ids = mx.array([self.prompt], dtype=mx.int32)
            mask = prompt_self_mask(ids, self.pad_id, self.net.dtype)
            out = self.net.decoder(ids, cache, mask, self._xmask, probs_layer=layer)
            hidden, probs = out if layer is not None else (out, None)
            scores = self.net.logits(hidden[:, -1])
            rows = probs[0, -3:] if probs is not None else None
        else:
            cache.length = len(self.row) - 1
            ids = mx.array([self.row[-1]], dtype=mx.int32)
            out = self.net.decoder.step(ids, cache, self._xmask, self.net.logits, probs_layer=layer)
            scores, probs = out if layer is not None else (out, None)
            rows = probs[:1] if probs is not None else None
        next_id = mx.argmax(scores[0])
        if rows is None:
            return int(next_id.item()), None
        mx.eval(next_id, rows)
        return int(next_id.item()), rows.tolist()

    def _room_for_step(self) -> bool:
        """False once the next decoder input would fall outside the positional table (NeMo raises there)."""
        return not self.started or len(self.row) - 1 < min(self.max_positions, self.keys[0].shape[2])

    def _accept(self, token: int, w: _Window) -> None:
        self.decoding_step += 1 if self.started else len(self.prompt)
        self.row.append(token)
        self.row_frames.append(w.decoder_length + w.shift)
        self.emitted.append(token)
        self.alignment.append(w.decoder_length + w.shift)

    def _ends_window(self, token: int, w: _Window) -> bool:
        """EOS ends this window's decoding (not emitted); on the last window it ends the stream."""
        if token != self.eos_id:
            return False
        self.active = self.active and not w.is_last
        return True

    def _accept_checked(self, token: int, w: _Window) -> bool:
        """Emit ``token``, unless the hallucination detector (when on) fires on the row it completes: then it is
        taken back and the stream stops (NeMo's order). False when this window's decoding must end."""
        self._accept(token, w)
        if self.options.hallucinations_detector and is_hallucination(self.row):
            self._drop_last()
            self._stop()
            return False
        return True

    def _drop_last(self) -> None:
        self.row.pop()
        self.row_frames.pop()
        self.emitted.pop()
        self.alignment.pop()

    def _stop(self) -> None:
        """NeMo switches the stream off for good (hallucination, token capacity, positional table). With
        history="window" the decoder restarts from the prompt on the next window instead."""
        if self.windowed:
            self._restart()
        else:
            self.active = False

    def _restart(self) -> None:
        self.row = list(self.prompt)
        self.row_frames = []
        self.decoding_step = -1

    def _forget_before(self, first_frame: int, cache: DecoderCache) -> None:
        """history="window": drop from the prefix the tokens decided before the window's first frame and
        recompute the rest's keys/values against this window (one pass over prompt + kept tokens)."""
        drop = 0
        while drop < len(self.row_frames) and self.row_frames[drop] <= first_frame:
            drop += 1
        if not drop:
            return
        kept = self.row[len(self.prompt) + drop :]
        frames = self.row_frames[drop:]
        self._restart()
        if not kept:
            return
        self.row, self.row_frames = self.prompt + kept, frames
        self.decoding_step = len(self.row) - 2  # as if the prompt and the kept tokens had been decoded
        cache.length = 0
        ids = mx.array([self.row[:-1]], dtype=mx.int32)
        self.net.decoder(ids, cache, prompt_self_mask(ids, self.pad_id, self.net.dtype), self._xmask)

    def _waitk(self, w: _Window, cache: DecoderCache) -> None:
        # NeMo: decoding_step starts at -1, grows by the prompt length on the first token and by one after;
        # a window that is not the last runs one iteration, the last runs up to max_generation_length.
        start = self.decoding_step + 1
        end = start + 1 if not w.is_last else self.options.max_generation_length
        for _ in range(start, end):
            if not self._room_for_step():
                self._stop()
                break
            token, _rows = self._run(cache, with_probs=False)
            if self._ends_window(token, w):
                break
            if len(self.row) >= self.capacity:  # NeMo would index past its 256-slot token buffer here
                self._stop()
                break
            if not self._accept_checked(token, w):
                break
            if len(self.row) == self.options.max_generation_length - 1:
                self.active = False
                break

    def _alignatt(self, w: _Window, cache: DecoderCache) -> None:
        per_step_cap = self.options.tokens_per_alignatt_step()
        emitted = 0
        while True:
            if not self._room_for_step():
                self._stop()
                break
            prompt_pass = not self.started
            token, rows = self._run(cache, with_probs=True)
            sink = sink_frames(prompt_pass, w.frames, self.options.exclude_sink_frames, w.shift)
            if sink >= w.frames:
                # A window no longer than the sink after the prompt pass (a clip under ~0.7 s): NeMo's argmax
                # over no frames raises here. The peak only matters before the last window, where such a
                # window never decodes (initial lagging); count it as the last frame.
                peak = w.frames - 1
            elif self.options.use_avgpool_for_alignatt:
                peak = avgpool_peak(rows, sink)
            else:
                peak = sink + int(np.argmax(rows[-1][sink:]))
            if not alignatt_may_continue(w.decoder_length, peak, self.options.alignatt_thr, w.is_last):
                break
            if self._ends_window(token, w):
                break
            if not self._accept_checked(token, w):
                break
            if len(self.row) == self.capacity:  # the token landed on NeMo's last position: dropped, stream off
                self._drop_last()
                self._stop()
                break
            emitted += 1
            if emitted >= per_step_cap and not w.is_last:
                break


class StreamingSession:
    """Feed 16 kHz mono audio in pieces of any size; get the tokens that became final as ``StreamEvent``s.

    ``feed(samples)`` returns the events decided by the audio so far; ``finish()`` decodes the last window and
    returns the ``StreamResult`` (identical to feeding the whole recording at once). The session keeps one
    window of audio; a piece is processed as soon as one more chunk (plus the right context) has arrived.
    """

    def __init__(self, net: Canary, tokenizer, prompt: Sequence[int], options: StreamingOptions = StreamingOptions()):
        pre = net.config.preprocessor
        self.net = net
        self.tokenizer = tokenizer
        self.options = options
        self.sample_rate = pre.sample_rate
        self.geometry = geometry(options, pre.sample_rate, pre.hop_length, net.config.encoder.subsampling_factor)
        self._decoder = _StreamDecoder(net, prompt, options, self.geometry, tokenizer.eos_id, tokenizer.pad_id)
        self._audio = np.zeros(0, np.float32)  # samples from absolute position _offset on
        self._pending: list[np.ndarray] = []  # pieces not yet joined to _audio (joined when a window is due)
        self._offset = 0
        self._received = 0
        self._step = 0  # next window to decode
        self._finished = False
        self._emitted = 0  # tokens already reported

    @property
    def tokens(self) -> list[int]:
        """Every token emitted so far (prompt excluded)."""
        return list(self._decoder.emitted)

    @property
    def buffered_samples(self) -> int:
        """Audio samples held (one window plus what has not been decoded yet)."""
        return int(self._audio.size) + sum(p.size for p in self._pending)

    @property
    def decoder_prefix_length(self) -> int:
        """Tokens in the decoder's prefix (prompt included): NeMo's current_context_length."""
        return len(self._decoder.row)

    @property
    def decoder_cache_shape(self) -> tuple:
        """Shape of one layer's self-attention keys (preallocated once: it never grows)."""
        return tuple(self._decoder.keys[0].shape)

    def feed(self, samples) -> list[StreamEvent]:
        if self._finished:
            raise CanaryError("This streaming session is finished; start a new one.")
        piece = _as_samples(samples)
        if piece.size:
            self._pending.append(piece)
            self._received += piece.size
        events = []
        # A window is known not to be the last once audio past its end has arrived.
        while self._received > self.geometry.step_end(self._step):
            events += self._decode(self.geometry.step_end(self._step), is_last=False)
        return events

    def finish(self) -> StreamResult:
        """Decode the rest as NeMo's last window and return the whole stream's result."""
        if self._finished:
            raise CanaryError("This streaming session is already finished.")
        self._finished = True
        events = self._decode(self._received, is_last=True) if self._received else []
        d = self._decoder
        tokens = self.tokens
        frame_s = self.geometry.frame_ms / 1000
        pieces = [self.tokenizer.id_to_piece(t) for t in tokens]
        eos_piece = self.tokenizer.id_to_piece(self.tokenizer.eos_id)
        return StreamResult(
            tokens=list(tokens),
            text=self.tokenizer.decode(tokens).strip(),
            token_times=[f * frame_s for f in d.alignment],
            duration=self._received / self.sample_rate,
            events=events,
            _laal_inputs=(pieces, list(d.alignment), self.geometry, self.options, eos_piece),
        )

    # -- internals ------------------------------------------------------------------------------------------

    def _decode(self, end: int, is_last: bool) -> list[StreamEvent]:
        geo = self.geometry
        start = max(0, end - geo.window_samples)
        if self._pending:
            self._audio = np.concatenate([self._audio, *self._pending])
            self._pending = []
        window = self._audio[start - self._offset : end - self._offset]
        w = self._encode(window, self._step, end if is_last else None, is_last)
        new = self._decoder.decode_window(w)
        self._step += 1
        # Keep what the next window can still need: its start is at least this window's end minus one window.
        keep_from = max(0, geo.step_end(self._step - 1) - geo.window_samples)
        if keep_from > self._offset:
            self._audio = self._audio[keep_from - self._offset :]
            self._offset = keep_from
        if not new:
            return []
        received = min(end, self._received) / self.sample_rate
        return [self._event(new, w, received)]

    def _encode(self, window: np.ndarray, step: int, total: Optional[int], is_last: bool) -> _Window:
        audio = mx.array(window[None, :])
        lengths = mx.array([window.size])
        features, feat_lengths = self.net.features(audio, lengths, pad_to=0)
        encoded, enc_lengths = self.net.encode(features, feat_lengths)
        frames = encoded.shape[1]
        if is_last:
            decoder_length = int(enc_lengths[0].item())
        else:
            decoder_length = self.geometry.decoder_length(step)
        return _Window(encoded, frames, decoder_length, self.geometry.encoder_shift(step, total), is_last)

    def _event(self, new: list[int], w: _Window, received: float) -> StreamEvent:
        emitted = self._decoder.emitted
        first = len(emitted) - len(new)
        context = emitted[max(0, first - DELTA_CONTEXT_TOKENS) : first]
        shown = self.tokenizer.decode(context)
        full = self.tokenizer.decode(context + new)
        if full.startswith(shown):
            delta = full[len(shown):]
        else:
            delta = self.tokenizer.decode(new)
        if not first:
            delta = delta.lstrip()
        # On the last window the encoder's length rounds up past the audio's end: no time beyond what was read.
        time = min((w.decoder_length + w.shift) * self.geometry.frame_ms / 1000, received)
        return StreamEvent(tuple(new), delta, time, received)


def _as_samples(samples) -> np.ndarray:
    array = np.asarray(samples)
    if array.ndim != 1:
        raise CanaryError(f"Streaming expects 1-D mono samples, got an array of shape {array.shape}.")
    if array.dtype == np.int16:
        return array.astype(np.float32) / 32768.0
    if not np.issubdtype(array.dtype, np.floating):
        raise CanaryError(f"Streaming expects float or int16 samples, got {array.dtype}.")
    # A copy: callers (audio callbacks) often reuse their buffer for the next piece.
    piece = array.astype(np.float32, copy=True)
    if not np.isfinite(piece).all():
        raise CanaryError("Streaming audio contains NaN or infinite samples.")
    return piece


def transcribe_stream(net: Canary, tokenizer, prompt: Sequence[int], samples: np.ndarray,
                      options: StreamingOptions = StreamingOptions()) -> StreamResult:
    """Stream a whole recording through a session (what NeMo's driver does to a file at batch 1)."""
    session = StreamingSession(net, tokenizer, prompt, options)
    events = session.feed(samples)
    result = session.finish()
    result.events = events + result.events
    return result


def transcribe_streams(net: Canary, tokenizer, prompt: Sequence[int], recordings: Sequence[np.ndarray],
                       options: StreamingOptions = StreamingOptions()) -> list[StreamResult]:
    """Several recordings, each with its batch-1 result (NeMo's batched driver is not batch-invariant)."""
    return [transcribe_stream(net, tokenizer, prompt, r, options) for r in recordings]

