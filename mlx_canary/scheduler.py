"""The one scheduler between front ends and the model: batching, retry-one-by-one, back-pressure.

Jobs are decoded waveforms with their ``TranscribeOptions``. The scheduler takes the oldest waiting job plus up to
``max_batch_size - 1`` more with equal options, runs one batched ``model.transcribe`` and resolves each job's
future; a batch that fails is retried one job at a time, so only the input that causes a failure fails. Inputs that
need chunking run alone (their chunks are the batch). At most ``max_queue`` jobs, holding at most
``max_queued_seconds`` of audio, wait; past that ``submit`` raises ``QueueFull`` (the server answers 503).

Two ways to drive it, sharing the same batching and retry:
* ``start()`` / ``submit()`` / ``stop()``: a worker thread that loads and owns the model (MLX evaluation is not
  safe from several threads at once) and serves jobs as they arrive (the server); ``call(fn, ...)`` runs any other
  model work (a streaming session's next piece) on that thread, in turn with the batches;
* ``load()`` then ``run(jobs)``: the same, in the calling thread, for a known list of jobs (the CLI).
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np

from .audio import SAMPLE_RATE
from .errors import CanaryError
from .options import TranscribeOptions

log = logging.getLogger("mlx_canary.scheduler")

DEFAULT_MAX_BATCH = 8
DEFAULT_MAX_QUEUE = 256
# Decoded audio waiting at once (float32 samples): an hour of it is 230 MB. Bounds a server's memory whatever the
# uploads decode to (a 25 MB MP3 can hold hours).
DEFAULT_MAX_QUEUED_SECONDS = 3600.0


class QueueFull(Exception):
    """Too many jobs are waiting, or the scheduler is not running."""


class WorkerStopped(Exception):
    """The scheduler stopped before the job was transcribed."""


@dataclass
class Job:
    """One input to transcribe. ``item`` is what the samples came from (a path, for ``Transcript.path``);
    ``progress(done_chunks, total_chunks)`` follows a long input's chunks."""

    wave: np.ndarray
    options: TranscribeOptions
    item: Any = None
    progress: Optional[Callable[[int, int], None]] = None
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    long: bool = False


_STOP = object()


@dataclass
class _Call:
    """Model work other than a transcription job, run on the worker thread in its turn."""

    fn: Callable
    args: tuple
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


@dataclass
class SchedulerStats:
    requests: int = 0  # jobs finished (successfully or not)
    failed: int = 0
    batches: int = 0  # model calls
    largest_batch: int = 0
    long_requests: int = 0  # jobs that took the long-audio path


