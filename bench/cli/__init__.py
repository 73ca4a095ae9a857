"""The ``bench`` command line: a Typer layer over the library, one module per command group.

Each command parses its options and makes one call into the library (``bench.train``, ``bench.speed``, ...);
no library module imports this package. Bad input (``bench.errors.BenchError`` and the registry's
``UnknownModel``) ends in one line on stderr and exit code 2.
"""
# Importing a command module registers its commands; this order is the order of `bench --help`.
from bench.cli import (
    data,  # noqa: F401
    doctor,  # noqa: F401
    gpucheck,  # noqa: F401
    models,  # noqa: F401
    parser,  # noqa: F401
    plan,  # noqa: F401
    quality,  # noqa: F401
    report,  # noqa: F401
    run,  # noqa: F401
    sample,  # noqa: F401
    speed,  # noqa: F401
    train,  # noqa: F401
    tune,  # noqa: F401
    weights,  # noqa: F401
)
from bench.cli.common import app

__all__ = ["app"]
