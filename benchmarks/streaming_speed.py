"""Streaming compute per chunk at canary-180m-flash / canary-1b-flash dimensions (random weights, MLX).

    python benchmarks/streaming_speed.py [--models 180m,1b] [--seconds 40] [--setting 10-1-0.5]

Builds the network straight from a configuration with the released models' encoder/decoder sizes (the bundled
demo model's tokenizer and vocabulary stand in; no NeMo needed), streams ``--seconds`` of the demo speech clip
repeated through ``StreamingSession`` in 1-chunk pieces, and prints per-chunk compute (median and 90th
percentile over the windows after the left context has filled) and the real-time factor. Random weights do
not stop talking, so the hallucination detector is off: every window runs its policy's full decoder work.
Writes the figures as JSON to ``--json`` when given. Asserts nothing about time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

# First: importing the package binds MLX's CPU BLAS (MKL / OpenBLAS); mlx.core imported earlier would keep
# MLX's slow reference BLAS.
from mlx_canary import load_model  # isort: skip

import mlx.core as mx
import numpy as np

from mlx_canary.audio import load_audio
from mlx_canary.loading import DEMO_MODEL_DIR
from mlx_canary.model import Canary
from mlx_canary.prompts import build_prompt
from mlx_canary.streaming import StreamingSession
from mlx_canary.streaming_policy import StreamingOptions

# (encoder layers, encoder width, projection) with a 4 x 1024 decoder (benchmarks/nemo_models.py's shapes)
SHAPES = {"180m": (17, 512), "1b": (32, 1024)}


def network(name: str, demo) -> Canary:
    layers, width = SHAPES[name]
    cfg = demo.config
    config = dataclasses.replace(
        cfg,
        preprocessor=dataclasses.replace(cfg.preprocessor, n_mels=128),
        encoder=dataclasses.replace(cfg.encoder, feat_in=128, d_model=width, n_layers=layers, n_heads=8,
                                    subsampling_conv_channels=256),
        decoder=dataclasses.replace(cfg.decoder, hidden_size=1024, num_layers=4, num_heads=8, inner_size=4096,
                                    max_sequence_length=1024),
    )
    net = Canary(config)
    # A real Hann window and a mel-like filterbank so that the front end does real work on real numbers.
    p = config.preprocessor
    net.preprocessor.window = mx.array(np.hanning(p.win_length).astype(np.float32))
    bank = np.abs(np.random.default_rng(0).standard_normal((p.n_mels, p.n_fft // 2 + 1))).astype(np.float32)
    net.preprocessor.filterbank = mx.array(bank / bank.sum(axis=1, keepdims=True))
    mx.eval(net.parameters())
    net.eval()
    return net


def run(name: str, policy: str, setting: tuple, seconds: float, demo, audio) -> dict:
    net = network(name, demo)
    left, chunk, right = setting
    options = StreamingOptions(policy=policy, left_context_secs=left, chunk_secs=chunk, right_context_secs=right,
                               hallucinations_detector=False, history="window")
    prompt = build_prompt(demo.tokenizer, demo.config.prompt_format, source_lang="en", target_lang="en", pnc=True)
    session = StreamingSession(net, demo.tokenizer, prompt, options)
    piece = session.geometry.chunk_samples
    times, windows_before = [], []
    for at in range(0, audio.size, piece):
        start = time.perf_counter()
        session.feed(audio[at : at + piece])
        times.append(time.perf_counter() - start)
    start = time.perf_counter()
    result = session.finish()
    total = sum(times) + time.perf_counter() - start
    steady = times[int(left / chunk) + 2 :] or times
    return {
        "model": name, "policy": policy, "setting": "-".join(f"{x:g}" for x in setting),
        "audio_s": round(audio.size / 16000, 2), "tokens": len(result.tokens),
        "chunk_ms_median": round(1000 * float(np.median(steady)), 1),
        "chunk_ms_p90": round(1000 * float(np.percentile(steady, 90)), 1),
        "rtf": round(total / (audio.size / 16000), 3),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="180m,1b")
    ap.add_argument("--policies", default="waitk,alignatt")
    ap.add_argument("--seconds", type=float, default=40.0)
    ap.add_argument("--setting", default="10-1-0.5", help="left-chunk-right seconds")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    setting = tuple(float(x) for x in args.setting.split("-"))
    demo = load_model(DEMO_MODEL_DIR, dtype="float32").engine
    clip = load_audio(DEMO_MODEL_DIR / "sample.wav")
    audio = np.tile(np.concatenate([clip, np.zeros(8000, np.float32)]), int(args.seconds * 16000 / clip.size) + 1)
    audio = audio[: int(args.seconds * 16000)]
    rows = []
    print(f"{'model':6} {'policy':9} {'setting':9} {'chunk ms (median)':>18} {'p90':>8} {'RTF':>6} {'tokens':>7}")
    for name in args.models.split(","):
        for policy in args.policies.split(","):
            r = run(name, policy, setting, args.seconds, demo, audio)
            rows.append(r)
            print(f"{r['model']:6} {r['policy']:9} {r['setting']:9} {r['chunk_ms_median']:>18} "
                  f"{r['chunk_ms_p90']:>8} {r['rtf']:>6} {r['tokens']:>7}", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": str(mx.default_device()), "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
