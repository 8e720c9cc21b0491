"""Corpus jobs on a Ray cluster: the same batches, run by actors (one model each) on any number of machines.

``RayExecutor`` is an executor for ``corpus.run_corpus``: the driver (the ``mlx-canary`` process) plans the
batches, sends each to a ``CorpusWorker`` actor, and yields the rows as batches finish; the driver alone writes
the journal and the final manifest, so the resume and nothing-lost guarantees are the local ones. A worker reads
the audio itself: the files must be at the same path on every machine (a shared or synced folder).

When a worker dies mid-batch (its process killed, its machine gone), Ray restarts it (reloading the model) and
runs the batch again; if it cannot, the driver gives the batch to another worker. A batch's rows reach the
journal once, when the driver receives them, so a batch run twice is still written once. If every worker is
gone the job stops with an error and the same command resumes it. Needs the ``ray`` extra.
"""

from __future__ import annotations

import logging
import os
import socket
from collections import deque
from typing import Any, Iterator, Optional

from .errors import CanaryError

WORKER_RESTARTS = 2  # Ray restarts a dead worker this often (and retries its batches) before giving up on it
READY_TIMEOUT_S = 600.0  # for a worker to load its model (a first download can take minutes)


class CorpusWorker:
    """One model on one Ray worker: ``run(batch) -> rows`` decodes the batch's files (background threads) and
    transcribes them with the scheduler's batching and retry-one-by-one."""

    def __init__(self, model: str, dtype: Optional[str], load_options: dict, batch_size: int, decode_workers: int):
        from . import corpus
        from .loading import load_model

        self.model = load_model(model, dtype=dtype, **load_options)
        self.runner = corpus.BatchRunner(self.model, batch_size)
        self.decode_workers = decode_workers

    def ready(self) -> dict:
        return {"host": socket.gethostname(), "pid": os.getpid(),
                "default_lang": self.model.capabilities.default_source_lang}

    def run(self, batch: list) -> list:
        from . import corpus

        stream = corpus.decoded_ahead(batch, self.decode_workers, ahead=len(batch))
        decoded = []
        for item, future in stream:
            try:
                decoded.append((item, future.result()))
            except Exception as e:  # noqa: BLE001  (the item's error)
                decoded.append((item, e))
        return self.runner.run(decoded)


def connect(address: str) -> Any:
    """``ray.init`` to an existing cluster (``auto``: the one this machine belongs to / ``$RAY_ADDRESS``)."""
    try:
        import ray
    except ImportError:
        raise CanaryError("--ray needs the ray extra: pip install 'mlx-canary[ray]'") from None
    if not ray.is_initialized():
        try:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False,
                     configure_logging=True)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise CanaryError(f"cannot connect to the Ray cluster at {address}: {e}; start one with `ray start "
                              "--head` (see README: Transcribing a corpus)") from None
    return ray


class RayExecutor:
    """Runs planned batches on ``workers`` Ray actors (default: one per node), ``in_flight`` batches each."""

    def __init__(self, address: str, model: str, *, dtype: Optional[str] = None, load_options: Optional[dict] = None,
                 batch_size: int = 8, decode_workers: int = 2, workers: Optional[int] = None,
                 cpus_per_worker: float = 1.0, in_flight: int = 2):
        self.address = address
        self.model = model
        self.dtype = dtype
        self.load_options = load_options or {}
        self.batch_size = batch_size
        self.decode_workers = decode_workers
        self.workers = workers
        self.cpus_per_worker = cpus_per_worker
        self.in_flight = in_flight
        self.default_lang: Optional[str] = None
        self.hosts: list = []

    def _start_workers(self, ray) -> list:
        count = self.workers or max(1, len([n for n in ray.nodes() if n.get("Alive")]))
        remote = ray.remote(num_cpus=self.cpus_per_worker, max_restarts=WORKER_RESTARTS,
                            max_task_retries=WORKER_RESTARTS)(CorpusWorker)
        actors = [remote.remote(self.model, self.dtype, self.load_options, self.batch_size, self.decode_workers)
                  for _ in range(count)]
        try:
            infos = ray.get([actor.ready.remote() for actor in actors], timeout=READY_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            raise CanaryError(f"the Ray workers did not load the model within {READY_TIMEOUT_S:.0f} s (does the "
                              f"cluster have {count} x {self.cpus_per_worker:g} free CPUs?)") from None
        except ray.exceptions.RayError as e:
            raise CanaryError(f"a Ray worker could not load the model {self.model}: {_cause(e)}") from None
        self.default_lang = infos[0]["default_lang"]
        self.hosts = [info["host"] for info in infos]
        return actors

    def __call__(self, batches: list) -> Iterator[tuple[list, list]]:
        ray = connect(self.address)
        actors = self._start_workers(ray)
        waiting = deque(batches)
        running: dict = {}  # object ref -> (actor, batch)
        load = {id(actor): 0 for actor in actors}

        def feed() -> None:
            for actor in actors:
                while waiting and load[id(actor)] < self.in_flight:
                    batch = waiting.popleft()
                    running[actor.run.remote(batch)] = (actor, batch)
                    load[id(actor)] += 1

        try:
            feed()
            while running:
                ready, _ = ray.wait(list(running), num_returns=1)
                actor, batch = running.pop(ready[0])
                load[id(actor)] -= 1
                try:
                    rows = ray.get(ready[0])
                except ray.exceptions.RayActorError:
                    # Restarts used up (or its machine is gone): its batches go to the other workers.
                    if actor in actors:
                        actors.remove(actor)
                    waiting.appendleft(batch)
                    if not actors:
                        raise CanaryError("every Ray worker died; run the same command again to resume") from None
                    feed()
                    continue
                except ray.exceptions.RayTaskError as e:  # a bug in the worker's code: its items fail, the job goes on
                    from . import corpus

                    rows = [corpus.failed_row(item, f"Ray worker error: {_cause(e)}") for item in batch]
                feed()
                yield batch, rows
        finally:
            for ref in running:
                ray.cancel(ref, force=False)
            for actor in actors:
                ray.kill(actor, no_restart=True)


def _cause(error: BaseException) -> str:
    cause = getattr(error, "cause", None) or error
    lines = str(cause).strip().splitlines()
    return lines[-1] if lines else type(cause).__name__
