"""The public transcription API: ``CanaryModel.transcribe`` / ``translate`` over files, arrays and lists.

A call goes: inputs -> 16 kHz mono samples (``audio``) -> NeMo's 1-second minimum padding -> batches in input
order -> log-mels -> encoder -> prompt -> decoding -> text (+ timestamps) -> ``Transcript``.
Batches are right-padded exactly as NeMo pads them, so batched results equal NeMo's batched results.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence, Union

import mlx.core as mx
import numpy as np

from . import audio as audio_io
from .config import ModelConfig
from .decoding import DecodeOptions, greedy_decode
from .errors import CanaryError
from .model import Canary
from .prompts import build_lid_prompt, build_prompt
from .transcript import Transcript

AudioInput = Union[str, os.PathLike, bytes, np.ndarray, mx.array]


@dataclass
class PromptSettings:
    source_lang: str
    target_lang: str
    pnc: bool = True
    timestamps: bool = False


@dataclass
class Request:
    """Validated options of one transcribe/generate call."""

    source_lang: str  # a language code, or "auto"
    target_lang: Optional[str]  # None: same as the (identified) source
    pnc: bool
    timestamps: bool
    batch_size: int
    beam_size: Optional[int]
    length_penalty: Optional[float]
    chunk_seconds: Optional[float]
    prompt: Optional[list]  # None when the source language is identified per input
    options: DecodeOptions

    def settings(self, source_lang: str) -> PromptSettings:
        return PromptSettings(source_lang, self.target_lang or source_lang, self.pnc, self.timestamps)


def pad_to_min_duration(samples: np.ndarray, min_samples: int) -> np.ndarray:
    """Zero-pad short clips on both sides to ``min_samples`` as NeMo's transcribe() does.

    The padding counts as valid audio; the left side gets the rounded-up half, as lhotse splits it.
    """
    missing = min_samples - len(samples)
    if missing <= 0:
        return samples
    left = missing - missing // 2
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
        chunk_seconds: Optional[float] = None,
        sample_rate: Optional[int] = None,
        channel: Optional[int] = None,
        progress: Optional[Callable[[int, int], None]] = None,
    ):
        """Transcribe (or, with ``target_lang`` != ``source_lang``, translate) one input or a list of inputs.

        ``audio`` may be a path, encoded bytes, or a numpy/MLX array of samples at ``sample_rate`` (default
        16 kHz; 1-768 kHz), or a list of those. A single input returns one ``Transcript``; a list returns a list.
        Files are loaded as NeMo loads them (see ``mlx_canary.audio``); multi-channel audio is averaged, or
        ``channel=N`` keeps channel N (NeMo's ``channel_selector``). Empty audio is refused.
        ``source_lang="auto"`` identifies the spoken language first (reported in ``Transcript.language``).
        Inputs longer than one chunk (NeMo's 30-40 s plan, or ``chunk_seconds``) go through the overlapped,
        token-merged long-audio path; ``progress(done_chunks, total_chunks)`` follows it.
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
                chunk_seconds=chunk_seconds,
                sample_rate=sample_rate,
                channel=channel,
                progress=progress,
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
        chunk_seconds: Optional[float] = None,
        sample_rate: Optional[int] = None,
        channel: Optional[int] = None,
        progress: Optional[Callable[[int, int], None]] = None,
    ) -> Iterator[Transcript]:
        """Like ``transcribe`` on a list, yielding each ``Transcript`` as soon as its batch is done."""
        # Checked before any work: a wrong rate would otherwise resample (a rate of 1 Hz: 16000-fold) first.
        if sample_rate is not None:
            sample_rate = audio_io.check_sample_rate(sample_rate)
        channel = audio_io.check_channel(channel)
        request = self.validate(
            source_lang=source_lang,
            target_lang=target_lang,
            pnc=pnc,
            timestamps=timestamps,
            batch_size=batch_size,
            beam_size=beam_size,
            length_penalty=length_penalty,
            chunk_seconds=chunk_seconds,
        )
        for start in range(0, len(items), batch_size):
            batch = items[start : start + batch_size]
            waves = [self.load_input(item, sample_rate, channel) for item in batch]
            results: list[Optional[Transcript]] = [None] * len(batch)
            short = [i for i, wave in enumerate(waves) if not self.needs_chunking(wave, request.chunk_seconds)]
            if short:
                done = self.decode_batch([batch[i] for i in short], [waves[i] for i in short], request)
                for i, result in zip(short, done):
                    results[i] = result
            for i, result in enumerate(results):
                if result is None:
                    results[i] = self.decode_long(batch[i], waves[i], request, progress)
            yield from results

    def validate(
        self,
        *,
        source_lang: str = "en",
        target_lang: Optional[str] = None,
        pnc: bool = True,
        timestamps: bool = False,
        batch_size: int = 8,
        beam_size: Optional[int] = None,
        length_penalty: Optional[float] = None,
        chunk_seconds: Optional[float] = None,
    ) -> "Request":
        """Check the options against the model (languages, timestamps, sizes) before any audio is decoded."""
        if batch_size < 1:
            raise CanaryError("batch_size must be at least 1")
        if beam_size is not None and beam_size < 1:
            raise CanaryError("beam_size must be at least 1")
        chunk_seconds = self.chunk_length(chunk_seconds)
        if chunk_seconds is not None and chunk_seconds <= 2.0:
            raise CanaryError("chunk length must be more than 2 seconds (chunks overlap by 1 s)")
        if target_lang == "auto":
            raise CanaryError("target language cannot be 'auto'; name the language to write")
        auto = source_lang == "auto"
        if auto:
            self.language_id_prompt()
            if target_lang:
                self.prompt_ids(PromptSettings(target_lang, target_lang, pnc, timestamps))
            prompt = None
        else:
            prompt = self.prompt_ids(PromptSettings(source_lang, target_lang or source_lang, pnc, timestamps))
        return Request(
            source_lang=source_lang,
            target_lang=target_lang,
            pnc=pnc,
            timestamps=timestamps,
            batch_size=batch_size,
            beam_size=beam_size,
            length_penalty=length_penalty,
            chunk_seconds=chunk_seconds,
            prompt=prompt,
            options=self.decode_options(beam_size, length_penalty),
        )

    @staticmethod
    def load_input(item, sample_rate: Optional[int], channel: Optional[int]) -> np.ndarray:
        """One input's 16 kHz mono samples; empty audio is refused here, naming the input."""
        wave = audio_io.load(item, sample_rate=sample_rate, channel=channel)
        if wave.size == 0:
            name = os.fspath(item) if isinstance(item, (str, os.PathLike)) else f"the {type(item).__name__} input"
            raise CanaryError(f"{name} holds no audio samples")
        return wave

    def needs_chunking(self, wave: np.ndarray, chunk_seconds: Optional[float] = None) -> bool:
        from .chunking import plan_chunks

        sample_rate = self.config.preprocessor.sample_rate
        return len(plan_chunks(len(wave), sample_rate, chunk_seconds=self.chunk_length(chunk_seconds))) > 1

    def chunk_length(self, chunk_seconds: Optional[float] = None) -> Optional[float]:
        """Chunk length for long inputs: the caller's, else the config's ``decoding.chunk_seconds`` (None: NeMo's
        30-40 s plan)."""
        return self.config.decoding.chunk_seconds if chunk_seconds is None else chunk_seconds

    def decode_batch(self, items: list, waves: list[np.ndarray], request: "Request") -> list[Transcript]:
        """Short inputs decoded together as one padded batch (NeMo's batched semantics)."""
        encoded, enc_lengths = self.encode_waves(waves)
        if request.source_lang != "auto":
            settings = request.settings(request.source_lang)
            decoded = self.decode_encoded(encoded, enc_lengths, request.prompt, request.options)
            return [self.make_transcript(i, w, ids, settings) for i, w, ids in zip(items, waves, decoded)]
        languages = self.identify_languages(encoded, enc_lengths, items)
        results: list[Optional[Transcript]] = [None] * len(items)
        for lang in dict.fromkeys(languages):
            rows = [i for i, found in enumerate(languages) if found == lang]
            settings = request.settings(lang)
            index = mx.array(rows)
            decoded = self.decode_encoded(
                encoded[index], enc_lengths[index], self.prompt_ids(settings), request.options
            )
            for row, ids in zip(rows, decoded):
                results[row] = self.make_transcript(items[row], waves[row], ids, settings)
                results[row].language = lang
        return results

    def decode_long(self, item, wave: np.ndarray, request: "Request", progress=None) -> Transcript:
        """One long input through overlapped chunks and NeMo's token merge (see chunking.py)."""
        from .chunking import plan_chunks, transcribe_long

        language = None
        source = request.source_lang
        if source == "auto":
            first = plan_chunks(len(wave), self.config.preprocessor.sample_rate, chunk_seconds=request.chunk_seconds)[0]
            encoded, enc_lengths = self.encode_waves([wave[first.start : first.end]])
            source = language = self.identify_languages(encoded, enc_lengths, [item])[0]
        result = transcribe_long(
            self,
            wave,
            source_lang=source,
            target_lang=request.target_lang,
            pnc=request.pnc,
            timestamps=request.timestamps,
            chunk_seconds=request.chunk_seconds,
            batch_size=request.batch_size,
            beam_size=request.beam_size,
            length_penalty=request.length_penalty,
            progress=progress,
            item=item,
        )
        if language:
            result.language = language
        return result

    # -- building blocks ----------------------------------------------------------------------------------

    def prompt_ids(self, settings: PromptSettings) -> list[int]:
        ids = build_prompt(
            self.tokenizer,
            self.config.prompt_format,
            source_lang=settings.source_lang,
            target_lang=settings.target_lang,
            pnc=settings.pnc,
            timestamps=settings.timestamps,
        )
        # After build_prompt, so that an unknown language is reported as such first.
        self.check_direction(settings.source_lang, settings.target_lang)
        return ids

    def check_direction(self, source_lang: str, target_lang: str) -> None:
        """Refuse translation directions the model was not trained for (never a silent fallback)."""
        pairs = self.config.translation_pairs
        if source_lang == target_lang or pairs is None or [source_lang, target_lang] in pairs:
            return
        valid = ", ".join(f"{src}->{tgt}" for src, tgt in pairs)
        raise CanaryError(
            f"this model does not translate {source_lang} -> {target_lang}; supported translations: {valid}"
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

    def encode_waves(self, waves: list[np.ndarray], pad_to: Optional[int] = None) -> tuple[mx.array, mx.array]:
        """Right-pad a batch of 16 kHz waveforms (to ``pad_to`` samples at least) and run preprocessor + encoder."""
        p = self.config.preprocessor
        min_samples = int(round(p.min_duration * p.sample_rate))
        waves = [pad_to_min_duration(w, min_samples) for w in waves]
        longest = max([len(w) for w in waves] + [pad_to or 0])
        batch = np.zeros((len(waves), longest), dtype=np.float32)
        for row, w in enumerate(waves):
            batch[row, : len(w)] = w
        lengths = mx.array([len(w) for w in waves], dtype=mx.int32)
        # NeMo's transcribe() turns the preprocessor's pad_to off; it changes the padded encoder length,
        # which feeds the decoding budget.
        features, frame_lengths = self.net.features(mx.array(batch), lengths, pad_to=0)
        return self.net.encode(features, frame_lengths)

    def decode_encoded(self, encoded: mx.array, enc_lengths: mx.array, prompt: list[int], options) -> list[list[int]]:
        prompts = mx.array([prompt] * encoded.shape[0], dtype=mx.int32)
        if options.beam_size > 1:
            from .beam import beam_decode

            return beam_decode(self.net, encoded, enc_lengths, prompts, options)
        return greedy_decode(self.net, encoded, enc_lengths, prompts, options)

    def decode_waves(
        self, waves: list[np.ndarray], prompt: list[int], options: DecodeOptions, pad_to: Optional[int] = None
    ) -> list[list[int]]:
        encoded, enc_lengths = self.encode_waves(waves, pad_to)
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
        text = self.tokenizer.decode_text(tokens)
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
            timestamps=settings.timestamps,
            path=str(item) if isinstance(item, (str,)) or hasattr(item, "__fspath__") else None,
            model=self.name,
        )
