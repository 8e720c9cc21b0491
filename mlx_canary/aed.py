"""The Canary encoder-decoder family (canary-1b, -1b-flash, -180m-flash, -1b-v2) behind the ``engine.Engine`` seam.

``AEDEngine`` owns the network (``model.Canary``), its tokenizer and config, and turns the pipeline's requests
into NeMo's steps: 1 s minimum padding and right-padded batches -> log-mels -> FastConformer -> prompt (canary /
canary2 format) -> greedy or beam decoding over the Transformer decoder -> text (+ timestamps).

Timestamps come one of two ways, as in NeMo: flash models predict ``<|N|>`` frame tokens (``timestamps.py``);
canary-1b-v2 carries a CTC aligner (``aligner.Aligner``), and with it NeMo prompts ``<|notimestamp|>`` whatever was
asked and force-aligns the decoded text against the aligner's log-probs of the same (padded) input.
"""

from __future__ import annotations

from typing import Optional, Sequence

import mlx.core as mx
import numpy as np

from .beam import beam_decode
from .config import ModelConfig
from .decoding import DecodeOptions, greedy_decode
from .engine import Capabilities, Encoded, Framing
from .errors import CanaryError, UnsupportedOption
from .model import Canary
from .options import Task, TranscribeOptions
from .prompts import build_lid_prompt, build_prompt
from .streaming import StreamingSession
from .streaming_policy import StreamingOptions
from .timestamps import parse_timestamps


def pad_to_min_duration(samples: np.ndarray, min_samples: int) -> np.ndarray:
    """Zero-pad short clips on both sides to ``min_samples`` as NeMo's transcribe() does.

    The padding counts as valid audio; the left side gets the rounded-up half, as lhotse splits it.
    """
    missing = min_samples - len(samples)
    if missing <= 0:
        return samples
    left = missing - missing // 2
    return np.pad(samples, (left, missing - left))


