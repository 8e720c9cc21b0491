"""mlx-canary: NVIDIA Canary speech recognition and translation models on Apple MLX.

Public API: ``load_model``, ``convert``, ``Transcript``, ``CanaryError``, ``__version__``, and streaming:
``open_session`` / ``StreamingSession`` (fed pieces of 16 kHz audio), ``StreamingOptions``.
"""

# First, before anything imports mlx.core: on Linux, route MLX's CPU BLAS calls to OpenBLAS (see _blas.py).
from mlx_canary._blas import preload_blas as _preload_blas

_preload_blas()

from mlx_canary.errors import CanaryError  # noqa: E402
from mlx_canary.transcript import Transcript  # noqa: E402

__version__ = "0.1.0"


def _missing(name: str, error: ImportError):
    reason = str(error)

    def unavailable(*args, **kwargs):
        raise NotImplementedError(f"mlx_canary.{name} is unavailable in this build: {reason}")

    unavailable.__name__ = name
    return unavailable


# Imported eagerly, not lazily: importing the submodule mlx_canary.convert binds the package attribute
# ``convert`` to the module; binding the function right after keeps ``mlx_canary.convert`` the function.
# The guard covers only a module of this package that is absent or incomplete (the engine modules land one
# by one); a missing third-party dependency such as mlx still fails the import loudly.
try:
    from mlx_canary.loading import load_model  # noqa: E402
except ImportError as e:
    if not (e.name or "").startswith("mlx_canary"):
        raise
    load_model = _missing("load_model", e)

try:
    from mlx_canary.convert import convert  # noqa: E402
except ImportError as e:
    if not (e.name or "").startswith("mlx_canary"):
        raise
    convert = _missing("convert", e)

try:
    from mlx_canary.streaming import StreamingSession, open_session  # noqa: E402
    from mlx_canary.streaming_policy import StreamingOptions  # noqa: E402
except ImportError as e:
    if not (e.name or "").startswith("mlx_canary"):
        raise
    open_session = _missing("open_session", e)

__all__ = ["load_model", "convert", "Transcript", "CanaryError", "__version__", "open_session", "StreamingSession",
           "StreamingOptions"]
