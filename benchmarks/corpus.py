"""Corpus throughput: audio-seconds transcribed per wall-clock second, batch 1 vs batched, vs NeMo's transcribe().

    python benchmarks/corpus.py                         # 300 files, demo model at batch 1/8/16, oracle model vs NeMo
    python benchmarks/corpus.py --files 100 --batch-sizes 1,8 --threads 1
    python benchmarks/corpus.py --skip-nemo              # mlx-canary only (no NeMo needed)

What it measures, on one synthetic corpus (``--files`` WAVs of 1-8 s at 16 kHz, crops of the demo model's sample
sentence with a little noise, in random duration order, and their NeMo manifest):

* mlx-canary's corpus job (``mlx_canary.corpus.run_corpus``: duration-sorted batches, background decoding, the
  fsync'd journal and the final manifest), model loaded beforehand, at each ``--batch-sizes``; for the bundled
  demo model and for the random-weight Canary the NeMo oracle built with NeMo's own classes
  (``$MLX_CANARY_ORACLE_DIR`` or tests/.cache/oracle, agg_canary2_proj/model.nemo; or ``--nemo``);
* NeMo 3.0's ``EncDecMultiTaskModel.transcribe(manifest, batch_size=B)`` on the same manifest with that same
  ``.nemo`` (its defaults: lhotse loader, manifest order, one loader worker), in a subprocess; the predictions
  of both are compared text for text.

The demo model has no ``.nemo`` in the repository, so the NeMo comparison uses the oracle model. Prints a
markdown table and writes benchmarks/results/corpus-<timestamp>.json. Timings on a shared machine are noisy:
the load average is printed with them. Asserts nothing about time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_NEMO = Path(os.environ.get("MLX_CANARY_ORACLE_DIR") or REPO / "tests" / ".cache" / "oracle") / \
    "agg_canary2_proj" / "model.nemo"


def build_corpus(folder: Path, files: int, seed: int = 0) -> Path:
    import numpy as np
    import soundfile as sf

    manifest = folder / "manifest.jsonl"
    if manifest.exists() and len(manifest.read_text().splitlines()) == files:
        return manifest
    from mlx_canary.loading import DEMO_MODEL_DIR

    sample, rate = sf.read(DEMO_MODEL_DIR / "sample.wav", dtype="float32")
    rng = np.random.default_rng(seed)
    (folder / "audio").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(files):
        seconds = float(rng.uniform(1.0, 8.0))
        pieces, need = [], int(seconds * rate)
        while sum(len(p) for p in pieces) < need:
            start = int(rng.integers(0, len(sample) // 2))
            pieces.append(sample[start:])
        wave = np.concatenate(pieces)[:need] + rng.normal(0, 1e-3, need).astype(np.float32)
        path = folder / "audio" / f"utt{i:04d}.wav"
        sf.write(path, wave, rate, subtype="PCM_16")
        rows.append({"audio_filepath": str(path), "duration": need / rate, "text": "big white house"})
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


def run_mlx(model_name: str, manifest: Path, batch_sizes: list, workers: int) -> list:
    from mlx_canary import corpus
    from mlx_canary.loading import load_model
    from mlx_canary.options import TranscribeOptions

    model = load_model(model_name)
    model.transcribe(str(json.loads(manifest.read_text().splitlines()[0])["audio_filepath"]))  # warm up
    results = []
    for batch in batch_sizes:
        items = corpus.read_manifest(manifest, TranscribeOptions(batch_size=batch))
        with tempfile.TemporaryDirectory() as out:
            final, journal = corpus.output_paths(manifest, Path(out))
            started = time.perf_counter()
            executor = corpus.LocalExecutor(lambda: model, batch, workers)
            summary = corpus.run_corpus(items, final, journal, executor, batch_size=batch)
            wall = time.perf_counter() - started
        results.append({"engine": "mlx-canary", "model": model_name, "batch_size": batch, "files": len(items),
                        "audio_s": summary.audio_seconds, "wall_s": wall, "audio_s_per_s": summary.audio_seconds / wall,
                        "waited_for_audio_s": executor.waited_seconds,
                        "failed": summary.failed, "texts": [r.get("pred_text", "") for r in summary.rows]})
        print(f"  mlx-canary {model_name} batch {batch}: {summary.audio_seconds / wall:.1f} audio-s/s", flush=True)
    return results


NEMO_WORKER = r"""
import json, sys, time
sys.path.insert(0, sys.argv[4])
from nemo_support import quiet_nemo
import torch
torch.set_num_threads(int(sys.argv[3]))
from nemo.collections.asr.models import EncDecMultiTaskModel
quiet_nemo(python_warnings=True)
model = EncDecMultiTaskModel.restore_from(sys.argv[1], map_location="cpu").eval()
manifest = sys.argv[2]
first = json.loads(open(manifest).readline())["audio_filepath"]
model.transcribe([first], batch_size=1, verbose=False)  # warm up
out = []
for batch in json.loads(sys.argv[5]):
    started = time.perf_counter()
    hyps = model.transcribe(manifest, batch_size=batch, verbose=False)
    wall = time.perf_counter() - started
    out.append({"batch_size": batch, "wall_s": wall, "texts": [h.text for h in hyps]})
