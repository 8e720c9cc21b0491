"""Corpus jobs: a NeMo manifest (or a folder tree) in, a NeMo-style predictions manifest out, resumable.

What a corpus job does, and the guarantees it keeps:

* Input: a NeMo manifest (one JSON object a line: ``audio_filepath`` absolute or relative to the manifest's
  folder, ``duration``, optional ``offset`` (+ ``duration``) for a segment of a longer file, ``source_lang``,
  ``target_lang``, ``pnc``, ``timestamp``, reference ``text`` / ``answer``), or a folder searched recursively.
  A row's own ``source_lang`` / ``target_lang`` / ``pnc`` / ``timestamp`` override the command line's options
  (each item gets its own ``TranscribeOptions``; the ``Scheduler`` batches items whose options are equal).
* Order of work: as NeMo's ``transcribe_speech.py`` (``presort_manifest``), longest first, in fixed-size batches
  (NeMo's ``transcribe()`` itself uses a fixed batch size without bucketing); items of equal options are kept
  together so that batches are full. Audio is decoded by background threads a few batches ahead.
* Nothing lost, nothing twice: each finished batch appends one line per item to a journal
  (``<name>_predictions.jsonl.journal``), in one ``write`` followed by ``fsync``. After a kill the last line may
  be torn: reading drops (and truncates away) anything after the last complete, valid line, so a torn line is
  never merged with the next. Re-running the same command skips the items whose result is in the journal (a
  failed item is tried again); when every item has a result, the final manifest is written atomically, in input
  order, every input exactly once. A file that is missing or cannot be decoded is recorded with its ``error``
  and the job goes on.
* Output rows: the input row unchanged plus ``pred_text`` (what NeMo's evaluation reads), ``tokens`` (the
  generated ids), ``pred_lang`` (with ``source_lang=auto``), ``word`` / ``segment`` timestamps (when asked, as
  NeMo's ``transcribe_speech.py`` names them), or ``error`` (and an empty ``pred_text``) for a failed item.
* Who runs the batches: an executor, ``execute(batches)`` yielding ``(batch, rows)`` as batches finish:
  ``LocalExecutor`` here (one model, decoding threads), or ``corpus_ray.RayExecutor``; ``run_corpus`` alone
  writes the journal and the manifest, whichever runs them.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, TextIO

from . import audio as audio_io
from . import writers
from .errors import CanaryError
from .options import TranscribeOptions
from .scheduler import Job, Scheduler

MANIFEST_SUFFIXES = (".json", ".jsonl")
DEFAULT_DECODE_WORKERS = 2
_TRUE = {"yes", "true", "1", "pnc", "timestamp", "y", "on"}
_FALSE = {"no", "false", "0", "nopnc", "notimestamp", "n", "off", ""}


@dataclass
class CorpusItem:
    """One row of the job: what to read, with which options, and the row written back with its result."""

    index: int  # position in the input (the final manifest's order)
    entry: dict  # the input row as read; the output row is this plus the prediction
    audio: Path  # the file to read, resolved
    options: TranscribeOptions
    offset: Optional[float] = None  # seconds: read a segment of the file (with ``duration``)
    duration: Optional[float] = None  # seconds of audio (from the row, or the file's header)
    key: str = ""  # identity in the journal: see ``assign_keys``


def assign_keys(items: list) -> list:
    """Give each item its journal key: a hash of its row and of the options that shape its result (not the batch
    size), and of how many equal rows came before it. A row moved within the manifest keeps its key; an item run
    with other options is a new item."""
    seen: dict = {}
    for item in items:
        shaping = {k: v for k, v in sorted(vars(item.options).items()) if k != "batch_size"}
        identity = json.dumps([item.entry, shaping], sort_keys=True, default=str)
        digest = hashlib.sha256(identity.encode("utf-8")).hexdigest()[:24]
        seen[digest] = seen.get(digest, 0) + 1
        item.key = digest if seen[digest] == 1 else f"{digest}-{seen[digest]}"
    return items


# -- reading the input -----------------------------------------------------------------------------------------


def _flag(value: Any, name: str, line: int) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise CanaryError(f"manifest line {line}: {name} must be yes/no (or true/false), got {value!r}")


def row_options(entry: dict, base: TranscribeOptions, line: int = 0) -> TranscribeOptions:
    """The options of one manifest row: the row's languages / pnc / timestamp over ``base`` (the CLI's)."""
    changes: dict = {}
    for name in ("source_lang", "target_lang"):
        value = entry.get(name)
        if value is not None:
            if not isinstance(value, str) or not value.strip():
                raise CanaryError(f"manifest line {line}: {name} must be a language code, got {value!r}")
            changes[name] = value.strip()
    if entry.get("pnc") is not None:
        changes["pnc"] = _flag(entry["pnc"], "pnc", line)
    for name in ("timestamp", "timestamps"):
        if entry.get(name) is not None:
            changes["timestamps"] = _flag(entry[name], name, line)
    if "source_lang" in changes and "target_lang" not in changes and base.target_lang is None:
        changes["target_lang"] = None  # transcription of the row's language
    try:
        return base.replace(**changes) if changes else base
    except CanaryError as e:
        raise CanaryError(f"manifest line {line}: {e}") from None


def _seconds(value: Any, name: str, line: int) -> Optional[float]:
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise CanaryError(f"manifest line {line}: {name} must be a number of seconds, got {value!r}") from None
    if not number >= 0 or number == float("inf"):
        raise CanaryError(f"manifest line {line}: {name} must be a finite number >= 0, got {value!r}")
    return number


def resolve_audio_path(name: str, manifest: Path) -> Path:
    """An ``audio_filepath`` as NeMo resolves it: as given when it exists (absolute, or relative to the working
    directory), else relative to the manifest's folder."""
    path = Path(name).expanduser()
    if path.is_absolute() or path.exists():
        return path
    beside = manifest.parent / path
    return beside if beside.exists() else path


