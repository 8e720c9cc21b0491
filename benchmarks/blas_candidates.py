"""Measure MLX's CPU matrix products on each candidate BLAS, each in a fresh process (the BLAS is bound when
mlx.core is first imported), back to back, several rounds; the best round of each is reported (the machine may
be shared: the best is the least disturbed).

    python benchmarks/blas_candidates.py [--rounds 3] [--libs ref,system,scipy-openblas32,cmeel,ngsolve,mkl]
    python benchmarks/blas_candidates.py --threads 1 --clock cpu   # per-core figures, robust to other load

With --clock cpu each product is timed by this process's CPU time: with one thread that is what it takes on an
idle core, whatever else the machine runs (memory bandwidth and caches remain shared).

Rows: one-row products as a decoding step issues them (x @ W.T, W stored (out, in) as nn.Linear does), in GB/s
of weights read; batch-4 rows (4 sequences decoded together); encoder-sized products (T x d @ d x 4d) in
GFLOP/s. Candidates are looked up in this interpreter's environment (pip packages) and the system.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GEMV = [(1, 1024, 4096), (1, 4096, 1024), (1, 1024, 1024), (4, 1024, 4096), (1, 1024, 5248)]
GEMM = [(188, 512, 2048), (752, 512, 2048), (188, 1024, 4096), (752, 1024, 4096), (2048, 2048, 2048)]


def package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    return Path(list(spec.submodule_search_locations)[0]) if spec and spec.submodule_search_locations else None


def load(lib: str) -> str:
    """Load the candidate so that mlx.core binds cblas_* to it; return a description."""
    if lib == "ref":
        return "MLX's bundled reference BLAS"
    if lib == "scipy-openblas32":
        spec = importlib.util.spec_from_file_location("_symbol_alias", REPO / "mlx_canary" / "_symbol_alias.py")
        _symbol_alias = importlib.util.module_from_spec(spec)  # not via the package: it imports mlx.core
        spec.loader.exec_module(_symbol_alias)

        d = package_dir("scipy_openblas32")
        so = ctypes.CDLL(str(d / "lib" / "libscipy_openblas.so"))
        _symbol_alias.load_aliases({n: ctypes.cast(getattr(so, "scipy_" + n), ctypes.c_void_p).value
                                    for n in ("cblas_sgemm", "cblas_dgemm", "cblas_cgemm")})
        return config(so, "scipy_")
    if lib == "mkl":
        ctypes.CDLL("libgomp.so.1", mode=ctypes.RTLD_GLOBAL)
        so = ctypes.CDLL(str(Path(sys.prefix) / "lib" / "libmkl_rt.so.3"), mode=ctypes.RTLD_GLOBAL)
        so.MKL_Set_Threading_Layer(ctypes.c_int(3))  # GNU OpenMP
        buf = ctypes.create_string_buffer(256)
        so.MKL_Get_Version_String(buf, 256)
        return buf.value.decode().strip() + f", {so.MKL_Get_Max_Threads()} threads"
    path = {"system": "libopenblas.so.0",
            "cmeel": str(Path(importlib.util.find_spec("cmeel").origin).parents[1] / "cmeel.prefix" / "lib" / "libopenblas.so.0"),
            "ngsolve": str(next((package_dir("ngsolve_openblas") or Path("/nonexistent")).glob("libopenblas*.so")))
            }[lib]
    return config(ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL), "")


def config(so, prefix: str) -> str:
    get = getattr(so, prefix + "openblas_get_config")
    get.restype = ctypes.c_char_p
    return f"{get().decode().strip()}, {getattr(so, prefix + 'openblas_get_num_threads')()} threads"


def worker(lib: str, clock) -> dict:
    desc = load(lib)
    import mlx.core as mx

    mx.set_default_device(mx.cpu)
    res = {"lib": lib, "config": desc}

    def best(fn, n):
        fn()
        fn()
        t_best = 1e9
        for _ in range(n):
            t = clock()
            fn()
            t_best = min(t_best, clock() - t)
        return t_best

    for m, k, n in GEMV:
        w, x = mx.random.normal((n, k)), mx.random.normal((m, k))
        mx.eval(w, x)
        res[f"gemv {m}x{k} @ ({n}x{k}).T GB/s"] = n * k * 4 / best(lambda: mx.eval(x @ w.T), 30) / 1e9
    # A decoding step reads every decoder weight once (245 MB at 180m / 1b): 16 matrices of 16 MB in turn, more
    # than any cache, so this row is bound by memory, as decoding is (the rows above fit in a large L3).
    ws = [mx.random.normal((4096, 1024)) for _ in range(16)]
    x = mx.random.normal((1, 1024))
    mx.eval(ws, x)
    res["gemv 1x1024 @ 16 x (4096x1024).T, 256 MB GB/s"] = 16 * 4096 * 1024 * 4 / best(
        lambda: [mx.eval(x @ w.T) for w in ws], 10) / 1e9
    for m, k, n in GEMM:
        a, b = mx.random.normal((m, k)), mx.random.normal((k, n))
        mx.eval(a, b)
        runs = 3 if lib == "ref" else 8
        res[f"gemm {m}x{k}x{n} GF/s"] = 2 * m * k * n / best(lambda: mx.eval(a @ b), runs) / 1e9
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--libs", default="ref,system,scipy-openblas32,cmeel,ngsolve,mkl")
    ap.add_argument("--threads", type=int, help="OPENBLAS/MKL/OMP_NUM_THREADS of the workers (default: theirs)")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    ap.add_argument("--worker")
    args = ap.parse_args()
    if args.worker:
        clock = time.process_time if args.clock == "cpu" else time.perf_counter
        print(json.dumps(worker(args.worker, clock)))
        return 0
    env = dict(os.environ)
    if args.threads:
        env.update({k: str(args.threads) for k in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS")})
    best: dict[str, dict] = {}
    for r in range(args.rounds):
        for lib in args.libs.split(","):
            load1 = os.getloadavg()[0]
            p = subprocess.run([sys.executable, __file__, "--worker", lib, "--clock", args.clock],
                               capture_output=True, text=True, env=env)
            if p.returncode:
                best.setdefault(lib, {"lib": lib, "config": f"failed: {p.stderr.strip().splitlines()[-1:]}"})
                continue
            res = json.loads(p.stdout.splitlines()[-1])
            print(f"round {r} {lib} load {load1:.1f}", file=sys.stderr, flush=True)
            prev = best.setdefault(lib, res)
            for k, v in res.items():
                if isinstance(v, float):
                    prev[k] = max(prev[k], v)
    keys = [k for k in next(iter(best.values())) if k not in ("lib", "config")]
    libs = list(best)
    print("| product | " + " | ".join(libs) + " |")
    print("|---|" + "---|" * len(libs))
    for k in keys:
        print(f"| {k} | " + " | ".join(f"{best[l].get(k, float('nan')):.1f}" for l in libs) + " |")
    for l in libs:
        print(f"- {l}: {best[l]['config']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
