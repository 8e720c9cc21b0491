"""Make MLX's CPU backend use an optimized BLAS on Linux.

MLX's Linux wheel bundles a reference BLAS (a few GFLOP/s on a matrix product where an optimized one reaches
hundreds). Loading an optimized ``cblas`` library with RTLD_GLOBAL before ``mlx.core`` is first imported makes
MLX's CPU kernels resolve their BLAS symbols to it. This must run before anything imports ``mlx.core``; the
package ``__init__`` calls it first.

Which library, in order (``MLX_CANARY_BLAS=auto``, the default), chosen by measurement (benchmarks/README.md,
"Choosing the BLAS"): MLX issues every matrix product as ``sgemm``, also the one-row products of each decoding
step, which dominate transcription time.

1. Intel MKL from the ``mkl`` pip package (``pip install 'mlx-canary[cpu]'`` brings it on x86-64). Its
   one-row ``sgemm`` streams the weights at 3-4x the rate of any OpenBLAS on x86-64 (OpenBLAS packs the whole
   weight matrix first); on the encoder's large products the two are on par.
2. OpenBLAS from the ``scipy-openblas32`` pip package (``[cpu]`` brings it on every Linux machine): one
   self-contained library with kernels for every CPU chosen at run time. Its symbols carry a ``scipy_`` prefix,
   so ``cblas_sgemm`` & co. are published under MLX's names by a tiny generated alias object
   (``_symbol_alias``; glibc 2.28+).
3. The system's OpenBLAS (``libopenblas.so.0``, e.g. Debian's ``libopenblas0-pthread``): measured no faster
   than the pip one, so it serves where the pip one cannot load.

``MLX_CANARY_BLAS=mkl`` / ``openblas`` asks for one family only (``openblas``: the pip one, else the system's),
``none`` (or the older ``MLX_CANARY_NO_OPENBLAS=1``) keeps MLX's bundled BLAS. When a run on Linux still ends
up on the reference BLAS although it asked for a fast one, one line on stderr says so, with the command that
fixes it.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import platform
import sys
from pathlib import Path

OPENBLAS_NAMES = (
    "libopenblas.so.0",  # Debian/Ubuntu libopenblas0-pthread / libopenblas0
    "libopenblas.so",
    "libopenblasp-r0.so",
)
MKL_NAMES = ("libmkl_rt.so.3", "libmkl_rt.so.2")
PIP_OPENBLAS = "scipy_openblas32"  # module of the scipy-openblas32 wheel
PIP_OPENBLAS_LIBRARY = "libscipy_openblas.so"
# Every cblas function MLX's CPU backend calls (``nm -D libmlx.so``: cblas_sgemm, cblas_dgemm, cblas_cgemm).
MLX_CBLAS = ("cblas_sgemm", "cblas_dgemm", "cblas_cgemm")
CHOICES = ("auto", "mkl", "openblas", "none")
FIX_COMMAND = "pip install 'mlx-canary[cpu]'"

loaded_blas: str | None = None
loaded_description: str | None = None
requested_blas: str = "auto"
_warned = False


def requested() -> str:
    """The BLAS asked for by the environment: one of CHOICES (an unknown value counts as auto)."""
    if os.environ.get("MLX_CANARY_NO_OPENBLAS"):
        return "none"
    value = os.environ.get("MLX_CANARY_BLAS", "auto").strip().lower()
    return value if value in CHOICES else "auto"


def preload_blas() -> str | None:
    """Load an optimized BLAS globally if one is installed; return its name (or None). Says once on stderr when
    a fast BLAS was wanted and none could be loaded."""
    global loaded_blas, requested_blas
    if loaded_blas is not None or not sys.platform.startswith("linux"):
        return loaded_blas
    requested_blas = requested()
    if requested_blas == "none" or "mlx.core" in sys.modules:
        return None  # too late once mlx.core is loaded: MLX already bound its BLAS symbols
    if requested_blas in ("auto", "mkl"):
        loaded_blas = _load_mkl()
    if loaded_blas is None and requested_blas in ("auto", "openblas"):
        loaded_blas = _load_pip_openblas() or _load_system_openblas()
    if loaded_blas is None:
        warn_reference_blas()
    return loaded_blas


def _load_first(names, directory: Path | None = None, mode: int = ctypes.RTLD_GLOBAL):
    """(name, handle) of the first library in ``names`` that loads, or (None, None)."""
    for name in names:
        try:
            return name, ctypes.CDLL(str(directory / name) if directory else name, mode=mode)
        except OSError:
            continue
    return None, None


# --- MKL -----------------------------------------------------------------------------------------------------


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
    global loaded_description
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
            loaded_description = f"{_mkl_version(lib)} ({name}, {lib.MKL_Get_Max_Threads()} threads)"
            return name
    return None


def _mkl_version(lib) -> str:
    buf = ctypes.create_string_buffer(256)
    try:
        lib.MKL_Get_Version_String(buf, len(buf))
        words = buf.value.decode(errors="replace").split()
        return "MKL " + words[words.index("Version") + 1].split("-")[0]
    except (AttributeError, ValueError, IndexError):
        return "MKL"


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


# --- OpenBLAS --------------------------------------------------------------------------------------------------


def pip_openblas_path() -> Path | None:
    """The library of the scipy-openblas32 wheel, if installed (found without importing the package)."""
    spec = importlib.util.find_spec(PIP_OPENBLAS)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "lib" / PIP_OPENBLAS_LIBRARY
    return path if path.exists() else None


def _load_pip_openblas() -> str | None:
    """Load scipy-openblas32's library (privately: its prefixed names must not clash with SciPy's own copy) and
    publish its cblas functions under MLX's names."""
    global loaded_description
    from . import _symbol_alias

    path = pip_openblas_path()
    if path is None or not _symbol_alias.supported():
        return None
    try:
        lib = ctypes.CDLL(str(path))
        _symbol_alias.load_aliases({n: ctypes.cast(getattr(lib, "scipy_" + n), ctypes.c_void_p).value
                                    for n in MLX_CBLAS})
    except (OSError, AttributeError):
        return None
    loaded_description = f"{_openblas_config(lib, 'scipy_')} (scipy-openblas32)"
    return "scipy-openblas32"


