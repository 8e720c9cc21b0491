"""Shared pytest setup: the `parity` marker, the NeMo oracle directory and the speech corpus fixtures.

The oracle (tests/nemo_oracle.py) is built once, in a subprocess with this interpreter, and cached on disk
(default tests/.cache/oracle, or $MLX_CANARY_ORACLE_DIR). The pytest process never imports NeMo or torch.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Before any test module imports mlx.core: the package picks MLX's CPU BLAS (OpenBLAS / MKL) at its import, and
# only the first import of mlx.core binds it. Without this the suite would run on MLX's reference BLAS, not
# the library users get.
import mlx_canary  # noqa: E402,F401

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

import audio_fixtures  # noqa: E402
import nemo_oracle  # noqa: E402
import nemo_salm_oracle  # noqa: E402
import nemo_v2_oracle  # noqa: E402

ORACLE_BUILD_TIMEOUT_S = 1200
AUDIO_ENV_DIR = "MLX_CANARY_AUDIO_DIR"


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "parity: compares against NeMo reference outputs (tests/nemo_oracle.py; needs NeMo once to build them)",
    )


@contextlib.contextmanager
def _file_lock(path: Path):
    """Serialise oracle builds between concurrent pytest processes (e.g. xdist workers)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        try:
            import fcntl
        except ImportError:  # non-POSIX: no locking
            yield
            return
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _nemo_available() -> bool:
    try:
        return importlib.util.find_spec("nemo") is not None
    except (ImportError, ValueError):
        return False


@pytest.fixture(scope="session")
def oracle_dir() -> Path:
    """Directory with NeMo's reference outputs (see tests/nemo_oracle.py for the layout); built if missing/stale."""
    out = nemo_oracle.oracle_dir_default().resolve()
    if nemo_oracle.is_fresh(out):
        return out
    if not _nemo_available():
        # A complete oracle from this script's exact parameters is still valid without NeMo installed.
        if nemo_oracle.is_fresh(out, check_versions=False):
            return out
        pytest.skip(
            "NeMo is not importable and no cached oracle matches tests/nemo_oracle.py "
            f"(build one with a NeMo environment: python tests/nemo_oracle.py --out {out})"
        )
    with _file_lock(out.parent / f".{out.name}.lock"):
        if nemo_oracle.is_fresh(out):
            return out
        cmd = [sys.executable, str(TESTS / "nemo_oracle.py"), "--out", str(out)]
        try:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, timeout=ORACLE_BUILD_TIMEOUT_S, env=dict(os.environ)
            )
        except subprocess.TimeoutExpired:
            pytest.fail(f"building the NeMo oracle timed out after {ORACLE_BUILD_TIMEOUT_S} s: {' '.join(cmd)}")
        if proc.returncode != 0 or not nemo_oracle.is_fresh(out):
            tail = (proc.stdout[-3000:] + "\n" + proc.stderr[-6000:]).strip()
            pytest.fail(f"building the NeMo oracle failed (rc={proc.returncode}): {' '.join(cmd)}\n{tail}")
    return out


def _build_in_subprocess(script: str, out: Path, fresh) -> None:
    """Run ``script --out out`` with this interpreter (NeMo stays out of the pytest process), bounded in time."""
    cmd = [sys.executable, str(TESTS / script), "--out", str(out)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=ORACLE_BUILD_TIMEOUT_S, env=dict(os.environ))
    except subprocess.TimeoutExpired:
        pytest.fail(f"building the NeMo oracle timed out after {ORACLE_BUILD_TIMEOUT_S} s: {' '.join(cmd)}")
    if proc.returncode != 0 or not fresh(out):
        tail = (proc.stdout[-3000:] + "\n" + proc.stderr[-6000:]).strip()
        pytest.fail(f"building the NeMo oracle failed (rc={proc.returncode}): {' '.join(cmd)}\n{tail}")


