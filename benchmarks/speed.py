"""How fast is mlx-canary against NeMo on this machine? Several short files, batch 1 and batch 4, side by side.

    python benchmarks/speed.py --model 180m                      # random weights, canary-180m-flash dimensions
    python benchmarks/speed.py --model 1b                        # random weights, canary-1b-flash dimensions
    python benchmarks/speed.py --model DIR --nemo FILE.nemo      # any converted model and its NeMo checkpoint
    python benchmarks/speed.py --model DIR --engines mlx         # mlx-canary alone (no NeMo installed)
        --audio a.wav,b.flac   your own files instead of the generated ones (--files N short English clips)
        --batch-sizes 1,4      --runs 3 (warm runs; the best is kept)   --threads N (default: all cores)
        --threads 1 --clock cpu    on a machine other jobs keep busy: one thread per engine, timed by process
                                   CPU time (what an idle core would take; wall-clock whole-process figures there
                                   wait behind the other jobs, and multi-threaded torch stalls in its barriers)
        --mlx-blas auto,openblas   one mlx-canary row per MLX_CANARY_BLAS choice (default: auto)
        --mlx-python PATH      interpreter of the mlx-canary workers, e.g. a fresh venv made by
                               `pip install 'mlx-canary[cpu]'` (default: this one; NeMo always runs in this one)

Each engine runs in its own fresh process per batch size (NeMo: torch + NeMo; mlx-canary: never imports either):

* whole process: from spawning the process to the list of transcripts in hand: interpreter start, imports,
  loading the model, the first (cold) ``transcribe(files, batch_size=B)``. What a user waits for in a
  one-shot command.
* model time: the best of ``--runs`` warm ``transcribe(files, batch_size=B)`` calls in that same process (audio
  reading, features, encoder, decoding, detokenising): what a long-running server pays per request.

The table names the BLAS MLX's CPU backend uses (mlx_canary._blas) and the torch version; "other load" is the
CPU time other processes took meanwhile, in cores (> 0.2: a shared machine disturbed the figures). The
random-weight models (nemo_models.py) never emit EOS, so each file decodes to NeMo's length cap and both
engines decode the same number of tokens; "tokens equal" compares the ids file by file.
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
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

import nemo_models  # noqa: E402  (imports neither torch nor NeMo at module level)
from bench import run_json_worker  # noqa: E402

SENTENCES = [
    "Good morning, and welcome to the weekly project meeting.",
    "Today we will review the progress of the speech recognition system.",
    "Please keep your questions short.",
    "The new model converts checkpoints in a few seconds and runs on a laptop.",
    "Our next meeting is on the third of June at half past ten in the small room.",
    "Write down anything we cannot answer today.",
    "We will follow up by email before Friday.",
    "The latest benchmark numbers look promising, but we need more tests on real recordings.",
    "Thank you all for coming.",
]


def make_files(n: int, cache: Path) -> list[Path]:
    """``n`` short English clips from espeak-ng (16 kHz mono PCM16), made once."""
    d = cache / "speed-audio"
    d.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(n):
        wav = d / f"clip{i:02d}.wav"
        if not wav.exists():
            raw = d / "raw.wav"
            subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(raw), SENTENCES[i % len(SENTENCES)]],
                           check=True)
            subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-i", str(raw), "-ac", "1", "-ar", "16000",
                            "-c:a", "pcm_s16le", str(wav)], check=True)
            raw.unlink()
        files.append(wav)
    return files


def seconds_of(files) -> float:
    import soundfile as sf

    return sum(sf.info(str(f)).duration for f in files)


# --- workers (each in its own process) ---------------------------------------------------------------------------


def warm_runs(run, n: int) -> dict:
    """Wall and process CPU seconds of ``n`` warm calls."""
    wall, cpu = [], []
    for _ in range(n):
        t, c = time.perf_counter(), time.process_time()
        run()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return {"warm_s": wall, "warm_cpu_s": cpu}


def worker_mlx(args) -> dict:
    import mlx_canary
    from mlx_canary import _blas

    assert "torch" not in sys.modules and "nemo" not in sys.modules
    model = mlx_canary.load_model(args.model_dir)
    files = [str(f) for f in args.files]

    def run():
        return model.transcribe(files, source_lang="en", target_lang="en", pnc=True, batch_size=args.batch_size)

    out = run()
    first = {"start_to_transcripts_s": time.time() - args.t0, "start_to_transcripts_cpu_s": time.process_time()}
    return {**first, **warm_runs(run, args.runs), "blas": _blas.describe(),
            "tokens": [list(t.tokens) for t in out]}


def worker_nemo(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    nemo_models.quiet_nemo(python_warnings=True)
    from nemo.collections.asr.models import EncDecMultiTaskModel

    nemo_models.quiet_nemo(python_warnings=True)
    model = EncDecMultiTaskModel.restore_from(args.nemo, map_location="cpu")
    model.eval()
    files = [str(f) for f in args.files]

    def run():
        hyps = model.transcribe(files, batch_size=args.batch_size, return_hypotheses=True, verbose=False,
                                num_workers=0, source_lang="en", target_lang="en", pnc="yes")
        model.eval()  # NeMo leaves the decoder in train mode after transcribe()
        return hyps

    out = run()
    first = {"start_to_transcripts_s": time.time() - args.t0, "start_to_transcripts_cpu_s": time.process_time()}
    return {**first, **warm_runs(run, args.runs),
            "torch": f"torch {torch.__version__}, {torch.get_num_threads()} threads",
            "tokens": [[int(i) for i in h.y_sequence.tolist()] for h in out]}


def run_worker(kind: str, args, batch_size: int, out_dir: Path, blas: str = "auto") -> dict:
    out_json = out_dir / f"{kind}-b{batch_size}-{int(time.time() * 1000)}.json"
    threads = str(args.threads)
    env = dict(os.environ, OMP_NUM_THREADS=threads, OPENBLAS_NUM_THREADS=threads, MKL_NUM_THREADS=threads,
               PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", MLX_CANARY_BLAS=blas)
    python = args.mlx_python if kind == "mlx" and args.mlx_python else sys.executable
    cmd = [python, str(Path(__file__).resolve()), "--worker", kind, "--out-json", str(out_json),
           "--batch-size", str(batch_size), "--runs", str(args.runs), "--threads", threads,
           "--model-dir", str(args.model_dir), "--nemo", str(args.nemo or ""),
           "--files", ",".join(str(f) for f in args.files)]
    return run_json_worker(kind, cmd, env, out_json, pass_start_time=True)


# --- the table ---------------------------------------------------------------------------------------------------


def table(rows: list[dict], audio_s: float, n_files: int, clock: str) -> str:
    warm, first = ("warm_cpu_s", "start_to_transcripts_cpu_s") if clock == "cpu" else (
        "warm_s", "start_to_transcripts_s")
    out = [f"{n_files} files, {audio_s:.1f} s of audio; model time = best warm transcribe(), whole process = "
           f"start -> transcripts (s, {'process CPU time' if clock == 'cpu' else 'wall clock'})", "",
           "| batch, mlx-canary BLAS | model time NeMo | model time mlx-canary | NeMo / mlx | whole process NeMo | "
           "whole process mlx-canary | NeMo / mlx | tokens NeMo / mlx (equal) | other load NeMo / mlx |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        n, m = r.get("nemo"), r["mlx"]
        mm, mp = min(m[warm]), m[first]
        mt = sum(len(t) for t in m["tokens"])
        if n:
            nm, np_ = min(n[warm]), n[first]
            nt = sum(len(t) for t in n["tokens"])
            same = sum(a == b for a, b in zip(n["tokens"], m["tokens"]))
            out.append(f"| {r['batch']}, {r['blas']} | {nm:.2f} | {mm:.2f} | **{nm / mm:.2f}** | {np_:.2f} | {mp:.2f} | "
                       f"**{np_ / mp:.2f}** | {nt} / {mt} ({same}/{len(m['tokens'])} files) | "
                       f"{n['other_load_cores']:.2f} / {m['other_load_cores']:.2f} |")
        else:
            out.append(f"| {r['batch']}, {r['blas']} | | {mm:.2f} | | | {mp:.2f} | | {mt} | / {m['other_load_cores']:.2f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="180m", help="180m, 1b (random weights, built once) or a converted model dir")
    ap.add_argument("--nemo", help="the NeMo checkpoint (.nemo) of --model DIR (implied for 180m / 1b)")
    ap.add_argument("--engines", default="nemo,mlx")
    ap.add_argument("--audio", help="comma-separated audio files (default: --files generated clips)")
    ap.add_argument("--files", default="9", help="number of generated clips (worker: the files)")
    ap.add_argument("--batch-sizes", default="1,4")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--cache", type=Path, default=HERE / ".cache")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: process CPU time (with --threads 1, what an idle core would take; for shared machines)")
    ap.add_argument("--mlx-python", help="interpreter for the mlx-canary workers (default: this one)")
    ap.add_argument("--mlx-blas", default="auto", help="MLX_CANARY_BLAS of the mlx-canary workers, one row each "
                    "(e.g. auto,openblas,none)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--out-json", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--t0", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--batch-size", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        args.files = args.files.split(",")
        res = {"mlx": worker_mlx, "nemo": worker_nemo}[args.worker](args)
        args.out_json.write_text(json.dumps(res))
        return 0

    engines = set(args.engines.split(","))
    if args.model in nemo_models.SPECS:
        models = args.cache / "models"
        for step in ("build", "convert"):
            if step == "build" and "nemo" not in engines and nemo_models.is_converted(models, args.model):
                continue
            subprocess.run([sys.executable, str(HERE / "nemo_models.py"), step, "--model", args.model, "--cache",
                            str(models)], check=True, stdout=subprocess.DEVNULL)
        args.model_dir = nemo_models.converted_dir(models, args.model)
        args.nemo = nemo_models.model_dir(models, args.model) / "model.nemo"
    else:
        args.model_dir = Path(args.model)
        if "nemo" in engines and not args.nemo:
            ap.error("--nemo FILE.nemo is needed to run NeMo beside a model directory (or --engines mlx)")
    files = [Path(f) for f in args.audio.split(",")] if args.audio else make_files(int(args.files), args.cache)
    args.files = files
    out_dir = args.cache / "speed-logs"
    out_dir.mkdir(parents=True, exist_ok=True)

    load0 = os.getloadavg()
    rows = []
    for b in (int(x) for x in args.batch_sizes.split(",")):
        nemo = None
        if "nemo" in engines:
            print(f"[speed] NeMo, batch {b} ...", file=sys.stderr, flush=True)
            nemo = run_worker("nemo", args, b, out_dir)
        for blas in args.mlx_blas.split(","):
            print(f"[speed] mlx-canary (MLX_CANARY_BLAS={blas}), batch {b} ...", file=sys.stderr, flush=True)
            mlx = run_worker("mlx", args, b, out_dir, blas)
            rows.append({"batch": b, "blas": mlx["blas"].split(" (")[0].split(" DYNAMIC")[0], "mlx": mlx,
                         "nemo": nemo})
    print(f"model {args.model}; mlx-canary BLAS: {'; '.join(dict.fromkeys(r['mlx']['blas'] for r in rows))}"
          + (f"; NeMo: {rows[0]['nemo']['torch']}" if rows[0]["nemo"] else "")
          + f"; {args.threads} threads; load average before {load0[0]:.1f}, after {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} cores")
    print(table(rows, seconds_of(files), len(files), args.clock))
    (out_dir / f"speed-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(
        {"model": str(args.model), "files": [str(f) for f in files], "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
