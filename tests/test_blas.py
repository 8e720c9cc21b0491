"""BLAS selection for MLX's CPU backend on Linux (mlx_canary/_blas.py).

Each case runs in a fresh interpreter: the choice is made once, before ``mlx.core`` is first imported.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_canary import _blas

REPO = Path(__file__).resolve().parents[1]
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="BLAS preloading is Linux-only")

# Reports which BLAS was loaded at the moment mlx.core was imported, then checks a matrix product against
# NumPy's (a wrong library binding would give garbage or crash here).
PROBE = """
import json, sys
seen = {}
class Spy:
    def find_spec(self, name, path=None, target=None):
        if name == 'mlx.core' and 'blas' not in seen:
            seen['blas'] = sys.modules['mlx_canary._blas'].loaded_blas
sys.meta_path.insert(0, Spy())
import mlx_canary, mlx.core as mx, numpy as np
from mlx_canary import _blas
mx.set_default_device(mx.cpu)
a = np.random.default_rng(0).standard_normal((300, 200)).astype(np.float32)
b = np.random.default_rng(1).standard_normal((200, 150)).astype(np.float32)
err = float(np.abs(np.array(mx.array(a) @ mx.array(b)) - a @ b).max())
print(json.dumps({"at_mlx_import": seen.get('blas'), "loaded": _blas.loaded_blas, "status": _blas.blas_status(),
                  "max_abs_err": err}))
"""


def probe(**env_overrides) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MLX_CANARY_BLAS", "MLX_CANARY_NO_OPENBLAS")}
    env.update(env_overrides)
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def have_openblas() -> bool:
    try:
        ctypes.CDLL("libopenblas.so.0")
    except OSError:
        return False
    return True


def have_mkl() -> bool:
    return any((d / n).exists() for d in _blas.mkl_library_dirs() for n in _blas.MKL_NAMES)


def test_requested_reads_the_environment(monkeypatch):
    monkeypatch.delenv("MLX_CANARY_NO_OPENBLAS", raising=False)
    monkeypatch.delenv("MLX_CANARY_BLAS", raising=False)
    assert _blas.requested() == "auto"
    for value, expected in (("MKL", "mkl"), (" openblas ", "openblas"), ("none", "none"), ("bogus", "auto")):
        monkeypatch.setenv("MLX_CANARY_BLAS", value)
        assert _blas.requested() == expected
    monkeypatch.setenv("MLX_CANARY_NO_OPENBLAS", "1")  # the older switch still wins
    assert _blas.requested() == "none"


@linux_only
def test_openblas_is_loaded_before_mlx():
    if not have_openblas():
        pytest.skip("libopenblas.so.0 is not installed")
    r = probe(MLX_CANARY_BLAS="openblas")
    assert r["at_mlx_import"] == r["loaded"] == "libopenblas.so.0"
    assert r["max_abs_err"] < 1e-3
    assert r["status"] == "BLAS: using libopenblas.so.0 for MLX's CPU backend"


@linux_only
def test_auto_prefers_mkl_then_openblas():
    r = probe()
    if have_mkl():
        assert r["at_mlx_import"] == r["loaded"] and r["loaded"].startswith("libmkl_rt")
    elif have_openblas():
        assert r["loaded"] == "libopenblas.so.0"
    else:
        assert r["loaded"] is None and "no OpenBLAS or MKL found" in r["status"]
    assert r["max_abs_err"] < 1e-3


@linux_only
def test_mkl_when_asked():
    r = probe(MLX_CANARY_BLAS="mkl")
    if not have_mkl():
        assert r["loaded"] is None and "MLX_CANARY_BLAS=mkl but MKL was not found" in r["status"]
        return
    assert r["at_mlx_import"] == r["loaded"] and r["loaded"].startswith("libmkl_rt")
    assert r["max_abs_err"] < 1e-3


@linux_only
@pytest.mark.parametrize("env", [{"MLX_CANARY_BLAS": "none"}, {"MLX_CANARY_NO_OPENBLAS": "1"}])
def test_none_keeps_mlx_bundled_blas(env):
    r = probe(**env)
    assert r["loaded"] is None and r["status"].startswith("BLAS: MLX's bundled reference BLAS")
    assert r["max_abs_err"] < 1e-3


@linux_only
def test_this_test_process_uses_the_optimized_blas():
    """conftest.py imports mlx_canary before any test module imports mlx.core, so that the whole suite runs on
    the BLAS that users get rather than MLX's reference one."""
    if not (have_mkl() or have_openblas()):
        pytest.skip("neither MKL nor OpenBLAS is installed")
    if os.environ.get("MLX_CANARY_BLAS", "auto") == "none" or os.environ.get("MLX_CANARY_NO_OPENBLAS"):
        pytest.skip("the environment asks for MLX's bundled BLAS")
    assert _blas.loaded_blas is not None
