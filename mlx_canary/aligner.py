"""canary-1b-v2's timestamps model in MLX: a CTC FastConformer whose log-probs the AED's text is force-aligned to.

NeMo restores it from the ``.nemo`` as a second model (``EncDecCTCModelBPE``: its own preprocessor settings, a
FastConformer, a ``ConvASRDecoder`` = one 1x1 convolution over the SentencePiece vocabulary plus the blank, then
log-softmax). ``CTCAligner`` is that network (parameter names are the converter's contract: ``preprocessor.*``,
``encoder.*`` as in ``model.Canary``, ``head.weight`` / ``head.bias``); ``Aligner`` pairs it with its vocabulary
and turns one waveform plus a text into word / segment (or char) times through ``forced_alignment``.

Each input runs alone (NeMo's batch-1 result; batch-invariant by construction). The waveform is taken as given:
in the transcription path it is the AED's input after NeMo's 1 s minimum padding, as NeMo hands it over.

Long inputs (``mlx-canary align`` on a film or a podcast): up to ``ONE_PASS_SECONDS`` the aligner sees the whole
input at once, exactly as NeMo runs it. Beyond, one pass would hold attention over every frame (an hour: 45,000
frames, tens of GB at canary-1b-v2's size), so the log-probs are computed in overlapping windows (``plan_windows``:
each keeps its central ``WINDOW_KEEP_SECONDS`` and sees ``WINDOW_CONTEXT_SECONDS`` either side, normalised on its
own like one of NeMo's long-form chunks), stitched frame for frame into the one-pass frame count, and kept only for
the token ids the text uses; one Viterbi then runs over the whole text (``forced_alignment.viterbi`` bounds its own
memory). The log-probs held grow as frames x the text's distinct tokens (an hour, ~3,000 distinct pieces: ~0.5 GB).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .config import AlignerConfig
from .conformer import ConformerEncoder
from .forced_alignment import AlignedText, SentencePieceVocab, align_text, text_columns
from .model import Preprocessor

ONE_PASS_SECONDS = 120.0  # inputs up to this long run through the aligner at once (NeMo's result)
WINDOW_KEEP_SECONDS = 32.0  # longer ones in windows that keep their central 32 s ...
WINDOW_CONTEXT_SECONDS = 4.0  # ... and see 4 s of context either side (40 s windows)


@dataclass(frozen=True)
class Window:
    """Samples ``start..end`` of the input run through the aligner; its output frames ``keep_from..keep_to``
    (``None``: to its end) are the input's frames ``first_frame..``."""

    start: int
    end: int
    keep_from: int
    keep_to: Optional[int]
    first_frame: int


def plan_windows(num_samples: int, samples_per_frame: int, keep_frames: int, context_frames: int) -> list[Window]:
    """Overlapping windows covering ``num_samples`` whose kept frames join into the one-pass frames.

    Windows start on whole output frames (``samples_per_frame`` = hop x subsampling), so a window's frame ``i`` is
    the input's frame ``first_frame - keep_from + i`` and the last window, which runs to the input's end, ends on
    the input's last frame (NeMo's framing and its stride-2 convolutions shift by whole frames).
    """
    windows, k = [], 0
    while True:
        first = k * keep_frames
        start = max(0, first - context_frames) * samples_per_frame
        end = (first + keep_frames + context_frames) * samples_per_frame
        keep_from = first - start // samples_per_frame
        if end >= num_samples:
            windows.append(Window(start, num_samples, keep_from, None, first))
            return windows
        windows.append(Window(start, end, keep_from, keep_from + keep_frames, first))
        k += 1


class CTCAligner(nn.Module):
    def __init__(self, config: AlignerConfig):
        super().__init__()
        self.config = config
        self.preprocessor = Preprocessor(config)
        self.encoder = ConformerEncoder(config.encoder)
        self.head = nn.Linear(config.encoder.d_model, config.vocab_size + 1)

    @property
    def dtype(self):
        return self.head.bias.dtype

    def __call__(self, audio: mx.array, lengths: mx.array) -> tuple[mx.array, mx.array]:
        """(B, N) samples -> log-probs (B, T, V+1) float32 (blank last) and their lengths (B,)."""
        # NeMo's transcribe() turns the preprocessor's pad_to off, as for the main model.
        features, frames = self.preprocessor(audio, lengths, pad_to=0)
        states, out_lengths = self.encoder(features.astype(self.dtype), frames)
        logits = self.head(states).astype(mx.float32)
        return logits - mx.logsumexp(logits, axis=-1, keepdims=True), out_lengths


class Aligner:
    """A loaded timestamps model: ``CTCAligner`` + its SentencePiece vocabulary (``forced_alignment.AlignmentVocab``)."""

    def __init__(self, net: CTCAligner, vocab: SentencePieceVocab, config: AlignerConfig):
        self.net = net
        self.vocab = vocab
        self.config = config

    @property
    def frame_seconds(self) -> float:
        return self.config.frame_seconds

    @property
    def samples_per_frame(self) -> int:
        return self.config.preprocessor.hop_length * self.config.encoder.subsampling_factor

    def log_probs(self, wave: np.ndarray, columns: Optional[np.ndarray] = None) -> np.ndarray:
        """(T, V+1) float32 log-probs of one waveform (16 kHz mono float32); with ``columns``, (T, len(columns)):
        those token ids only. Inputs longer than ``ONE_PASS_SECONDS`` are computed in windows (module docstring)."""
        wave = np.asarray(wave, dtype=np.float32)
        if len(wave) <= ONE_PASS_SECONDS * self.config.preprocessor.sample_rate:
            return self._log_probs(wave, columns)
        rate = self.config.preprocessor.sample_rate / self.samples_per_frame
        windows = plan_windows(len(wave), self.samples_per_frame, round(WINDOW_KEEP_SECONDS * rate),
                               round(WINDOW_CONTEXT_SECONDS * rate))
        return np.concatenate([self._log_probs(wave[w.start : w.end], columns)[w.keep_from : w.keep_to]
                               for w in windows])

    def _log_probs(self, wave: np.ndarray, columns: Optional[np.ndarray]) -> np.ndarray:
        samples = mx.array(wave[None, :])
        log_probs, lengths = self.net(samples, mx.array([samples.shape[1]], dtype=mx.int32))
        log_probs = log_probs[0, : int(lengths[0])]
        if columns is not None:
            log_probs = log_probs[:, mx.array(np.asarray(columns, dtype=np.int32))]
        return np.array(log_probs)

    def align(self, wave: np.ndarray, text: str, level: str = "words") -> AlignedText:
        """NeMo's forced-alignment timestamps of ``text`` in ``wave`` (see ``forced_alignment.align_text``), with the
        characters of ``text`` the vocabulary lacks (NeMo aligns them as <unk> tokens). Only the log-probs of the
        text's own tokens are kept (the same floats), which bounds memory on long inputs."""
        columns = text_columns(text, self.vocab, level)
        aligned = align_text(self.log_probs(wave, columns), text, self.vocab, self.frame_seconds, level, columns)
        aligned.unknown_characters = self.vocab.unknown_characters(text)
        return aligned
