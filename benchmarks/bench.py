"""NeMo (PyTorch) vs mlx-canary, side by side on the same audio and the same (random) weights.

    /work/venv/bin/python benchmarks/bench.py [--models 180m,1b] [--runs 3] [--audio-seconds 15]
    python benchmarks/bench.py --device gpu --mlx-dtypes float32,bfloat16   # NeMo on CUDA vs MLX's CUDA backend

Every engine runs in its own subprocess (peak RSS and start-up are its own; the mlx-canary process never imports
torch or NeMo). Models are random-weight NeMo checkpoints with the real dimensions (nemo_models.py), built and
converted once into benchmarks/.cache/. Results: a markdown table on stdout, JSON in benchmarks/results/.
What each number means is written next to it in the table and in README.md.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import inspect
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))  # mlx_canary from this checkout

import nemo_models  # noqa: E402  (imports neither torch nor NeMo at module level)

DEFAULT_CACHE = HERE / ".cache"
RESULTS = HERE / "results"
THREADS = int(os.environ.get("CANARY_BENCH_THREADS", "2"))
WORKER_TIMEOUT = 3600

SPEECH_TEXT = (
    "Good morning, and welcome to the weekly project meeting. Today we will review the progress of the speech "
    "recognition system, look at the latest benchmark numbers, and decide which features to ship next. "
    "The new model converts checkpoints in a few seconds and runs on a laptop without a graphics card. "
    "Please keep your questions short, and write down anything we cannot answer today, so that we can follow up "
    "by email before Friday. Our next meeting is on the third of June at half past ten in the small room."
)

# ------------------------------------------------------------------------------------------------------------
# Small helpers shared by the workers.


def vm_kib(field: str) -> int:
    """VmHWM (peak RSS) / VmRSS of this process, KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def median(xs):
    return statistics.median(xs) if xs else None


CLOCK = {"fn": time.perf_counter}
CLOCK_NAME = {"name": "wall (time.perf_counter)"}
DEVICE = {"name": "cpu"}  # "gpu": NeMo on CUDA, mlx-canary on MLX's GPU backend (set per worker by --device)


def now() -> float:
    """The measurement clock: wall time, or with --clock cpu this process's CPU time (all threads).

    CPU time is what a run would take on an idle machine only when the engine runs on one thread (--threads 1):
    with more threads it adds up the threads and their spin-waits.
    """
    return CLOCK["fn"]()


def timed_runs(fn, runs: int, warmup: int = 1):
    """[seconds] of `runs` calls after `warmup` discarded calls; returns (times, last result)."""
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(runs):
        t = now()
        out = fn()
        times.append(now() - t)
    return times, out


def step_summary(steps: list[float]) -> dict:
    """Per decoder-step times (s): step 0 is the prompt pass, steps 1.. the cached one-token steps."""
    if not steps:
        return {}
    rest = steps[1:]
    return {
        "n_steps": len(steps),
        "prompt_step_ms": steps[0] * 1e3,
        "step_ms_mean": (sum(rest) / len(rest) * 1e3) if rest else None,
        "step_ms_first64": (sum(rest[:64]) / len(rest[:64]) * 1e3) if rest else None,
        "step_ms_last64": (sum(rest[-64:]) / len(rest[-64:]) * 1e3) if rest else None,
        "cumulative_s": _cumulative(steps),
    }


def _cumulative(steps):
    acc, out = 0.0, []
    for s in steps:
        acc += s
        out.append(round(acc, 5))
    return out


def use_torch_device(torch) -> str:
    """The torch device of this worker; on CUDA the clock synchronizes first, so timed sections include the
    GPU work they queued (MLX needs no such step: mx.eval / .item() return when the work is done)."""
    if DEVICE["name"] != "gpu":
        return "cpu"
    if not torch.cuda.is_available():
        raise SystemExit("--device gpu: torch sees no CUDA device")
    host_clock = CLOCK["fn"]

    def synced():
        torch.cuda.synchronize()
        return host_clock()

    CLOCK["fn"] = synced
    return "cuda"


def use_mlx_device() -> str:
    import mlx.core as mx

    if DEVICE["name"] == "gpu":
        if not mx.is_available(mx.gpu):
            raise SystemExit("--device gpu: MLX has no GPU backend here (install mlx[cuda13] / mlx[cuda12])")
        mx.set_default_device(mx.gpu)
    else:
        mx.set_default_device(mx.cpu)
    return str(mx.default_device())


# ------------------------------------------------------------------------------------------------------------
# Worker: machine throughput (fp32 GEMM).


def worker_machine_mlx(args) -> dict:
    import mlx_canary  # noqa: F401  (loads OpenBLAS for MLX first)
    from mlx_canary import _blas
    import mlx.core as mx
    import numpy as np

    res = {"mlx_blas": _blas.loaded_blas, "mlx_version": mx.__version__, "numpy_version": np.__version__,
           "mlx_device": use_mlx_device()}
    for m, k, n in json.loads(args.gemm_shapes):
        a = mx.random.normal((m, k))
        b = mx.random.normal((k, n))
        mx.eval(a, b)
        times, _ = timed_runs(lambda: mx.eval(a @ b), args.runs_gemm, warmup=2)
        res[f"mlx_gflops_{m}x{k}x{n}"] = 2 * m * k * n / median(times) / 1e9
        if DEVICE["name"] == "gpu":  # half precision is the GPU default compute dtype
            ah, bh = a.astype(mx.bfloat16), b.astype(mx.bfloat16)
            mx.eval(ah, bh)
            times, _ = timed_runs(lambda: mx.eval(ah @ bh), args.runs_gemm, warmup=2)
            res[f"mlx_bf16_gflops_{m}x{k}x{n}"] = 2 * m * k * n / median(times) / 1e9
        an = np.random.standard_normal((m, k)).astype(np.float32)
        bn = np.random.standard_normal((k, n)).astype(np.float32)
        times, _ = timed_runs(lambda: an @ bn, args.runs_gemm, warmup=2)
        res[f"numpy_gflops_{m}x{k}x{n}"] = 2 * m * k * n / median(times) / 1e9
    # One decoder token: (1 x 1024) @ W^T with W stored (4096, 1024), as nn.Linear does.
    for n_out, n_in in ((4096, 1024), (1024, 4096)):
        w = mx.random.normal((n_out, n_in))
        x = mx.random.normal((1, n_in))
        mx.eval(w, x)
        times, _ = timed_runs(lambda: mx.eval(x @ w.T), 20, warmup=3)
        res[f"mlx_gemv_{n_in}->{n_out}_gbps"] = n_out * n_in * 4 / median(times) / 1e9
        wn = np.random.standard_normal((n_out, n_in)).astype(np.float32)
        xn = np.random.standard_normal((1, n_in)).astype(np.float32)
        times, _ = timed_runs(lambda: xn @ wn.T, 20, warmup=3)
        res[f"numpy_gemv_{n_in}->{n_out}_gbps"] = n_out * n_in * 4 / median(times) / 1e9
    big = np.ones(64 * 2**20, dtype=np.float32)  # 256 MiB
    dst = np.empty_like(big)
    times, _ = timed_runs(lambda: np.copyto(dst, big), 5, warmup=1)
    res["numpy_copy_gbps"] = 2 * big.nbytes / median(times) / 1e9  # read + write
    times, _ = timed_runs(lambda: big.sum(), 5, warmup=1)
    res["numpy_sum_read_gbps"] = big.nbytes / median(times) / 1e9
    # Elementwise transcendental throughput (single op, 8M elements): MLX CPU vs NumPy.
    xe = mx.random.normal((8 * 2**20,))
    mx.eval(xe)
    times, _ = timed_runs(lambda: mx.eval(mx.sigmoid(xe)), 5, warmup=1)
    res["mlx_sigmoid_ns_per_elem"] = median(times) / xe.size * 1e9
    import mlx.nn as nn

    from mlx_canary import activations

    times, _ = timed_runs(lambda: mx.eval(nn.silu(xe)), 5, warmup=1)
    res["mlx_silu_ns_per_elem"] = median(times) / xe.size * 1e9
    times, _ = timed_runs(lambda: mx.eval(activations.silu(xe)), 5, warmup=1)
    res["mlx_canary_silu_ns_per_elem"] = median(times) / xe.size * 1e9
    times, _ = timed_runs(lambda: mx.eval(xe + 1.0), 5, warmup=1)
    res["mlx_add_ns_per_elem"] = median(times) / xe.size * 1e9
    xen = np.random.standard_normal(8 * 2**20).astype(np.float32)
    times, _ = timed_runs(lambda: xen / (1.0 + np.exp(-xen)), 5, warmup=1)
    res["numpy_silu_ns_per_elem"] = median(times) / xen.size * 1e9
    try:
        cfg = np.show_config(mode="dicts")  # numpy >= 1.25
        res["numpy_blas"] = cfg.get("Build Dependencies", {}).get("blas", {}).get("name")
    except Exception:  # informational only
        pass
    return res


