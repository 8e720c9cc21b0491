"""Load test for ``mlx-canary serve``: N concurrent OpenAI clients x M requests; throughput and latency percentiles.

    /work/venv/bin/python benchmarks/server_load.py                       # tiny random-weight model, 8 x 25
    /work/venv/bin/python benchmarks/server_load.py --model DIR --clients 8 --requests 25 --audio-seconds 5
    /work/venv/bin/python benchmarks/server_load.py --url http://127.0.0.1:8000/v1   # a server already running
    /work/venv/bin/python benchmarks/server_load.py --soak 600 --model demo   # memory soak: RSS over 10 minutes

Without ``--url`` the server runs in this process (uvicorn in a thread on a free loopback port, exactly the code
``mlx-canary serve`` runs). Without ``--model`` it serves the tiny random-weight model that tests/test_server.py
builds (needs torch to write the .nemo; its transcripts are noise, the point is the server's own overhead).
Every client is a separate ``openai.OpenAI`` client (no retries); requests rotate over en/de clips of mixed
length and over ``MIX``: mostly json/text transcriptions, some verbose_json/srt/vtt (timestamps) and translations.

Prints requests, failures, wall time, throughput (requests/s and audio seconds per second), latency p50/p95/max,
and the worker's batching (model calls, largest batch). ``tests/test_server.py`` runs ``run_load`` and asserts
zero failures only; nothing here asserts anything about time.

``--soak SECONDS`` answers "is the server's memory bounded?": it starts ``mlx-canary serve`` as its own process
on a free loopback port (so the figure is the server's alone, not the clients'), keeps the load running for
SECONDS, and prints the server's resident memory (``VmRSS`` from /proc, Linux) every ``--sample-every`` seconds,
then the series' summary: after warm-up, peak, end, and the growth over the second half of the run.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
FORMATS = ("json", "text", "srt", "vtt", "verbose_json")


# -- audio -----------------------------------------------------------------------------------------------------


def wav_bytes(seconds: float, *, freq: float = 220.0, rate: int = 16000, channels: int = 1, seed: int = 0) -> bytes:
    """A PCM16 WAV file: a tone with some noise (different seeds give different audio)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    signal = 0.3 * np.sin(2 * np.pi * freq * t) + 0.05 * rng.standard_normal(t.shape)
    pcm = (np.clip(signal, -1, 1) * 32767).astype("<i2")
    if channels > 1:
        pcm = np.repeat(pcm[:, None], channels, axis=1)
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return buf.getvalue()


@dataclass
class Request:
    """One request of the load: which clip, endpoint, format and extra fields."""

    clip: int
    endpoint: str  # "transcriptions" | "translations"
    response_format: str
    language: str


# What a mixed population of clients asks for: mostly plain transcriptions, some with timestamps, some translations.
MIX = (
    ("transcriptions", "json"), ("transcriptions", "json"), ("transcriptions", "text"), ("transcriptions", "json"),
    ("transcriptions", "verbose_json"), ("transcriptions", "json"), ("transcriptions", "text"),
    ("transcriptions", "srt"), ("translations", "json"), ("transcriptions", "vtt"),
)


