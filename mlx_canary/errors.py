"""The exception types for errors a user can cause (bad path, bad language, corrupt file...).

``CanaryError`` is the one type to catch: the CLI prints its message and exits non-zero, the server answers 4xx.
Its subclasses exist only where a caller must tell errors apart (never by matching message text):

* ``AudioError``: an input that cannot be decoded or is not usable audio (only that input fails);
* ``UnsupportedOption``: an option the loaded model cannot honour (a language, a translation direction,
  timestamps, language identification), found before any audio is decoded.

Anything else escaping is a bug and keeps its traceback.
"""


class CanaryError(Exception):
    """An error with a message a person can act on."""


class AudioError(CanaryError):
    """An input that cannot be decoded, or holds no usable audio."""


class UnsupportedOption(CanaryError):
    """An option the loaded model does not support (language, translation direction, timestamps, ...)."""