def read_manifest(manifest: Path, options: TranscribeOptions) -> list[CorpusItem]:
    """The rows of a NeMo manifest as items; a malformed row is a ``CanaryError`` naming its line (before any
    work: a manifest is fixed once, not discovered item by item)."""
    try:
        text = manifest.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CanaryError(f"manifest not found: {manifest}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CanaryError(f"cannot read manifest {manifest}: {getattr(e, 'strerror', None) or e}") from None
    items = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            raise CanaryError(f"manifest line {line_number} is not JSON ({e.msg})") from None
        if not isinstance(entry, dict):
            raise CanaryError(f"manifest line {line_number} is not a JSON object")
        name = entry.get("audio_filepath")
        if not isinstance(name, str) or not name:
            raise CanaryError(f"manifest line {line_number} has no audio_filepath")
        offset = _seconds(entry.get("offset"), "offset", line_number)
        duration = _seconds(entry.get("duration"), "duration", line_number)
        items.append(CorpusItem(len(items), entry, resolve_audio_path(name, manifest),
                                row_options(entry, options, line_number), offset, duration))
    if not items:
        raise CanaryError(f"manifest {manifest} holds no rows")
    return assign_keys(items)


def read_folder(folder: Path, options: TranscribeOptions) -> list[CorpusItem]:
    """Every audio/video file under ``folder`` (recursively, sorted by path) as an item, named by its absolute path
    (so that NeMo reads the predictions manifest from anywhere, and a resume from another directory matches)."""
    files = [path.resolve() for path in audio_io.find_audio_files(folder, recursive=True)]
    if not files:
        raise CanaryError(f"no audio or video files in directory {folder}")
    return assign_keys([CorpusItem(i, {"audio_filepath": str(path)}, path, options) for i, path in enumerate(files)])


def read_input(source: Path, options: TranscribeOptions) -> list[CorpusItem]:
    return read_folder(source, options) if source.is_dir() else read_manifest(source, options)


def output_paths(source: Path, output_dir: Path) -> tuple[Path, Path]:
    """The final manifest ``OUT/<name>_predictions.jsonl`` and its journal."""
    name = source.resolve().name if source.is_dir() else source.stem
    final = output_dir / f"{name}_predictions.jsonl"
    return final, final.with_name(final.name + ".journal")


def probe_duration(item: CorpusItem) -> float:
    """Seconds of audio an item holds, for sorting and progress: the row's ``duration``, else the file's header
    (0 when the header says nothing: formats only ffmpeg reads, missing files)."""
    if item.duration is not None:
        return item.duration
    try:
        import soundfile

        info = soundfile.info(str(item.audio))
        seconds = info.frames / info.samplerate if info.samplerate else 0.0
    except Exception:  # noqa: BLE001  (a file soundfile cannot read is decoded or refused later)
        return 0.0
    return max(0.0, seconds - (item.offset or 0.0))


# -- the journal ---------------------------------------------------------------------------------------------


class Journal:
    """Append-only record of finished items, safe against a kill at any moment.

    Each record is one JSON line ``{"key", "index", "row"}``; ``append`` writes a batch's lines in one ``write``
    and ``fsync``s. ``load`` keeps the complete, valid lines, and cuts the file back to the end of the last
    one, so that a line torn by a kill is dropped, never merged with the next record. An exclusive lock keeps a
    second job from writing to the same journal.
    """

    def __init__(self, path: Path):
        self.path = path
        self._fd: Optional[int] = None

    def open(self) -> dict:
        """Lock and read the journal; returns ``{key: record}`` (the last record of each key)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        created = not self.path.exists()
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o666)
        if created:
            _fsync_directory(self.path.parent)  # the new file's name survives a power cut too
        try:
            import fcntl

            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # pragma: no cover  (non-POSIX: no lock)
            pass
        except BlockingIOError:
            os.close(self._fd)
            self._fd = None
            raise CanaryError(f"another job is writing {self.path}; wait for it, or use another output directory")
        records, good_end = self._read()
        if good_end < os.fstat(self._fd).st_size:
            os.ftruncate(self._fd, good_end)  # a torn last line: cut it off before anything is appended
            os.fsync(self._fd)
        return records

    def _read(self) -> tuple[dict, int]:
        with open(self.path, "rb") as f:
            data = f.read()
        records: dict = {}
        good_end = 0
        position = 0
        while position < len(data):
            end = data.find(b"\n", position)
            if end < 0:
                break  # no newline: torn
            try:
                record = json.loads(data[position:end])
                key = record["key"]
            except (ValueError, KeyError, TypeError):
                break  # torn or damaged: nothing after it is trusted
            records[key] = record
            position = good_end = end + 1
        return records, good_end

    def append(self, records: list) -> None:
        if not records:
            return
        payload = "".join(json.dumps(r, ensure_ascii=False, default=_plain) + "\n" for r in records).encode("utf-8")
        written = 0
        while written < len(payload):
            written += os.write(self._fd, payload[written:])
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _fsync_directory(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a directory
        pass
    finally:
        os.close(fd)


def _plain(value: Any) -> Any:
    """JSON for numpy scalars in results."""
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


# -- rows ----------------------------------------------------------------------------------------------------


def _timed(items: list, name: str) -> list:
    out = []
    for item in items or []:
        entry = {name: str(item.get("text", "")).strip()}
        entry.update({k: v for k, v in item.items() if k != "text"})
        out.append(entry)
    return out


def prediction_row(item: CorpusItem, transcript) -> dict:
    """The output row of a transcribed item: its input row plus NeMo's prediction fields."""
    row = dict(item.entry)
    row["pred_text"] = str(transcript.text)
    row["tokens"] = [int(t) for t in transcript.tokens]
    if "duration" not in row:
        row["duration"] = round(float(transcript.duration), 6)
    if item.options.identifies_language:
        row["pred_lang"] = transcript.source_lang
    if item.options.timestamps:
        row["word"] = _timed(transcript.words, "word")
        row["segment"] = _timed(transcript.segments, "segment")
    return row


def failed_row(item: CorpusItem, error: str) -> dict:
    row = dict(item.entry)
    row["pred_text"] = ""
    row["error"] = error
    return row


# -- running -------------------------------------------------------------------------------------------------


@dataclass
class CorpusSummary:
    items: int = 0  # inputs in the job
    skipped: int = 0  # already in the journal when the job started
    done: int = 0  # finished in this run (transcribed or failed)
    failed: int = 0  # inputs whose row holds an error (whole job)
    audio_seconds: float = 0.0  # audio transcribed in this run
    wall_seconds: float = 0.0
    output: Optional[Path] = None
    rows: list = field(default_factory=list)  # the final manifest's rows

    @property
    def speed(self) -> float:
        """Audio seconds per wall-clock second (× real time)."""
        return self.audio_seconds / self.wall_seconds if self.wall_seconds > 0 else 0.0


def order_for_batching(items: list, durations: dict) -> list:
    """Items of equal options together (in order of first appearance), longest first within them (NeMo's
    presort), input order among equal durations."""
    groups: dict = {}
    for item in items:
        groups.setdefault(item.options, len(groups))
    return sorted(items, key=lambda it: (groups[it.options], -durations[it.key], it.index))


def decode_item(item: CorpusItem) -> Any:
    """The item's 16 kHz mono samples; an empty file is an error."""
    if item.offset is not None:
        wave = audio_io.load_segment(item.audio, item.offset, item.duration, channel=item.options.channel)
    else:
        wave = audio_io.load_audio(item.audio, channel=item.options.channel)
    if wave.size == 0:
        raise CanaryError(f"no audio samples in {item.entry.get('audio_filepath')} (the file holds no audio)")
    return wave


def decoded_ahead(items: list, workers: int, ahead: int) -> Iterator[tuple[CorpusItem, Future]]:
    """``(item, future of its samples)`` in order, with up to ``ahead`` items decoding in ``workers`` background
    threads, so that the model does not wait for files (soundfile, scipy and ffmpeg release the GIL)."""
    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="mlx-canary-decode")
    window: deque = deque()
    source = iter(items)
    try:
        for item in source:
            window.append((item, pool.submit(decode_item, item)))
            if len(window) >= ahead:
                break
        while window:
            item, future = window.popleft()
            following = next(source, None)
            if following is not None:
                window.append((following, pool.submit(decode_item, following)))
            yield item, future
    finally:
        for _, future in window:
            future.cancel()
        pool.shutdown(wait=False, cancel_futures=True)