def plan_requests(clips: list, clients: int, per_client: int) -> list:
    """``clips``: [(name, bytes, language)]. A deterministic mix of clips, endpoints and formats per client."""
    plan = []
    for c in range(clients):
        row = []
        for j in range(per_client):
            n = c * per_client + j
            clip = n % len(clips)
            endpoint, fmt = MIX[(n // len(clips)) % len(MIX)]
            row.append(Request(clip, endpoint, fmt, clips[clip][2]))
        plan.append(row)
    return plan


# -- the load --------------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    client: int
    index: int
    request: Request
    ok: bool
    latency: float
    output: Any = None  # the parsed response, or the error text


def send(client, clips: list, request: Request):
    name, data, _ = clips[request.clip]
    kwargs: dict = {"model": "canary", "file": (name, data, "audio/wav"), "response_format": request.response_format}
    if request.endpoint == "transcriptions":
        return client.audio.transcriptions.create(language=request.language, **kwargs)
    if request.language == "en":
        kwargs["extra_body"] = {"language": "en", "target_language": "de"}
    else:
        kwargs["extra_body"] = {"language": request.language}
    return client.audio.translations.create(**kwargs)


def run_load(base_url: str, clips: list, *, clients: int = 8, per_client: int = 25, api_key: str = "unused",
             timeout: float = 120.0) -> list:
    """Run the load; returns one ``Outcome`` per request (failures included, never raised)."""
    import openai

    plan = plan_requests(clips, clients, per_client)
    outcomes: list = []
    lock = threading.Lock()
    start = threading.Barrier(clients)

    def worker(c: int) -> None:
        client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=timeout)
        start.wait()
        try:
            for j, request in enumerate(plan[c]):
                t0 = time.perf_counter()
                try:
                    output, ok = send(client, clips, request), True
                except Exception as e:  # every failure is counted, whatever its kind
                    output, ok = f"{type(e).__name__}: {e}", False
                outcome = Outcome(c, j, request, ok, time.perf_counter() - t0, output)
                with lock:
                    outcomes.append(outcome)
        finally:
            client.close()

    threads = [threading.Thread(target=worker, args=(c,), name=f"load-client-{c}") for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcomes


def percentile(values: list, q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, int(np.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]


def summarize(outcomes: list, wall: float, clips: list) -> dict:
    latencies = [o.latency for o in outcomes if o.ok]
    audio = sum(_duration(clips[o.request.clip][1]) for o in outcomes if o.ok)
    return {
        "requests": len(outcomes),
        "failed": sum(not o.ok for o in outcomes),
        "wall_s": wall,
        "throughput_rps": len(latencies) / wall if wall else float("nan"),
        "audio_s_per_s": audio / wall if wall else float("nan"),
        "latency_p50_ms": 1000 * percentile(latencies, 50),
        "latency_p95_ms": 1000 * percentile(latencies, 95),
        "latency_max_ms": 1000 * max(latencies) if latencies else float("nan"),
        "first_errors": [o.output for o in outcomes if not o.ok][:5],
    }


def _duration(data: bytes) -> float:
    with wave.open(io.BytesIO(data)) as w:
        return w.getnframes() / w.getframerate()


# -- an in-process server --------------------------------------------------------------------------------------


class ServerThread:
    """``mlx-canary serve`` in a background thread on a free loopback port (for tests and this benchmark)."""

    def __init__(self, worker, *, host: str = "127.0.0.1", log_level: str = "warning", limits=None, **app_options):
        import uvicorn

        from mlx_canary.server import ConnectionLimits, create_app
        from mlx_canary.server_limits import uvicorn_options

        limits = limits or ConnectionLimits()
        self.worker = worker
        self.app = create_app(worker, limits=limits, **app_options)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.host, self.port = self.sock.getsockname()[:2]
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level=log_level, timeout_keep_alive=30,
                                                    **uvicorn_options(limits)))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True,
                                       name="uvicorn")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# -- the memory soak -------------------------------------------------------------------------------------------


def rss_mib(pid: int) -> float:
    """Resident memory of process ``pid`` in MiB (``VmRSS``; Linux /proc)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def start_server_process(model: str, extra: list) -> tuple:
    """``python -m mlx_canary serve`` on a free loopback port; returns (process, base URL) once /health answers."""
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "mlx_canary", "serve", "--model", model, "--host", "127.0.0.1",
                             "--port", str(port), "-q", *extra], env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as response:
                if response.status == 200:
                    return proc, url + "/v1"
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("the server did not come up within 120 s")
        time.sleep(0.2)


def soak(base_url: str, clips: list, pid: int, *, seconds: float, clients: int, sample_every: float,
         api_key: str = "unused") -> dict:
    """Keep ``clients`` clients busy for ``seconds``; sample the server's RSS every ``sample_every`` seconds."""
    samples: list = []  # (elapsed s, requests finished, failures, RSS MiB)
    counts = {"requests": 0, "failed": 0}
    done = threading.Event()
    t0 = time.monotonic()

    def sampler() -> None:
        while True:
            sample = (time.monotonic() - t0, counts["requests"], counts["failed"], rss_mib(pid))
            samples.append(sample)
            print(f"t {sample[0]:6.0f} s  requests {sample[1]:6d}  failed {sample[2]:3d}  RSS {sample[3]:7.1f} MiB",
                  flush=True)
            if done.wait(sample_every):
                return

    thread = threading.Thread(target=sampler, name="rss-sampler", daemon=True)
    thread.start()
    while time.monotonic() - t0 < seconds:
        outcomes = run_load(base_url, clips, clients=clients, per_client=5, api_key=api_key)
        counts["requests"] += len(outcomes)
        counts["failed"] += sum(not o.ok for o in outcomes)
    done.set()
    thread.join()
    rss = [s[3] for s in samples]
    half = len(rss) // 2
    return {
        "seconds": samples[-1][0], "requests": counts["requests"], "failed": counts["failed"],
        "rss_first_mib": rss[0], "rss_after_warmup_mib": rss[min(1, len(rss) - 1)], "rss_peak_mib": max(rss),
        "rss_end_mib": rss[-1], "rss_second_half_growth_mib": rss[-1] - rss[half],
        "series": [{"t": round(s[0], 1), "requests": s[1], "failed": s[2], "rss_mib": round(s[3], 1)}
                   for s in samples],
    }


