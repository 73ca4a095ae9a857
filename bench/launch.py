"""Training stages as jobs, for ``bench run --launcher slurm|local`` (submitit, the optional ``cluster`` extra).

Each training run is one job. The main process (``bench.pipeline``) writes the job's spec, submits it, records the
job id in its state file, polls, and collects the result; it owns the state file and runs every other stage itself,
after the training jobs. A job only trains: ``TrainJob`` (below) reads the spec and calls ``bench.train.train``, in its
own process, or through ``torchrun --nproc-per-node N -m bench.launch SPEC`` when the job has N > 1 GPUs. Whether the
run resumes is decided when the job starts (its last checkpoint exists or not), so a job that submitit requeues after
a preemption or a time-out (``TrainJob`` is checkpointable) continues from the run's last checkpoint, as does a job
submitted again by a later ``bench run``.

Executors:

- ``slurm``: ``submitit.SlurmExecutor``, one task on one node with ``gpus`` GPUs per job (torchrun inside for more
  than one), the job's time limit in minutes and extra sbatch options (``--slurm partition=gpu,account=abc``). A
  later ``bench run`` re-attaches to the jobs its state file names (``submitit.SlurmJob``) and waits for them instead
  of submitting them again.
- ``local``: ``submitit.LocalExecutor`` on this machine: each job its own process (torch threads ``threads``), at most
  ``jobs`` at once, GPUs handed out so that no two jobs share one. The main process waits for its jobs, also when it
  is interrupted (they get SIGTERM, save a checkpoint and stop); a job still running from an earlier main process
  (same process id, a submitit controller) is waited for, one without a result is submitted again.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.errors import BenchError
from bench.io import display_path, write_json
from bench.runtime import set_threads
from bench.train import TrainConfig, train

LAUNCHERS = ("slurm", "local")
JOB_MINUTES = 3 * 24 * 60  # default time limit of a training job
POLL_S = 10.0  # how often the main process looks at its jobs
TERMINATE_WAIT_S = 300  # how long an interrupted job's trainer may take to write its checkpoint
INSTALL = "pip install 'sis-bench[cluster]' (or pip install submitit)"


@dataclass
class LaunchOptions:
    """How `bench run` runs its training stages: in its own process (launcher None) or as jobs."""

    launcher: str | None = None
    jobs: int = 1  # training jobs at once (local); slurm queues each job as soon as it is submitted
    gpus: int = 1  # GPUs per training job on CUDA (torchrun over them when more than one)
    minutes: int = JOB_MINUTES
    slurm: dict = field(default_factory=dict)  # extra sbatch options, e.g. {"partition": "gpu", "account": "abc"}
    threads: int | None = None  # torch threads in each job (None: local with several jobs 1, else torch's choice)

    def check(self) -> None:
        if self.launcher not in (None, *LAUNCHERS):
            raise BenchError(f"--launcher {self.launcher}: use {' or '.join(LAUNCHERS)} (or leave it out to train in "
                             f"this process)")
        if self.jobs < 1 or self.gpus < 1 or self.minutes < 1:
            raise BenchError(f"--jobs, --gpus-per-job and --job-minutes must be at least 1; got {self.jobs}, "
                             f"{self.gpus} and {self.minutes}")
        if self.slurm and self.launcher != "slurm":
            raise BenchError("--slurm options need --launcher slurm")
        if self.launcher:
            submitit()
        if self.launcher == "slurm" and not slurm_available():
            raise BenchError("--launcher slurm: no srun here; run bench run on a machine of the Slurm cluster (a login "
                             "node, or inside an allocation where the later stages should run)")

    def job_threads(self) -> int | None:
        if self.threads is not None:
            return self.threads
        return 1 if self.launcher == "local" and self.jobs > 1 else None


def submitit():
    """The submitit module, or a one-line error saying how to install it."""
    try:
        import submitit as module
    except ImportError:
        raise BenchError(f"--launcher needs submitit: {INSTALL}") from None
    return module


def slurm_available() -> bool:
    """Slurm's srun on the PATH (submitit's own test before it submits anything)."""
    import shutil

    return shutil.which("srun") is not None


def parse_slurm_options(text: str | None) -> dict:
    """'partition=gpu, account=abc' -> {'partition': 'gpu', 'account': 'abc'} (sbatch long options)."""
    out = {}
    for item in (t.strip() for t in (text or "").split(",")):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise BenchError(f"--slurm {text!r}: give KEY=VALUE pairs separated by commas, e.g. partition=gpu,qos=high")
        out[key.strip().lstrip("-")] = value.strip()
    return out


# ---------------------------------------------------------------------------------------------- in the job

def train_spec(config: dict, run_dir: Path, device: str, threads: int | None, processes: int) -> dict:
    """What a training job needs: the run's TrainConfig (a dict), its folder, device, torch threads and processes."""
    return {"config": config, "run_dir": str(run_dir), "device": device, "threads": threads,
            "processes": processes}


