"""``bench run --launcher slurm|local``: the training stages as jobs (``bench.launch``), collected into the state file.

Recorded jobs are collected, the others submitted, at most ``--jobs`` at once; each is recorded in the state file
when submitted and when finished. The class is mixed into ``bench.pipeline.Pipeline``, whose state file methods
(``save_state``, ``is_done``) it calls; the main process alone writes that file.
"""
from __future__ import annotations

import dataclasses
import re
import time

from bench import launch  # a module: tests replace its Launcher and POLL_S
from bench.errors import BenchError
from bench.io import display_path
from bench.run_setup import Stage, now, plain
from bench.stages import StageBodies
from bench.variants import Variant


class TrainingJobs(StageBodies):
    """Submitting, collecting and recording the training jobs of one `bench run`."""

    def check_no_job(self, stage: Stage, record: dict) -> None:
        """Training here while a job of an earlier `bench run --launcher` may still train the same run: refused."""
        job = record.get("job") if record.get("status") == "submitted" else None
        if not job or self.opts.force:
            return
        if job.get("launcher") == "slurm" or launch._is_submitit_process(job.get("id", "")):
            raise BenchError(f"{stage.name} was submitted as {job.get('launcher')} job {job.get('id')} "
                             f"({display_path(self.state_path)}); run with --launcher {job.get('launcher')} to "
                             f"collect it, or cancel the job and add --force to train from scratch")

    def run_jobs(self, stages: list[tuple[int, Stage]], state: dict, ran: set[str], total: int) -> None:
        """The training stages as jobs: recorded jobs collected, the others submitted, at most ``--jobs`` at once,
        each recorded in the state file when submitted and when finished."""
        launcher = launch.Launcher(self.opts.launch, self.dir / "jobs", cuda=self.jobs_on_cuda())
        queue, active = self.recorded_jobs(launcher, stages, state, ran, total)
        failures = []
        try:
            while queue or active:
                while queue and len(active) < launcher.capacity and not failures:
                    i, stage = queue.pop(0)
                    active[stage.name] = (i, stage, self.submit(launcher, i, stage, state, total))
                finished = [name for name, (_, _, job) in active.items() if launcher.done(job)]
                for name in finished:
                    self.collect(launcher, active.pop(name), state, ran, failures)
                if failures and (self.opts.launch.launcher != "local" or not active):
                    break
                if not finished:
                    time.sleep(launch.POLL_S)
        except KeyboardInterrupt:
            launcher.interrupt([job for _, _, job in active.values()])
            raise
        if failures:
            running = f"; still running: {', '.join(active)} (collected by the next bench run)" if active else ""
            raise BenchError(f"{len(failures)} training job(s) failed: {'; '.join(failures)}{running}. Run the same "
                             f"command again to submit them again (training resumes from the last checkpoint)")

    def recorded_jobs(self, launcher, stages: list[tuple[int, Stage]], state: dict, ran: set[str], total: int):
        """The stages to submit (queue) and the jobs the state file names, to collect (active: stage name ->
        (index, stage, job)); stages done are skipped."""
        queue, active = [], {}
        for i, stage in stages:
            record = state["stages"].get(stage.name, {})
            if self.is_done(stage, record, ran, state["stages"]):
                self.echo(f"\n== [{i}/{total}] {stage.title}: done on {record.get('finished')}, skipped "
                          f"(--force redoes it)")
                continue
            job = None
            if (not self.opts.force and record.get("status") == "submitted"
                    and record.get("settings") == plain(stage.settings) and record.get("job")):
                job = launcher.attach(record["job"])
            if job is None:
                queue.append((i, stage))
                continue
            self.echo(f"\n== [{i}/{total}] {stage.title}: collecting {self.opts.launch.launcher} job {job.job_id}, "
                      f"submitted on {record.get('started')}")
            active[stage.name] = (i, stage, job)
        return queue, active

    def collect(self, launcher, entry: tuple, state: dict, ran: set[str], failures: list[str]) -> None:
        """A finished job's result recorded in the state file, or its failure added to ``failures``."""
        _, stage, job = entry
        name = stage.name
        try:
            result = launcher.result(job)
        except Exception as e:  # noqa: BLE001 - whatever the job raised, said in one line
            failures.append(f"{name}: {launcher.error(job, e)}")
            state["stages"][name] = {**state["stages"].get(name, {}), "status": "failed", "failed": now()}
            self.save_state(state)
            self.echo(f"   {name}: {launcher.error(job, e)}")
            return
        record = state["stages"].get(name, {})
        seconds = time.time() - record.get("submitted_at", time.time())
        run_dir = self.run_dir(*self.variant_seed(stage))
        state["stages"][name] = {"status": "done", "settings": plain(stage.settings),
                                 "outputs": plain(self.train_outputs(run_dir, result)),
                                 "seconds": round(seconds, 1), "finished": now(), "job": record.get("job")}
        self.save_state(state)
        ran.add(name)
        self.echo(f"   {name} done ({self.opts.launch.launcher} job {job.job_id}, step {result['step']}) in "
                  f"{seconds:.1f} s")

    def submit(self, launcher, i: int, stage: Stage, state: dict, total: int):
        """Prepare one training run (its config, --force clearing it) and submit it; recorded in the state file."""
        variant, seed = self.variant_seed(stage)
        cfg, run_dir, _ = self.prepare_train(variant, seed)
        slug = re.sub(r"[^A-Za-z0-9_-]+", "-", stage.name).strip("-")
        spec = launch.write_spec(launch.train_spec(dataclasses.asdict(cfg), run_dir, self.job_device(),
                                                   self.opts.launch.job_threads(), launcher.processes),
                                 self.dir / "jobs" / f"{slug}.json")
        self.current = stage
        job = launcher.submit(spec)
        record = launcher.record(job, spec)
        state["stages"][stage.name] = {"status": "submitted", "settings": plain(stage.settings), "started": now(),
                                       "submitted_at": time.time(), "job": record}
        self.save_state(state)
        self.echo(f"\n== [{i}/{total}] {stage.title}: submitted as {launcher.name} job {job.job_id} (log: "
                  f"{record['log']})")
        return job

    def jobs_on_cuda(self) -> bool:
        """Whether training jobs get GPUs: on Slurm unless --device cpu (this process may run on a node without
        one), locally when this machine's device is CUDA."""
        if self.opts.launch.launcher == "slurm":
            return (self.opts.device or "auto").strip().lower() != "cpu"
        return self.device.startswith("cuda")

    def job_device(self) -> str:
        """The --device a training job resolves on its own node: cuda (its own GPUs), cpu, or auto."""
        choice = (self.opts.device or "auto").strip().lower()
        return "cuda" if choice.startswith("cuda") or (self.opts.launch.launcher == "local" and self.jobs_on_cuda()) \
            else choice

    def variant_seed(self, stage: Stage) -> tuple[Variant, int]:
        """The variant and seed of a training stage."""
        seed = stage.settings["seed"]
        return next(v for v in self.variants if stage.name == f"train:{v.name}@{seed}"), seed