class Scheduler:
    """Serves transcription jobs in batches of equal options over one model."""

    def __init__(self, loader: Callable[[], Any], *, max_batch_size: int = DEFAULT_MAX_BATCH,
                 max_queue: int = DEFAULT_MAX_QUEUE, long_audio_seconds: Optional[float] = None,
                 max_queued_seconds: float = DEFAULT_MAX_QUEUED_SECONDS):
        """``loader()`` returns the model (called by ``load``, on the worker thread when started);
        ``long_audio_seconds`` overrides the model's own test for inputs that need chunking."""
        if max_batch_size < 1:
            raise CanaryError("max_batch_size must be at least 1")
        self._loader = loader
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.long_audio_seconds = long_audio_seconds
        self.model: Any = None
        self.stats = SchedulerStats()
        self._queue: "queue.Queue" = queue.Queue()
        self._pending: deque = deque()
        self._waiting = 0  # submitted and not yet started
        self._queued_samples = 0  # audio of the waiting jobs
        self.max_queued_samples = int(max_queued_seconds * SAMPLE_RATE)
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._load_error: Optional[BaseException] = None
        self._thread: Optional[threading.Thread] = None
        self._stopping = False

    # -- in the caller's thread
    def load(self) -> "Scheduler":
        self.model = self._loader()
        return self

    def run(self, jobs: list) -> list:
        """Transcribe ``jobs`` now, in this thread; every job's future is resolved on return."""
        for job in jobs:
            job.long = self._is_long(job.wave, job.options)
        with self._lock:  # the caller holds these jobs anyway: counted, not bounded
            self._waiting += len(jobs)
            self._queued_samples += sum(len(job.wave) for job in jobs)
        self._pending.extend(jobs)
        while self._pending:
            batch = self._take_batch()
            if batch:
                self._run(batch)
        return jobs

    # -- on a worker thread
    def start(self, timeout: Optional[float] = None) -> "Scheduler":
        """Start the thread and wait until the model is loaded; a load error is raised here."""
        self._thread = threading.Thread(target=self._main, name="mlx-canary-worker", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise CanaryError("the model did not finish loading in time")
        if self._load_error is not None:
            raise self._load_error
        return self

    def stop(self, timeout: Optional[float] = 10.0) -> None:
        self._stopping = True
        self._queue.put(_STOP)
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.model is not None

    @property
    def waiting(self) -> int:
        return self._waiting

    def submit(self, wave: np.ndarray, options: TranscribeOptions, item: Any = None) -> concurrent.futures.Future:
        self._admit(len(wave))
        job = Job(wave, options, item, long=self._is_long(wave, options))
        self._queue.put(job)
        return job.future

    def _admit(self, samples: int = 0) -> None:
        """Count one more waiting piece of work (of ``samples`` audio), or refuse it (not running, the queue full,
        or too much audio waiting already; a single job larger than the bound is admitted into an empty queue)."""
        if self._stopping or not self.alive:
            raise QueueFull("the transcription worker is not running")
        with self._lock:
            if self._waiting >= self.max_queue:
                raise QueueFull(f"{self._waiting} requests are already waiting")
            if self._queued_samples and self._queued_samples + samples > self.max_queued_samples:
                raise QueueFull(f"{self._queued_samples / SAMPLE_RATE:.0f} s of audio are already waiting")
            self._waiting += 1
            self._queued_samples += samples

    def call(self, fn: Callable, *args) -> concurrent.futures.Future:
        """Run ``fn(*args)`` on the worker thread (between batches, in arrival order); its result or exception
        resolves the returned future. Counts against the queue bound like a job."""
        self._admit()
        work = _Call(fn, args)
        self._queue.put(work)
        return work.future

    def _is_long(self, wave: np.ndarray, options: TranscribeOptions) -> bool:
        """Whether ``wave`` takes the long-audio (chunked) path; such jobs run alone."""
        if self.long_audio_seconds is not None:
            return len(wave) >= self.long_audio_seconds * SAMPLE_RATE
        return bool(self.model.needs_chunking(wave, options.chunk_seconds))  # plain arithmetic: any thread

    def _main(self) -> None:
        try:
            self._serve()
        finally:
            # MLX keeps per-thread streams; a thread that used MLX must destroy its own before it ends, or the
            # process can abort at exit ("terminate called without an active exception", ml-explore/mlx#3126).
            try:
                import mlx.core as mx

                mx.clear_streams()
            except (ImportError, AttributeError):
                pass

    def _serve(self) -> None:
        try:
            self.load()
        except BaseException as e:  # reported to start(), which re-raises it in the caller's thread
            self._load_error = e
            self._ready.set()
            return
        self._ready.set()
        while True:
            try:
                if not self._pending:
                    item = self._queue.get()
                    if item is _STOP:
                        break
                    self._pending.append(item)
                stop = self._drain_queue()
                batch = self._take_batch()
                if batch:
                    self._run(batch)
                if stop:
                    break
            except Exception:  # a bug here must not end the worker: log it and keep serving
                log.exception("transcription worker error")
        self._drain_queue()
        for job in self._pending:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(WorkerStopped("the server is shutting down"))
        self._pending.clear()

    def _drain_queue(self) -> bool:
        """Move every queued job to the pending list; True when the stop sentinel was among them."""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return False
            if item is _STOP:
                return True
            self._pending.append(item)

    # -- shared by both ways
    def _take_batch(self) -> list:
        """The oldest job, plus the next waiting jobs with the same options (long audio runs alone). Other model
        work (``call``) is run here, in its turn, and gives an empty batch."""
        first = self._pending.popleft()
        if isinstance(first, _Call):
            with self._lock:
                self._waiting -= 1
            if first.future.set_running_or_notify_cancel():
                try:
                    first.future.set_result(first.fn(*first.args))
                except BaseException as e:  # noqa: BLE001  (handed to the caller, which decides)
                    first.future.set_exception(e)
            return []
        batch = [first]
        if not first.long:
            rest = deque()
            while self._pending:
                job = self._pending.popleft()
                if (isinstance(job, Job) and len(batch) < self.max_batch_size and not job.long
                        and job.options == first.options):
                    batch.append(job)
                else:
                    rest.append(job)
            self._pending = rest
        with self._lock:
            self._waiting -= len(batch)
            self._queued_samples -= sum(len(job.wave) for job in batch)
        # A future cancelled by its caller (client gone) is skipped.
        return [job for job in batch if job.future.set_running_or_notify_cancel()]

    def _run(self, batch: list) -> None:
        try:
            results = self._transcribe(batch)
        except Exception as e:
            if len(batch) == 1:
                self._finish(batch[0], error=e)
                return
            # Retry one by one so that only the input that caused the failure fails.
            for job in batch:
                try:
                    self._finish(job, result=self._transcribe([job])[0])
                except Exception as single:
                    self._finish(job, error=single)
            return
        for job, result in zip(batch, results):
            self._finish(job, result=result)

    def _transcribe(self, batch: list) -> list:
        self.stats.batches += 1
        self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
        first = batch[0]
        if first.long:
            self.stats.long_requests += 1
        # A long input is decoded in chunks by the long-audio path, max_batch_size chunks at a time; a batch of
        # short inputs is one model batch.
        options = first.options
        if first.long:
            options = options.replace(batch_size=self.max_batch_size)
        elif len(batch) > options.batch_size:
            options = options.replace(batch_size=len(batch))
        results = self.model.transcribe([job.wave for job in batch], options, progress=first.progress)
        if len(results) != len(batch):
            raise RuntimeError(f"the model returned {len(results)} results for {len(batch)} inputs")
        return results

    def _finish(self, job: Job, *, result=None, error: Optional[BaseException] = None) -> None:
        self.stats.requests += 1
        if error is not None:
            self.stats.failed += 1
            if not isinstance(error, CanaryError):
                log.error("transcription failed", exc_info=error)
            job.future.set_exception(error)
        else:
            job.future.set_result(result)
