"""The log-mel front end, equal to NeMo's ``FilterbankFeatures`` at inference.

Pipeline per utterance (NeMo order): pre-emphasis -> zero the batch padding -> centred STFT with zero padding
and a symmetric Hann window -> power spectrum -> mel filterbank -> log(x + guard) -> per-feature normalisation
over the valid frames only (unbiased std, +1e-5 on the std) -> padded frames set to ``pad_value``.
The window and the filterbank are the tensors stored in the checkpoint (NeMo uses those, not recomputed ones).
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx

from .config import PreprocessorConfig


def valid_frames(num_samples: mx.array, cfg: PreprocessorConfig) -> mx.array:
    """Frames NeMo counts as valid for ``num_samples`` samples (the STFT itself yields one more)."""
    pad = 2 * (cfg.n_fft // 2)
    return (num_samples + pad - cfg.n_fft) // cfg.hop_length


def log_mel(
    audio: mx.array,
    lengths: mx.array,
    window: mx.array,
    filterbank: mx.array,
    cfg: PreprocessorConfig,
    pad_to: Optional[int] = None,
) -> tuple[mx.array, mx.array]:
    """Features for a right-padded batch.

    audio: (B, N) float32 at ``cfg.sample_rate``; lengths: (B,) valid samples.
    Returns features (B, T, n_mels) and frame lengths (B,), T = N // hop + 1 rounded up to a multiple of
    ``pad_to`` (default ``cfg.pad_to``; NeMo's transcribe() sets it to 0).
    """
    pad_to = cfg.pad_to if pad_to is None else pad_to
    audio = audio.astype(mx.float32)
    batch, num = audio.shape
    sample_idx = mx.arange(num)[None, :]
    if cfg.preemph:
        audio = mx.concatenate([audio[:, :1], audio[:, 1:] - cfg.preemph * audio[:, :-1]], axis=1)
    audio = mx.where(sample_idx < lengths[:, None], audio, 0.0)

    half = cfg.n_fft // 2
    padded = mx.pad(audio, [(0, 0), (half, half)])
    n_frames = 1 + num // cfg.hop_length
    frames = mx.as_strided(
        padded,
        shape=(batch, n_frames, cfg.n_fft),
        strides=(padded.shape[1], cfg.hop_length, 1),
    )
    # The window (win_length) sits centred inside the n_fft frame, zeros around it.
    left = (cfg.n_fft - window.shape[0]) // 2
    window = mx.pad(window.astype(mx.float32), [(left, cfg.n_fft - window.shape[0] - left)])
    spectrum = mx.fft.rfft(frames * window, n=cfg.n_fft, axis=-1)
    power = mx.abs(spectrum)
    if cfg.mag_power != 1.0:
        power = power**cfg.mag_power

    mel = power @ filterbank.astype(mx.float32).T  # (B, frames, n_mels)
    if cfg.log:
        if cfg.log_zero_guard_type == "add":
            mel = mx.log(mel + cfg.log_zero_guard_value)
        else:
            mel = mx.log(mx.maximum(mel, cfg.log_zero_guard_value))

    frame_lengths = valid_frames(lengths, cfg)
    valid = (mx.arange(n_frames)[None, :] < frame_lengths[:, None])[..., None]  # (B, frames, 1)
    if cfg.normalize == "per_feature":
        mel = _normalize(mel, valid, frame_lengths[:, None, None], axis=1)
    elif cfg.normalize == "all_features":
        count = frame_lengths[:, None, None] * mel.shape[-1]
        mel = _normalize(mel, valid, count, axis=(1, 2))

    mel = mx.where(valid, mel, cfg.pad_value)
    if pad_to > 0 and n_frames % pad_to:
        extra = pad_to - n_frames % pad_to
        mel = mx.pad(mel, [(0, 0), (0, extra), (0, 0)], constant_values=cfg.pad_value)
    return mel, frame_lengths


def _normalize(mel: mx.array, valid: mx.array, count: mx.array, axis) -> mx.array:
    """(x - mean) / (std + 1e-5) over valid frames; std is unbiased (N-1) and 0 when N == 1, as in NeMo.

    One exception, for featureless input (digital silence, or audio so quiet that every mel value is the log
    guard): when every normalised group is constant over the valid frames, the exact value of the formula, 0,
    is returned. NeMo computes the mean with float rounding there, and dividing that rounding error by a std of
    the same size amplifies it to values up to ~0.9 (its features for 5 s of zeros are -0.276): noise that
    makes a trained model hallucinate words in silence (the demo model: "open open open"), and that no two
    implementations reproduce alike. Such input has no meaningful token equality with NeMo.
    """
    count_f = count.astype(mx.float32)
    masked = mx.where(valid, mel, 0.0)
    mean = masked.sum(axis=axis, keepdims=True) / count_f
    centred = mx.where(valid, mel - mean, 0.0)
    var = (centred * centred).sum(axis=axis, keepdims=True) / mx.maximum(count_f - 1.0, 1.0)
    std = mx.where(count > 1, mx.sqrt(var), 0.0)
    normalized = (mel - mean) / (std + 1e-5)
    highest = mx.where(valid, mel, -mx.inf).max(axis=axis, keepdims=True)
    lowest = mx.where(valid, mel, mx.inf).min(axis=axis, keepdims=True)
    featureless = mx.all(highest <= lowest, axis=tuple(range(1, mel.ndim)), keepdims=True)
    return mx.where(featureless, 0.0, normalized)