def _load_system_openblas() -> str | None:
    global loaded_description
    name, lib = _load_first(OPENBLAS_NAMES)
    if name:
        loaded_description = f"{_openblas_config(lib, '')} ({name})"
    return name


def _openblas_config(lib, prefix: str) -> str:
    """OpenBLAS's build line (version, kernel family, MAX_THREADS) and the threads it will use."""
    try:
        get = getattr(lib, prefix + "openblas_get_config")
        get.restype = ctypes.c_char_p
        threads = getattr(lib, prefix + "openblas_get_num_threads")()
        return f"{get().decode(errors='replace').strip()}, {threads} threads"
    except AttributeError:
        return "OpenBLAS"


# --- reporting ---------------------------------------------------------------------------------------------------


def fix_hint() -> str:
    """The command that gives this machine a fast BLAS."""
    if requested_blas == "mkl" and platform.machine().lower() not in ("x86_64", "amd64"):
        return "MKL exists for x86-64 only: unset MLX_CANARY_BLAS to use OpenBLAS"
    if pip_openblas_path() is None:
        return FIX_COMMAND
    # the pip OpenBLAS is installed but cannot be used here (not glibc 2.28+ on x86-64/aarch64)
    return "install the system's OpenBLAS (Debian/Ubuntu: sudo apt-get install libopenblas0-pthread)"


def warn_reference_blas() -> None:
    """One line on stderr, once per process, when MLX's CPU backend is left on its reference BLAS although a
    fast one was wanted (not with MLX_CANARY_BLAS=none, not where MLX has a GPU backend instead of mlx-cpu)."""
    global _warned
    if _warned or requested_blas == "none" or not _mlx_cpu_installed():
        return
    _warned = True
    wanted = "MKL" if requested_blas == "mkl" else "an optimized BLAS"
    print(f"mlx-canary: warning: {wanted} was not found, so MLX's CPU backend uses its slow reference BLAS "
          f"(transcription several times slower); fix: {fix_hint()}", file=sys.stderr)


def _mlx_cpu_installed() -> bool:
    try:
        from importlib import metadata

        metadata.distribution("mlx-cpu")
    except Exception:  # MLX without its Linux CPU wheel (a CUDA build, a source build): its BLAS is not ours
        return False
    return True


def blas_status() -> str:
    """One line for verbose output saying which BLAS MLX's CPU backend uses."""
    if not sys.platform.startswith("linux"):
        return "BLAS: platform default"
    if loaded_blas:
        return f"BLAS: using {loaded_description or loaded_blas} for MLX's CPU backend"
    if requested_blas == "none":
        return "BLAS: MLX's bundled reference BLAS (MLX_CANARY_BLAS=none)"
    if requested_blas == "mkl":
        return ("BLAS: MLX_CANARY_BLAS=mkl but MKL was not found (pip install 'mlx-canary[cpu]' on x86-64); "
                "MLX's CPU backend uses its slow bundled reference BLAS")
    return f"BLAS: no OpenBLAS or MKL found; MLX's CPU backend uses its slow bundled reference BLAS ({fix_hint()})"


def describe() -> str:
    """Short name of the BLAS in use, for benchmark tables."""
    if not sys.platform.startswith("linux"):
        return "platform default"
    return loaded_description or ("MLX reference BLAS" if loaded_blas is None else loaded_blas)