def run_soak(args, clips: list) -> int:
    extra = ["--max-batch-size", str(args.max_batch_size)]
    proc, base_url = start_server_process(args.model or "demo", extra)
    try:
        # One request per clip first (as in the load run), so the first sample is taken after the warm-up.
        run_load(base_url, clips, clients=1, per_client=len(clips), api_key=args.api_key)
        summary = soak(base_url, clips, proc.pid, seconds=args.soak, clients=args.clients,
                       sample_every=args.sample_every, api_key=args.api_key)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    summary.update(model=args.model or "demo", clients=args.clients, audio_seconds=args.audio_seconds)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"{summary['requests']} requests in {summary['seconds']:.0f} s ({args.clients} clients), "
              f"{summary['failed']} failed")
        print(f"server RSS: {summary['rss_after_warmup_mib']:.1f} MiB after warm-up, peak "
              f"{summary['rss_peak_mib']:.1f}, end {summary['rss_end_mib']:.1f}; growth over the second half "
              f"{summary['rss_second_half_growth_mib']:+.1f} MiB")
    return 1 if summary["failed"] else 0


# -- main ------------------------------------------------------------------------------------------------------


def default_clips(seconds: float) -> list:
    """Four en/de clips of mixed length around ``seconds``."""
    lengths = [seconds * f for f in (0.5, 1.0, 0.75, 1.25)]
    return [(f"clip{i}.wav", wav_bytes(s, freq=150 + 60 * i, seed=i), "en" if i % 2 == 0 else "de")
            for i, s in enumerate(lengths)]


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="base URL of a running server, e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--model", help="model to serve in-process (default: the tiny random-weight test model)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=25, help="requests per client")
    parser.add_argument("--audio-seconds", type=float, default=4.0, help="typical clip length")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--api-key", default="unused")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--soak", type=float, default=None, metavar="SECONDS",
                        help="memory soak: serve --model (default: demo) in its own process for SECONDS under load "
                        "and print its RSS over time")
    parser.add_argument("--sample-every", type=float, default=15.0, metavar="SECONDS",
                        help="RSS sampling interval of --soak (default: 15)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", "deprecated", DeprecationWarning)  # the openai client's audio.translations

    sys.path.insert(0, str(REPO))
    clips = default_clips(args.audio_seconds)
    if args.soak is not None:
        return run_soak(args, clips)
    server = None
    if args.url:
        base_url = args.url
    else:
        import mlx_canary
        from mlx_canary.scheduler import Scheduler
        from mlx_canary.server import model_id_for

        model_path = args.model
        tmp = None
        if model_path is None:
            sys.path.insert(0, str(REPO / "tests"))
            from test_server import build_tiny_model

            tmp = tempfile.TemporaryDirectory(prefix="mlx-canary-load-")
            model_path = str(build_tiny_model(Path(tmp.name)))
        worker = Scheduler(lambda: mlx_canary.load_model(model_path), max_batch_size=args.max_batch_size).start()
        server = ServerThread(worker, model_id=model_id_for(model_path)).start()
        base_url = server.url + "/v1"
        # One request per clip first: the first call of each shape compiles/warms MLX.
        run_load(base_url, clips, clients=1, per_client=len(clips), api_key=args.api_key)
        before = (worker.stats.batches, worker.stats.requests)
    t0 = time.perf_counter()
    outcomes = run_load(base_url, clips, clients=args.clients, per_client=args.requests, api_key=args.api_key)
    wall = time.perf_counter() - t0
    summary = summarize(outcomes, wall, clips)
    summary.update(clients=args.clients, per_client=args.requests, audio_seconds=args.audio_seconds,
                   url=args.url or "in-process")
    if server is not None:
        stats = server.worker.stats
        summary.update(model_calls=stats.batches - before[0], largest_batch=stats.largest_batch,
                       mean_batch=(stats.requests - before[1]) / max(1, stats.batches - before[0]))
        server.stop()
        server.worker.stop()
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"{summary['requests']} requests ({args.clients} clients x {args.requests}), "
              f"{summary['failed']} failed, {wall:.2f} s")
        print(f"throughput: {summary['throughput_rps']:.1f} requests/s, {summary['audio_s_per_s']:.1f} audio s/s")
        print(f"latency: p50 {summary['latency_p50_ms']:.0f} ms, p95 {summary['latency_p95_ms']:.0f} ms, "
              f"max {summary['latency_max_ms']:.0f} ms")
        if "model_calls" in summary:
            print(f"batching: {summary['model_calls']} model calls, mean batch {summary['mean_batch']:.2f}, "
                  f"largest {summary['largest_batch']}")
        for error in summary["first_errors"]:
            print(f"error: {error}")
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
