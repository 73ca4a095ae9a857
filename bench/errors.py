"""The one exception type for bad input: the CLI prints its message on one line and exits non-zero."""
from __future__ import annotations


class BenchError(Exception):
    """A user-facing error: the message says what is wrong and how to fix it, on one line."""