print("RESULT " + json.dumps(out))
"""


def run_nemo(nemo: Path, manifest: Path, batch_sizes: list, threads: int, audio_s: float) -> list:
    done = subprocess.run(
        [sys.executable, "-c", NEMO_WORKER, str(nemo), str(manifest), str(threads), str(REPO / "scripts"),
         json.dumps(batch_sizes)], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"NeMo worker failed:\n{done.stderr[-4000:]}")
    runs = json.loads([line for line in done.stdout.splitlines() if line.startswith("RESULT ")][-1][7:])
    results = []
    for run in runs:
        results.append({"engine": "nemo", "model": nemo.parent.name, "batch_size": run["batch_size"],
                        "files": len(run["texts"]), "audio_s": audio_s, "wall_s": run["wall_s"],
                        "audio_s_per_s": audio_s / run["wall_s"], "texts": run["texts"]})
        print(f"  nemo {nemo.parent.name} batch {run['batch_size']}: {audio_s / run['wall_s']:.1f} audio-s/s",
              flush=True)
    return results


def _waited(result: dict) -> str:
    return f"{result['waited_for_audio_s']:.2f}" if "waited_for_audio_s" in result else "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=300)
    parser.add_argument("--batch-sizes", default="1,8,16")
    parser.add_argument("--nemo-batch-sizes", default=None, help="default: --batch-sizes")
    parser.add_argument("--threads", type=int, default=2, help="BLAS/OpenMP threads of each engine")
    parser.add_argument("--decode-workers", type=int, default=2)
    parser.add_argument("--nemo", type=Path, default=DEFAULT_NEMO, help="the .nemo for the NeMo comparison")
    parser.add_argument("--skip-nemo", action="store_true")
    parser.add_argument("--nemo-files", type=int, default=None,
                        help="the oracle model (both engines) transcribes only the manifest's first N files")
    parser.add_argument("--cache", type=Path, default=HERE / ".cache" / "corpus")
    args = parser.parse_args()
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(args.threads)
    os.environ.setdefault("MLX_CANARY_CACHE", str(HERE / ".cache" / "mlx-canary"))
    sys.path.insert(0, str(REPO))
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    nemo_batches = [int(b) for b in (args.nemo_batch_sizes or args.batch_sizes).split(",")]

    manifest = build_corpus(args.cache / f"{args.files}", args.files)
    audio_s = sum(json.loads(line)["duration"] for line in manifest.read_text().splitlines())
    print(f"corpus: {args.files} files, {audio_s / 60:.1f} min of audio; load average {os.getloadavg()[0]:.1f}")
    results = run_mlx("demo", manifest, batch_sizes, args.decode_workers)
    if not args.skip_nemo:
        if not args.nemo.is_file():
            raise SystemExit(f"{args.nemo} not found: build the oracle (pytest -m parity) or pass --nemo")
        nemo_manifest = manifest  # the oracle model runs on these files in both engines
        if args.nemo_files and args.nemo_files < args.files:
            nemo_manifest = manifest.with_name(f"first{args.nemo_files}.jsonl")
            nemo_manifest.write_text("".join(manifest.read_text().splitlines(keepends=True)[: args.nemo_files]))
        nemo_audio = sum(json.loads(line)["duration"] for line in nemo_manifest.read_text().splitlines())
        results += run_mlx(str(args.nemo), nemo_manifest, batch_sizes, args.decode_workers)
        results += run_nemo(args.nemo, nemo_manifest, nemo_batches, args.threads, nemo_audio)
    for r in results:  # the same texts as mlx-canary at batch 1 with the same model (NeMo: on its files)
        model = str(args.nemo) if r["engine"] == "nemo" else r["model"]
        reference = next(o for o in results if o["engine"] == "mlx-canary" and o["model"] == model
                         and o["batch_size"] == batch_sizes[0])
        r["same_text"] = f"{sum(a == b for a, b in zip(r['texts'], reference['texts']))}/{len(r['texts'])}"
    print(f"\nload average after: {os.getloadavg()[0]:.1f}\n")
    print("| engine | model | batch | files | audio s | wall s | audio-s/s | model waited for audio s "
          f"| same text as mlx-canary batch {batch_sizes[0]} |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        model = "demo" if r["model"] == "demo" else "oracle agg_canary2_proj (random weights)"
        print(f"| {r['engine']} | {model} | {r['batch_size']} | {r['files']} | {r['audio_s']:.0f} | {r['wall_s']:.1f} "
              f"| {r['audio_s_per_s']:.1f} | {_waited(r)} | {r['same_text']} |")
    out = HERE / "results" / f"corpus-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"files": args.files, "threads": args.threads, "decode_workers": args.decode_workers,
            "nemo_files": args.nemo_files, "load_average": os.getloadavg()}
    out.write_text(json.dumps({"meta": meta, "results": [{k: v for k, v in r.items() if k != "texts"}
                                                         for r in results]}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
