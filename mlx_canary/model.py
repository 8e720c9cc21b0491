"""``Canary``: preprocessor buffers + FastConformer encoder + optional projection + Transformer decoder + head.

The module tree's parameter names are the contract with the converter (see ``convert.py``). The output head
shares its weight with the decoder's token embedding (tied in NeMo) and keeps its own bias.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .config import ModelConfig
from .conformer import ConformerEncoder
from .features import log_mel
from .transformer import DecoderCache, TransformerDecoder


class Preprocessor(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        p = config.preprocessor
        self.cfg = p
        self.window = mx.zeros((p.win_length,))
        self.filterbank = mx.zeros((p.n_mels, p.n_fft // 2 + 1))

    def __call__(self, audio: mx.array, lengths: mx.array, pad_to=None) -> tuple[mx.array, mx.array]:
        return log_mel(audio, lengths, self.window, self.filterbank, self.cfg, pad_to)


class OutputHead(nn.Module):
    """Bias of the classifier; its weight is the (tied) token embedding."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.bias = mx.zeros((vocab_size,))


class Canary(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.preprocessor = Preprocessor(config)
        self.encoder = ConformerEncoder(config.encoder)
        if config.has_projection:
            self.encoder_decoder_proj = nn.Linear(config.encoder.d_model, config.decoder.hidden_size)
        self.decoder = TransformerDecoder(config.decoder)
        self.head = OutputHead(config.decoder.vocab_size)

    @property
    def dtype(self):
        return self.decoder.final_layer_norm.weight.dtype

    def features(self, audio: mx.array, lengths: mx.array, pad_to=None) -> tuple[mx.array, mx.array]:
        """(B, N) samples -> (B, T, n_mels) float32 log-mels and frame lengths (``pad_to``: see log_mel)."""
        return self.preprocessor(audio, lengths, pad_to)

    def encode(self, features: mx.array, lengths: mx.array) -> tuple[mx.array, mx.array]:
        """Features -> encoder states in decoder width (B, T', D) and their lengths."""
        x, lengths = self.encoder(features.astype(self.dtype), lengths)
        if "encoder_decoder_proj" in self:
            x = self.encoder_decoder_proj(x)
        return x, lengths

    def decode(self, ids: mx.array, cache: DecoderCache, self_mask, cross_mask) -> mx.array:
        """Decoder hidden states for ``ids`` continuing ``cache`` (see TransformerDecoder)."""
        return self.decoder(ids, cache, self_mask, cross_mask)

    def decode_step(self, ids: mx.array, cache: DecoderCache, cross_mask: mx.array) -> mx.array:
        """Raw scores (B, V) of the token after ``ids`` (B,), the last token of each row, which joins ``cache``."""
        return self.decoder.step(ids, cache, cross_mask, self.logits)

    def logits(self, hidden: mx.array) -> mx.array:
        """Raw classifier scores over the (padded) vocabulary, float32."""
        scores = self.decoder.embedding.token_embedding.as_linear(hidden) + self.head.bias
        return scores.astype(mx.float32)
