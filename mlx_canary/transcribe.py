"""The transcription pipeline: ``CanaryModel.transcribe`` / ``translate`` / ``generate`` over files, arrays and lists.

A call goes: options (one ``TranscribeOptions``) -> checked once against the model (``prepare``) -> inputs ->
16 kHz mono samples (``audio``) -> batches of similar lengths -> the engine (``engine.Engine``: encode, prompt, decode)
-> text (+ timestamps) -> ``Transcript``, in input order. Inputs longer than one chunk take the long-audio path
here: planned into overlapping chunks, decoded ``batch_size`` chunks at a time, merged by the pure functions of
``chunking``. Batches are right-padded as NeMo pads them, and every input keeps the result it has alone (NeMo's
batch-1 result: see ``decoding.greedy_decode``), so which inputs share a batch changes the work, not the tokens
(tested; floating-point rounding may differ in the last bits, as with any batching): a list is read a few batches
ahead and batched longest first (``batch_order``), which spares the padding that a short input next to a long one
costs in the encoder and in decoding.

The pipeline knows no model family: everything family-specific is behind the engine it is given.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, TypeVar, Union

import numpy as np

from . import audio as audio_io
from .chunking import Chunk, merge_aligned_chunks, merge_chunks_text, merge_timed_chunks, plan_chunks
from .engine import Engine
from .errors import AudioError, CanaryError, UnsupportedOption
from .options import Task, TranscribeOptions
from .streaming_policy import StreamingOptions
from .transcript import Transcript

AudioInput = Union[str, os.PathLike, bytes, np.ndarray, Any]  # Any: an MLX array
ProgressCallback = Callable[[int, int], None]
T = TypeVar("T")

MIN_CHUNK_SECONDS = 2.0  # chunks overlap by 1 s: a chunk must be longer than that
# A list is read this many batches ahead (and at most this much audio) to form batches of similar lengths.
LOOKAHEAD_BATCHES = 4
LOOKAHEAD_SECONDS = 1200.0


class AlignmentWarning(UserWarning):
    """``align`` met characters the aligner cannot write; they were aligned as unknown tokens."""


class LanguageFallbackWarning(UserWarning):
    """``source_lang="auto"`` found no language token for an input; it was transcribed in the default language."""


@dataclass(frozen=True)
class Request:
    """``TranscribeOptions`` checked against the loaded model (the source language resolved to the model's default
    when omitted), with what the engine needs precomputed."""

    options: TranscribeOptions
    chunk_seconds: Optional[float]  # resolved: None = NeMo's 30-40 s plan, 0 = never chunk
    prompt: Optional[list]  # None when the source language is identified per input
    decoding: Any  # the engine's decode options

    def task(self, source_lang: Optional[str] = None) -> Task:
        return self.options.task(source_lang)


def load_input(item, sample_rate: Optional[int], channel: Optional[int]) -> np.ndarray:
    """One input's 16 kHz mono samples; empty audio is refused here, naming the input."""
    wave = audio_io.load(item, sample_rate=sample_rate, channel=channel)
    if wave.size == 0:
        name = os.fspath(item) if isinstance(item, (str, os.PathLike)) else f"the {type(item).__name__} input"
        raise AudioError(f"{name} holds no audio samples")
    return wave


def batch_order(lengths: Sequence[int]) -> list[int]:
    """The order in which to batch inputs of these lengths: longest first (input order among equal lengths), so
    that each batch holds similar lengths, as NeMo's ``transcribe_speech.py`` presorts a manifest."""
    return sorted(range(len(lengths)), key=lambda i: -lengths[i])


def lookahead_inputs(options: TranscribeOptions) -> int:
    """How many inputs to read ahead: ``LOOKAHEAD_BATCHES`` batches; one when streaming (each input is a stream of
    its own, nothing to batch)."""
    return 1 if options.streaming is not None else options.batch_size * LOOKAHEAD_BATCHES