def worker_machine_torch(args) -> dict:
    import torch

    torch.set_num_threads(THREADS)
    dev = use_torch_device(torch)
    res = {"torch_version": torch.__version__, "torch_threads": torch.get_num_threads(), "torch_device": dev}
    if dev == "cuda":
        res["gpu_name"] = torch.cuda.get_device_name()
        res["torch_allow_tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    for m, k, n in json.loads(args.gemm_shapes):
        a = torch.randn(m, k, device=dev)
        b = torch.randn(k, n, device=dev)
        with torch.inference_mode():
            times, _ = timed_runs(lambda: a @ b, args.runs_gemm, warmup=2)
            res[f"torch_gflops_{m}x{k}x{n}"] = 2 * m * k * n / median(times) / 1e9
            if dev == "cuda":
                ah, bh = a.bfloat16(), b.bfloat16()
                times, _ = timed_runs(lambda: ah @ bh, args.runs_gemm, warmup=2)
                res[f"torch_bf16_gflops_{m}x{k}x{n}"] = 2 * m * k * n / median(times) / 1e9
    with torch.inference_mode():
        for n_out, n_in in ((4096, 1024), (1024, 4096)):
            w = torch.randn(n_out, n_in, device=dev)
            x = torch.randn(1, n_in, device=dev)
            times, _ = timed_runs(lambda: torch.nn.functional.linear(x, w), 20, warmup=3)
            res[f"torch_gemv_{n_in}->{n_out}_gbps"] = n_out * n_in * 4 / median(times) / 1e9
        xe = torch.randn(8 * 2**20, device=dev)
        times, _ = timed_runs(lambda: torch.nn.functional.silu(xe), 5, warmup=1)
        res["torch_silu_ns_per_elem"] = median(times) / xe.numel() * 1e9
    return res


# ------------------------------------------------------------------------------------------------------------
# Worker: mlx-canary (no torch, no NeMo).


def worker_mlx(args) -> dict:
    t_enter = time.time()
    import numpy as np

    t0 = time.perf_counter()
    import mlx_canary
    from mlx_canary import _blas
    import mlx.core as mx
    from mlx_canary import audio as audio_io
    from mlx_canary.decoding import generation_budget, greedy_decode
    from mlx_canary.options import Task, TranscribeOptions
    from mlx_canary.transformer import cross_mask, prompt_self_mask

    import_s = time.perf_counter() - t0
    assert "torch" not in sys.modules and "nemo" not in sys.modules, "mlx worker must not import torch/NeMo"
    res = {"blas": _blas.loaded_blas, "mlx_version": mx.__version__, "python_start_to_main_s": t_enter - args.t0,
           "import_s": import_s, "device": use_mlx_device(), "MLX_ENABLE_TF32": os.environ.get("MLX_ENABLE_TF32")}

    t0 = time.perf_counter()
    model = mlx_canary.load_model(args.model_dir, dtype=args.dtype)
    res["load_s"] = time.perf_counter() - t0
    res["dtype"] = str(model.engine.net.dtype).replace("mlx.core.", "")
    res["rss_after_load_mib"] = vm_kib("VmRSS") / 1024

    kwargs = dict(source_lang="en", target_lang="en", pnc=True, batch_size=1)
    t0, c0 = time.perf_counter(), time.process_time()
    first = model.transcribe(args.wav, **kwargs)
    res["first_transcribe_s"] = time.perf_counter() - t0
    res["first_transcribe_cpu_s"] = time.process_time() - c0
    res["start_to_first_transcript_s"] = time.time() - args.t0
    tokens = list(first.tokens)
    res["tokens"] = tokens
    res["text_head"] = first.text[:80]

    # Warm transcribe() calls, whole pipeline (file decode by ffmpeg, features, encoder, decoding, detokenise).
    totals = []
    for _ in range(args.runs):
        t0 = now()
        tr = model.transcribe(args.wav, **kwargs)
        totals.append(now() - t0)
        assert list(tr.tokens) == tokens, "mlx-canary is not deterministic across runs"
    res["transcribe_s"] = totals

    # Components on the same input.
    net = model.engine.net
    t0 = now()
    wave = audio_io.load(args.wav)
    res["audio_load_s"] = now() - t0
    audio = mx.array(wave[None].astype(np.float32))
    lengths = mx.array([len(wave)], dtype=mx.int32)

    def feats():
        f, fl = net.features(audio, lengths)
        mx.eval(f, fl)
        return f, fl

    times, (f, fl) = timed_runs(feats, args.runs)
    res["features_s"] = times
    res["n_feature_frames"] = int(f.shape[1])

    def enc():
        e, el = net.encode(f, fl)
        mx.eval(e, el)
        return e, el

    times, (e, el) = timed_runs(enc, args.runs)
    res["encoder_s"] = times
    res["t_enc"] = int(e.shape[1])

    settings = Task("en", "en", True, False)
    prompt = model.engine.prompt(settings)
    options = model.engine.decode_options(TranscribeOptions())
    prompts = mx.array([prompt], dtype=mx.int32)
    res["prompt_ids"] = prompt

    def dec():
        return greedy_decode(net, e, el, prompts, options)

    times, toks = timed_runs(dec, args.runs)
    res["decode_s"] = times
    res["decode_tokens_equal_transcribe"] = toks[0] == tokens

    # Per-step profile: greedy_decode's computation, evaluated (and timed) one step at a time.
    budget = generation_budget(net, len(prompt), e.shape[1], options.max_generation_delta)
    budget += int(options.beam_strategy)
    res["budget"] = budget

    def stepwise():
        t0 = now()
        cache = net.decoder.new_cache(e, len(prompt) + budget)
        xmask = cross_mask(el, e.shape[1], e.dtype)
        mx.eval([(c.cross_keys, c.cross_values, c.keys, c.values) for c in cache.layers], xmask)
        cache_s = now() - t0
        steps, out = [], []
        nxt = None
        for i in range(budget):
            t = now()
            if i == 0:
                hidden = net.decode(prompts, cache, prompt_self_mask(prompts, options.pad_id, e.dtype), xmask)
                scores = net.logits(hidden[:, -1])
            else:
                scores = net.decode_step(nxt, cache, xmask)
            nxt = mx.argmax(scores, axis=-1).astype(mx.int32)
            tok = nxt.item()
            steps.append(now() - t)
            out.append(tok)
            if tok == options.eos_id:
                break
        return cache_s, steps, out

    _, (cache_s, steps, out) = timed_runs(stepwise, 1)
    res["cross_kv_s"] = cache_s
    res["steps"] = step_summary(steps)
    res["stepwise_tokens_equal"] = [t for t in out if t != options.eos_id] == tokens

    res["peak_rss_mib"] = vm_kib("VmHWM") / 1024
    res["mlx_peak_memory_mib"] = mx.get_peak_memory() / 2**20

    if args.profile:
        res["encoder_profile"] = profile_mlx_encoder(net, f, fl, e, args.runs)
        res["decoder_step_profile"] = profile_mlx_decoder_step(net, e, el, prompts, options, budget)
    return res


def _mlx_timer(records: dict):
    import mlx.core as mx

    def run(name, fn):
        t = now()
        out = fn()
        mx.eval(out)
        records[name] = records.get(name, 0.0) + now() - t
        return out

    return run


def profile_mlx_encoder(net, f, fl, e_ref, runs: int) -> dict:
    """Encoder time by block and by operation, each evaluated on its own (so MLX cannot fuse across them).

    Mirrors ConformerEncoder / ConformerLayer / RelPositionAttention / ConvModule call by call; the result is
    checked against the real encoder output (max_abs_diff). Sums are per full encoder pass (all layers).
    """
    import mlx.core as mx
    from mlx_canary import activations as A
    from mlx_canary import conformer as C

    enc = net.encoder
    cfg = enc.cfg
    best = None
    for _ in range(max(2, runs)):
        rec: dict = {}
        run = _mlx_timer(rec)
        x, lengths = _profile_pre_encode(enc.pre_encode, f, fl, run)
        if cfg.xscaling:
            x = run("xscale", lambda: x * math.sqrt(cfg.d_model))
        t = x.shape[1]
        pos = run("masks + positions", lambda: enc.positions(t, x.dtype))
        keep = C._time_mask(lengths, t)
        pair = keep[:, None, :, None] & keep[:, None, None, :]
        att_mask = run("masks + positions", lambda: mx.where(pair, 0.0, C.ATTENTION_MASK_VALUE).astype(x.dtype))
        valid = keep[:, :, None]
        # The encoder reads each layer's projected positions from a per-length-bucket cache (computed by the
        # warm-up run); beyond its range it projects them per call.
        projected = enc.projected_positions(t, x.dtype) or [None] * len(enc.layers)
        for layer, projected_pos in zip(enc.layers, projected):
            a = layer.self_attn
            # feed-forward 1
            y = run("layer norms", lambda: layer.norm_feed_forward1(x))
            h = run("ff: linear1 (d->4d)", lambda: layer.feed_forward1.linear1(y))
            h = run("ff: silu", lambda: A.silu(h))
            h = run("ff: linear2 (4d->d)", lambda: layer.feed_forward1.linear2(h))
            x = run("residual adds", lambda: x + 0.5 * h)
            # self-attention
            y = run("layer norms", lambda: layer.norm_self_att(x))
            b, tt, _ = y.shape
            hh, dk = a.n_heads, a.d_k
            q = run("attn: q/k/v projections", lambda: a.linear_q(y).reshape(b, tt, hh, dk))
            k = run("attn: q/k/v projections", lambda: a.linear_k(y).reshape(b, tt, hh, dk).transpose(0, 2, 1, 3))
            v = run("attn: q/k/v projections", lambda: a.linear_v(y).reshape(b, tt, hh, dk).transpose(0, 2, 1, 3))
            p = run("attn: pos projection", lambda: (a.linear_pos(pos) if projected_pos is None else projected_pos)
                    .reshape(-1, hh, dk).transpose(1, 0, 2))
            q_u = run("attn: +u/+v biases", lambda: (q + a.pos_bias_u).transpose(0, 2, 1, 3))
            q_v = run("attn: +u/+v biases", lambda: (q + a.pos_bias_v).transpose(0, 2, 1, 3))
            bd = run("attn: q_v @ p^T (T x 2T-1)", lambda: q_v @ p.swapaxes(-1, -2))
            bd = run("attn: rel_shift", lambda: C._rel_shift(bd))
            scale = 1.0 / math.sqrt(dk)
            m = run("attn: bias mask bd*scale+mask", lambda: bd * scale + att_mask)
            o = run("attn: q_u k^T, softmax, @v", lambda: C._attend(q_u, k, v, scale, m))
            o = run("attn: out projection", lambda: a.linear_out(o.transpose(0, 2, 1, 3).reshape(b, tt, hh * dk)))
            x = run("residual adds", lambda: x + o)
            # convolution module
            cm = layer.conv
            y = run("layer norms", lambda: layer.norm_conv(x))
            y = run("conv: pointwise1 (d->2d)", lambda: cm.pointwise_conv1(y))
            y = run("conv: glu + mask", lambda: mx.where(valid, A.glu(*mx.split(y, 2, axis=-1)), 0.0))
            y = run("conv: depthwise (k=9)", lambda: cm.depthwise_conv(y))
            y = run("conv: batchnorm + silu", lambda: A.silu(cm.batch_norm(y)))
            y = run("conv: pointwise2 (d->d)", lambda: cm.pointwise_conv2(y))
            x = run("residual adds", lambda: x + y)
            # feed-forward 2
            y = run("layer norms", lambda: layer.norm_feed_forward2(x))
            h = run("ff: linear1 (d->4d)", lambda: layer.feed_forward2.linear1(y))
            h = run("ff: silu", lambda: A.silu(h))
            h = run("ff: linear2 (4d->d)", lambda: layer.feed_forward2.linear2(h))
            x = run("residual adds", lambda: x + 0.5 * h)
            x = run("layer norms", lambda: layer.norm_out(x))
        if "encoder_decoder_proj" in net:
            x = run("encoder_decoder_proj", lambda: net.encoder_decoder_proj(x))
        total = sum(rec.values())
        if best is None or total < best[0]:
            best = (total, rec, x)
    total, rec, x = best
    return {"ops_s": dict(sorted(rec.items(), key=lambda kv: -kv[1])), "sum_s": total,
            "max_abs_diff_vs_encode": float(mx.abs(x - e_ref).max().item())}


def _profile_pre_encode(ps, f, lengths, run):
    """DwStridingSubsampling.__call__, one module at a time."""
    import mlx.nn as nn
    from mlx_canary import conformer as C

    x = f[..., None]
    x = run("pre_encode: time masks", lambda: x * C._time_mask(lengths, x.shape[1])[:, :, None, None])
    for layer in ps.conv:
        if isinstance(layer, nn.ReLU):
            x = run("pre_encode: relu", lambda: nn.relu(x))
            continue
        if isinstance(layer, C.Conv2dNHWC):
            label = "pre_encode: conv2d 3x3 s2 (1->C)" if layer.groups == 1 else "pre_encode: depthwise conv2d 3x3 s2"
            lengths = C._conv_length(lengths)
        else:
            label = "pre_encode: pointwise CxC"
        x = run(label, lambda: layer(x))
        x = run("pre_encode: time masks",
                lambda: x * C._time_mask(lengths, x.shape[1])[:, :, None, None].astype(x.dtype))
    b, t, fr, c = x.shape
    x = run("pre_encode: out linear (C*F/8 -> d)", lambda: ps.out(x.reshape(b, t, fr * c)))
    return x, lengths


def profile_mlx_decoder_step(net, e, el, prompts, options, budget: int, n_steps: int = 32) -> dict:
    """One cached decoder step split by operation (evaluated separately, unfused and over the filled prefix only,
    unlike the compiled TransformerDecoder.step), averaged over n_steps after the prompt."""
    import mlx.core as mx
    from mlx_canary.transformer import cross_mask, prompt_self_mask

    dec = net.decoder
    cache = dec.new_cache(e, prompts.shape[1] + budget)
    xmask = cross_mask(el, e.shape[1], e.dtype)
    hidden = net.decode(prompts, cache, prompt_self_mask(prompts, options.pad_id, e.dtype), xmask)
    nxt = mx.argmax(net.logits(hidden[:, -1]), axis=-1).astype(mx.int32)
    mx.eval(nxt, [(c.keys, c.values, c.cross_keys, c.cross_values) for c in cache.layers])
    rec: dict = {}
    run = _mlx_timer(rec)
    n = min(n_steps, budget - 1)
    for _ in range(n):
        ids = nxt[:, None]
        start = cache.length
        x = run("embedding + LN", lambda: dec.embedding(ids, start))
        for layer, lc in zip(dec.layers, cache.layers):
            y = run("layer norms", lambda: layer.layer_norm_1(x))

            def self_kv():
                k, v = layer.self_attn.project_kv(y)
                lc.keys[:, :, start: start + 1] = k
                lc.values[:, :, start: start + 1] = v
                return lc.keys, lc.values

            run("self-attn: k/v proj + cache write", self_kv)
            keys, values = lc.keys[:, :, : start + 1], lc.values[:, :, : start + 1]
            o = run("self-attn: q proj + sdpa + out proj", lambda: layer.self_attn.attend(y, keys, values, None))
            x = run("residual adds", lambda: x + o)
            y = run("layer norms", lambda: layer.layer_norm_2(x))
            o = run("cross-attn: q proj + sdpa + out proj",
                    lambda: layer.cross_attn.attend(y, lc.cross_keys, lc.cross_values, xmask))
            x = run("residual adds", lambda: x + o)
            y = run("layer norms", lambda: layer.layer_norm_3(x))
            h = run("ffn: dense_in (1024->4096) + relu", lambda: layer.ffn.act(layer.ffn.dense_in(y)))
            h = run("ffn: dense_out (4096->1024)", lambda: layer.ffn.dense_out(h))
            x = run("residual adds", lambda: x + h)
        cache.length = start + 1
        x = run("final LN", lambda: dec.final_layer_norm(x))
        lg = run("head (1024 x 5248) + bias", lambda: net.logits(x[:, -1]))
        nxt = run("argmax", lambda: mx.argmax(lg, axis=-1).astype(mx.int32))
        nxt.item()
    ms = {k: v / n * 1e3 for k, v in sorted(rec.items(), key=lambda kv: -kv[1])}
    return {"per_step_ms": ms, "sum_ms": sum(ms.values()), "n_steps": n}


# ------------------------------------------------------------------------------------------------------------
# Worker: NeMo.


def worker_nemo(args) -> dict:
    t_enter = time.time()
    t0 = time.perf_counter()
    import torch

    torch.set_num_threads(THREADS)
    nemo_models.quiet_nemo(python_warnings=True)
    from nemo.collections.asr.models import EncDecMultiTaskModel

    import soundfile as sf

    nemo_models.quiet_nemo(python_warnings=True)
    res = {"torch_version": torch.__version__, "torch_threads": torch.get_num_threads(),
           "python_start_to_main_s": t_enter - args.t0, "import_s": time.perf_counter() - t0}
    import nemo

    res["nemo_version"] = nemo.__version__
    dev = use_torch_device(torch)
    res["device"] = dev
    if dev == "cuda":
        res["gpu_name"] = torch.cuda.get_device_name()
        res["torch_allow_tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
        res["torch_allow_tf32_cudnn"] = torch.backends.cudnn.allow_tf32

    t0 = time.perf_counter()
    model = EncDecMultiTaskModel.restore_from(args.nemo, map_location=dev)
    model.eval()
    res["load_s"] = time.perf_counter() - t0
    res["rss_after_load_mib"] = vm_kib("VmRSS") / 1024

    kwargs = dict(batch_size=1, return_hypotheses=True, verbose=False, num_workers=0, source_lang="en",
                  target_lang="en", pnc="yes")

    def transcribe():
        hyps = model.transcribe([args.wav], **kwargs)
        model.eval()  # NeMo leaves the decoder in train mode after transcribe()
        return hyps[0]

    t0, c0 = time.perf_counter(), time.process_time()
    hyp = transcribe()
    res["first_transcribe_s"] = time.perf_counter() - t0
    res["first_transcribe_cpu_s"] = time.process_time() - c0
    res["start_to_first_transcript_s"] = time.time() - args.t0
    tokens = [int(i) for i in hyp.y_sequence.tolist()]
    res["tokens"] = tokens
    res["text_head"] = hyp.text[:80]

    # Instrument transcribe(): model.forward = preprocessor + encoder (+ projection); decode_predictions_tensor =
    # greedy generation + hypothesis formatting; the generator's _one_step_forward = one decoder step.
    rec = {"forward": [], "decode": [], "steps": []}

    def wrap(obj, name, sink):
        orig = getattr(obj, name)

        def wrapped(*a, **k):
            t = now()
            out = orig(*a, **k)
            sink.append(now() - t)
            return out

        setattr(obj, name, wrapped)

    gen = model.decoding.decoding
    gen = getattr(gen, "greedy_search", None) or getattr(gen, "beam_search")
    wrap(model, "forward", rec["forward"])
    orig_decode = model.decoding.decode_predictions_tensor
    prompt_seen = []

    def decode_spy(*a, **k):
        prompt_seen.append(k["decoder_input_ids"][:1].clone())
        return orig_decode(*a, **k)

    model.decoding.decode_predictions_tensor = decode_spy
    wrap(model.decoding, "decode_predictions_tensor", rec["decode"])
    wrap(gen, "_one_step_forward", rec["steps"])

    totals, fwd, decs, steps_last = [], [], [], []
    for _ in range(args.runs):
        for v in rec.values():
            v.clear()
        t0 = now()
        h = transcribe()
        totals.append(now() - t0)
        assert [int(i) for i in h.y_sequence.tolist()] == tokens, "NeMo is not deterministic across runs"
        fwd.append(sum(rec["forward"]))
        decs.append(sum(rec["decode"]))
        steps_last = list(rec["steps"])
    res["transcribe_s"] = totals
    res["transcribe_forward_s"] = fwd
    res["transcribe_decode_s"] = decs
    res["steps"] = step_summary(steps_last)
    res["prompt_ids"] = prompt_seen[-1][0].tolist()
    for obj, name in ((model, "forward"), (model.decoding, "decode_predictions_tensor"), (gen, "_one_step_forward")):
        delattr(obj, name)

    # Components on the same input (soundfile, as lhotse reads it).
    wave, sr = sf.read(args.wav, dtype="float32")
    assert sr == 16000 and wave.ndim == 1
    x = torch.from_numpy(wave)[None].to(dev)
    xl = torch.tensor([len(wave)], device=dev)
    with torch.inference_mode():
        times, (f, fl) = timed_runs(lambda: model.preprocessor(input_signal=x, length=xl), args.runs)
        res["features_s"] = times
        res["n_feature_frames"] = int(f.shape[-1])

        def enc():
            e, el = model.encoder(audio_signal=f, length=fl)
            return model.encoder_decoder_proj(e.transpose(1, 2)), el

        times, (e, el) = timed_runs(enc, args.runs)
        res["encoder_s"] = times
        res["t_enc"] = int(e.shape[1])
        if args.profile:
            res["encoder_profile"] = profile_nemo_encoder(model, f, fl)
            res["decoder_step_profile"] = profile_nemo_decoder(model, gen, e, el, prompt_seen[-1])
    res["peak_rss_mib"] = vm_kib("VmHWM") / 1024
    if dev == "cuda":
        res["gpu_peak_memory_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return res


def time_module(mod, name: str, rec: dict) -> list:
    """Forward hooks that add the module's call time to ``rec[name]`` (torch runs synchronously on the CPU; on
    CUDA the clock synchronizes)."""
    start = {}

    def pre(_m, _i):
        start["t"] = now()

    def post(_m, _i, _o):
        rec[name] = rec.get(name, 0.0) + now() - start["t"]

    return [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]


def profile_nemo_encoder(model, f, fl) -> dict:
    """Encoder time by block (forward hooks; CPU execution is synchronous), summed over layers, one pass."""
    import torch

    rec: dict = {}
    hooks = []

    def add(mod, name):
        hooks.extend(time_module(mod, name, rec))

    enc = model.encoder
    add(enc.pre_encode, "pre_encode (dw_striding subsampling)")
    for layer in enc.layers:
        add(layer.feed_forward1, "ff1 + ff2 (linear, silu, linear)")
        add(layer.feed_forward2, "ff1 + ff2 (linear, silu, linear)")
        add(layer.self_attn, "self-attention (rel_pos)")
        add(layer.conv, "conv module")
        for n in ("norm_feed_forward1", "norm_self_att", "norm_conv", "norm_feed_forward2", "norm_out"):
            add(getattr(layer, n), "layer norms")
    add(enc, "encoder total")
    try:
        with torch.inference_mode():
            enc(audio_signal=f, length=fl)  # warm
            rec.clear()
            enc(audio_signal=f, length=fl)
    finally:
        for h in hooks:
            h.remove()
    total = rec.pop("encoder total")
    rec["other (residuals, pos enc, masks)"] = total - sum(rec.values())
    return {"ops_s": dict(sorted(rec.items(), key=lambda kv: -kv[1])), "sum_s": total}


def profile_nemo_decoder(model, gen, e, el, prompt, n_steps: int = 32) -> dict:
    """Average time of one NeMo decoder step at prefix length ~prompt+n_steps, split by sub-layer (hooks)."""
    import torch

    dec = model.transf_decoder
    rec: dict = {}
    hooks = []

    def add(mod, name):
        hooks.extend(time_module(mod, name, rec))

    for layer in dec.decoder.layers:
        add(layer.first_sub_layer, "self-attn (recomputes K/V of the whole prefix)")
        add(layer.second_sub_layer, "cross-attn (recomputes K/V of the encoder states)")
        add(layer.third_sub_layer, "ffn")
        for n in ("layer_norm_1", "layer_norm_2", "layer_norm_3"):
            add(getattr(layer, n), "layer norms (incl. LN over the whole prefix)")
    add(model.log_softmax, "head")
    add(dec.embedding, "embedding")
    steps = []
    orig = gen._one_step_forward

    def wrapped(*a, **k):
        t = now()
        out = orig(*a, **k)
        steps.append(now() - t)
        return out

    gen._one_step_forward = wrapped
    mask = (torch.arange(e.shape[1], device=e.device)[None] < el[:, None]).to(e.dtype)
    try:
        saved = gen.max_seq_length
        gen.max_seq_length = prompt.shape[1] + n_steps + 1  # decode exactly n_steps + 1 steps
        try:
            with torch.inference_mode():
                gen(decoder_input_ids=prompt, encoder_hidden_states=e, encoder_input_mask=mask)
        finally:
            gen.max_seq_length = saved
    finally:
        del gen._one_step_forward
        for h in hooks:
            h.remove()
    # rec holds prompt step + n cached steps; the prompt step's share is removed proportionally via step times.
    frac = sum(steps[1:]) / sum(steps) if sum(steps) else 1.0
    n = max(len(steps) - 1, 1)
    ms = {k: v * frac / n * 1e3 for k, v in sorted(rec.items(), key=lambda kv: -kv[1])}
    return {"per_step_ms": ms, "step_ms_mean": sum(steps[1:]) / n * 1e3, "n_steps": n,
            "note": "hook sums scaled by the cached steps' share of total step time"}


# ------------------------------------------------------------------------------------------------------------
# Orchestration.


WAIT_IDLE = {"seconds": 0.0, "note": print, "retries": 0}
DISTURBED = 0.2  # cores used by other processes during a worker above which its timings are not trusted


def run_worker(kind: str, log_dir: Path, extra: list[str], env_extra: dict | None = None) -> dict:
    """Run a worker; if other processes disturbed it, wait for an idle machine and retry (keep the best)."""
    best = None
    for attempt in range(1 + WAIT_IDLE["retries"]):
        if WAIT_IDLE["seconds"] > 0:
            wait_idle(WAIT_IDLE["seconds"], WAIT_IDLE["note"])
        res = _run_worker_once(kind, log_dir, extra, env_extra)
        res["attempt"] = attempt + 1
        if best is None or res["other_load_cores"] < best["other_load_cores"]:
            best = res
        if res["other_load_cores"] <= DISTURBED:
            break
        WAIT_IDLE["note"](f"worker {kind}: other processes used {res['other_load_cores']:.2f} cores meanwhile"
                          + ("; retrying" if attempt < WAIT_IDLE["retries"] else ""))
    return best


def _run_worker_once(kind: str, log_dir: Path, extra: list[str], env_extra: dict | None = None) -> dict:
    out_json = log_dir / f"{kind}-{int(time.time() * 1000)}.json"
    log = out_json.with_suffix(".log")
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), OPENBLAS_NUM_THREADS=str(THREADS),
               MKL_NUM_THREADS=str(THREADS), PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    env.update(env_extra or {})
    busy0, ru0 = _busy_cpu_s(), _children_cpu_s()
    t0 = time.time()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--out-json", str(out_json),
           "--t0", repr(t0), *extra]
    with open(log, "w") as lf:
        proc = subprocess.run(cmd, stdout=lf, stderr=subprocess.STDOUT, env=env, timeout=WORKER_TIMEOUT)
    wall = time.time() - t0
    if proc.returncode != 0 or not out_json.exists():
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"worker {kind} failed (rc {proc.returncode}); log {log}:\n{tail}")
    res = json.loads(out_json.read_text())
    res["worker_wall_s"] = wall
    own = _children_cpu_s() - ru0
    res["worker_cpu_s"] = own
    # CPU time spent by everything else on the machine while the worker ran, in cores: > ~0.2 means another
    # workload competed for the 2 cores and the worker's timings are not trustworthy.
    res["other_load_cores"] = max(0.0, (_busy_cpu_s() - busy0 - own) / wall)
    return res