class AEDEngine:
    """A loaded Canary AED model: network, tokenizer and configuration."""

    def __init__(self, net: Canary, tokenizer, config: ModelConfig, name: str = "canary", aligner=None):
        self.net = net
        self.tokenizer = tokenizer
        self.config = config
        self.name = name
        self.aligner = aligner  # aligner.Aligner (canary-1b-v2's timestamps model) or None

    # -- what the model can do ------------------------------------------------------------------------------

    @property
    def capabilities(self) -> Capabilities:
        languages = tuple(self.tokenizer.languages)
        pairs = self.config.translation_pairs
        return Capabilities(
            languages=languages,
            timestamps=self.aligner is not None or self._predicts_timestamps,
            translation=len(languages) > 1 and (pairs is None or any(s != t for s, t in pairs)),
            language_id=len(languages) > 1,
            default_source_lang="en" if "en" in languages or not languages else languages[0],
            translation_timestamps=self.aligner is None and self._predicts_timestamps,
            alignment=self.aligner is not None,
        )

    @property
    def _predicts_timestamps(self) -> bool:
        return self.config.prompt_format == "canary2" and bool(self.tokenizer.supports_timestamps)

    @property
    def framing(self) -> Framing:
        p = self.config.preprocessor
        return Framing(
            sample_rate=p.sample_rate,
            hop_length=p.hop_length,
            subsampling_factor=self.config.encoder.subsampling_factor,
            min_samples=int(round(p.min_duration * p.sample_rate)),
        )

    @property
    def default_chunk_seconds(self) -> Optional[float]:
        return self.config.decoding.chunk_seconds

    @property
    def chunk_merge_by_time(self) -> bool:
        return self.config.decoding.chunk_merge == "timestamps"

    # -- prompts ----------------------------------------------------------------------------------------------

    def prompt(self, task: Task) -> list[int]:
        if task.timestamps and self.aligner is None:
            self._check_not_missing_aligner()
        if task.timestamps and self.aligner is not None and task.source_lang != task.target_lang:
            # NeMo 3.0 does align a translation: it force-aligns the target-language text against the aligner's
            # CTC log-probs of the source-language speech (no check of the task). Those times belong to no spoken
            # word (the aligner hears the source language), so they are refused rather than reproduced.
            raise UnsupportedOption(
                "timestamps are not available for speech translation with this model: its times come from aligning "
                "the text with the speech, and a translation's words were not spoken; transcribe with timestamps "
                "(source language = target language), or translate without them"
            )
        ids = build_prompt(
            self.tokenizer,
            self.config.prompt_format,
            source_lang=task.source_lang,
            target_lang=task.target_lang,
            pnc=task.pnc,
            # With an aligner NeMo forces <|notimestamp|>: the times come from forced alignment.
            timestamps=task.timestamps and self.aligner is None,
        )
        # After build_prompt, so that an unknown language is reported as such first.
        self.check_direction(task.source_lang, task.target_lang)
        return ids

    def _check_not_missing_aligner(self) -> None:
        """A canary-1b-v2 directory converted before the aligner was (no ``aligner`` key in its config.json) would
        otherwise prompt ``<|timestamp|>``, which v2 was not trained to answer (NeMo never asks it)."""
        config = self.config
        if config.aligner_unknown and config.tokenizer.type == "spe" and config.prompt_format == "canary2":
            raise CanaryError(
                f"{self.name} was converted by an older mlx-canary, which left out canary-1b-v2's timestamps model "
                "(its CTC aligner); convert the .nemo again (mlx-canary convert MODEL.nemo OUT_DIR, or delete the "
                "cached conversion) to get timestamps"
            )

    def open_stream(self, task: Task, options: StreamingOptions) -> StreamingSession:
        """A streaming session (Wait-k / AlignAtt, NeMo's streaming decoding) with ``task``'s prompt."""
        return StreamingSession(self.net, self.tokenizer, self.prompt(task), options)

    def check_direction(self, source_lang: str, target_lang: str) -> None:
        """Refuse translation directions the model was not trained for (never a silent fallback)."""
        pairs = self.config.translation_pairs
        if source_lang == target_lang or pairs is None or [source_lang, target_lang] in pairs:
            return
        valid = ", ".join(f"{src}->{tgt}" for src, tgt in pairs)
        raise UnsupportedOption(
            f"this model does not translate {source_lang} -> {target_lang}; supported translations: {valid}"
        )

    def language_id_prompt(self) -> list[int]:
        return build_lid_prompt(self.tokenizer, self.config.prompt_format)

    # -- decoding ---------------------------------------------------------------------------------------------

    def decode_options(self, options: TranscribeOptions) -> DecodeOptions:
        d = self.config.decoding
        beam_size, length_penalty = options.beam_size, options.length_penalty
        return DecodeOptions(
            eos_id=self.tokenizer.eos_id,
            pad_id=self.tokenizer.pad_id,
            max_generation_delta=d.max_generation_delta,
            beam_size=beam_size or d.beam_size,
            length_penalty=d.length_penalty if length_penalty is None else length_penalty,
            beam_strategy=d.strategy == "beam" if beam_size is None else beam_size > 0,
        )

    def encode(self, waves: Sequence[np.ndarray], pad_to: Optional[int] = None) -> Encoded:
        """Right-pad a batch of waveforms (to ``pad_to`` samples at least) and run preprocessor + encoder."""
        min_samples = self.framing.min_samples
        waves = [pad_to_min_duration(w, min_samples) for w in waves]
        longest = max([len(w) for w in waves] + [pad_to or 0])
        batch = np.zeros((len(waves), longest), dtype=np.float32)
        for row, w in enumerate(waves):
            batch[row, : len(w)] = w
        lengths = mx.array([len(w) for w in waves], dtype=mx.int32)
        # NeMo's transcribe() turns the preprocessor's pad_to off; it changes the padded encoder length,
        # which feeds the decoding budget.
        features, frame_lengths = self.net.features(mx.array(batch), lengths, pad_to=0)
        states, enc_lengths = self.net.encode(features, frame_lengths)
        return Encoded(states, enc_lengths, self._own_lengths([max(len(w), pad_to or 0) for w in waves]))

    def _own_lengths(self, num_samples: list[int]) -> mx.array:
        """The padded encoder length of each input encoded alone: the STFT's N // hop + 1 frames, through each
        stride-2 subsampling stage."""
        frames = np.array(num_samples) // self.config.preprocessor.hop_length + 1
        for _ in range(self.config.encoder.subsampling_stages):
            frames = (frames - 1) // 2 + 1
        return mx.array(frames.astype(np.int32))

    def decode(self, encoded: Encoded, prompt: list[int], options: DecodeOptions) -> list[list[int]]:
        states = encoded.states
        prompts = mx.array([prompt] * states.shape[0], dtype=mx.int32)
        # Each row's token budget is the one it has alone: a batch decodes every input as batch 1 does.
        if options.beam_size > 1:
            return beam_decode(self.net, states, encoded.lengths, prompts, options, budget_lengths=encoded.own_lengths)
        return greedy_decode(self.net, states, encoded.lengths, prompts, options, budget_lengths=encoded.own_lengths)

    def identify_languages(self, encoded: Encoded) -> list[Optional[str]]:
        """Source language per row, read from the tokens the model predicts after the partial prompt.

        canary2 (NeMo's ``user_partial`` role): the first token is the emotion, the second the language.
        canary v1: the language directly follows the start-of-transcript token.
        """
        steps = 2 if self.config.prompt_format == "canary2" else 1
        options = DecodeOptions(eos_id=self.tokenizer.eos_id, pad_id=self.tokenizer.pad_id)
        prompts = mx.array([self.language_id_prompt()] * encoded.states.shape[0], dtype=mx.int32)
        rows = greedy_decode(self.net, encoded.states, encoded.lengths, prompts, options, steps)
        return [self.tokenizer.language_of(ids[steps - 1]) if len(ids) >= steps else None for ids in rows]

    def chat(self, message: str, adapter: bool = False, max_new_tokens: Optional[int] = None) -> list[int]:
        raise UnsupportedOption(f"{self.name} is a speech model only: it cannot be prompted with text")

    def read_tokens(self, tokens: list[int], task: Task, wave: Optional[np.ndarray] = None) -> tuple[str, list, list]:
        text = self.tokenizer.decode_text(tokens)  # special pieces such as <unk> are never text
        if not task.timestamps:
            return text.strip(), [], []
        if self.aligner is not None:
            if wave is None:
                raise ValueError("forced-alignment timestamps need the input's samples")
            aligned = self.align(wave, text)
            return text.strip(), aligned.words, aligned.segments
        framing = self.framing
        text, words, segments = parse_timestamps(
            text,
            window_stride=framing.hop_length / framing.sample_rate,
            subsampling_factor=framing.subsampling_factor,
        )
        return text.strip(), words, segments

    # -- forced alignment (canary-1b-v2's aligner) -----------------------------------------------------------

    def align(self, wave: np.ndarray, text: str, level: str = "words"):
        """``forced_alignment.AlignedText`` of ``text`` in ``wave`` (16 kHz mono samples of one input, as decoded:
        NeMo's 1 s minimum padding is applied here, so times count from the padded start, as NeMo's do).
        ``level="chars"``: per-token times (what NeMo computes per chunk before merging long-form chunks)."""
        if self.aligner is None:
            raise UnsupportedOption(f"{self.name} has no timestamps model (CTC aligner) to align text with; "
                                    "canary-1b-v2 carries one")
        return self.aligner.align(pad_to_min_duration(wave, self.framing.min_samples), text, level)

    def align_chunk(self, wave: np.ndarray, tokens: list[int], task: Task) -> list[dict]:
        """NeMo's char-level timestamps of one long-form chunk (its samples as decoded, its generated ids): the
        chunk's text aligned as one word (``timestamp_type='char'``), before NeMo merges the chunks."""
        return self.align(wave, self.tokenizer.decode_text(tokens), level="chars").chars
