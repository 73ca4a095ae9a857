"""The one exception type for bad input: the CLI prints its message on one line and exits non-zero."""
from __future__ import annotations


class BenchError(Exception):
    """A user-facing error: the message says what is wrong and how to fix it, on one line."""


class NonFiniteLoss(BenchError):
    """Training met a non-finite loss or weight: the one-line error, and the step training stopped at."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step
