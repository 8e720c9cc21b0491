"""The scheduler on a scripted model: batching of equal options, long inputs alone, retry one by one, the queue
bound, and other model work (``call``) run in turn on the worker thread."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from mlx_canary.errors import CanaryError
from mlx_canary.options import TranscribeOptions
from mlx_canary.scheduler import Job, QueueFull, Scheduler


class ScriptedModel:
    """transcribe() records its calls; an input of ``bad`` samples is a user error, of ``bug`` samples a crash."""

    def __init__(self, bad=None, bug=None, long_samples=10 ** 9):
        self.calls = []
        self.threads = set()
        self.bad, self.bug, self.long_samples = bad, bug, long_samples
        self.gate = threading.Event()
        self.gate.set()

    def needs_chunking(self, wave, chunk_seconds=None):
        return len(wave) > self.long_samples

    def transcribe(self, waves, options, progress=None):
        self.threads.add(threading.get_ident())
        self.gate.wait(30)
        self.calls.append(([len(w) for w in waves], options.batch_size, progress is not None))
        for w in waves:
            if len(w) == self.bad:
                raise CanaryError(f"{len(w)} samples are not audio")
            if len(w) == self.bug:
                raise ValueError("a bug")
        return [f"{len(w)} samples in {options.source_lang}" for w in waves]


def wave(n):
    return np.zeros(n, np.float32)


def jobs(*specs):
    return [Job(wave(n), TranscribeOptions(source_lang=lang)) for n, lang in specs]


def test_run_batches_equal_options_in_order_and_long_inputs_alone():
    model = ScriptedModel(long_samples=1000)
    done = Scheduler(lambda: model, max_batch_size=2).load().run(
        jobs((10, "en"), (11, "de"), (12, "en"), (2000, "en"), (13, "en")))
    assert [j.future.result() for j in done] == [
        "10 samples in en", "11 samples in de", "12 samples in en", "2000 samples in en", "13 samples in en"]
    # oldest first, up to 2 of equal options; the long input alone, with the scheduler's batch size for its chunks
    assert [c[:2] for c in model.calls] == [([10, 12], 8), ([11], 8), ([2000], 2), ([13], 8)]


def test_a_failing_batch_is_retried_one_by_one():
    model = ScriptedModel(bad=11, bug=12)
    done = Scheduler(lambda: model).load().run(jobs((10, "en"), (11, "en"), (12, "en"), (13, "en")))
    assert done[0].future.result() == "10 samples in en" and done[3].future.result() == "13 samples in en"
    assert isinstance(done[1].future.exception(), CanaryError)
    assert isinstance(done[2].future.exception(), ValueError)
    assert [c[0] for c in model.calls] == [[10, 11, 12, 13], [10], [11], [12], [13]]


def test_call_runs_on_the_worker_thread_in_turn():
    model = ScriptedModel()
    worker = Scheduler(lambda: model, max_queue=3).start()
    try:
        model.gate.clear()
        first = worker.submit(wave(10), TranscribeOptions(source_lang="en"))
        deadline = time.monotonic() + 10
        while worker.waiting or not model.threads:  # until the worker is inside the first call
            assert time.monotonic() < deadline
            time.sleep(0.01)
        order = []
        called = worker.call(lambda x: order.append(("call", x)) or threading.get_ident(), 7)
        failing = worker.call(lambda: 1 / 0)
        later = worker.submit(wave(11), TranscribeOptions(source_lang="en"))
        with pytest.raises(QueueFull):  # three waiting: the bound counts calls too
            worker.call(lambda: None)
        model.gate.set()
        assert first.result(10) == "10 samples in en" and later.result(10) == "11 samples in en"
        assert called.result(10) in model.threads and order == [("call", 7)]
        assert isinstance(failing.exception(10), ZeroDivisionError)
        assert worker.alive  # an exception in a call does not end the worker
    finally:
        model.gate.set()
        worker.stop()
    with pytest.raises(QueueFull):
        worker.call(lambda: None)


def test_waiting_audio_is_bounded():
    model = ScriptedModel()
    model.gate.clear()
    worker = Scheduler(lambda: model, max_queued_seconds=2.0).start()
    try:
        running = worker.submit(wave(16000 * 5), TranscribeOptions(source_lang="en"))  # alone: admitted
        deadline = time.monotonic() + 10
        while worker.waiting:  # until the worker is inside its call
            assert time.monotonic() < deadline
            time.sleep(0.01)
        first = worker.submit(wave(16000), TranscribeOptions(source_lang="en"))
        with pytest.raises(QueueFull, match="of audio are already waiting"):
            worker.submit(wave(16000 * 2), TranscribeOptions(source_lang="en"))
        second = worker.submit(wave(16000), TranscribeOptions(source_lang="en"))  # fits: 2 s in all
        model.gate.set()
        assert running.result(10) and first.result(10) and second.result(10)
        assert worker.submit(wave(16000 * 2), TranscribeOptions(source_lang="en")).result(10)  # room again
    finally:
        model.gate.set()
        worker.stop()