def _message(error: BaseException) -> str:
    if isinstance(error, CanaryError):
        return str(error)
    return f"unexpected error ({type(error).__name__}: {error})"


class BatchRunner:
    """Transcribes batches of decoded items with one model in this process (the Scheduler's batching and
    retry-one-by-one): what ``LocalExecutor`` and each Ray worker (``corpus_ray.CorpusWorker``) run."""

    def __init__(self, model, batch_size: int):
        self.model = model
        self.scheduler = Scheduler(lambda: model, max_batch_size=batch_size).load()
        self._checked: dict = {}  # options -> None or the error of model.prepare

    def check(self, options: TranscribeOptions) -> Optional[str]:
        """``model.prepare`` once per distinct options: an unsupported language fails its items only."""
        if options not in self._checked:
            try:
                self.model.prepare(options)
                self._checked[options] = None
            except CanaryError as e:
                self._checked[options] = str(e)
        return self._checked[options]

    def run(self, decoded: list) -> list:
        """``decoded``: ``(item, wave or exception)`` pairs -> output rows, in the same order."""
        rows: dict = {}
        jobs = []
        for item, wave in decoded:
            problem = _message(wave) if isinstance(wave, BaseException) else self.check(item.options)
            if problem is not None:
                rows[item.key] = failed_row(item, problem)
            else:
                jobs.append(Job(wave, item.options.replace(channel=None), item))
        for job in self.scheduler.run(jobs):
            error = job.future.exception()
            item = job.item
            rows[item.key] = failed_row(item, _message(error)) if error is not None else \
                prediction_row(item, job.future.result())
        return [rows[item.key] for item, _ in decoded]


