"""A fresh process for one share of a ``bench speed`` sweep: ``python -m bench.speed_worker JOB.json RESULT.json``.

It reads a ``bench.rounds.Job`` as JSON, runs it (``bench.rounds.time_process``) and writes the result as JSON; a
one-line error (``BenchError``) is written as ``{"error": message}`` with exit status 2, so that the sweep can say it
in one line too. Anything else is a crash: the traceback goes to standard error and no result file is written.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from bench.errors import BenchError
from bench.io import write_text
from bench.rounds import Job, time_process


def main(argv: list[str]) -> int:
    job_file, result_file = map(Path, argv)
    job = Job(**json.loads(job_file.read_text()))
    try:
        result = time_process(job)
    except BenchError as e:
        write_text(result_file, json.dumps({"error": str(e)}))
        return 2
    write_text(result_file, json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
