"""The one user-facing error type: its message names the problem and the fix."""


class QbaraError(ValueError):
    """Bad input or an impossible request. Caught by the CLI and printed without a traceback."""