def write_spec(spec: dict, path: Path) -> Path:
    write_json(path, spec)
    return path


class TrainJob:
    """The callable a job runs: train the run of the spec at ``path``; returns {step, loss, wall_s}.

    Checkpointable as submitit sees it (it has a ``checkpoint`` method): on a preemption or time-out submitit requeues
    it, and it resumes from the run's last checkpoint.
    """

    def __init__(self, path: str):
        self.path = str(path)

    def __call__(self) -> dict:
        spec = json.loads(Path(self.path).read_text())
        if spec.get("threads"):
            os.environ["OMP_NUM_THREADS"] = str(spec["threads"])
        if spec["processes"] > 1:
            return self._torchrun(spec)
        return run_spec(spec)

    def _torchrun(self, spec: dict) -> dict:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
               str(spec["processes"]), "-m", "bench.launch", self.path]
        proc = subprocess.Popen(cmd)
        try:
            code = proc.wait()
        finally:  # requeued, cancelled or interrupted: the workers save a checkpoint on SIGTERM
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=TERMINATE_WAIT_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
        if code != 0:
            raise RuntimeError(f"torchrun over {spec['processes']} processes exited with {code}")
        return json.loads(result_path(Path(self.path)).read_text())

    def checkpoint(self, *args, **kwargs):
        """submitit's requeue hook: the same job again (it resumes from the run's last checkpoint)."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(TrainJob(self.path), *args, **kwargs)


def result_path(spec_path: Path) -> Path:
    return spec_path.with_name(spec_path.stem + ".result.json")


def run_spec(spec: dict) -> dict:
    """Train the run of ``spec`` in this process (one rank of torchrun, or alone); resume when it has a checkpoint."""
    if spec.get("threads"):
        set_threads(spec["threads"])
    run_dir = Path(spec["run_dir"])
    resume = (run_dir / "checkpoints" / "last.pt").is_file()
    result = train(TrainConfig(**spec["config"]), run_dir, resume=resume, device=spec["device"], progress=False)
    return {k: result[k] for k in ("step", "loss", "wall_s")}


def main(argv: list[str] | None = None) -> None:
    """``python -m bench.launch SPEC``: one torchrun worker of a training job; rank 0 writes the result."""
    path = Path((argv if argv is not None else sys.argv[1:])[0])
    result = run_spec(json.loads(path.read_text()))
    if int(os.environ.get("RANK", "0")) == 0:
        write_json(result_path(path), result)


# ---------------------------------------------------------------------------------------------- in the main process

class Launcher:
    """Submits training jobs through submitit and follows them (see the module docstring)."""

    def __init__(self, opts: LaunchOptions, folder: Path, cuda: bool):
        self.opts, self.folder, self.cuda = opts, Path(folder), cuda
        self.name = opts.launcher
        self._free_gpus = list(range(_gpu_count())) if cuda and self.name == "local" else []
        self._gpus = len(self._free_gpus)  # this machine's, for local jobs
        self._held: dict[str, list[int]] = {}

    @property
    def processes(self) -> int:
        """Processes per job: one per GPU on CUDA, one on the CPU."""
        return self.opts.gpus if self.cuda else 1

    @property
    def capacity(self) -> int:
        """Jobs that may run at once."""
        if self.name == "local" and self.cuda:
            return max(1, min(self.opts.jobs, self._gpus // self.opts.gpus))
        return self.opts.jobs

    def _executor(self, gpus: list[int]):
        s = submitit()
        folder = self.folder / "%j"
        if self.name == "local":
            ex = s.LocalExecutor(folder)
            ex.update_parameters(timeout_min=self.opts.minutes, gpus_per_node=len(gpus), visible_gpus=gpus)
            return ex
        ex = s.SlurmExecutor(folder)
        ex.update_parameters(time=self.opts.minutes, nodes=1, ntasks_per_node=1,
                             gpus_per_node=self.opts.gpus if self.cuda else None, job_name="sis-bench-train",
                             additional_parameters=dict(self.opts.slurm))
        return ex

    def submit(self, spec_path: Path):
        """Submit the job of one spec; returns the submitit job."""
        gpus = []
        if self._free_gpus:
            gpus, self._free_gpus = self._free_gpus[:self.opts.gpus], self._free_gpus[self.opts.gpus:]
        job = self._executor(gpus).submit(TrainJob(str(spec_path)))
        self._held[job.job_id] = gpus
        return job

    def record(self, job, spec_path: Path) -> dict:
        """What the state file keeps of a job."""
        return {"launcher": self.name, "id": str(job.job_id), "folder": display_path(self.folder),
                "spec": display_path(spec_path), "log": display_path(job.paths.stdout)}

    def attach(self, record: dict):
        """The job a state file names, if it can still give a result (finished, or running); None otherwise."""
        s = submitit()
        if record.get("launcher") != self.name or not record.get("id"):
            return None
        folder = self.folder / "%j"
        if self.name == "slurm":
            return s.SlurmJob(folder=folder, job_id=record["id"])
        job = s.LocalJob(folder=folder, job_id=record["id"])
        if job.paths.result_pickle.exists():
            return job
        return _OrphanLocalJob(job) if _is_submitit_process(record["id"]) else None

    def done(self, job) -> bool:
        return job.done()

    def result(self, job) -> dict:
        """The job's result; the GPUs it held are free again. Raises what the job raised."""
        self._free_gpus += self._held.pop(job.job_id, [])
        return job.result()

    def error(self, job, e: BaseException) -> str:
        """One line about a failed job: its exception's last line and its log."""
        lines = [ln for ln in str(e).strip().splitlines() if ln.strip() and not ln.startswith(("-", " "))]
        reason = next((ln for ln in reversed(lines) if "Error" in ln or "Interrupted" in ln), lines[-1] if lines
                      else type(e).__name__)

        reason = re.sub(r"^(?:[A-Za-z_]\w*\.)+(?=\w+: )", "", reason.strip())  # bench.errors.BenchError -> BenchError
        return f"job {job.job_id} failed: {reason} (log: {display_path(job.paths.stderr)})"

    def interrupt(self, jobs: list) -> None:
        """Main process interrupted: local jobs get SIGTERM (their trainers save a checkpoint) and are waited for;
        slurm jobs go on (the state file names them, and the next `bench run` collects them)."""
        if self.name != "local":
            return
        for job in jobs:
            process = getattr(job, "_process", None)
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + TERMINATE_WAIT_S
        for job in jobs:
            process = getattr(job, "_process", None)
            if process is not None:
                try:
                    process.wait(timeout=max(1.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    process.kill()


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _is_submitit_process(pid: str) -> bool:
    """True when process ``pid`` is alive and is a submitit job controller."""
    try:
        cmdline = Path(f"/proc/{int(pid)}/cmdline").read_bytes().replace(b"\0", b" ")
    except (OSError, ValueError):
        return False
    return b"submitit" in cmdline


class _OrphanLocalJob:
    """A local job started by an earlier main process and still running: done when its process is gone."""

    def __init__(self, job):
        self._job = job
        self.job_id = job.job_id
        self.paths = job.paths

    def done(self) -> bool:
        return not _is_submitit_process(self.job_id) or self._job.paths.result_pickle.exists()

    def result(self):
        return self._job.result()


if __name__ == "__main__":
    main()
