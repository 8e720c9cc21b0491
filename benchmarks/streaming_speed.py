"""Streaming speed: NeMo's streaming driver and mlx-canary's StreamingSession on the same model and audio.

    python benchmarks/streaming_speed.py [--models 180m,1b,demo] [--policies waitk,alignatt] [--seconds 24]
                                         [--setting 10-1-0.5] [--threads 1] [--engines nemo,mlx] [--clock cpu]

Models: the random-weight NeMo checkpoints at canary-180m-flash / canary-1b-flash dimensions
(``nemo_models.py``, built and converted once into ``--cache``); NeMo runs the ``.nemo`` archive, mlx-canary its
float32 conversion; ``demo``: the bundled trained model, mlx-canary only (real words: a LAAL that means
something). Audio: the demo's speech clip (``mlx_canary/demo/sample.wav``, 3.5 s, six words) with 0.5 s
of pause, repeated to ``--seconds``, written once as a float WAV that both engines read.

Each engine runs in its own fresh process per model (``--threads`` intra-op threads: torch.set_num_threads,
OMP/MKL/OpenBLAS env; this process and the mlx-canary worker never import torch or NeMo):

* NeMo: ``run_driver`` of tests/nemo_stream_oracle.py, the loop of NeMo's
  ``examples/asr/asr_chunked_inference/aed/speech_to_text_aed_streaming_infer.py`` with NeMo's own pieces (model
  restored from the .nemo, ``StreamingBatchedAudioBuffer``, the model's forward on each window,
  ``GreedyBatchedStreamingAEDComputer``, its ``compute_*_lagging`` for LAAL), batch 1. A window's compute is
  read between the ends of consecutive ``GreedyBatchedStreamingAEDComputer.__call__`` calls (buffer update +
  features + encoder + policy step; the first from the model's forward).
* mlx-canary: ``CanaryModel.stream()`` -> ``StreamingSession``; the first piece is one window's audio plus one
  sample, then one chunk per ``feed()``, so that every ``feed()`` decodes exactly one window, as soon as the
  session can know that window is not the stream's last; ``finish()`` decodes the last one.

Both engines: NeMo's defaults for the policies, except ``hallucinations_detector=False`` (random weights repeat
themselves; the detector would switch the stream off at different moments of the benchmark, not of a real model)
and ``max_generation_length=256`` (NeMo's state holds 256 token positions; its default 512 bounds Wait-k's last
window, which on a model that never says EOS indexes past that buffer and raises; 256 ends it where the buffer
ends, the same in both engines). Random weights never emit EOS, so the stream decodes until NeMo's 256-position
state is full.

Figures (``--clock cpu``, the default: process CPU time, what one idle core takes at ``--threads 1``; the load
average and the other processes' CPU use are printed beside; ``--clock wall``: wall clock):

* chunk median / p90: compute per window after the left context has filled (windows ``left/chunk + 2`` on,
  the last window excluded: it decodes to the end of the stream), and how many of those windows emitted tokens
  (a stream whose 256 positions are full runs the encoder only);
* RTF: all windows' compute (the last included) / audio duration;
* first token: the time from the start of speech to its first final token in a live stream: the window that
  emits it is complete when the audio up to its end (right context included) has arrived; windows are computed
  in order, each starting when its audio is complete and the previous window is done; the first token appears
  when its window is done. Split into audio (how long the policy makes the speaker wait) + compute waits;
* LAAL: each engine's own (NeMo's ``compute_waitk_lagging`` / ``compute_alignatt_lagging``, mlx-canary's
  ``StreamResult.laal``), with the reference's word count (the clip's words times its repetitions);
* tokens equal: the token ids of both engines, compared.

Writes everything as JSON to ``--json`` (default ``<cache>/streaming-speed-<time>.json``). Asserts nothing about
time.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

import nemo_models  # noqa: E402  (imports neither torch nor NeMo at module level)
from bench import run_json_worker  # noqa: E402

DEMO_DIR = REPO / "mlx_canary" / "demo"
CLIP_WORDS = "Up big white house dog car."  # the demo clip's reference (mlx_canary/demo/nemo_reference.json)
PAUSE_S = 0.5
WARMUP_S = 3.0
SAMPLE_RATE = 16000
# Knobs both engines run with (see the module docstring).
KNOBS = {"hallucinations_detector": False, "max_generation_length": 256}


# --- the audio ---------------------------------------------------------------------------------------------------


def make_audio(cache: Path, seconds: float) -> dict:
    """The demo clip + pause, repeated to ``seconds``; a float WAV both engines read, and a short warm-up WAV."""
    import soundfile as sf

    clip, rate = sf.read(DEMO_DIR / "sample.wav", dtype="float32")
    assert rate == SAMPLE_RATE and clip.ndim == 1
    tile = np.concatenate([clip, np.zeros(int(PAUSE_S * SAMPLE_RATE), np.float32)])
    n = int(seconds * SAMPLE_RATE)
    audio = np.tile(tile, n // tile.size + 1)[:n]
    out = cache / "streaming-audio"
    out.mkdir(parents=True, exist_ok=True)
    path, warmup = out / f"speech-{seconds:g}s.wav", out / "warmup.wav"
    sf.write(path, audio, SAMPLE_RATE, subtype="FLOAT")
    sf.write(warmup, audio[: int(WARMUP_S * SAMPLE_RATE)], SAMPLE_RATE, subtype="FLOAT")
    repeats = -(-n // tile.size)  # clips begun within the audio
    return {"path": str(path), "warmup": str(warmup), "seconds": n / SAMPLE_RATE,
            "speech_onset_s": speech_onset(audio), "reference": " ".join([CLIP_WORDS] * repeats)}


def speech_onset(audio: np.ndarray, frame: int = 160) -> float:
    """Start of the first 10 ms frame whose RMS is within 30 dB of the loudest frame's."""
    frames = audio[: audio.size // frame * frame].reshape(-1, frame)
    rms = np.sqrt((frames.astype(np.float64) ** 2).mean(axis=1))
    return float(np.argmax(rms >= rms.max() * 10 ** (-30 / 20)) * frame / SAMPLE_RATE)


def samples_hash(samples: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(samples, dtype=np.float32).tobytes()).hexdigest()[:16]


# --- workers (one fresh process per engine and model) -----------------------------------------------------------


def clocks() -> tuple[float, float]:
    return time.process_time(), time.perf_counter()


def worker_nemo(args) -> dict:
    """NeMo's driver loop (tests/nemo_stream_oracle.run_driver) on the .nemo, every window timed."""
    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(REPO / "tests"))
    import nemo_oracle
    import nemo_stream_oracle
    from nemo.collections.asr.parts.submodules.aed_decoding import GreedyBatchedStreamingAEDComputer
    from nemo.collections.asr.parts.utils.streaming_utils import SimpleAudioDataset

    nemo_oracle.quiet_nemo()
    model = nemo_stream_oracle.load_model(Path(args.nemo))
    marks: list[dict] = []  # per window: clocks when it ended, tokens so far
    starts: list[tuple] = []
    model.register_forward_pre_hook(lambda *_: starts.append(clocks()))
    call = GreedyBatchedStreamingAEDComputer.__call__

    def timed_call(self, *a, **kw):
        state = call(self, *a, **kw)
        cpu, wall = clocks()
        emitted = int(state.current_context_lengths[0]) - state.decoder_input_ids.size(-1)
        marks.append({"cpu": cpu, "wall": wall, "tokens": emitted})
        return state

    GreedyBatchedStreamingAEDComputer.__call__ = timed_call
    wave = SimpleAudioDataset([args.audio], sample_rate=SAMPLE_RATE)[0][0].numpy()
    setting = tuple(float(x) for x in args.setting.split("-"))
    out = {"torch": f"torch {torch.__version__}, {torch.get_num_threads()} threads", "audio_sha": samples_hash(wave),
           "runs": {}}
    for policy in args.policies.split(","):
        nemo_stream_oracle.run_driver(model, [Path(args.warmup)], [CLIP_WORDS], policy, setting, 1, dict(KNOBS))
        marks.clear(), starts.clear()
        r = nemo_stream_oracle.run_driver(model, [Path(args.audio)], [args.reference], policy, setting, 1,
                                          dict(KNOBS))
        first = {"cpu": starts[0][0], "wall": starts[0][1]}
        windows = [{"cpu_s": m["cpu"] - p["cpu"], "wall_s": m["wall"] - p["wall"], "tokens": m["tokens"]}
                   for p, m in zip([first] + marks[:-1], marks)]
        sub = model.encoder.subsampling_factor
        frame_samples = (int(SAMPLE_RATE * model.cfg.preprocessor["window_stride"]) // sub) * sub * sub
        chunk, right = (f * frame_samples for f in r["frames"][1:])
        for k, w in enumerate(windows):  # audio the driver's buffer held at this window (its right_sample)
            w["audio_end_s"] = min(chunk + right + k * chunk, wave.size) / SAMPLE_RATE
        out["runs"][policy] = {"windows": windows, "tokens": r["tokens"][0], "laal_ms": r["laal"][0],
                               "prompt": r["prompt"], "frames": r["frames"]}
    return out


def worker_mlx(args) -> dict:
    """mlx-canary's StreamingSession on the converted model, every window timed."""
    import mlx_canary
    from mlx_canary import _blas
    from mlx_canary.audio import load_audio
    from mlx_canary.streaming_policy import StreamingOptions

    assert "torch" not in sys.modules and "nemo" not in sys.modules
    model = mlx_canary.load_model(args.model_dir, dtype="float32")
    wave, warm = load_audio(args.audio), load_audio(args.warmup)
    left, chunk, right = (float(x) for x in args.setting.split("-"))
    out = {"blas": _blas.describe(), "audio_sha": samples_hash(wave), "runs": {}}
    for policy in args.policies.split(","):
        options = StreamingOptions(policy=policy, left_context_secs=left, chunk_secs=chunk,
                                   right_context_secs=right, **KNOBS)

        def session():
            return model.stream(source_lang="en", target_lang="en", pnc=True, streaming=options)

        stream(session(), warm)
        s = session()
        windows, result = stream(s, wave)
        reference_words = len(args.reference.split())
        out["runs"][policy] = {"windows": windows, "tokens": list(result.tokens),
                               "laal_ms": result.laal(reference_words),
                               "prompt": list(s._decoder.prompt)}
    return out


def stream(session, wave: np.ndarray):
    """Feed ``wave`` so that each feed() decodes one window; returns per-window timings and the result."""
    geo = session.geometry
    windows, at, step = [], 0, 0
    while True:
        end = geo.step_end(step) + 1  # one sample past the window: the session then knows it is not the last
        if end > wave.size:
            break
        c0, w0 = clocks()
        session.feed(wave[at:end])
        c1, w1 = clocks()
        windows.append({"cpu_s": c1 - c0, "wall_s": w1 - w0, "tokens": len(session.tokens),
                        "audio_end_s": (end - 1) / SAMPLE_RATE})
        at, step = end, step + 1
    c0, w0 = clocks()
    session.feed(wave[at:])
    result = session.finish()
    c1, w1 = clocks()
    windows.append({"cpu_s": c1 - c0, "wall_s": w1 - w0, "tokens": len(result.tokens),
                    "audio_end_s": wave.size / SAMPLE_RATE})
    return windows, result


def run_worker(kind: str, args, name: str, audio: dict, out_dir: Path) -> dict:
    out_json = out_dir / f"{kind}-{name}-{int(time.time() * 1000)}.json"
    threads = str(args.threads)
    env = dict(os.environ, OMP_NUM_THREADS=threads, OPENBLAS_NUM_THREADS=threads, MKL_NUM_THREADS=threads,
               PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    models = args.cache / "models"
    model_dir = DEMO_DIR if name == "demo" else nemo_models.converted_dir(models, name)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--out-json", str(out_json),
           "--threads", threads, "--policies", args.policies, "--setting", args.setting,
           "--model-dir", str(model_dir), "--nemo", str(nemo_models.model_dir(models, name) / "model.nemo"),
           "--audio", audio["path"], "--warmup", audio["warmup"], "--reference", audio["reference"]]
    return run_json_worker(kind, cmd, env, out_json)


# --- the figures -------------------------------------------------------------------------------------------------


def figures(run: dict, setting: tuple, audio: dict, clock: str) -> dict:
    windows = run["windows"]
    key = f"{clock}_s"
    left, chunk, _ = setting
    first_steady = min(int(left / chunk) + 2, len(windows) - 1)
    steady = range(first_steady, len(windows) - 1) or range(len(windows))
    times = [windows[i][key] for i in steady]
    emitting = sum(1 for i in steady if windows[i]["tokens"] > (windows[i - 1]["tokens"] if i else 0))
    done, first = 0.0, None
    for w in windows:  # the live queue: a window starts when its audio is in and the previous one is done
        done = max(done, w["audio_end_s"]) + w[key]
        if first is None and w["tokens"] > 0:
            first = {"audio_s": w["audio_end_s"] - audio["speech_onset_s"],
                     "total_s": done - audio["speech_onset_s"]}
    return {
        "windows": len(windows), "steady_windows": len(steady), "steady_emitting": emitting,
        "chunk_ms_median": 1000 * float(np.median(times)), "chunk_ms_p90": 1000 * float(np.percentile(times, 90)),
        "wall_ms_median": 1000 * float(np.median([windows[i]["wall_s"] for i in steady])),
        "rtf": sum(w[key] for w in windows) / audio["seconds"],
        "first_token": first, "laal_ms": run["laal_ms"], "tokens": len(run["tokens"]),
    }


def table(rows: list[dict], clock: str) -> str:
    what = "process CPU" if clock == "cpu" else "wall clock"
    lines = [f"| model | policy | engine | chunk ms median ({what}) | p90 | wall median | steady windows "
             "(emitting) | RTF | speech -> first token s (audio + compute) | LAAL ms | tokens | tokens equal |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for engine in ("nemo", "mlx"):
            f = r.get(engine)
            if f is None:
                continue
            ft = f["first_token"]
            first = "-" if ft is None else (f"{ft['total_s']:.2f} ({ft['audio_s']:.2f} + "
                                            f"{ft['total_s'] - ft['audio_s']:.2f})")
            lines.append(
                f"| {r['model']} | {r['policy']} | {'NeMo' if engine == 'nemo' else 'mlx-canary'} | "
                f"{f['chunk_ms_median']:.0f} | {f['chunk_ms_p90']:.0f} | {f['wall_ms_median']:.0f} | "
                f"{f['steady_windows']} ({f['steady_emitting']}) | {f['rtf']:.2f} | {first} | "
                f"{f['laal_ms']:.1f} | {f['tokens']} | {r['equal']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="180m,1b,demo",
                    help="180m, 1b (random weights, both engines), demo (the bundled trained model, mlx-canary "
                         "only: real words, so a LAAL that means something)")
    ap.add_argument("--policies", default="waitk,alignatt")
    ap.add_argument("--seconds", type=float, default=24.0)
    ap.add_argument("--setting", default="10-1-0.5", help="left-chunk-right seconds")
    ap.add_argument("--engines", default="nemo,mlx")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    ap.add_argument("--cache", type=Path, default=HERE / ".cache",
                    help="benchmark cache (models in <cache>/models, see nemo_models.py)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--out-json", type=Path, help=argparse.SUPPRESS)
    for hidden in ("--model-dir", "--nemo", "--audio", "--warmup", "--reference"):
        ap.add_argument(hidden, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        res = {"mlx": worker_mlx, "nemo": worker_nemo}[args.worker](args)
        args.out_json.write_text(json.dumps(res))
        return 0

    engines = args.engines.split(",")
    setting = tuple(float(x) for x in args.setting.split("-"))
    models = args.cache / "models"
    audio = make_audio(args.cache, args.seconds)
    out_dir = args.cache / "streaming-logs"
    out_dir.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()
    rows, raw = [], {}
    for name in args.models.split(","):
        for step in ("build", "convert") if name != "demo" else ():
            if step == "build" and nemo_models.is_built(models, name):
                continue
            if step == "convert" and nemo_models.is_converted(models, name):
                continue
            subprocess.run([sys.executable, str(HERE / "nemo_models.py"), step, "--model", name, "--cache",
                            str(models)], check=True, stdout=subprocess.DEVNULL)
        results = {}
        for engine in engines if name != "demo" else ["mlx"]:
            print(f"[streaming_speed] {name}: {engine} ...", file=sys.stderr, flush=True)
            results[engine] = run_worker(engine, args, name, audio, out_dir)
        raw[name] = results
        hashes = {r["audio_sha"] for r in results.values()}
        if len(hashes) > 1:
            raise SystemExit(f"the engines read different samples from {audio['path']}: {hashes}")
        for policy in args.policies.split(","):
            row = {"model": name, "policy": policy}
            for engine, res in results.items():
                row[engine] = figures(res["runs"][policy], setting, audio, args.clock)
            runs = [res["runs"][policy] for res in results.values()]
            row["equal"] = "yes" if len(runs) == 2 and runs[0]["tokens"] == runs[1]["tokens"] and \
                runs[0]["prompt"] == runs[1]["prompt"] else ("-" if len(runs) < 2 else "NO")
            rows.append(row)
        print(f"{name}: " + "; ".join(f"{e}: {r.get('torch') or r.get('blas')}, other load "
                                      f"{r['other_load_cores']:.2f} cores" for e, r in results.items()),
              flush=True)
    load1 = os.getloadavg()
    print(f"setting {args.setting}; {audio['seconds']:g} s of speech (onset {audio['speech_onset_s']:.2f} s); "
          f"{args.threads} thread(s) per engine; load average before {load0[0]:.2f}, after {load1[0]:.2f} on "
          f"{os.cpu_count()} cores")
    print(table(rows, args.clock))
    path = args.json or args.cache / f"streaming-speed-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"setting": args.setting, "audio": audio, "clock": args.clock,
                                "threads": args.threads, "load": [load0, load1], "rows": rows, "raw": raw},
                               indent=1))
    print(f"JSON: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
