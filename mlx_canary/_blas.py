"""Make MLX's CPU backend use an optimized BLAS on Linux.

MLX's Linux wheel bundles a reference BLAS (~8 GFLOP/s fp32 matmul on a small x86 machine vs ~270 with
OpenBLAS). Loading ``libopenblas.so.0`` with RTLD_GLOBAL before ``mlx.core`` is first imported makes MLX's
CPU kernels resolve their BLAS symbols to it. This must run before anything imports ``mlx.core``; the package
``__init__`` calls it first. Setting ``MLX_CANARY_NO_OPENBLAS=1`` skips it.
"""

from __future__ import annotations

import ctypes
import os
import sys

_CANDIDATES = (
    "libopenblas.so.0",  # Debian/Ubuntu libopenblas0-pthread / libopenblas0
    "libopenblas.so",
    "libopenblasp-r0.so",
)

loaded_blas: str | None = None


def preload_blas() -> str | None:
    """Load an optimized BLAS globally if one is installed; return its name (or None)."""
    global loaded_blas
    if loaded_blas is not None or not sys.platform.startswith("linux"):
        return loaded_blas
    if os.environ.get("MLX_CANARY_NO_OPENBLAS"):
        return None
    if "mlx.core" in sys.modules:
        return None  # too late: MLX already bound its BLAS symbols
    for name in _CANDIDATES:
        try:
            ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        loaded_blas = name
        return name
    return None


def blas_status() -> str:
    """One line for verbose output saying which BLAS MLX's CPU backend uses."""
    if not sys.platform.startswith("linux"):
        return "BLAS: platform default"
    if loaded_blas:
        return f"BLAS: using {loaded_blas} for MLX's CPU backend"
    return (
        "BLAS: no OpenBLAS found; MLX's CPU backend uses its slow bundled reference BLAS "
        "(install it: apt-get install libopenblas0-pthread)"
    )
