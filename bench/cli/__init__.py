"""The ``bench`` command line: a Typer layer over the library, one module per command group.

Each command parses its options and makes one call into the library (``bench.train``, ``bench.speed``, ...);
no library module imports this package. Bad input (``bench.errors.BenchError`` and the registry's
``UnknownModel``) ends in one line on stderr and exit code 2.
"""
# Importing a command module registers its commands; this order is the order of `bench --help` (kept as written).
# isort: off
from bench.cli import models  # noqa: F401
from bench.cli import data  # noqa: F401
from bench.cli import weights  # noqa: F401
from bench.cli import train  # noqa: F401
from bench.cli import tune  # noqa: F401
from bench.cli import sample  # noqa: F401
from bench.cli import speed  # noqa: F401
from bench.cli import plan  # noqa: F401
from bench.cli import parser  # noqa: F401
from bench.cli import quality  # noqa: F401
from bench.cli import run  # noqa: F401
from bench.cli import report  # noqa: F401
from bench.cli import doctor  # noqa: F401
from bench.cli import gpucheck  # noqa: F401
# isort: on
from bench.cli.common import app

__all__ = ["app"]