def plan_batches(pending: list, durations: dict, batch_size: int) -> list:
    """The batches to run: ``order_for_batching``'s order cut into runs of at most ``batch_size`` items of equal
    options (so that each batch is one model call)."""
    batches: list = []
    for item in order_for_batching(pending, durations):
        if batches and len(batches[-1]) < batch_size and batches[-1][0].options == item.options:
            batches[-1].append(item)
        else:
            batches.append([item])
    return batches


def _outcome(future: Future) -> Any:
    try:
        return future.result()
    except Exception as e:  # noqa: BLE001  (recorded as the item's error)
        return e


class LocalExecutor:
    """Runs planned batches in this process: files decoded by background threads, one model (loaded when the
    first batch is due, while the first files decode). Yields ``(batch, rows)`` in order."""

    def __init__(self, load: Callable[[], Any], batch_size: int, workers: int = DEFAULT_DECODE_WORKERS):
        self.load = load
        self.batch_size = batch_size
        self.workers = workers
        self.default_lang: Optional[str] = None
        self.waited_seconds = 0.0  # time the model's thread spent waiting for decoded audio (0: never starved)

    def __call__(self, batches: list) -> Iterator[tuple[list, list]]:
        stream = decoded_ahead([item for batch in batches for item in batch], self.workers,
                               ahead=max(2 * self.batch_size, self.workers))
        runner = None
        for batch in batches:
            waiting = time.perf_counter()
            # zip(batch, stream): the batch ends first, so the stream is not advanced past it
            decoded = [(item, _outcome(future)) for _, (item, future) in zip(batch, stream)]
            if runner is not None:  # the first batch's wait overlaps loading the model
                self.waited_seconds += time.perf_counter() - waiting
            if runner is None:
                model = self.load()
                self.default_lang = model.capabilities.default_source_lang
                runner = BatchRunner(model, self.batch_size)
            yield batch, runner.run(decoded)