def read_ahead(entries: Iterable[T], samples: Callable[[T], int], max_inputs: int) -> Iterator[list[T]]:
    """``entries`` (read lazily) in groups of at most ``max_inputs``, closed early at ``LOOKAHEAD_SECONDS`` of audio
    (``samples(entry)``: its 16 kHz samples), so that long files are not all held at once."""
    group: list[T] = []
    held = 0
    for entry in entries:
        group.append(entry)
        held += samples(entry)
        if len(group) >= max_inputs or held >= LOOKAHEAD_SECONDS * audio_io.SAMPLE_RATE:
            yield group
            group, held = [], 0
    if group:
        yield group


def _path_of(item) -> Optional[str]:
    return str(item) if isinstance(item, str) or hasattr(item, "__fspath__") else None


class CanaryModel:
    """A loaded model behind the pipeline. Create it with ``mlx_canary.load_model``."""

    def __init__(self, engine: Engine):
        self.engine = engine

    @property
    def name(self) -> str:
        return self.engine.name

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def capabilities(self):
        return self.engine.capabilities

    # -- public API -------------------------------------------------------------------------------------

    def transcribe(
        self,
        audio: Union[AudioInput, Sequence[AudioInput]],
        options: Optional[TranscribeOptions] = None,
        *,
        sample_rate: Optional[int] = None,
        progress: Optional[ProgressCallback] = None,
        **fields,
    ):
        """Transcribe (or, with ``target_lang`` != ``source_lang``, translate) one input or a list of inputs.

        ``audio`` may be a path, encoded bytes, or a numpy/MLX array of samples at ``sample_rate`` (default
        16 kHz; 1-768 kHz), or a list of those. A single input returns one ``Transcript``; a list returns a list.
        Files are loaded as NeMo loads them (see ``mlx_canary.audio``); multi-channel audio is averaged, or
        ``channel=N`` keeps channel N (NeMo's ``channel_selector``). Empty audio is refused.
        The choices are a ``TranscribeOptions`` or its fields as keywords (``source_lang="de"``, ``timestamps=True``,
        ``beam_size=4``, ``chunk_seconds=0``, ``channel=1`` ...). ``source_lang="auto"`` identifies the spoken language first
        (reported in ``Transcript.language``). Inputs longer than one chunk go through the overlapped, token-merged
        long-audio path; ``progress(done_chunks, total_chunks)`` follows it.
        """
        single = not isinstance(audio, (list, tuple))
        items = [audio] if single else list(audio)
        results = list(self.generate(items, options, sample_rate=sample_rate, progress=progress, **fields))
        return results[0] if single else results

    def translate(self, audio, options: Optional[TranscribeOptions] = None, *, target_lang: str, **fields):
        """Speech translation into ``target_lang`` text (the speech is ``source_lang``, default ``en``)."""
        return self.transcribe(audio, options, target_lang=target_lang, **fields)

    def generate(
        self,
        items: Sequence[AudioInput],
        options: Optional[TranscribeOptions] = None,
        *,
        sample_rate: Optional[int] = None,
        progress: Optional[ProgressCallback] = None,
        **fields,
    ) -> Iterator[Transcript]:
        """Like ``transcribe`` on a list (or any iterable), yielding the ``Transcript`` objects in input order as soon
        as the group of inputs read ahead with them (``LOOKAHEAD_BATCHES`` batches, at most ``LOOKAHEAD_SECONDS`` of
        audio) is done. An input that fails (unreadable audio) raises when its group is read, before that group's
        results are yielded."""
        # Checked before any work: a wrong rate would otherwise resample (a rate of 1 Hz: 16000-fold) first.
        if sample_rate is not None:
            sample_rate = audio_io.check_sample_rate(sample_rate)
        request = self.prepare(TranscribeOptions.build(options, **fields))
        loaded = ((item, load_input(item, sample_rate, request.options.channel)) for item in items)
        for group in read_ahead(loaded, lambda entry: len(entry[1]), lookahead_inputs(request.options)):
            yield from self.decode_waves([item for item, _ in group], [wave for _, wave in group], request, progress)

    def align(self, audio: AudioInput, text: str, *, sample_rate: Optional[int] = None,
              channel: Optional[int] = None) -> Transcript:
        """Word and segment times of ``text``, a transcript the caller already has (subtitles to re-time, a script
        read aloud), in ``audio``: forced alignment with the model's CTC aligner, exactly as NeMo times its own
        transcripts on canary-1b-v2 (segments end at ``. ? !``, punctuation takes no time of its own). Only models
        that carry an aligner can (``capabilities.alignment``). Characters the aligner's vocabulary lacks are aligned
        as unknown tokens, with an ``AlignmentWarning`` naming them. Audio is read as ``transcribe`` reads it; inputs
        under 1 s are padded to 1 s as NeMo pads them, and times count from the padded start."""
        if not self.capabilities.alignment:
            raise UnsupportedOption(f"{self.name} has no aligner to time a text with (canary-1b-v2 carries one)")
        if not isinstance(text, str) or not text.strip():
            raise CanaryError("the text to align is empty")
        if sample_rate is not None:
            sample_rate = audio_io.check_sample_rate(sample_rate)
        audio_io.check_channel(channel)
        wave = load_input(audio, sample_rate, channel)
        aligned = self.engine.align(wave, text)
        if aligned.unknown_characters:
            shown = " ".join(repr(c) for c in aligned.unknown_characters[:10])
            warnings.warn(f"the aligner's vocabulary lacks {shown}: aligned as unknown tokens, so the times of the "
                          "words holding them are less certain", AlignmentWarning, stacklevel=2)
        if not aligned.words:
            raise CanaryError(f"the text is too long for {len(wave) / self.engine.framing.sample_rate:.2f} s of audio: "
                              "it has more tokens than the aligner has frames (is it the right audio?)")
        return Transcript(text=" ".join(text.split()), duration=len(wave) / self.engine.framing.sample_rate,
                          segments=aligned.segments, words=aligned.words, timestamps=True, path=_path_of(audio),
                          model=self.name)

    def ask(self, question: str, context: Optional[str] = None, *, max_new_tokens: Optional[int] = None) -> str:
        """A speech-LLM's LLM-only mode (its adapter off, as NeMo documents): the answer to ``question`` about
        ``context`` (e.g. a transcript), greedy. Models without it (``capabilities.chat``) raise UnsupportedOption."""
        if not self.capabilities.chat:
            raise UnsupportedOption(f"{self.name} cannot be prompted with text (only speech-LLMs such as "
                                    "canary-qwen-2.5b can)")
        if not isinstance(question, str) or not question.strip():
            raise CanaryError("the question is empty")
        message = question if not context else f"{question}\n\n{context}"
        return self.tokenizer.decode(self.engine.chat(message, max_new_tokens=max_new_tokens)).strip()

    def prepare(self, options: Optional[TranscribeOptions] = None, **fields) -> Request:
        """Check the options against the model (languages, timestamps, sizes) before any audio is decoded."""
        options = TranscribeOptions.build(options, **fields)
        audio_io.check_channel(options.channel)
        if options.source_lang is None:
            options = options.replace(source_lang=self.capabilities.default_source_lang)
        chunk_seconds = self.chunk_length(options.chunk_seconds)
        if chunk_seconds is not None and chunk_seconds != 0 and not chunk_seconds > MIN_CHUNK_SECONDS:
            raise CanaryError("chunk length must be more than 2 seconds (chunks overlap by 1 s), or 0 for no chunking")
        if options.streaming is not None:
            self._check_streaming(options)
        if options.identifies_language:
            if not self.capabilities.language_id:
                raise UnsupportedOption("this model knows one language only: there is none to identify; "
                                        "leave the source language out")
            self.engine.language_id_prompt()
            if options.target_lang and options.timestamps and not self.capabilities.translation_timestamps:
                # Known only per input: whether it is spoken in the target language (transcribed, timed) or not
                # (translated: this model cannot time a translation). Refused up front rather than mid-batch.
                raise UnsupportedOption("this model times transcriptions only, not translations: with a target "
                                        "language and timestamps, name the spoken language instead of 'auto'")
            if options.target_lang:
                self.engine.prompt(Task(options.target_lang, options.target_lang, options.pnc, options.timestamps))
            prompt = None
        else:
            prompt = self.engine.prompt(options.task())
        return Request(options, chunk_seconds, prompt, self.engine.decode_options(options))

    validate = prepare

    @staticmethod
    def _check_streaming(options: TranscribeOptions) -> None:
        """What streaming decoding does not combine with, refused up front (never silently ignored)."""
        refused = [name for name, on in (("source_lang='auto' (name the spoken language)", options.identifies_language),
                                         ("timestamps (captions carry decision times instead)", options.timestamps),
                                         ("beam search (streaming decodes greedily)", (options.beam_size or 1) > 1))
                   if on]
        if refused:
            raise UnsupportedOption(f"streaming decoding does not combine with {'; '.join(refused)}")

    def stream(self, options: Optional[TranscribeOptions] = None, **fields):
        """A live session (``streaming.StreamingSession``): ``feed(samples)`` with pieces of 16 kHz audio returns
        the tokens that became final, ``finish()`` the whole result. ``options.streaming`` (default: NeMo's
        streaming defaults) picks the policy and the contexts."""
        options = TranscribeOptions.build(options, **fields)
        if options.streaming is None:
            options = options.replace(streaming=StreamingOptions())
        request = self.prepare(options)
        return self.engine.open_stream(request.task(), request.options.streaming)

    def chunk_length(self, chunk_seconds: Optional[float] = None) -> Optional[float]:
        """Chunk length for long inputs: the caller's, else the model's default (None: NeMo's 30-40 s plan)."""
        return self.engine.default_chunk_seconds if chunk_seconds is None else chunk_seconds

    def needs_chunking(self, wave: np.ndarray, chunk_seconds: Optional[float] = None) -> bool:
        """Whether ``wave`` takes the chunked long-audio path (never with streaming options, see decode_waves)."""
        chunk_seconds = self.chunk_length(chunk_seconds)
        if chunk_seconds == 0:
            return False
        return len(plan_chunks(len(wave), self.engine.framing.sample_rate, chunk_seconds=chunk_seconds)) > 1

    # -- one batch of decoded inputs ----------------------------------------------------------------------

    def decode_waves(
        self, items: Sequence, waves: Sequence[np.ndarray], request: Request, progress: Optional[ProgressCallback] = None
    ) -> list[Transcript]:
        """Transcripts of ``waves`` (16 kHz mono samples of ``items``), in their order: the short ones in padded batches
        of ``batch_size`` formed longest first, the long ones one at a time through the chunked path; with
        ``streaming`` options each one as a live stream."""
        if request.options.streaming is not None:
            return [self.decode_stream(item, wave, request) for item, wave in zip(items, waves)]
        results: list[Optional[Transcript]] = [None] * len(waves)
        short = [i for i, wave in enumerate(waves) if not self.needs_chunking(wave, request.chunk_seconds)]
        short = [short[i] for i in batch_order([len(waves[i]) for i in short])]
        size = request.options.batch_size
        for first in range(0, len(short), size):
            rows = short[first : first + size]
            done = self.decode_batch([items[i] for i in rows], [waves[i] for i in rows], request)
            for i, result in zip(rows, done):
                results[i] = result
        for i, result in enumerate(results):
            if result is None:
                results[i] = self.decode_long(items[i], waves[i], request, progress)
        return results

    def decode_batch(self, items: Sequence, waves: Sequence[np.ndarray], request: Request) -> list[Transcript]:
        """Short inputs decoded together as one padded batch (NeMo's batched semantics)."""
        engine = self.engine
        encoded = engine.encode(waves)
        if not request.options.identifies_language:
            task = request.task()
            decoded = engine.decode(encoded, request.prompt, request.decoding)
            return [self.make_transcript(i, w, ids, task) for i, w, ids in zip(items, waves, decoded)]
        identified = self._identify(encoded, items)
        default = self.capabilities.default_source_lang
        languages = [lang or default for lang in identified]
        results: list[Optional[Transcript]] = [None] * len(items)
        for lang in dict.fromkeys(languages):
            rows = [i for i, found in enumerate(languages) if found == lang]
            task = request.task(lang)
            decoded = engine.decode(encoded.select(rows), engine.prompt(task), request.decoding)
            for row, ids in zip(rows, decoded):
                results[row] = self.make_transcript(items[row], waves[row], ids, task)
                results[row].language = identified[row]
        return results

    def _identify(self, encoded, items) -> list[Optional[str]]:
        """The identified language per input; None (with a ``LanguageFallbackWarning``) where the model named none:
        the caller transcribes those in the model's default language, as if the language had been omitted."""
        found = self.engine.identify_languages(encoded)
        default = self.capabilities.default_source_lang
        for item, lang in zip(items, found):
            if lang is None:
                label = _path_of(item) or "an input"
                warnings.warn(
                    f"could not identify the spoken language of {label} (the model predicted no language token); "
                    f"transcribing it as {default!r}. Name the language with source_lang to silence this.",
                    LanguageFallbackWarning,
                    stacklevel=2,
                )
        return found

    def make_transcript(self, item, wave: np.ndarray, tokens: list[int], task: Task) -> Transcript:
        text, words, segments = self.engine.read_tokens(tokens, task, wave)
        return Transcript(
            text=text,
            tokens=tokens,
            source_lang=task.source_lang,
            target_lang=task.target_lang,
            duration=len(wave) / self.engine.framing.sample_rate,
            segments=segments,
            words=words,
            timestamps=task.timestamps,
            path=_path_of(item),
            model=self.name,
        )

    def decode_stream(self, item, wave: np.ndarray, request: Request) -> Transcript:
        """One input decoded as a live stream would decode it; segments are the caption lines as they became final."""
        task = request.task()
        session = self.engine.open_stream(task, request.options.streaming)
        events = session.feed(wave)
        result = session.finish()
        return result.to_transcript(events + result.events, source_lang=task.source_lang,
                                    target_lang=task.target_lang, model=self.name, path=_path_of(item))

    # -- long audio ----------------------------------------------------------------------------------------

    def decode_long(
        self,
        item,
        wave: np.ndarray,
        request: Request,
        progress: Optional[ProgressCallback] = None,
        *,
        window_seconds: Optional[float] = None,
    ) -> Transcript:
        """One long input in overlapping chunks (``chunking.plan_chunks``), decoded ``batch_size`` chunks at a time
        and merged (``chunking``, as ``long_form_merge`` says: NeMo's LCS token merge, by time with timestamp
        tokens, or canary-1b-v2's merge of force-aligned chunks when its aligner gives the timestamps).

        ``window_seconds`` (NeMo: 3600) first cuts the input into independently merged windows. A single chunk
        gives exactly the result of the short path. ``progress(done_chunks, total_chunks)`` follows each batch.
        """
        samples = np.asarray(wave, dtype=np.float32)
        if samples.ndim != 1:
            raise CanaryError(f"Expected a mono waveform (1-D samples), got an array of shape {samples.shape}.")
        engine, options = self.engine, request.options
        framing = engine.framing
        if request.chunk_seconds == 0:  # no chunking: the whole input in one pass
            chunks = [Chunk(0, 0, len(samples), len(samples))]
        else:
            chunks = plan_chunks(len(samples), framing.sample_rate, chunk_seconds=request.chunk_seconds,
                                 window_seconds=window_seconds)
        language = None
        source = options.source_lang
        if options.identifies_language:
            first = chunks[0]
            language = self._identify(engine.encode([samples[first.start : first.end]]), [item])[0]
            source = language or self.capabilities.default_source_lang
        task = request.task(source)
        prompt = request.prompt if request.prompt is not None else engine.prompt(task)
        merge = self.long_form_merge(task, len(chunks))
        if merge == "aligned" and len({chunk.window for chunk in chunks}) > 1:
            raise UnsupportedOption("aligned timestamps of an input cut into windows are not merged; leave "
                                    "window_seconds unset")
        if merge == "timed" and not task.timestamps:
            # one id per word: NeMo's token merge would reach past the overlap (chunking docstring)
            prompt = engine.prompt(Task(task.source_lang, task.target_lang, task.pnc, True))

        chunks_tokens: list[list[int]] = []
        encoded_lengths: list[int] = []
        for first in range(0, len(chunks), options.batch_size):
            batch = chunks[first : first + options.batch_size]
            waves = [samples[chunk.start : chunk.end] for chunk in batch]  # views: no copy beyond the batch
            # NeMo pads every chunk of a file to the full chunk size, whatever else is in the batch.
            encoded = engine.encode(waves, pad_to=max(c.size for c in batch))
            decoded = engine.decode(encoded, prompt, request.decoding)
            chunks_tokens.extend([int(t) for t in tokens] for tokens in decoded)
            if merge == "aligned":  # NeMo places each chunk's times by its encoder length
                encoded_lengths.extend(int(n) for n in np.array(encoded.lengths).reshape(-1))
            if progress is not None:
                progress(len(chunks_tokens), len(chunks))

        if len(chunks) == 1:
            result = self.make_transcript(item, samples, chunks_tokens[0], task)
        elif merge == "aligned":
            result = self._aligned_transcript(item, samples, chunks, chunks_tokens, encoded_lengths, task)
        else:
            result = self._merged_transcript(item, samples, chunks, chunks_tokens, task, merge == "timed")
        result.language = language
        return result

    def long_form_merge(self, task: Task, n_chunks: int) -> str:
        """How the chunks of a long input become one transcript: ``"tokens"`` (NeMo's LCS token merge),
        ``"timed"`` (chunks decoded with timestamp tokens, merged by time: flash-style timestamps, or a model whose
        config asks for it) or ``"aligned"`` (canary-1b-v2's own path when its aligner gives the timestamps: each
        chunk's text force-aligned token by token, the tokens merged, words and segments rebuilt after)."""
        capabilities = self.capabilities
        if task.timestamps:
            return "aligned" if capabilities.alignment else "timed"
        if n_chunks > 1 and self.engine.chunk_merge_by_time:
            try:
                self.engine.prompt(Task(task.source_lang, task.target_lang, task.pnc, True))
                return "timed"
            except UnsupportedOption:  # the model has no timestamps: NeMo's token merge
                pass
        return "tokens"

    def _aligned_transcript(self, item, samples, chunks, chunks_tokens, encoded_lengths, task: Task) -> Transcript:
        """canary-1b-v2's long-form merge with timestamps (``chunking.merge_aligned_chunks``): every chunk's text is
        aligned token by token against the chunk's own samples, as NeMo aligns its chunk hypotheses."""
        engine = self.engine
        framing = engine.framing
        aligned = [engine.align_chunk(samples[chunk.start : chunk.end], tokens, task)
                   for chunk, tokens in zip(chunks, chunks_tokens)]
        merged = merge_aligned_chunks(aligned, encoded_lengths, engine.tokenizer.decode,
                                      window_stride=framing.hop_length / framing.sample_rate,
                                      subsampling_factor=framing.subsampling_factor)
        return Transcript(
            text=merged.text,
            tokens=merged.ids,
            source_lang=task.source_lang,
            target_lang=task.target_lang,
            duration=len(samples) / framing.sample_rate,
            segments=merged.segments,
            words=merged.words,
            timestamps=True,
            path=_path_of(item),
            model=self.name,
        )

    def _merged_transcript(self, item, samples, chunks, chunks_tokens, task: Task, merge_by_time: bool) -> Transcript:
        engine = self.engine
        framing = engine.framing
        words: list[dict] = []
        segments: list[dict] = []
        if merge_by_time:
            merged = merge_timed_chunks(
                chunks_tokens,
                chunks,
                engine.tokenizer,
                hop_length=framing.hop_length,
                sample_rate=framing.sample_rate,
                subsampling_factor=framing.subsampling_factor,
            )
            ids, text = merged.ids, merged.text
            if task.timestamps:
                words, segments = merged.words, merged.segments
        else:
            ids, text = merge_chunks_text(chunks_tokens, chunks, engine.tokenizer,
                                          subsampling_factor=framing.subsampling_factor)
        return Transcript(
            text=text,
            tokens=ids,
            source_lang=task.source_lang,
            target_lang=task.target_lang,
            duration=len(samples) / framing.sample_rate,
            segments=segments,
            words=words,
            timestamps=task.timestamps,
            path=_path_of(item),
            model=self.name,
        )
