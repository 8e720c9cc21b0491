"""The one options object: what a transcription call asks for, built once by the API, the CLI or the server and
passed down unchanged; each layer reads the fields it needs.

``TranscribeOptions`` holds every choice of a call (task, decoding, chunking). It is frozen and hashable, so the
scheduler batches together exactly the requests whose options are equal. ``Task`` is the part that reaches the
prompt, with the source language resolved for one input (``"auto"`` becomes the identified language).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from .errors import CanaryError
from .streaming_policy import StreamingOptions


@dataclass(frozen=True)
class Task:
    """The prompt's choices for one input: languages (resolved codes), punctuation, timestamps."""

    source_lang: str
    target_lang: str
    pnc: bool = True
    timestamps: bool = False

    @property
    def is_translation(self) -> bool:
        return self.source_lang != self.target_lang


@dataclass(frozen=True)
class TranscribeOptions:
    """Everything a transcription call can choose.

    ``source_lang``: the spoken language (``None``: the model's default source language, as in NeMo), or
    ``"auto"`` to identify it per input (experimental: an input whose language the model does not name falls back to
    the default language, with a warning). ``target_lang``: the output language (``None``: the source language,
    i.e. transcription). ``beam_size`` / ``length_penalty``: ``None``
    takes the model's own decoding settings. ``chunk_seconds``: the chunk length for long inputs (``None``: the
    model's default plan; ``0``: never chunk, decode every input in one pass as NeMo's ``transcribe()`` does for
    models without an aligner). ``channel``: multi-channel inputs are averaged at unit gain (``None``) or keep
    channel N (NeMo's ``channel_selector``). ``streaming``: decode each input as a live stream would be
    (NeMo's Wait-k / AlignAtt streaming, ``streaming_policy.StreamingOptions``) instead of offline.
    """

    source_lang: Optional[str] = None
    target_lang: Optional[str] = None
    pnc: bool = True
    timestamps: bool = False
    batch_size: int = 8
    beam_size: Optional[int] = None
    length_penalty: Optional[float] = None
    chunk_seconds: Optional[float] = None
    channel: Optional[int] = None
    streaming: Optional[StreamingOptions] = None

    def __post_init__(self):
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise CanaryError(f"batch_size must be a whole number of at least 1, got {self.batch_size!r}")
        if self.beam_size is not None and (not isinstance(self.beam_size, int) or self.beam_size < 1):
            raise CanaryError(f"beam_size must be a whole number of at least 1, got {self.beam_size!r}")
        if self.target_lang == "auto":
            raise CanaryError("target language cannot be 'auto'; name the language to write")

    @property
    def identifies_language(self) -> bool:
        return self.source_lang == "auto"

    def task(self, source_lang: Optional[str] = None) -> Task:
        """The prompt's choices for an input spoken in ``source_lang`` (default: the options' own, which must be
        resolved by then: ``CanaryModel.prepare`` fills in the model's default)."""
        source = source_lang or self.source_lang
        if source is None or source == "auto":
            raise ValueError("the source language is not resolved yet")
        return Task(source, self.target_lang or source, self.pnc, self.timestamps)

    def replace(self, **changes) -> "TranscribeOptions":
        return dataclasses.replace(self, **changes)

    @classmethod
    def build(cls, options: Optional["TranscribeOptions"] = None, **fields) -> "TranscribeOptions":
        """``options`` with ``fields`` replaced (or new options from ``fields``); unknown names are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise TypeError(f"unknown transcription option(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        if options is None:
            return cls(**fields)
        return dataclasses.replace(options, **fields) if fields else options
