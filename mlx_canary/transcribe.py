"""The public transcription API: ``CanaryModel.transcribe`` / ``translate`` over files, arrays and lists.

A call goes: inputs -> 16 kHz mono samples (``audio``) -> NeMo's 1-second minimum padding -> batches in input
order -> log-mels -> encoder -> prompt -> decoding -> text (+ timestamps) -> ``Transcript``.
Batches are right-padded exactly as NeMo pads them, so batched results equal NeMo's batched results.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Union

import mlx.core as mx
import numpy as np

from . import audio as audio_io
from .config import ModelConfig
from .decoding import DecodeOptions, greedy_decode
from .errors import CanaryError
from .model import Canary
from .prompts import build_lid_prompt, build_prompt
from .transcript import Transcript

AudioInput = Union[str, "os.PathLike", bytes, np.ndarray, mx.array]


@dataclass
class PromptSettings:
    source_lang: str
    target_lang: str
    pnc: bool = True
    timestamps: bool = False


def pad_to_min_duration(samples: np.ndarray, min_samples: int) -> np.ndarray:
    """Zero-pad short clips on both sides to ``min_samples`` as NeMo's transcribe() does.

    The padding counts as valid audio; the left share is ``round(pad / 2)`` (lhotse's split, Python rounding).
    """
    missing = min_samples - len(samples)
    if missing <= 0:
        return samples
    left = round(missing / 2)
    return np.pad(samples, (left, missing - left))


class CanaryModel:
    """A loaded model: network, tokenizer and configuration. Create it with ``mlx_canary.load_model``."""

    def __init__(self, net: Canary, tokenizer, config: ModelConfig, name: str = "canary"):
        self.net = net
        self.tokenizer = tokenizer
        self.config = config
        self.name = name

    # -- public API -------------------------------------------------------------------------------------

    def transcribe(
        self,
        audio: Union[AudioInput, Sequence[AudioInput]],
        *,
        source_lang: str = "en",
        target_lang: Optional[str] = None,
        pnc: bool = True,
        timestamps: bool = False,
        batch_size: int = 8,
        beam_size: Optional[int] = None,
        length_penalty: Optional[float] = None,
        sample_rate: Optional[int] = None,
    ):
        """Transcribe (or, with ``target_lang`` != ``source_lang``, translate) one input or a list of inputs.

        ``audio`` may be a path, encoded bytes, or a numpy/MLX array of samples at ``sample_rate`` (default
        16 kHz), or a list of those. A single input returns one ``Transcript``; a list returns a list.
        """
        single = not isinstance(audio, (list, tuple))
        items = [audio] if single else list(audio)
        results = list(
            self.generate(
                items,
                source_lang=source_lang,
                target_lang=target_lang,
                pnc=pnc,
                timestamps=timestamps,
                batch_size=batch_size,
                beam_size=beam_size,
                length_penalty=length_penalty,
                sample_rate=sample_rate,
            )
        )
        return results[0] if single else results

    def translate(self, audio, *, target_lang: str, source_lang: str = "en", **kwargs):
        """Speech translation from ``source_lang`` speech into ``target_lang`` text."""
        return self.transcribe(audio, source_lang=source_lang, target_lang=target_lang, **kwargs)

    def generate(
        self,
        items: Sequence[AudioInput],
        *,
        source_lang: str = "en",
        target_lang: Optional[str] = None,
        pnc: bool = True,
        timestamps: bool = False,
        batch_size: int = 8,
        beam_size: Optional[int] = None,
        length_penalty: Optional[float] = None,
        sample_rate: Optional[int] = None,
    ) -> Iterator[Transcript]:
        """Like ``transcribe`` on a list, yielding each ``Transcript`` as soon as its batch is done."""
        if batch_size < 1:
            raise CanaryError("batch_size must be at least 1")
        auto = source_lang == "auto"
        if auto and target_lang == "auto":
            raise CanaryError("target_lang cannot be 'auto'; name the language to translate into")
        settings = PromptSettings(source_lang, target_lang or source_lang, pnc, timestamps)
        # Build (and so validate) the prompt before any audio is decoded.
        prompt = None if auto else self.prompt_ids(settings)
        if auto:
            self.language_id_prompt()
            if target_lang:
                self.prompt_ids(PromptSettings(target_lang, target_lang, pnc, timestamps))
        options = self.decode_options(beam_size, length_penalty)
        for start in range(0, len(items), batch_size):
            batch = items[start : start + batch_size]
            waves = [audio_io.load(item, sample_rate=sample_rate) for item in batch]
            encoded, enc_lengths = self.encode_waves(waves)
            if auto:
                languages = self.identify_languages(encoded, enc_lengths, batch)
                tokens = [None] * len(batch)
                for lang in dict.fromkeys(languages):
                    rows = [i for i, found in enumerate(languages) if found == lang]
                    lang_settings = PromptSettings(lang, target_lang or lang, pnc, timestamps)
                    index = mx.array(rows)
                    decoded = self.decode_encoded(
                        encoded[index], enc_lengths[index], self.prompt_ids(lang_settings), options
                    )
                    for row, ids in zip(rows, decoded):
                        tokens[row] = ids
                for item, wave, ids, lang in zip(batch, waves, tokens, languages):
                    result = self.make_transcript(item, wave, ids, PromptSettings(lang, target_lang or lang, pnc,
                                                                                  timestamps))
                    result.language = lang
                    yield result
            else:
                for item, wave, ids in zip(batch, waves, self.decode_encoded(encoded, enc_lengths, prompt, options)):
                    yield self.make_transcript(item, wave, ids, settings)

    # -- building blocks ----------------------------------------------------------------------------------

    def prompt_ids(self, settings: PromptSettings) -> list[int]:
        return build_prompt(
            self.tokenizer,
            self.config.prompt_format,
            source_lang=settings.source_lang,
            target_lang=settings.target_lang,
            pnc=settings.pnc,
            timestamps=settings.timestamps,
        )

    def decode_options(self, beam_size=None, length_penalty=None) -> DecodeOptions:
        d = self.config.decoding
        return DecodeOptions(
            eos_id=self.tokenizer.eos_id,
            pad_id=self.tokenizer.pad_id,
            max_generation_delta=d.max_generation_delta,
            beam_size=beam_size or d.beam_size,
            length_penalty=d.length_penalty if length_penalty is None else length_penalty,
            beam_strategy=d.strategy == "beam" if beam_size is None else beam_size > 0,
        )

    def encode_waves(self, waves: list[np.ndarray]) -> tuple[mx.array, mx.array]:
        """Right-pad a batch of 16 kHz waveforms and run preprocessor + encoder."""
        p = self.config.preprocessor
        min_samples = int(round(p.min_duration * p.sample_rate))
        waves = [pad_to_min_duration(w, min_samples) for w in waves]
        longest = max(len(w) for w in waves)
        batch = np.zeros((len(waves), longest), dtype=np.float32)
        for row, w in enumerate(waves):
            batch[row, : len(w)] = w
        lengths = mx.array([len(w) for w in waves], dtype=mx.int32)
        features, frame_lengths = self.net.features(mx.array(batch), lengths)
        return self.net.encode(features, frame_lengths)

    def decode_encoded(self, encoded: mx.array, enc_lengths: mx.array, prompt: list[int], options) -> list[list[int]]:
        prompts = mx.array([prompt] * encoded.shape[0], dtype=mx.int32)
        if options.beam_size > 1:
            from .beam import beam_decode

            return beam_decode(self.net, encoded, enc_lengths, prompts, options)
        return greedy_decode(self.net, encoded, enc_lengths, prompts, options)

    def decode_waves(self, waves: list[np.ndarray], prompt: list[int], options: DecodeOptions) -> list[list[int]]:
        encoded, enc_lengths = self.encode_waves(waves)
        return self.decode_encoded(encoded, enc_lengths, prompt, options)

    def language_id_prompt(self) -> list[int]:
        return build_lid_prompt(self.tokenizer, self.config.prompt_format)

    def identify_languages(self, encoded: mx.array, enc_lengths: mx.array, items) -> list[str]:
        """Source language per row, read from the tokens the model predicts after the partial prompt.

        canary2 (NeMo's ``user_partial`` role): the first token is the emotion, the second the language.
        canary v1: the language directly follows the start-of-transcript token.
        """
        prompt = self.language_id_prompt()
        steps = 2 if self.config.prompt_format == "canary2" else 1
        options = DecodeOptions(eos_id=self.tokenizer.eos_id, pad_id=self.tokenizer.pad_id)
        prompts = mx.array([prompt] * encoded.shape[0], dtype=mx.int32)
        found = []
        for item, ids in zip(items, greedy_decode(self.net, encoded, enc_lengths, prompts, options, steps)):
            lang = self.tokenizer.language_of(ids[steps - 1]) if len(ids) >= steps else None
            if lang is None:
                label = item if isinstance(item, str) else "the audio"
                raise CanaryError(
                    f"could not identify the spoken language of {label}: the model predicted no language token; "
                    f"pass --source-lang (one of {', '.join(self.tokenizer.languages)})"
                )
            found.append(lang)
        return found

    def make_transcript(self, item, wave: np.ndarray, tokens: list[int], settings: PromptSettings) -> Transcript:
        text = self.tokenizer.decode(tokens)
        words: list = []
        segments: list = []
        if settings.timestamps:
            from .timestamps import parse_timestamps

            p = self.config.preprocessor
            text, words, segments = parse_timestamps(
                text,
                window_stride=p.hop_length / p.sample_rate,
                subsampling_factor=self.config.encoder.subsampling_factor,
            )
        return Transcript(
            text=text.strip(),
            tokens=tokens,
            source_lang=settings.source_lang,
            target_lang=settings.target_lang,
            duration=len(wave) / self.config.preprocessor.sample_rate,
            segments=segments,
            words=words,
            path=str(item) if isinstance(item, (str,)) or hasattr(item, "__fspath__") else None,
            model=self.name,
        )
