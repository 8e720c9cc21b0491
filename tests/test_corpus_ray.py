"""Corpus jobs on a real local Ray cluster (mlx_canary/corpus_ray.py): a head node on this machine (its address
127.0.0.1, a free port, 2 CPUs, no dashboard), two workers with the demo model; one worker is killed (SIGKILL)
mid-job and the final manifest is still every input once, in order, equal to a local run's.

Ray's GCS and raylet still listen on every interface (Ray's CLI has no bind-address option); the ports are free
ones picked at random and the cluster lives for this module only."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from test_corpus import make_corpus, read_rows

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="Ray is not installed (the ray extra)"),
]

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 180
JOB_TIMEOUT_S = 420


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_bin() -> str:
    return str(Path(sys.executable).with_name("ray"))


@pytest.fixture(scope="module")
def ray_cluster():
    """``ray start --head --block`` in its own process group (stopped by signalling that group only)."""
    port = _free_port()
    temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # Ray's socket paths must stay short
    env = dict(os.environ, PYTHONPATH=str(REPO), RAY_USAGE_STATS_ENABLED="0")
    head = subprocess.Popen(
        [_ray_bin(), "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
         "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while True:
            if head.poll() is not None:
                pytest.fail(f"ray start failed: {head.stderr.read().decode()[-3000:]}")
            status = subprocess.run([_ray_bin(), "status", f"--address={address}"], env=env, capture_output=True,
                                    timeout=60)
            if status.returncode == 0:
                break
            if time.monotonic() > deadline:
                pytest.fail(f"the Ray head did not come up within {START_TIMEOUT_S} s")
            time.sleep(2)
        yield address, env, head.pid  # the head's session id (start_new_session)
    finally:
        # Our process group only: `ray start --block`, the GCS, the raylet and the workers it started.
        try:
            os.killpg(head.pid, signal.SIGTERM)
            head.wait(30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)  # whatever did not stop on SIGTERM
        except ProcessLookupError:
            pass
        head.wait(30)
        shutil.rmtree(temp, ignore_errors=True)


def _session_of(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return -1
    return int(stat.rsplit(")", 1)[1].split()[3])  # fields after the name: state ppid pgrp session


def _worker_pids(session: int) -> list:
    """Our cluster's CorpusWorker actor processes: Ray titles them ``ray::CorpusWorker...``, and the raylet that
    starts them is in the head's session."""
    listing = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    pids = [int(line.split(None, 1)[0]) for line in listing.splitlines() if "ray::CorpusWorker" in line]
    return [pid for pid in pids if _session_of(pid) == session]


def test_worker_killed_mid_job_loses_nothing(ray_cluster, tmp_path):
    address, env, session = ray_cluster
    manifest = make_corpus(tmp_path, 30, [{"audio_filepath": "audio/missing.wav", "duration": 9.0}])
    out = tmp_path / "out"
    journal = out / "in_predictions.jsonl.journal"
    local = [sys.executable, "-m", "mlx_canary", "transcribe", "--manifest", str(manifest), "-m", "demo", "-b", "1",
             "-q"]
    job = subprocess.Popen(local + ["-o", str(out), "--ray", address, "--ray-workers", "2"], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed = None
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline and job.poll() is None:
        if journal.exists() and journal.read_bytes().count(b"\n") >= 4:
            pids = _worker_pids(session)
            if len(pids) >= 2:
                killed = pids[0]
                os.kill(killed, signal.SIGKILL)
                break
        time.sleep(0.05)
    assert killed is not None, f"no worker was killed; job status {job.poll()}"
    done_at_kill = journal.read_bytes().count(b"\n")
    _, stderr = job.communicate(timeout=JOB_TIMEOUT_S)
    assert job.returncode == 1, stderr[-3000:]  # the missing file, and nothing else
    assert done_at_kill < 31, "the job had finished before a worker was killed"
    rows = read_rows(out / "in_predictions.jsonl")
    assert [r["audio_filepath"] for r in rows] == [r["audio_filepath"] for r in read_rows(manifest)]
    assert [i for i, r in enumerate(rows) if "error" in r] == [30]
    records = [json.loads(line) for line in journal.read_text().splitlines()]
    transcribed = [r["key"] for r in records if "error" not in r["row"]]
    assert len(transcribed) == len(set(transcribed)) == 30  # written once, whatever ran twice
    # the same rows as a local run of the same job
    fresh = tmp_path / "fresh"
    subprocess.run(local + ["-o", str(fresh)], env=env, capture_output=True, timeout=JOB_TIMEOUT_S)
    assert read_rows(fresh / "in_predictions.jsonl") == rows
