"""The model-family seam: what the pipeline (``transcribe.py``) asks of a loaded model, and nothing more.

One implementation per model family: ``aed.AEDEngine`` for the Canary encoder-decoder models (canary-1b,
-1b-flash, -180m-flash, -1b-v2). A second family (a speech-LLM such as Canary-Qwen) implements the same methods;
the pipeline, the scheduler and the front ends never ask which family they hold. What a family cannot do is
stated in ``Capabilities`` and refused by its ``prompt`` with ``UnsupportedOption``, not probed with ``getattr``.

Arrays: waveforms are 1-D float32 numpy at ``sample_rate``; encoder output stays MLX (``Encoded``, handed back to
the engine that made it); token ids are plain lists of ints (the prompt excluded, trailing EOS stripped).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Protocol, Sequence

import numpy as np

from .options import Task, TranscribeOptions


@dataclass(frozen=True)
class Encoded:
    """A batch's encoder output: ``states`` (B, T, D), valid ``lengths`` (B,), and ``own_lengths`` (B,): the padded
    length each row's encoder output has when that input is encoded alone (what sets its token budget in NeMo's
    batch-1 decoding, so that a batch can decode each row exactly as alone)."""

    states: Any
    lengths: Any
    own_lengths: Any

    def select(self, rows: Sequence[int]) -> "Encoded":
        import mlx.core as mx

        index = mx.array(list(rows))
        return Encoded(self.states[index], self.lengths[index], self.own_lengths[index])


@dataclass(frozen=True)
class Capabilities:
    """What a loaded model can do; front ends read this to offer or refuse options up front."""

    languages: tuple  # language codes the model reads and writes
    timestamps: bool  # word/segment timestamps on request
    translation: bool  # some target language differs from the source
    language_id: bool  # source_lang="auto" is offered
    default_source_lang: str  # what an omitted source language means
    chat: bool = False  # answers text prompts (a speech-LLM's LLM-only mode: ``Engine.chat``)
    translation_timestamps: bool = False  # timestamps for translations too (predicted tokens; an aligner cannot)
    alignment: bool = False  # force-aligns a given text to speech (a CTC aligner, as canary-1b-v2's: ``Engine.align``)


@dataclass(frozen=True)
class Framing:
    """How audio maps to the model's frames: what the long-audio path needs to plan, merge and re-time chunks."""

    sample_rate: int  # Hz of the waveforms the model takes
    hop_length: int  # samples per feature frame
    subsampling_factor: int  # feature frames per output frame
    min_samples: int  # shorter inputs are zero-padded to this (NeMo's 1 s minimum)

    @property
    def frame_seconds(self) -> float:
        return self.hop_length * self.subsampling_factor / self.sample_rate


class Engine(Protocol):
    """A loaded model of one family, as the pipeline drives it."""

    name: str
    tokenizer: Any  # decode(ids), is_timestamp(id), languages...
    capabilities: Capabilities
    framing: Framing
    default_chunk_seconds: Optional[float]  # None: NeMo's 30-40 s plan
    chunk_merge_by_time: bool  # long inputs decoded with timestamps and merged by time

    def prompt(self, task: Task) -> list:
        """Prompt ids for ``task``; raises ``UnsupportedOption`` for what the model cannot do."""

    def decode_options(self, options: TranscribeOptions) -> Any:
        """The family's decoding settings for ``options`` (model defaults filled in)."""

    def encode(self, waves: Sequence[np.ndarray], pad_to: Optional[int] = None) -> Encoded:
        """Right-pad ``waves`` (to ``pad_to`` samples at least) and encode them as one batch."""

    def decode(self, encoded: Encoded, prompt: list, decode_options) -> list:
        """Token ids per row, greedy or beam as ``decode_options`` say."""

    def identify_languages(self, encoded: Encoded) -> list:
        """The spoken language per row (a code), or None where the model predicted none."""

    def chat(self, message: str, adapter: bool = False, max_new_tokens: Optional[int] = None) -> list:
        """Answer ids to a text-only prompt (``capabilities.chat``); others raise ``UnsupportedOption``."""

    def read_tokens(self, tokens: list, task: Task, wave: Optional[np.ndarray] = None) -> tuple:
        """``(text, words, segments)`` of generated ids for the input ``wave`` they were decoded from (timestamps
        when ``task.timestamps``: parsed from timestamp tokens, or force-aligned against ``wave`` by a model that
        carries an aligner)."""

    def align(self, wave: np.ndarray, text: str, level: str = "words") -> Any:
        """``forced_alignment.AlignedText`` of ``text`` in one input's samples (``capabilities.alignment``); others
        raise ``UnsupportedOption``."""

    def align_chunk(self, wave: np.ndarray, tokens: list, task: Task) -> list:
        """Per-token times (NeMo's "char" dicts) of one long-form chunk's generated ``tokens`` in its samples
        ``wave`` (``capabilities.alignment``): what canary-1b-v2's long-form merge joins."""

    def open_stream(self, task: Task, options: Any) -> Any:
        """A live session for ``task``: ``feed(samples)`` -> final-token events, ``finish()`` -> the result
        (``streaming.StreamingSession``; ``options``: ``streaming_policy.StreamingOptions``)."""