def run_corpus(items: list, final: Path, journal_path: Path, execute: Callable[[list], Iterable], *,
               batch_size: int, progress: Optional[Callable] = None) -> CorpusSummary:
    """Transcribe the items not yet in the journal, appending each batch's rows as it finishes, then write
    ``final`` (every item's row, in input order) atomically. ``execute(batches)`` yields ``(batch, rows)`` as
    batches finish, in any order (``LocalExecutor``, or Ray's); ``progress(summary, total_audio, done_audio)``
    is called after each batch."""
    started = time.monotonic()
    journal = Journal(journal_path)
    records = journal.open()
    try:
        summary = CorpusSummary(items=len(items), output=final)
        done = {item.key for item in items if item.key in records and "error" not in records[item.key]["row"]}
        pending = [item for item in items if item.key not in done]
        summary.skipped = len(items) - len(pending)
        durations = {item.key: probe_duration(item) for item in pending}
        total_audio = sum(durations.values())
        if progress is not None:
            progress(summary, total_audio, 0.0)
        done_audio = 0.0
        for batch, rows in execute(plan_batches(pending, durations, batch_size)) if pending else ():
            journal.append([{"key": item.key, "index": item.index, "row": row} for item, row in zip(batch, rows)])
            for item, row in zip(batch, rows):
                records[item.key] = {"row": row}
                summary.done += 1
                seconds = durations[item.key] or float(row.get("duration") or 0.0)
                done_audio += seconds
                if "error" not in row:
                    summary.audio_seconds += seconds
            summary.wall_seconds = time.monotonic() - started
            if progress is not None:
                progress(summary, total_audio, done_audio)
        missing = [item.index for item in items if item.key not in records]
        if missing:  # an executor that dropped a batch: a bug, and the journal still holds the rest
            raise CanaryError(f"{len(missing)} items got no result (first: row {missing[0] + 1}); run again to resume")
        summary.rows = [records[item.key]["row"] for item in items]
        summary.failed = sum(1 for row in summary.rows if "error" in row)
        write_manifest(final, summary.rows)
        summary.wall_seconds = time.monotonic() - started
        return summary
    finally:
        journal.close()


def write_manifest(path: Path, rows: Iterable[dict]) -> None:
    text = "".join(json.dumps(row, ensure_ascii=False, default=_plain) + "\n" for row in rows)
    try:
        writers.atomic_write(path, text)
    except OSError as e:
        raise CanaryError(f"could not write {path}: {e.strerror or e}") from None


# -- progress --------------------------------------------------------------------------------------------------


