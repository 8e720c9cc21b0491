"""Streaming decoding for Canary (AED) models: the settings, the window geometry and the policies' decisions.

Everything here is pure (no model, no arrays): the streaming engine (``streaming.py``) asks these functions
what NeMo 3.0.0's streaming computer (``GreedyBatchedStreamingAEDComputer`` in
``nemo/collections/asr/parts/submodules/aed_decoding/aed_batched_streaming.py``) and its driver script
(``examples/asr/asr_chunked_inference/aed/speech_to_text_aed_streaming_infer.py``) would decide.

Facts carried over from NeMo (re-implemented, not copied):

* Contexts are given in seconds and rounded *down* to encoder frames: ``int(secs * 100 / 8)`` for a 10 ms hop
  and 8x subsampling (so 0.5 s -> 6 frames = 0.48 s, 1 s -> 12 frames = 0.96 s); one encoder frame is
  ``make_divisible_by(int(sr * stride), 8) * 8`` = 1280 samples. Every window is
  ``[left | chunk | right]`` of raw audio, the encoder runs on the whole window (log-mels computed on the window
  alone, per-feature normalised over it), and the decoder sees the window's encoder output with the right
  context masked out (encoder length = left + chunk frames), except on the last window, where the encoder's own
  length is used.
* Step k of the driver adds audio up to ``chunk + right + k * chunk`` samples; it is the last step when that
  reaches the end of the file. The window keeps at most ``left + chunk + right`` samples (oldest dropped).
* ``prev_encoder_shift`` (frames of audio that fell off the window's left edge, used for token alignment) is
  ``max(end_of_window // 1280 - left - chunk, 0)`` with ``end_of_window = min(chunk, N) + k * chunk`` samples.
* Both policies wait until ``encoder_length // chunk_frames >= waitk_lagging`` (except on the last window).
* Wait-k: one token per window; on the last window, tokens until EOS.
* AlignAtt: tokens while the most attended encoder frame (argmax of the head-averaged cross-attention of layer
  ``xatt_scores_layer``, the first ``exclude_sink_frames`` skipped while the window still starts at the
  beginning of the audio) is at least ``alignatt_thr`` frames before the end of the visible audio; at most
  ``max_tokens_per_alignatt_step`` tokens per window (the driver sets ``10 * int(chunk_secs + right_secs)``,
  ignoring the decoding config's value of 30); the last window decodes to EOS.
* An EOS before the last window only ends that window's decoding (the last token is re-fed on the next one).
* The hallucination detector stops a stream on "a a a a a", "a b a b a b" or "a b c a b c a b c" at the end of
  the token row (prompt included).
* NeMo's state holds 256 token positions (``AEDStreamingState.max_generation_length``, prompt included; the
  decoding config's ``max_generation_length`` = 512 only bounds Wait-k's last window): AlignAtt stops a stream
  when a token lands on position 255 (that token is dropped).

NeMo issue #15231 (AlignAtt "stalls" after 20-40 s of continuous speech, canary-1b-v2, 10 s left context): a
property of NeMo's streaming scheme, not an indexing bug. The decoder's prefix is the whole transcript so far and
is never trimmed, while the audio it attends to is one window. Canary models are trained on utterances of bounded
length (canary-1b-v2 on up to ~40 s; the bundled demo model on up to 16 s). Once the prefix holds more text than
the visible audio (the window has slid past the start) or than the model ever saw in training, the model's next
token attends to the window's right edge (AlignAtt says wait) or is EOS (ends the window's decoding), window
after window: the stream goes silent. Reproduced with this engine in NeMo-exact mode on the demo model
(tests/test_streaming.py; 90 s of continuous speech, AlignAtt): at 10-1-0.5 tokens come every window for ~12 s,
then sparsely, none after ~25 s; at 4-1-0.5 none after ~9 s; a longer left context does not help (30 s or 60 s:
none after ~12 s, the model's training length). Two harder ceilings follow on longer streams: NeMo's state holds
256 token positions (AlignAtt switches a stream off at position 255; Wait-k, by its code, would index past its
buffer) and a detected hallucination switches a stream off for good. Remedy, as an option (off by default, since
NeMo does not do it): ``history="window"`` keeps in the decoder prefix only the tokens decided on audio still
inside the window (their keys/values recomputed against the current window when older ones drop out) and
restarts from the prompt where NeMo would switch the stream off, so prefix and window stay within what the model
was trained on and a stream of any length keeps decoding (demo model, 90 s: tokens to the end at 4-1-0.5 and
10-1-0.5; tests: 10 minutes). It is an approximation of NeMo's decoder: words at the window's left edge can be
repeated or lost, and the window itself must stay within the model's training length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from .errors import CanaryError

POLICIES = ("waitk", "alignatt")
HISTORIES = ("all", "window")
# NeMo's AEDStreamingState.max_generation_length: token positions (prompt included) a stream can hold.
STATE_TOKEN_CAPACITY = 256
# AEDStreamingState.max_tokens_per_one_second: the driver's AlignAtt per-window cap is this x int(chunk + right).
MAX_TOKENS_PER_SECOND = 10
# compute_alignatt_lagging's LAAL for a stream that produced no token.
EMPTY_LAAL_MS = 5000.0


@dataclass(frozen=True)
class StreamingOptions:
    """Streaming settings; every default is NeMo 3.0.0's (AEDStreamingDecodingConfig and the driver).

    policy: "waitk" or "alignatt". Contexts in seconds (rounded down to encoder frames as NeMo does); the
    driver's recommended setting is 10 s left, 1 s chunk, 0.5 s right (its own defaults are 10-2-2).
    ``max_tokens_per_alignatt_step`` None = the driver's rule (10 per second of chunk + right context, whole
    seconds); ``max_generation_length`` bounds Wait-k's last window (NeMo's decoding config);
    ``history``: "all" = NeMo's decoder prefix, every token of the stream (see the module docstring: #15231);
    "window" = only the tokens decided on audio still inside the window, and a stream that NeMo would switch
    off (hallucination, token capacity) restarts from the prompt instead.
    """

    policy: str = "waitk"
    chunk_secs: float = 2.0
    left_context_secs: float = 10.0
    right_context_secs: float = 2.0
    alignatt_thr: float = 8
    waitk_lagging: int = 2
    exclude_sink_frames: int = 8
    xatt_scores_layer: int = -2
    max_tokens_per_alignatt_step: Optional[int] = None
    max_generation_length: int = 512
    use_avgpool_for_alignatt: bool = False
    hallucinations_detector: bool = True
    history: str = "all"

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise CanaryError(f"Unknown streaming policy {self.policy!r}; choose one of: {', '.join(POLICIES)}.")
        for name in ("chunk_secs", "left_context_secs", "right_context_secs"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value < 0 or value != value:
                raise CanaryError(f"{name} must be a number of seconds >= 0, got {value!r}.")
        if self.history not in HISTORIES:
            raise CanaryError(f"Unknown history {self.history!r}; choose one of: {', '.join(HISTORIES)}.")

    def tokens_per_alignatt_step(self) -> int:
        if self.max_tokens_per_alignatt_step is not None:
            return self.max_tokens_per_alignatt_step
        return MAX_TOKENS_PER_SECOND * int(self.chunk_secs + self.right_context_secs)


@dataclass(frozen=True)
class Geometry:
    """Contexts in encoder frames and in samples, as the NeMo driver rounds them."""

    left: int  # encoder frames
    chunk: int
    right: int
    frame_samples: int  # samples per encoder frame (1280 at 16 kHz, 10 ms hop, 8x subsampling)
    frame_ms: float  # milliseconds per encoder frame (80)

    @property
    def left_samples(self) -> int:
        return self.left * self.frame_samples

    @property
    def chunk_samples(self) -> int:
        return self.chunk * self.frame_samples

    @property
    def right_samples(self) -> int:
        return self.right * self.frame_samples

    @property
    def window_samples(self) -> int:
        return self.left_samples + self.chunk_samples + self.right_samples

    def step_end(self, step: int) -> int:
        """Sample position the driver has read up to at step ``step`` (before clipping to the file's end)."""
        return self.chunk_samples + self.right_samples + step * self.chunk_samples

    def steps_for(self, num_samples: int) -> int:
        """Number of windows the driver runs over ``num_samples`` samples (the last is the first whose end
        reaches the file's end; none for an empty file)."""
        if num_samples <= 0:
            return 0
        step = 0
        while self.step_end(step) < num_samples:
            step += 1
        return step + 1

    def decoder_length(self, step: int) -> int:
        """Encoder frames the decoder may attend to on a window that is not the last (right context masked)."""
        return min(step * self.chunk, self.left) + self.chunk

    def encoder_shift(self, step: int, num_samples: Optional[int]) -> int:
        """NeMo's prev_encoder_shift: frames between the audio's start and the window's first frame.

        ``num_samples``: the file's length when known (it only matters for a file shorter than one chunk).
        """
        first = self.chunk_samples if num_samples is None else min(self.chunk_samples, num_samples)
        end_of_window = first + step * self.chunk_samples
        return max(end_of_window // self.frame_samples - self.left - self.chunk, 0)


def geometry(options: StreamingOptions, sample_rate: int, hop_length: int, subsampling: int) -> Geometry:
    """The driver's context sizes: seconds -> encoder frames (rounded down) -> samples."""
    features_per_sec = sample_rate / hop_length
    feature_samples = (int(sample_rate * hop_length / sample_rate) // subsampling) * subsampling

    def frames(secs: float) -> int:
        return int(secs * features_per_sec / subsampling)

    g = Geometry(
        left=frames(options.left_context_secs),
        chunk=frames(options.chunk_secs),
        right=frames(options.right_context_secs),
        frame_samples=feature_samples * subsampling,
        frame_ms=subsampling * hop_length / sample_rate * 1000,
    )
    if g.chunk < 1:
        raise CanaryError(
            f"chunk_secs={options.chunk_secs} is shorter than one encoder frame "
            f"({g.frame_ms / 1000:.2f} s); use a longer chunk."
        )
    return g


# -- decisions ------------------------------------------------------------------------------------------------


def must_wait(decoder_length: int, chunk_frames: int, waitk_lagging: int, is_last: bool) -> bool:
    """Initial lagging (both policies): decode nothing until ``waitk_lagging`` chunks are visible."""
    return decoder_length // chunk_frames < waitk_lagging and not is_last


def sink_frames(prompt_pass: bool, window_frames: int, exclude_sink_frames: int, encoder_shift: int) -> int:
    """Leading encoder frames AlignAtt ignores when looking for the most attended frame.

    ``window_frames``: the encoder output's full length (right context included), as NeMo's score shape.
    """
    if prompt_pass and window_frames <= exclude_sink_frames:
        return window_frames // 2
    return exclude_sink_frames if encoder_shift == 0 else 0


def alignatt_may_continue(decoder_length: int, most_attended: int, threshold: float, is_last: bool) -> bool:
    """AlignAtt's rule: the token may be emitted if its attention peak is ``threshold`` frames from the end."""
    return is_last or decoder_length - (most_attended + 1) >= threshold


def is_hallucination(row: Sequence[int]) -> bool:
    """NeMo's detector on a token row (prompt + tokens) ending with the newest token.

    Patterns at the row's end: the same token five times (NeMo compares the newest with the four before), "a b"
    three times, "a b c" three times. NeMo skips the check while the row is shorter than 8 positions.
    """
    n = len(row)
    if n < 9:  # NeMo's current_context_lengths < 8, with the newest token at index current_context_lengths
        return False
    t = [row[n - 1 - k] for k in range(9)]  # t[k] = token k places before the newest
    pattern_1 = t[0] == t[1] == t[2] == t[3] == t[4]
    pattern_2 = t[0] == t[2] == t[4] and t[1] == t[3] == t[5]
    pattern_3 = t[0] == t[3] == t[6] and t[1] == t[4] == t[7] and t[2] == t[5] == t[8]
    return pattern_1 or pattern_2 or pattern_3


def avgpool_peak(rows: Sequence[Sequence[float]], start: int) -> int:
    """Most attended frame of the last row after NeMo's 5x5 average pooling (stride 1, padding 2, padding not
    counted) over (query rows, frames ``start``...); ``rows``: head-averaged attention of the last <= 3 query
    rows (the pooled last row sees the two rows before it). Returns an index into the full frame axis."""
    frames = len(rows[-1])
    best, best_value = start, None
    for t in range(start, frames):
        lo, hi = max(start, t - 2), min(frames, t + 3)
        total = sum(sum(r[lo:hi]) for r in rows)
        value = total / (len(rows) * (hi - lo))
        if best_value is None or value > best_value:
            best, best_value = t, value
    return best


# -- latency (LAAL) -------------------------------------------------------------------------------------------


def laal(delays_ms: Sequence[float], source_ms: float, reference_words: int) -> float:
    """Length-adaptive average lagging (NeMo's compute_laal) of word delays in milliseconds."""
    if delays_ms[0] > source_ms:
        return float(delays_ms[0])
    gamma = max(len(delays_ms), reference_words) / source_ms
    total, tau = 0.0, 0
    for index, delay in enumerate(delays_ms):
        total += delay - index / gamma
        tau = index + 1
        if delay >= source_ms:
            break
    return total / tau


def waitk_laal(pieces: Sequence[str], geo: Geometry, waitk_lagging: int, source_ms: float,
               reference_words: int, eos_piece: str) -> float:
    """NeMo's compute_waitk_lagging for one stream: token j is assumed decided after j + lagging chunks."""
    delays = []
    for j, piece in enumerate(pieces):
        available = min(source_ms, ((j + waitk_lagging) * geo.chunk + geo.right) * geo.frame_ms)
        if _starts_word(piece) or piece == eos_piece:
            delays.append(available)
        if piece == eos_piece:
            break
    return laal(delays or [0.0], source_ms, reference_words)


def alignatt_laal(pieces: Sequence[str], alignment: Sequence[int], geo: Geometry, source_ms: float,
                  reference_words: int, eos_piece: str) -> float:
    """NeMo's compute_alignatt_lagging for one stream: token j was decided when ``alignment[j]`` frames of audio
    (plus the right context) had been read."""
    if not pieces:
        return EMPTY_LAAL_MS
    delays = []
    for piece, frames in zip(pieces, alignment):
        if _starts_word(piece) or piece == eos_piece:
            delays.append((frames + geo.right) * geo.frame_ms)
        if piece == eos_piece:
            break
    return laal(delays or [0.0], source_ms, reference_words)


def _starts_word(piece: str) -> bool:
    return piece.startswith("\u2581") and piece != "\u2581"