def wait_idle(max_wait: float, note) -> float:
    """Wait (up to max_wait s) until other processes use < 0.3 cores over a 3 s window; returns that load."""
    deadline = time.time() + max_wait
    warned = False
    while True:
        b0, t0 = _busy_cpu_s(), time.time()
        time.sleep(3)
        load = (_busy_cpu_s() - b0) / (time.time() - t0)
        if load < 0.3 or time.time() > deadline:
            if load >= 0.3:
                note(f"machine still busy ({load:.1f} cores used by other processes); measuring anyway")
            return load
        if not warned:
            note(f"machine busy ({load:.1f} cores used by other processes); waiting up to {max_wait:.0f} s")
            warned = True
        time.sleep(7)


def _busy_cpu_s() -> float:
    with open("/proc/stat") as f:
        vals = [int(v) for v in f.readline().split()[1:]]
    idle = vals[3] + vals[4]  # idle + iowait
    return (sum(vals[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _children_cpu_s() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_json_worker(kind: str, cmd: list[str], env: dict, out_json: Path, pass_start_time: bool = False) -> dict:
    """Run a worker process that writes its figures to ``out_json`` (output in ``out_json``'s .log) and return
    them, with ``other_load_cores``: CPU time every other process took meanwhile, in cores (> ~0.2: another
    workload competed for the cores). ``pass_start_time``: give the worker its spawn time as ``--t0``."""
    log = out_json.with_suffix(".log")
    busy0, own0 = _busy_cpu_s(), _children_cpu_s()
    t0 = time.time()
    with open(log, "w") as lf:
        proc = subprocess.run(cmd + (["--t0", repr(t0)] if pass_start_time else []), stdout=lf,
                              stderr=subprocess.STDOUT, env=env)
    wall = time.time() - t0
    if proc.returncode or not out_json.exists():
        raise SystemExit(f"{kind} worker failed (rc {proc.returncode}); log {log}:\n"
                         + log.read_text(errors="replace")[-3000:])
    res = json.loads(out_json.read_text())
    res["other_load_cores"] = max(0.0, (_busy_cpu_s() - busy0 - (_children_cpu_s() - own0)) / wall)
    return res


def run_step(args_list: list[str], log: Path) -> dict:
    with open(log, "a") as lf:
        proc = subprocess.run([sys.executable, str(HERE / "nemo_models.py"), *args_list], stdout=subprocess.PIPE,
                              stderr=lf, text=True,
                              env=dict(os.environ, OMP_NUM_THREADS=str(THREADS)))
    if proc.returncode != 0:
        raise RuntimeError(f"nemo_models.py {' '.join(args_list)} failed; see {log}:\n"
                           + log.read_text(errors="replace")[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def make_audio(seconds: float, cache: Path) -> tuple[Path, dict]:
    """English speech from espeak-ng, 16 kHz mono PCM16, cut (or silence-padded) to exactly `seconds`."""
    d = cache / "audio"
    d.mkdir(parents=True, exist_ok=True)
    wav = d / f"speech_{seconds:g}s.wav"
    if not wav.exists():
        raw = d / "espeak_raw.wav"
        text = SPEECH_TEXT
        while True:
            subprocess.run(["espeak-ng", "-v", "en-us", "-s", "160", "-w", str(raw), text], check=True)
            dur = float(subprocess.run(["ffprobe", "-v", "error", "-show_entries", "format=duration", "-of",
                                        "csv=p=0", str(raw)], check=True, capture_output=True,
                                       text=True).stdout.strip())
            if dur >= seconds or len(text) > 20000:
                break
            text = text + " " + SPEECH_TEXT
        tmp = wav.with_suffix(".tmp.wav")
        subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-i", str(raw), "-ac", "1", "-ar", "16000",
                        "-af", f"apad=whole_dur={seconds}", "-t", f"{seconds}", "-c:a", "pcm_s16le", str(tmp)],
                       check=True)
        tmp.rename(wav)
        raw.unlink()
    import soundfile as sf

    info = sf.info(str(wav))
    return wav, {"path": str(wav), "seconds": info.frames / info.samplerate, "sample_rate": info.samplerate,
                 "channels": info.channels, "source": "espeak-ng en-us, 160 wpm"}


def encoder_flops(spec: dict, n_frames: int) -> dict:
    """Analytic multiply-add FLOPs (2 per MAC) of subsampling + conformer layers (+ projection) for n_frames
    feature frames; elementwise work (norms, activations, softmax, masks) not counted."""
    F, C, d, L = spec["n_mels"], spec["sub_channels"], spec["enc_d"], spec["enc_layers"]
    K, ff = spec["conv_kernel"], 4 * spec["enc_d"]

    def half(n):
        return (n - 1) // 2 + 1

    t1, f1 = half(n_frames), half(F)
    t2, f2 = half(t1), half(f1)
    t3, f3 = half(t2), half(f2)
    sub = 2 * 9 * C * t1 * f1 + (2 * 9 * C + 2 * C * C) * (t2 * f2 + t3 * f3) + 2 * t3 * C * f3 * d
    T = t3
    ff_fl = 2 * (2 * T * d * ff * 2)
    attn = 4 * 2 * T * d * d + 2 * (2 * T - 1) * d * d + 2 * T * T * d * 2 + 2 * T * (2 * T - 1) * d
    conv = 2 * T * d * 2 * d + 2 * T * d * K + 2 * T * d * d
    layers = L * (ff_fl + attn + conv)
    proj = 2 * T * d * spec["dec_d"] if d != spec["dec_d"] else 0
    total = sub + layers + proj
    return {"total": total, "subsampling": sub, "layers": layers, "projection": proj, "t_enc": T,
            "per_layer": {"ff": ff_fl, "attention": attn, "conv": conv}}


def decoder_step_flops(spec: dict, vocab: int, t_enc: int, prefix: int) -> int:
    d, inner, L = spec["dec_d"], spec["dec_inner"], spec["dec_layers"]
    per_layer = 4 * 2 * d * d + 2 * 2 * d * d + 2 * 2 * d * inner + 2 * 2 * (prefix + t_enc) * d
    return L * per_layer + 2 * d * vocab


def quantize_supported() -> bool:
    try:
        from mlx_canary.convert import convert  # imports mlx only; this process measures nothing
    except Exception:
        return False
    return "quantize" in inspect.signature(convert).parameters


def summarize(name: str, spec: dict, build: dict, audio: dict, nemo: dict | None, mlx: dict | None,
              machine: dict, gemm_sq: str, variants: dict) -> dict:
    S = audio["seconds"]
    out = {"model": name, "spec": spec, "audio_seconds": S, "build": build, "nemo": nemo, "mlx": mlx,
           "quantized": variants}
    eng = {k: v for k, v in (("nemo", nemo), ("mlx", mlx)) if v}
    n_frames = next(iter(eng.values()))["n_feature_frames"]
    fl = encoder_flops(spec, n_frames)
    out["encoder_flops"] = fl
    peak = {"nemo": machine.get(f"torch_gflops_{gemm_sq}"), "mlx": machine.get(f"mlx_gflops_{gemm_sq}")}
    derived = {}
    for k, r in eng.items():
        enc_s = median(r["encoder_s"])
        total = median(r["transcribe_s"])
        n_tok = len(r["tokens"])
        dec_s = median(r["transcribe_decode_s"]) if k == "nemo" else median(r["decode_s"])
        st = r["steps"]
        # Estimate for a realistic transcript length (~4 tokens per audio second): the measured transcribe time
        # minus its decoding, plus the measured prompt step and the first cached steps.
        n_real = int(round(4 * S))
        cum = st.get("cumulative_s", [])
        est = est_first = None
        if cum and len(cum) > n_real:
            est = total - dec_s + cum[n_real]
            est_first = r["start_to_first_transcript_s"] - dec_s + cum[n_real]
        derived[k] = {
            "transcribe_s": total,
            "rtf": total / S,
            "features_ms": median(r["features_s"]) * 1e3,
            "encoder_ms": enc_s * 1e3,
            "encoder_ms_per_audio_s": enc_s * 1e3 / S,
            "encoder_gflops": fl["total"] / enc_s / 1e9,
            "encoder_frac_of_peak": (fl["total"] / enc_s / 1e9) / peak[k] if peak[k] else None,
            "decode_s": dec_s,
            "decode_ms_per_token": dec_s / max(n_tok, 1) * 1e3,
            "n_tokens": n_tok,
            "est_transcribe_s_realistic": est,
            "est_rtf_realistic": est / S if est else None,
            "est_start_to_first_realistic_s": est_first,
            "realistic_tokens": n_real,
        }
    out["derived"] = derived
    if nemo and mlx:
        a, b = nemo["tokens"], mlx["tokens"]
        same = 0
        for x, y in zip(a, b):
            if x != y:
                break
            same += 1
        out["agreement"] = {"identical": a == b, "nemo_tokens": len(a), "mlx_tokens": len(b),
                            "common_prefix": same}
        for q in variants.values():
            if "tokens" in q:
                q["identical_to_nemo"] = q["tokens"] == a
    for q in variants.values():
        if "tokens" in q and mlx:
            q["identical_to_mlx_float32"] = q["tokens"] == mlx["tokens"]
    return out


def fmt(x, nd=1):
    if x is None:
        return "-"
    if isinstance(x, float):
        if abs(x) >= 100:
            return f"{x:,.0f}"
        return f"{x:.{nd}f}"
    return str(x)


def ratio(a, b):
    return f"{a / b:.2f}x" if a and b else "-"


def markdown(summary: dict, machine: dict, gemm_shapes: list, audio: dict, wall: float) -> str:
    lines = []
    m = machine
    gpu = DEVICE["name"] == "gpu"
    where = f"GPU {m.get('gpu_name')}, MLX device {m.get('mlx_device')}; " if gpu else ""
    lines.append(f"## Machine ({platform.processor() or platform.machine()}, {os.cpu_count()} cores; {where}"
                 f"torch threads {m.get('torch_threads')}, MLX BLAS {m.get('mlx_blas')}; other load during these tests "
                 f"{fmt(m.get('other_load_cores'), 2)} cores)\n")
    mlx_head = "MLX GPU" if gpu else f"MLX CPU ({m.get('mlx_blas')})"
    lines.append(f"| fp32 GEMM (M x K x N) | {mlx_head} GFLOP/s | NumPy (CPU) GFLOP/s | torch GFLOP/s |")
    lines.append("|---|---|---|---|")
    for s in gemm_shapes:
        key = "x".join(map(str, s))
        lines.append(f"| {key} | {fmt(m.get('mlx_gflops_' + key))} | {fmt(m.get('numpy_gflops_' + key))} | "
                     f"{fmt(m.get('torch_gflops_' + key))} |")
        if gpu:
            lines.append(f"| {key}, bfloat16 | {fmt(m.get('mlx_bf16_gflops_' + key))} | | "
                         f"{fmt(m.get('torch_bf16_gflops_' + key))} |")
    for n_in, n_out in ((1024, 4096), (4096, 1024)):
        key = f"gemv_{n_in}->{n_out}_gbps"
        lines.append(f"| 1 x {n_in} x {n_out} (one-token Linear), GB/s of weights | {fmt(m.get('mlx_' + key))} | "
                     f"{fmt(m.get('numpy_' + key))} | {fmt(m.get('torch_' + key))} |")
    lines.append(f"| silu, ns per element (8M elements) | {fmt(m.get('mlx_silu_ns_per_elem'), 2)} (mlx-canary's "
                 f"arithmetic one: {fmt(m.get('mlx_canary_silu_ns_per_elem'), 2)}) | "
                 f"{fmt(m.get('numpy_silu_ns_per_elem'), 2)} | {fmt(m.get('torch_silu_ns_per_elem'), 2)} |")
    lines.append("")
    lines.append(f"Memory bandwidth (NumPy, 256 MiB): copy {fmt(m.get('numpy_copy_gbps'))} GB/s (read+write), "
                 f"sum {fmt(m.get('numpy_sum_read_gbps'))} GB/s (read). MLX sigmoid "
                 f"{fmt(m.get('mlx_sigmoid_ns_per_elem'), 2)} ns/elem, add {fmt(m.get('mlx_add_ns_per_elem'), 2)} "
                 "ns/elem.")
    lines.append("")
    lines.append(f"Threads per engine: {THREADS}. Clock: {CLOCK_NAME['name']}.\n")
    lines.append(f"Audio: {audio['seconds']:.2f} s of espeak-ng English, 16 kHz mono PCM16. Times are medians of "
                 f"the warm runs (first call excluded). Benchmark wall time: {wall:.0f} s.\n")
    for s in summary:
        d = s["derived"]
        n, x = s.get("nemo"), s.get("mlx")
        dn, dx = d.get("nemo", {}), d.get("mlx", {})
        g = lambda r, k: (r or {}).get(k)  # noqa: E731
        b = s["build"]
        lines.append(f"## {s['model']}: {s['spec']['name']}, {b.get('parameters', 0) / 1e6:.1f} M parameters, "
                     f"vocab {b.get('vocab_size')}\n")
        eng_dev = "CUDA" if gpu else "CPU"
        lines.append(f"| metric | NeMo (PyTorch {eng_dev}, float32) | mlx-canary ({g(x, 'device')}, {g(x, 'dtype')}, "
                     f"BLAS {g(x, 'blas')}) | NeMo / mlx |")
        lines.append("|---|---|---|---|")

        def row(label, a, bb, r=True, nd=1):
            lines.append(f"| {label} | {fmt(a, nd)} | {fmt(bb, nd)} | {ratio(a, bb) if r else ''} |")
        row("process start -> first transcript (s, wall) [python start, imports, load, 1st transcribe()]",
            g(n, "start_to_first_transcript_s"), g(x, "start_to_first_transcript_s"), nd=2)
        row(f"  est. for a ~{dn.get('realistic_tokens') or dx.get('realistic_tokens')}-token transcript "
            "[same - decode + first steps]", dn.get("est_start_to_first_realistic_s"),
            dx.get("est_start_to_first_realistic_s"), nd=2)
        row("  imports (s, wall)", g(n, "import_s"), g(x, "import_s"), nd=2)
        row("  model load (s, wall) [.nemo restore_from / converted dir load_model]", g(n, "load_s"), g(x, "load_s"),
            nd=2)
        row("  first transcribe() call (s, wall)", g(n, "first_transcribe_s"), g(x, "first_transcribe_s"), nd=2)
        row("  first transcribe() call (s, process CPU time)", g(n, "first_transcribe_cpu_s"),
            g(x, "first_transcribe_cpu_s"), nd=2)
        row("transcribe() warm, total (s) [file in -> tokens+text out, batch 1]", dn.get("transcribe_s"),
            dx.get("transcribe_s"), nd=2)
        row("real-time factor (transcribe s / audio s)", dn.get("rtf"), dx.get("rtf"), nd=3)
        row(f"est. RTF for a ~{dn.get('realistic_tokens') or dx.get('realistic_tokens')}-token transcript "
            "[total - decode + first steps]", dn.get("est_rtf_realistic"), dx.get("est_rtf_realistic"), nd=3)
        row("log-mel features (ms)", dn.get("features_ms"), dx.get("features_ms"))
        row("encoder (ms per audio second) [features -> encoder states (+proj)]", dn.get("encoder_ms_per_audio_s"),
            dx.get("encoder_ms_per_audio_s"))
        fl = s["encoder_flops"]["total"] / 1e9
        row(f"encoder GFLOP/s achieved ({fl:.0f} GFLOP analytic)", dn.get("encoder_gflops"),
            dx.get("encoder_gflops"))
        pk = lambda v: None if v is None else 100 * v  # noqa: E731
        row("encoder % of the framework's own 2048^3 GEMM rate", pk(dn.get("encoder_frac_of_peak")),
            pk(dx.get("encoder_frac_of_peak")), r=False)
        row("decode total (s) [NeMo: decode_predictions_tensor in transcribe; mlx: greedy_decode]",
            dn.get("decode_s"), dx.get("decode_s"), nd=2)
        row(f"decode ms/token [decode total / {dn.get('n_tokens') or dx.get('n_tokens')} tokens]",
            dn.get("decode_ms_per_token"), dx.get("decode_ms_per_token"))
        sn, sx = g(n, "steps") or {}, g(x, "steps") or {}
        row("  prompt step (ms)", sn.get("prompt_step_ms"), sx.get("prompt_step_ms"))
        row("  cached step ms, tokens 1-64", sn.get("step_ms_first64"), sx.get("step_ms_first64"))
        row("  cached step ms, last 64 tokens", sn.get("step_ms_last64"), sx.get("step_ms_last64"))
        row("peak RSS (MiB) [VmHWM of the engine's process]", g(n, "peak_rss_mib"), g(x, "peak_rss_mib"), nd=0)
        row("RSS after model load (MiB)", g(n, "rss_after_load_mib"), g(x, "rss_after_load_mib"), nd=0)
        if gpu:
            row("peak GPU memory (MiB) [torch.cuda.max_memory_allocated / mx.get_peak_memory]",
                g(n, "gpu_peak_memory_mib"), g(x, "mlx_peak_memory_mib"), nd=0)
        row("other load on the machine while the worker ran (cores; >0.2 = timings disturbed)",
            g(n, "other_load_cores"), g(x, "other_load_cores"), r=False, nd=2)
        ag = s.get("agreement")
        if ag:
            lines.append(f"| tokens produced | {ag['nemo_tokens']} | {ag['mlx_tokens']} | "
                         f"{'identical' if ag['identical'] else 'DIFFER after ' + str(ag['common_prefix'])} |")
        for tag, q in s.get("quantized", {}).items():
            if "error" in q or "skipped" in q:
                lines.append(f"| mlx-canary {tag} | {q.get('error') or q.get('skipped')} | | |")
            else:
                lines.append(f"| mlx-canary {tag} ({q.get('dtype')}, BLAS {q.get('blas')}): transcribe s / encoder ms per audio s "
                             f"/ decode ms per token / peak RSS MiB / tokens = NeMo | | "
                             f"{median(q['transcribe_s']):.2f} / "
                             f"{median(q['encoder_s']) * 1e3 / audio['seconds']:.1f} / "
                             f"{median(q['decode_s']) / max(len(q['tokens']), 1) * 1e3:.1f} / "
                             f"{q['peak_rss_mib']:.0f} / {q.get('identical_to_nemo')} (= mlx float32: "
                             f"{q.get('identical_to_mlx_float32')}) | "
                             f"{ratio(dn.get('transcribe_s'), median(q['transcribe_s']))} |")
        lines.append("")
        for k, label in (("mlx", "mlx-canary"), ("nemo", "NeMo")):
            r = s.get(k) or {}
            if r.get("encoder_profile"):
                p = r["encoder_profile"]
                lines.append(f"{label} encoder profile (each part evaluated separately; sum {p['sum_s'] * 1e3:.0f} "
                             f"ms vs {median(r['encoder_s']) * 1e3:.0f} ms fused):")
                lines.append("")
                lines.append("| part | ms | share |")
                lines.append("|---|---|---|")
                for op, t in p["ops_s"].items():
                    lines.append(f"| {op} | {t * 1e3:.1f} | {100 * t / p['sum_s']:.1f}% |")
                lines.append("")
            if r.get("decoder_step_profile"):
                p = r["decoder_step_profile"]
                tot = sum(p["per_step_ms"].values())
                lines.append(f"{label} decoder step profile (ms per cached step, first {p['n_steps']} steps):")
                lines.append("")
                lines.append("| part | ms/step | share |")
                lines.append("|---|---|---|")
                for op, t in p["per_step_ms"].items():
                    lines.append(f"| {op} | {t:.2f} | {100 * t / tot:.1f}% |")
                lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    global THREADS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="180m,1b", help="comma list of: " + ",".join(nemo_models.SPECS))
    ap.add_argument("--runs", type=int, default=3, help="timed runs per measurement (after one warm-up)")
    ap.add_argument("--audio-seconds", type=float, default=15.0)
    ap.add_argument("--engines", default="nemo,mlx")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--no-profile", dest="profile", action="store_false",
                    help="skip the per-operation encoder/decoder profiles")
    ap.add_argument("--quantize", default="8,4",
                    help="bit widths to benchmark if mlx_canary.convert.convert accepts quantize= ('' = none)")
    ap.add_argument("--quantized-runs", type=int, default=1,
                    help="timed runs for the quantized variants (their MLX CPU kernels are slow)")
    ap.add_argument("--retries", type=int, default=2,
                    help="re-run a worker whose timings other processes disturbed up to this many times")
    ap.add_argument("--threads", type=int, default=THREADS, help="threads per engine (torch, OpenMP, OpenBLAS)")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="'cpu': time sections by process CPU time (meaningful with --threads 1; robust to other "
                         "load on the machine); start-up and load times stay wall-clock")
    ap.add_argument("--rebuild", action="store_true", help="rebuild the NeMo models and reconvert")
    ap.add_argument("--runs-gemm", type=int, default=5)
    ap.add_argument("--wait-idle", type=float, default=600, metavar="S",
                    help="before each measurement wait up to S seconds for other processes to go idle (0 = no)")
    ap.add_argument("--device", choices=["cpu", "gpu"], default="cpu",
                    help="'gpu': NeMo on CUDA and mlx-canary on MLX's GPU backend (CUDA or Metal)")
    ap.add_argument("--mlx-dtypes", default="float32",
                    help="mlx-canary compute dtypes: the first is compared with NeMo's float32 row, the others are "
                         "reported as variants (e.g. float32,bfloat16 on a GPU)")
    ap.add_argument("--mlx-blas", default="auto",
                    help="MLX_CANARY_BLAS for the mlx-canary workers (auto, mkl, openblas, none): the first for the "
                         "main row, the others as variants (e.g. mkl,openblas)")
    # worker-only
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--out-json", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--t0", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--nemo", help=argparse.SUPPRESS)
    ap.add_argument("--wav", help=argparse.SUPPRESS)
    ap.add_argument("--gemm-shapes", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    DEVICE["name"] = args.device

    if args.worker:
        if args.clock == "cpu":
            CLOCK["fn"] = time.process_time
        fn = {"mlx": worker_mlx, "nemo": worker_nemo, "machine-mlx": worker_machine_mlx,
              "machine-torch": worker_machine_torch}[args.worker]
        res = fn(args)
        args.out_json.write_text(json.dumps(res))
        return 0

    t_start = time.time()
    os.environ["CANARY_BENCH_THREADS"] = str(args.threads)
    THREADS = args.threads
    if args.clock == "cpu" and args.threads != 1:
        print("warning: --clock cpu with more than one thread counts every thread's time (and spin-waits)",
              file=sys.stderr)
    models = [m for m in args.models.split(",") if m]
    engines = set(args.engines.split(","))
    mlx_dtypes = [d for d in args.mlx_dtypes.split(",") if d]
    mlx_blas = [b for b in args.mlx_blas.split(",") if b]
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    args.results.mkdir(parents=True, exist_ok=True)
    log_dir = args.cache / "logs" / stamp
    log_dir.mkdir(parents=True, exist_ok=True)
    model_cache = args.cache / "models"

    def note(msg):
        print(f"[bench {time.time() - t_start:6.0f}s] {msg}", file=sys.stderr, flush=True)

    if args.clock == "cpu":
        CLOCK_NAME["name"] = ("process CPU time (time.process_time) for the timed sections; start-up, import and "
                              "load times are wall-clock")
    if args.clock == "cpu":  # CPU time is not disturbed by other load: no waiting, no retries
        args.wait_idle, args.retries = 0, 0
    WAIT_IDLE.update(seconds=args.wait_idle, note=note, retries=args.retries)
    wav, audio = make_audio(args.audio_seconds, args.cache)
    note(f"audio {wav} ({audio['seconds']:.2f} s)")

    gemm_shapes = [[2048, 2048, 2048]]
    for name in models:  # encoder-shaped GEMMs: (T_enc x d) @ (d x 4d)
        sp = nemo_models.SPECS[name]
        t_enc = math.ceil(args.audio_seconds * 100 / 8)
        shape = [t_enc, sp["enc_d"], 4 * sp["enc_d"]]
        if shape not in gemm_shapes:
            gemm_shapes.append(shape)
    gx = ["--gemm-shapes", json.dumps(gemm_shapes), "--runs-gemm", str(args.runs_gemm), "--clock", args.clock,
          "--device", args.device]
    machine = run_worker("machine-mlx", log_dir, gx, {"MLX_CANARY_BLAS": mlx_blas[0], "MLX_ENABLE_TF32": "0"})
    mt = run_worker("machine-torch", log_dir, gx)
    machine["other_load_cores"] = max(machine["other_load_cores"], mt.pop("other_load_cores"))
    machine.update(mt)
    gemm_sq = "2048x2048x2048"
    note(f"fp32 GEMM 2048^3: MLX {machine['mlx_gflops_' + gemm_sq]:.0f}, "
         f"numpy {machine['numpy_gflops_' + gemm_sq]:.0f}, torch {machine['torch_gflops_' + gemm_sq]:.0f} GFLOP/s")

    bits = [int(b) for b in args.quantize.split(",") if b.strip()]
    can_quantize = quantize_supported()
    summary = []
    for name in models:
        step_log = log_dir / f"build-{name}.log"
        note(f"{name}: building / reusing the NeMo model")
        build = run_step(["build", "--model", name, "--cache", str(model_cache)] + (["--force"] if args.rebuild
                                                                                    else []), step_log)
        note(f"{name}: converting / reusing the MLX model")
        conv = run_step(["convert", "--model", name, "--cache", str(model_cache)] + (["--force"] if args.rebuild
                                                                                      else []), step_log)
        build = dict(build, convert=conv)
        nemo_path = nemo_models.model_dir(model_cache, name) / "model.nemo"
        mlx_dir = conv["dir"]
        common = ["--wav", str(wav), "--runs", str(args.runs), "--clock", args.clock, "--device", args.device] + (
            [] if args.profile else ["--no-profile"])
        nemo_res = mlx_res = None
        if "nemo" in engines:
            note(f"{name}: NeMo worker")
            nemo_res = run_worker("nemo", log_dir, common + ["--nemo", str(nemo_path)])
            note(f"{name}: NeMo done in {nemo_res['worker_wall_s']:.0f} s")
        variants = {}
        if "mlx" in engines:
            # main row: first dtype with the first BLAS; variants: the other dtypes, then the other BLAS choices
            configs = [(None, mlx_dtypes[0], mlx_blas[0])]
            configs += [(d, d, mlx_blas[0]) for d in mlx_dtypes[1:]]
            configs += [(f"blas={b}", mlx_dtypes[0], b) for b in mlx_blas[1:]]
            for tag, dtype, blas in configs:
                note(f"{name}: mlx-canary worker ({dtype}, BLAS {blas})")
                env = {"MLX_CANARY_BLAS": blas}
                if dtype == "float32":  # float32 on a GPU too: no TF32 matmuls (torch's default for NeMo's)
                    env["MLX_ENABLE_TF32"] = "0"
                r = run_worker("mlx", log_dir, common + ["--model-dir", mlx_dir, "--dtype", dtype], env)
                note(f"{name}: mlx-canary ({dtype}, BLAS {r.get('blas')}) done in {r['worker_wall_s']:.0f} s")
                if tag is None:
                    mlx_res = r
                else:
                    variants[tag] = r
        for b in bits if "mlx" in engines else []:
            tag = f"q{b}"
            if not can_quantize:
                variants[tag] = {"skipped": "convert() has no quantize= parameter yet"}
                continue
            try:
                qconv = run_step(["convert", "--model", name, "--cache", str(model_cache), "--quantize-bits",
                                  str(b)] + (["--force"] if args.rebuild else []), step_log)
                qcommon = ["--wav", str(wav), "--runs", str(args.quantized_runs), "--no-profile", "--clock",
                           args.clock, "--device", args.device]
                q = run_worker("mlx", log_dir, qcommon + ["--model-dir", qconv["dir"]], {"MLX_CANARY_BLAS": mlx_blas[0]})
                q["convert"] = qconv
                variants[tag] = q
            except Exception as exc:  # a hook for a feature in progress: report, do not abort
                variants[tag] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
        summary.append(summarize(name, nemo_models.SPECS[name], build, audio, nemo_res, mlx_res, machine,
                                 gemm_sq, variants))

    disturbed = [f"{s['model']}/{k}" for s in summary for k in ("nemo", "mlx")
                 if (s.get(k) or {}).get("other_load_cores", 0) > DISTURBED]
    if disturbed:
        note("WARNING: other processes used CPU during " + ", ".join(disturbed) + ": those timings are disturbed")
    wall = time.time() - t_start
    md = markdown(summary, machine, gemm_shapes, audio, wall)
    print(md)
    out = {"timestamp": stamp, "wall_s": wall, "argv": sys.argv[1:], "threads": THREADS, "clock": args.clock,
           "device": args.device,
           "machine": machine, "audio": audio,
           "host": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()},
           "models": summary, "markdown": md}
    path = args.results / f"{stamp}.json"
    path.write_text(json.dumps(out, indent=1))
    note(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
