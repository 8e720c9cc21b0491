"""canary-1b-v2's timestamps model in MLX: a CTC FastConformer whose log-probs the AED's text is force-aligned to.

NeMo restores it from the ``.nemo`` as a second model (``EncDecCTCModelBPE``: its own preprocessor settings, a
FastConformer, a ``ConvASRDecoder`` = one 1x1 convolution over the SentencePiece vocabulary plus the blank, then
log-softmax). ``CTCAligner`` is that network (parameter names are the converter's contract: ``preprocessor.*``,
``encoder.*`` as in ``model.Canary``, ``head.weight`` / ``head.bias``); ``Aligner`` pairs it with its vocabulary
and turns one waveform plus a text into word / segment (or char) times through ``forced_alignment``.

Each input runs alone (NeMo's batch-1 result; batch-invariant by construction). The waveform is taken as given:
in the transcription path it is the AED's input after NeMo's 1 s minimum padding, as NeMo hands it over.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .config import AlignerConfig
from .conformer import ConformerEncoder
from .forced_alignment import AlignedText, SentencePieceVocab, align_text
from .model import Preprocessor


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

    def log_probs(self, wave: np.ndarray) -> np.ndarray:
        """(T, V+1) float32 log-probs of one waveform (16 kHz mono float32)."""
        samples = mx.array(np.asarray(wave, dtype=np.float32)[None, :])
        log_probs, lengths = self.net(samples, mx.array([samples.shape[1]], dtype=mx.int32))
        return np.array(log_probs[0, : int(lengths[0])])

    def align(self, wave: np.ndarray, text: str, level: str = "words") -> AlignedText:
        """NeMo's forced-alignment timestamps of ``text`` in ``wave`` (see ``forced_alignment.align_text``), with the
        characters of ``text`` the vocabulary lacks (NeMo aligns them as <unk> tokens)."""
        aligned = align_text(self.log_probs(wave), text, self.vocab, self.frame_seconds, level)
        aligned.unknown_characters = self.vocab.unknown_characters(text)
        return aligned
