"""Helpers shared by the programs that drive NeMo itself: the test oracles (tests/nemo_*oracle.py), the benchmark
models (benchmarks/nemo_models.py) and the demo-model training (scripts/train_demo_model.py).

Development only: the mlx_canary package never imports this (nor NeMo or torch). NeMo is imported inside the
functions, so importing this module is cheap.
"""

from __future__ import annotations

import os
import sys
import tempfile


class QuietStderr:
    """Silence C-level stderr (SentencePiece training logs); replay its tail if the block fails."""

    def __enter__(self):
        sys.stderr.flush()
        self._tmp = tempfile.TemporaryFile()
        self._saved = os.dup(2)
        os.dup2(self._tmp.fileno(), 2)
        return self

    def __exit__(self, exc_type, *_):
        sys.stderr.flush()
        os.dup2(self._saved, 2)
        os.close(self._saved)
        if exc_type is not None:
            self._tmp.seek(0)
            sys.stderr.write(self._tmp.read().decode(errors="replace")[-5000:])
        self._tmp.close()
        return False


def quiet_nemo(python_warnings: bool = False) -> None:
    """NeMo, lhotse and Lightning log errors only; ``python_warnings=True`` also ignores Python warnings."""
    import logging as pylogging

    from nemo.utils import logging as nemo_logging

    nemo_logging.setLevel(pylogging.ERROR)
    for name in ("nemo_logger", "lhotse", "pytorch_lightning", "lightning", "lightning.pytorch"):
        pylogging.getLogger(name).setLevel(pylogging.ERROR)
    if python_warnings:
        import warnings

        warnings.filterwarnings("ignore")


def reset_restore_state() -> None:
    """NeMo keeps the last restore path globally; a model built afterwards would look for its artifacts there."""
    from nemo.utils.app_state import AppState

    st = AppState()
    st._all_model_restore_paths = []
    st._model_restore_path = None
    st.is_model_being_restored = False
    st.nemo_file_folder = None
