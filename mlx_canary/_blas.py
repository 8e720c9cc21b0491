"""Make MLX's CPU backend use an optimized BLAS on Linux.

MLX's Linux wheel bundles a reference BLAS (~8 GFLOP/s fp32 matmul on a small x86 machine vs ~270 with
OpenBLAS). Loading an optimized ``cblas`` library with RTLD_GLOBAL before ``mlx.core`` is first imported makes
MLX's CPU kernels resolve their BLAS symbols to it. This must run before anything imports ``mlx.core``; the
package ``__init__`` calls it first.

Which library, in order (``MLX_CANARY_BLAS=auto``, the default):

1. Intel MKL from the ``mkl`` pip package (``pip install "mlx-canary[mkl]"``, x86-64). Preferred because MLX
   issues every matrix product as ``sgemm``, also the one-row products of each decoding step: MKL streams
   those at memory bandwidth, while OpenBLAS before 0.3.27 (Debian 12 ships 0.3.21) packs the whole weight
   matrix first and runs them ~2x slower; MKL's sgemm is also ~25 % faster on the encoder's shapes.
2. The system's OpenBLAS (``apt-get install libopenblas0-pthread``).

``MLX_CANARY_BLAS=mkl`` / ``openblas`` asks for one of them only, ``none`` (or the older
``MLX_CANARY_NO_OPENBLAS=1``) keeps MLX's bundled BLAS.
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

OPENBLAS_NAMES = (
    "libopenblas.so.0",  # Debian/Ubuntu libopenblas0-pthread / libopenblas0
    "libopenblas.so",
    "libopenblasp-r0.so",
)
MKL_NAMES = ("libmkl_rt.so.3", "libmkl_rt.so.2")
CHOICES = ("auto", "mkl", "openblas", "none")

loaded_blas: str | None = None
requested_blas: str = "auto"


def requested() -> str:
    """The BLAS asked for by the environment: one of CHOICES (an unknown value counts as auto)."""
    if os.environ.get("MLX_CANARY_NO_OPENBLAS"):
        return "none"
    value = os.environ.get("MLX_CANARY_BLAS", "auto").strip().lower()
    return value if value in CHOICES else "auto"


def preload_blas() -> str | None:
    """Load an optimized BLAS globally if one is installed; return its name (or None)."""
    global loaded_blas, requested_blas
    if loaded_blas is not None or not sys.platform.startswith("linux"):
        return loaded_blas
    requested_blas = requested()
    if requested_blas == "none" or "mlx.core" in sys.modules:
        return None  # too late once mlx.core is loaded: MLX already bound its BLAS symbols
    if requested_blas in ("auto", "mkl"):
        loaded_blas = _load_mkl()
    if loaded_blas is None and requested_blas in ("auto", "openblas"):
        loaded_blas = _load_first(OPENBLAS_NAMES)[0]
    return loaded_blas


def _load_first(names, directory: Path | None = None):
    """(name, handle) of the first library in ``names`` that loads globally, or (None, None)."""
    for name in names:
        try:
            return name, ctypes.CDLL(str(directory / name) if directory else name, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
    return None, None


def mkl_library_dirs() -> list[Path]:
    """Where the ``mkl`` pip package puts its libraries: ``<prefix>/lib`` of this environment (its files are
    wheel data, installed beside the interpreter's prefix rather than in site-packages)."""
    dirs = [Path(sys.prefix) / "lib"]
    try:
        from importlib import metadata

        for f in metadata.distribution("mkl").files or ():
            if f.name in MKL_NAMES:
                dirs.insert(0, Path(f.locate()).resolve().parent)
    except Exception:  # no mkl distribution, or unreadable metadata: the prefix guess stands
        pass
    return list(dict.fromkeys(dirs))


# MKL_Set_Threading_Layer codes (mkl_service.h)
MKL_THREADING_INTEL, MKL_THREADING_GNU = 0, 3


def _load_mkl() -> str | None:
    for directory in mkl_library_dirs():
        if not any((directory / n).exists() for n in MKL_NAMES):
            continue
        layer = _openmp_runtime(directory)
        if layer is None:
            return None
        name, lib = _load_first(MKL_NAMES, directory)
        if name:
            if layer >= 0:
                lib.MKL_Set_Threading_Layer(ctypes.c_int(layer))
            return name
    return None


def _openmp_runtime(directory: Path) -> int | None:
    """Load the OpenMP runtime that MKL's threaded kernels need and return MKL's threading-layer code for it:
    GNU's libgomp when the system has it (torch and most Linux software use it too, so one runtime is shared),
    else Intel's libiomp5 from the intel-openmp package that mkl depends on. -1: the user chose a layer with
    MKL_THREADING_LAYER (MKL reads it itself). None: no runtime loads, so MKL is skipped."""
    if os.environ.get("MKL_THREADING_LAYER"):
        return -1
    if _load_first(("libgomp.so.1",))[0]:
        return MKL_THREADING_GNU
    if _load_first(("libiomp5.so",), directory)[0] or _load_first(("libiomp5.so",))[0]:
        return MKL_THREADING_INTEL
    return None


def blas_status() -> str:
    """One line for verbose output saying which BLAS MLX's CPU backend uses."""
    if not sys.platform.startswith("linux"):
        return "BLAS: platform default"
    if loaded_blas:
        return f"BLAS: using {loaded_blas} for MLX's CPU backend"
    if requested_blas == "none":
        return "BLAS: MLX's bundled reference BLAS (MLX_CANARY_BLAS=none)"
    if requested_blas == "mkl":
        return ("BLAS: MLX_CANARY_BLAS=mkl but MKL was not found (pip install \"mlx-canary[mkl]\"); MLX's CPU "
                "backend uses its slow bundled reference BLAS")
    return (
        "BLAS: no OpenBLAS or MKL found; MLX's CPU backend uses its slow bundled reference BLAS "
        "(install one: apt-get install libopenblas0-pthread, or pip install \"mlx-canary[mkl]\" on x86-64)"
    )
