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

from mlx_canary import _blas, _symbol_alias

REPO = Path(__file__).resolve().parents[1]
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="BLAS preloading is Linux-only")

# Reports which BLAS was loaded at the moment mlx.core was imported, then checks a matrix product against
# NumPy's (a wrong library binding would give garbage or crash here).
PROBE = """
import ctypes, importlib.util, json, os, sys
hidden = [h for h in os.environ.get('_HIDE', '').split(',') if h]
if hidden:
    real_find_spec = importlib.util.find_spec
    def find_spec(name, package=None):  # hides pip packages whose name contains a hidden word
        return None if any(h in name for h in hidden) else real_find_spec(name, package)
    importlib.util.find_spec = find_spec
    real_cdll = ctypes.CDLL
    class CDLL(real_cdll):  # and shared libraries whose path contains one
        def __init__(self, name, *args, **kwargs):
            if any(h in str(name) for h in hidden):
                raise OSError(f'{name}: hidden by the test')
            super().__init__(name, *args, **kwargs)
    ctypes.CDLL = CDLL
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
if os.environ.get('_WARN_AGAIN'):
    _blas.preload_blas(); _blas.warn_reference_blas()
print(json.dumps({"at_mlx_import": seen.get('blas'), "loaded": _blas.loaded_blas, "status": _blas.blas_status(),
                  "max_abs_err": err}))
"""


def probe(**env_overrides) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MLX_CANARY_BLAS", "MLX_CANARY_NO_OPENBLAS")}
    env.update(env_overrides)
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    return dict(json.loads(proc.stdout.splitlines()[-1]), stderr=proc.stderr)


def have_openblas() -> bool:
    try:
        ctypes.CDLL("libopenblas.so.0")
    except OSError:
        return False
    return True


def have_mkl() -> bool:
    return any((d / n).exists() for d in _blas.mkl_library_dirs() for n in _blas.MKL_NAMES)


def have_pip_openblas() -> bool:
    return _blas.pip_openblas_path() is not None and _symbol_alias.supported()


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
    """MLX_CANARY_BLAS=openblas: the pip wheel's OpenBLAS (scipy-openblas32) first, else the system's."""
    r = probe(MLX_CANARY_BLAS="openblas")
    if have_pip_openblas():
        assert r["at_mlx_import"] == r["loaded"] == "scipy-openblas32"
        assert r["status"].startswith("BLAS: using OpenBLAS ") and r["status"].endswith(
            "(scipy-openblas32) for MLX's CPU backend")
    elif have_openblas():
        assert r["at_mlx_import"] == r["loaded"] == "libopenblas.so.0"
        assert "(libopenblas.so.0) for MLX's CPU backend" in r["status"]
    else:
        pytest.skip("neither scipy-openblas32 nor libopenblas.so.0 is installed")
    assert r["max_abs_err"] < 1e-3


@linux_only
def test_system_openblas_when_the_pip_one_is_absent():
    if not have_openblas():
        pytest.skip("libopenblas.so.0 is not installed")
    r = probe(MLX_CANARY_BLAS="openblas", _HIDE="scipy_openblas")
    assert r["at_mlx_import"] == r["loaded"] == "libopenblas.so.0"
    assert r["max_abs_err"] < 1e-3


@linux_only
def test_auto_prefers_mkl_then_pip_openblas_then_system_openblas():
    r = probe()
    if have_mkl():
        assert r["at_mlx_import"] == r["loaded"] and r["loaded"].startswith("libmkl_rt")
        assert r["status"].startswith("BLAS: using MKL ")
    elif have_pip_openblas():
        assert r["loaded"] == "scipy-openblas32"
    elif have_openblas():
        assert r["loaded"] == "libopenblas.so.0"
    else:
        assert r["loaded"] is None and "no OpenBLAS or MKL found" in r["status"]
    assert r["max_abs_err"] < 1e-3
    if r["loaded"]:
        assert r["stderr"] == ""


@linux_only
def test_without_any_fast_blas_one_warning_line_names_the_fix():
    """Every optimized library hidden: MLX runs (correctly) on its reference BLAS, and stderr says so once,
    with the pip command, however often the check runs."""
    r = probe(_HIDE="openblas,mkl_rt", _WARN_AGAIN="1")
    assert r["loaded"] is None and r["max_abs_err"] < 1e-3
    lines = r["stderr"].splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("mlx-canary: warning: ") and "reference BLAS" in lines[0]
    assert lines[0].endswith("fix: pip install 'mlx-canary[cpu]'")


@linux_only
def test_no_warning_when_the_reference_blas_is_asked_for():
    r = probe(_HIDE="openblas,mkl_rt", MLX_CANARY_BLAS="none")
    assert r["loaded"] is None and r["stderr"] == ""


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
    if not (have_mkl() or have_pip_openblas() or have_openblas()):
        pytest.skip("neither MKL nor OpenBLAS is installed")
    if os.environ.get("MLX_CANARY_BLAS", "auto") == "none" or os.environ.get("MLX_CANARY_NO_OPENBLAS"):
        pytest.skip("the environment asks for MLX's bundled BLAS")
    assert _blas.loaded_blas is not None


# Publishes libc's strlen under several new names and finds each one through the handle and through the
# process's global scope (as MLX's symbol lookups will): exercises the generated object's hash table too.
ALIAS_PROBE = """
import ctypes, json
from mlx_canary import _symbol_alias
target = ctypes.cast(ctypes.CDLL(None).strlen, ctypes.c_void_p).value
names = [f"mlx_canary_test_alias_{i}" for i in range(7)]
handle = _symbol_alias.load_aliases({n: target for n in names})
found = [ctypes.cast(getattr(lib, n), ctypes.c_void_p).value for lib in (handle, ctypes.CDLL(None)) for n in names]
f = getattr(ctypes.CDLL(None), names[3])
f.restype, f.argtypes = ctypes.c_size_t, [ctypes.c_char_p]
print(json.dumps({"all_at_target": all(a == target for a in found), "strlen": f(b"hello")}))
"""


@linux_only
def test_alias_object_publishes_functions_under_new_names():
    if not _symbol_alias.supported():
        pytest.skip("symbol aliases need glibc 2.28+ on x86-64 or aarch64")
    proc = subprocess.run([sys.executable, "-c", ALIAS_PROBE], capture_output=True, text=True, cwd=REPO,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1]) == {"all_at_target": True, "strlen": 5}
