"""mlx-canary: NVIDIA Canary speech recognition and translation models on Apple MLX.

Public API: ``load_model``, ``convert``, ``TranscribeOptions``, ``Transcript``, ``CanaryError`` (and its
subclasses ``AudioError``, ``UnsupportedOption``), ``__version__``; streaming: ``StreamingOptions`` and
``StreamingSession`` (fed pieces of 16 kHz audio, yields final tokens as they are decided; a loaded model opens
one with ``model.engine.open_stream(task, options)``).
"""

# First, before anything imports mlx.core: on Linux, route MLX's CPU BLAS calls to a fast BLAS (see _blas.py).
from ._blas import preload_blas as _preload_blas

_preload_blas()

from ._version import __version__  # noqa: E402
from .errors import AudioError, CanaryError, UnsupportedOption  # noqa: E402
from .loading import load_model  # noqa: E402
from .options import TranscribeOptions  # noqa: E402
from .streaming import StreamingSession  # noqa: E402
from .streaming_policy import StreamingOptions  # noqa: E402
from .transcript import Transcript  # noqa: E402

# Last: importing the submodule mlx_canary.convert binds the package attribute ``convert`` to the module;
# binding the function right after keeps ``mlx_canary.convert`` the function (the one that picks the family).
from .conversion import convert  # noqa: E402

__all__ = [
    "load_model", "convert", "TranscribeOptions", "Transcript", "CanaryError", "AudioError", "UnsupportedOption",
    "__version__", "StreamingSession", "StreamingOptions",
]
