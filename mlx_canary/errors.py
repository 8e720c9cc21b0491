"""The one exception type for errors a user can cause (bad path, bad language, corrupt file...).

The CLI prints its message and exits non-zero; anything else escaping is a bug and keeps its traceback.
"""


class CanaryError(Exception):
    """An error with a message a person can act on."""