@pytest.fixture(scope="session")
def salm_oracle_dir() -> Path:
    """NeMo's SALM references (tests/nemo_salm_oracle.py): a tiny Canary-Qwen checkpoint and its generate() output."""
    out = nemo_salm_oracle.oracle_dir_default().resolve()
    if nemo_salm_oracle.is_fresh(out):
        return out
    if not _nemo_available() or importlib.util.find_spec("peft") is None:
        if nemo_salm_oracle.is_fresh(out, check_versions=False):
            return out
        pytest.skip("NeMo or peft (NeMo's speechlm2 needs it; both in the test extra) is not importable and no "
                    "cached SALM oracle matches tests/nemo_salm_oracle.py")
    with _file_lock(out.parent / f".{out.name}.lock"):
        if not nemo_salm_oracle.is_fresh(out):
            _build_in_subprocess("nemo_salm_oracle.py", out, nemo_salm_oracle.is_fresh)
    return out


@pytest.fixture(scope="session")
def v2_oracle_dir() -> Path:
    """NeMo's canary-1b-v2 references with a CTC aligner in the archive (tests/nemo_v2_oracle.py): NeMo's
    transcribe() from the files on, with and without timestamps, its long-form path included."""
    out = nemo_v2_oracle.oracle_dir_default().resolve()
    if nemo_v2_oracle.is_fresh(out):
        return out
    if not _nemo_available():
        if nemo_v2_oracle.is_fresh(out, check_versions=False):
            return out
        pytest.skip("NeMo is not importable and no cached v2 oracle matches tests/nemo_v2_oracle.py")
    with _file_lock(out.parent / f".{out.name}.lock"):
        if not nemo_v2_oracle.is_fresh(out):
            _build_in_subprocess("nemo_v2_oracle.py", out, nemo_v2_oracle.is_fresh)
    return out


@pytest.fixture(scope="session")
def v2_converted(v2_oracle_dir, tmp_path_factory) -> tuple:
    """The v2 oracle's .nemo converted once for every test that needs it: ``(reference, arrays, model_dir)``."""
    from mlx_canary.convert import convert

    ref, arrays = nemo_v2_oracle.load_reference(v2_oracle_dir)
    out = tmp_path_factory.mktemp("v2") / "mlx"
    convert(str(v2_oracle_dir / ref["model"]), out, progress=lambda _line: None)
    return ref, arrays, out


@pytest.fixture(scope="module")
def v2(v2_oracle_dir, v2_converted) -> tuple:
    """The converted v2 oracle model, loaded per test module: ``(reference, arrays, model, oracle dir)``."""
    from mlx_canary.loading import load_model

    ref, arrays, model_dir = v2_converted
    return ref, arrays, load_model(model_dir), v2_oracle_dir


@pytest.fixture(scope="session")
def oracle(oracle_dir):
    """Loader for one variant's references: oracle(variant) -> (reference.json dict, reference.npz mapping)."""
    cache = {}

    def load(variant: str):
        if variant not in cache:
            cache[variant] = nemo_oracle.load_reference(oracle_dir, variant)
        return cache[variant]

    return load


@pytest.fixture(scope="session")
def audio_dir() -> Path:
    """The speech corpus (tests/audio_fixtures.py): WAVs, their ffmpeg waveforms (*.ffmpeg16k.npy), audio.json.

    Uses the oracle's copy when a fresh oracle exists (so parity tests and plain tests read the same files);
    otherwise builds it under tests/.cache/audio (needs espeak-ng and ffmpeg, not NeMo).
    """
    out = nemo_oracle.oracle_dir_default().resolve()
    if nemo_oracle.is_fresh(out, check_versions=False):
        return out / "audio"
    target = Path(os.environ.get(AUDIO_ENV_DIR) or TESTS / ".cache" / "audio").resolve()
    with _file_lock(target.parent / f".{target.name}.lock"):
        try:
            audio_fixtures.build_corpus(target)
        except (RuntimeError, subprocess.CalledProcessError) as e:
            pytest.skip(f"cannot build the test speech corpus: {e}")
    return target


@pytest.fixture(scope="session")
def audio_manifest(audio_dir) -> dict:
    """audio.json of `audio_dir`: clips with name, lang, kind, file, sample_rate, channels, waveform_file, ..."""
    return audio_fixtures.load_manifest(audio_dir)