def _hms(seconds: float) -> str:
    seconds = int(max(0.0, seconds))
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class CorpusProgress:
    """``progress`` for ``run_corpus`` on a stream: items, audio hours done, × real time, ETA. On a terminal one
    line rewritten in place; otherwise (``lines=True``) a line at most every ``every`` seconds."""

    BAR = 20

    def __init__(self, stream: TextIO = sys.stderr, tty: Optional[bool] = None, lines: bool = False,
                 every: float = 10.0):
        self.stream = stream
        self.tty = stream.isatty() if tty is None else tty
        self.lines = lines
        self.every = every
        self._last = 0.0
        self._shown = 0
        self._lock = threading.Lock()

    def __call__(self, summary: CorpusSummary, total_audio: float, done_audio: float) -> None:
        line = self.render(summary, total_audio, done_audio)
        with self._lock:
            if self.tty:
                self.stream.write("\r" + line + " " * max(0, self._shown - len(line)))
                self._shown = len(line)
                self.stream.flush()
            elif self.lines:
                now = time.monotonic()
                finished = summary.skipped + summary.done >= summary.items
                if now - self._last >= self.every or finished or summary.done == 0:
                    self._last = now
                    self.stream.write(line + "\n")
                    self.stream.flush()

    def render(self, summary: CorpusSummary, total_audio: float, done_audio: float) -> str:
        finished = summary.skipped + summary.done
        filled = int(self.BAR * finished / max(1, summary.items))
        line = (f"[{'#' * filled}{'-' * (self.BAR - filled)}] {finished}/{summary.items} items | "
                f"{_hms(done_audio)}/{_hms(total_audio)} of audio")
        if summary.wall_seconds > 0 and summary.audio_seconds > 0:
            line += f" | {summary.speed:.1f}x real time"
            remaining = max(0.0, total_audio - done_audio)
            line += f" | ETA {_hms(remaining / summary.speed)}"
        return line

    def close(self) -> None:
        if self.tty and self._shown:
            self.stream.write("\r" + " " * self._shown + "\r")
            self.stream.flush()
            self._shown = 0


def summary_lines(summary: CorpusSummary) -> list[str]:
    lines = [f"{summary.items} items: {summary.items - summary.failed} transcribed, {summary.failed} failed"
             + (f" ({summary.skipped} done by an earlier run)" if summary.skipped else "")]
    if summary.done:
        lines.append(f"this run: {summary.done} items, {_hms(summary.audio_seconds)} of audio in "
                     f"{_hms(summary.wall_seconds)} ({summary.speed:.1f}x real time)")
    lines.append(f"wrote {summary.output}")
    return lines


# -- the whole job (what the command line runs) ----------------------------------------------------------------


def row_languages(items: list, rows: list, default_lang: str) -> list:
    """``(source, target)`` of each row for scoring: the identified language (``auto``) or the item's, else the
    model's default; target defaults to the source."""
    languages = []
    for item, row in zip(items, rows):
        source = row.get("pred_lang") or item.options.source_lang
        if source in (None, "auto"):
            source = default_lang
        languages.append((source, item.options.target_lang or source))
    return languages


def transcribe_corpus(source: Path, output_dir: Path, options: TranscribeOptions, load: Callable[[], Any], *,
                      decode_workers: int = DEFAULT_DECODE_WORKERS, normalize: tuple = (),
                      progress: Optional[CorpusProgress] = None, say: Callable[[str], None] = print,
                      executor: Optional[Callable] = None) -> CorpusSummary:
    """Run the job on ``source`` (a manifest or a folder) into ``output_dir``: read, transcribe what the journal
    lacks, write the final manifest, score it when it has references (``<name>_metrics.json``); ``say`` gets
    the summary lines. ``load()`` returns the model (not called when nothing is left to do); ``executor``
    replaces the in-process ``LocalExecutor`` (Ray's)."""
    items = read_input(source, options)
    final, journal = output_paths(source, output_dir)
    executor = executor or LocalExecutor(load, options.batch_size, decode_workers)
    try:
        summary = run_corpus(items, final, journal, executor, batch_size=options.batch_size, progress=progress)
    finally:
        if progress is not None:
            progress.close()
    for line in summary_lines(summary):
        say(line)
    if any(_has_reference(row) for row in summary.rows):
        from . import evaluation

        default_lang = getattr(executor, "default_lang", None) or "en"
        try:
            scores = evaluation.evaluate(summary.rows, row_languages(items, summary.rows, default_lang), normalize)
        except evaluation.MissingExtra as e:  # the transcripts are written; only the scores are missing
            say(f"not scored: {e}")
            scores = None
        if scores is not None:
            for line in scores.lines():
                say(line)
            metrics = final.with_name(final.name.replace("_predictions.jsonl", "_metrics.json"))
            writers.atomic_write(metrics, json.dumps(scores.to_dict(), indent=2) + "\n")
    return summary


def _has_reference(row: dict) -> bool:
    return any(isinstance(row.get(name), str) for name in ("text", "answer"))
