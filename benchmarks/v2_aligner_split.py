"""Where canary-1b-v2's aligner pass goes, stage by stage, NeMo beside mlx-canary (one thread, process CPU time).

Uses the model ``v2_timestamps.py`` builds and converts (run it first; same ``--cache``). Per engine, in its own
process, the aligner pass over a clip split into: features (log-mel with per-feature normalisation), subsampling
(dw_striding x8), the conformer layers' feed-forwards, self-attention and convolution modules, and the CTC head +
log-softmax. NeMo is timed with forward hooks (eager torch); mlx-canary stage by stage with ``mx.eval`` between
stages (their sum matches the lazy pass within a few %). Mean of ``--reps`` warm runs.

  python benchmarks/v2_aligner_split.py [--cache benchmarks/.cache/v2_1b] [--seconds 30] [--reps 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from v2_timestamps import DEFAULT_CACHE, clip  # noqa: E402

STAGES = ["features", "subsampling", "layers.ff", "layers.attn", "layers.conv", "head+log_softmax", "whole pass"]


def split_mlx(cache: Path, seconds: float, reps: int) -> dict:
    import mlx_canary
    import mlx.core as mx

    aligner = mlx_canary.load_model(cache / "mlx-float32").engine.aligner
    net, enc = aligner.net, aligner.net.encoder
    wave = clip(seconds, 0)
    out: dict = {}

    def timed(name, fn, record):
        start = time.process_time()
        result = fn()
        mx.eval(result)
        if record:
            out[name] = out.get(name, 0.0) + (time.process_time() - start) / reps
        return result

    for rep in range(reps + 1):
        record = rep > 0
        audio, lengths = mx.array(wave[None]), mx.array([wave.size], dtype=mx.int32)
        features, frames = timed("features", lambda: net.preprocessor(audio, lengths, pad_to=0), record)
        x, _ = timed("subsampling", lambda: enc.pre_encode(features.astype(net.dtype), frames, False), record)
        pos = enc.positions(x.shape[1], x.dtype)
        for layer in enc.layers:
            x = timed("layers.ff", lambda: x + 0.5 * layer.feed_forward1(layer.norm_feed_forward1(x)), record)
            x = timed("layers.attn", lambda: x + layer.self_attn(layer.norm_self_att(x), pos, None, None), record)
            x = timed("layers.conv", lambda: x + layer.conv(layer.norm_conv(x), None), record)
            x = timed("layers.ff", lambda: x + 0.5 * layer.feed_forward2(layer.norm_feed_forward2(x)), record)
            x = timed("layers.norm_out", lambda: layer.norm_out(x), record)

        def head():
            logits = net.head(x).astype(mx.float32)
            return logits - mx.logsumexp(logits, axis=-1, keepdims=True)

        timed("head+log_softmax", head, record)
        start = time.process_time()
        aligner.log_probs(wave)
        if record:
            out["whole pass"] = out.get("whole pass", 0.0) + (time.process_time() - start) / reps
    return out


def split_nemo(cache: Path, seconds: float, reps: int) -> dict:
    import torch

    from nemo.collections.asr.models import EncDecMultiTaskModel

    ctc = EncDecMultiTaskModel.restore_from(str(cache / "model.nemo"), map_location="cpu").timestamps_asr_model
    ctc.eval()
    times: dict = {}

    def hook(name, module):
        def pre(mod, args):
            mod._split_start = time.process_time()

        def post(mod, args, result):
            times[name] = times.get(name, 0.0) + time.process_time() - mod._split_start

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)

    hook("features", ctc.preprocessor)
    hook("subsampling", ctc.encoder.pre_encode)
    hook("head+log_softmax", ctc.decoder)
    for layer in ctc.encoder.layers:
        hook("layers.ff", layer.feed_forward1)
        hook("layers.ff", layer.feed_forward2)
        hook("layers.attn", layer.self_attn)
        hook("layers.conv", layer.conv)
    audio = torch.from_numpy(clip(seconds, 0))
    out: dict = {}
    with torch.no_grad():
        for rep in range(reps + 1):
            times.clear()
            start = time.process_time()
            ctc.transcribe([audio], batch_size=1, return_hypotheses=True, verbose=False)
            whole = time.process_time() - start
            if rep:
                for name, t in list(times.items()) + [("whole pass", whole)]:
                    out[name] = out.get(name, 0.0) + t / reps
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--engine", choices=["nemo", "mlx"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.engine:
        if args.engine == "nemo":
            import torch

            torch.set_num_threads(args.threads)
            torch.set_flush_denormal(True)  # as the other benchmarks: random weights leave subnormals
        split = (split_nemo if args.engine == "nemo" else split_mlx)(args.cache, args.seconds, args.reps)
        print(json.dumps(split))
        return 0
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               OPENBLAS_NUM_THREADS=str(args.threads), PYTHONPATH=str(HERE.parent))
    result = {}
    for engine in ("nemo", "mlx"):
        cmd = [sys.executable, __file__, "--engine", engine, "--cache", str(args.cache), "--seconds",
               str(args.seconds), "--reps", str(args.reps), "--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise SystemExit(f"{engine} failed:\n{proc.stderr[-4000:]}")
        result[engine] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"{args.seconds:g} s clip, {args.threads} thread(s), CPU s, load average {os.getloadavg()[0]:.1f}")
    print("| stage | NeMo | mlx-canary | mlx - NeMo |\n|---|---|---|---|")
    for stage in STAGES:
        n, m = result["nemo"].get(stage, 0.0), result["mlx"].get(stage, 0.0)
        print(f"| {stage} | {n:.3f} | {m:.3f} | {m - n:+.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
