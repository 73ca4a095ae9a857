"""``bench run``: the whole comparison in one call: data, training, samples, speed, quality, report.

Stages, in order: ``data`` (the synthetic set, or a check of ``--data``), ``train:<variant>@<seed>`` for each
backbone or variant and each training seed, ``sample`` (the same test masks and noise through every model, for the
report's grid), ``speed``, ``parser`` (the face parser that scores mask adherence), ``quality`` and ``report``.
Every model trains, samples and is timed at its recipe's precision (``bench.presets``: bf16 at ``paper``, fp32 at
``cpu`` and ``tiny``), the sampled and timed models cast to it once.
They call the Python APIs of ``bench.train``, ``bench.sample``, ``bench.speed``, ``bench.parser``,
``bench.quality`` and ``bench.report``. What each preset spends is ``bench.presets`` (recipes per backbone and the
preset's budget), the same table ``bench train`` reads.

Layout under ``RESULTS/run_<preset>[_<data>]/``: ``state.json``, ``runs/<variant>/seed<k>/`` (one training run
each), ``samples/<variant>/`` and ``parser-<size>px.pt``. Results rows go to ``RESULTS/speed.csv`` and
``RESULTS/quality.csv``, like the commands' own.

Resuming: ``state.json`` (written atomically) records each finished stage with the settings that decided it, its
outputs and its time. A re-run skips a stage that is done with the same settings when no stage it depends on ran
again; ``--force`` redoes every stage (training from scratch). A training stage interrupted (Ctrl-C, SIGTERM, a
kill) continues from the run's last checkpoint on the next ``bench run``.

Training as jobs (``--launcher slurm|local``, ``bench.launch``): each training stage is submitted as its own job
(at most ``--jobs`` at once) once the data stage is done, its job id recorded in the state file as soon as it is
submitted; the later stages run here after every training job has finished. A re-run collects the jobs its state
names (finished or still running) instead of submitting them again; a failed job is submitted again by the next
``bench run`` and resumes from its run's last checkpoint. The main process alone writes the state file.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from bench import presets
from bench.errors import BenchError
from bench.io import display_path, folder_lock, read_json, write_json
from bench.launch import LaunchOptions
from bench.provenance import machine_fingerprint
from bench.variants import Variant, parse_models

STATE_VERSION = 2
SAMPLE_SEED = 0  # noise of grid sample i and of quality samples comes from (seed, i): the same for every model
SCALING_WARMUP = 1  # untimed calls before timing the extra (scaling) resolutions, which are timed per NFE only
QUALITY_BATCH = 64


@dataclass
class RunOptions:
    """The options of one `bench run`."""

    preset: str = "cpu"
    data: Optional[Path] = None
    models: list = field(default_factory=lambda: ["sisma", "dit", "sdm"])  # names or Variants
    seeds: list[int] = field(default_factory=lambda: [0])
    steps: Optional[int] = None
    force: bool = False
    results: Path = Path("results")
    reports: Path = Path("reports")
    report_name: Optional[str] = None
    device: str = "auto"
    threads: Optional[int] = None
    vae: Optional[str] = None
    inception_weights: Optional[Path] = None
    alexnet_weights: Optional[Path] = None
    launch: LaunchOptions = field(default_factory=LaunchOptions)  # training in this process, or as jobs


@dataclass
class Stage:
    """One step of the pipeline: what decides it, what it depends on, how to run it, how to check its outputs."""

    name: str
    title: str
    settings: dict
    deps: tuple[str, ...]
    run: Callable[[], dict]
    outputs_exist: Callable[[dict], bool] = lambda outputs: True


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def plain(obj):
    """JSON-plain copy (tuples -> lists, paths -> str), so that saved and fresh settings compare equal."""
    return json.loads(json.dumps(obj, default=str))


class Pipeline:
    """The stages of one `bench run` and the state file that lets a re-run skip what is done."""

    def __init__(self, opts: RunOptions, echo=print):
        import models
        from bench.runtime import resolve_device

        self.budget = presets.budget(opts.preset)
        self.variants: list[Variant] = parse_models([str(m) for m in opts.models])
        for v in self.variants:
            if opts.preset not in models.list_presets(v.model):
                raise BenchError(f"model {v.model!r} has no preset {opts.preset!r}; available: "
                                 f"{', '.join(models.list_presets(v.model))}")
        if not opts.seeds or len(set(opts.seeds)) != len(opts.seeds) or min(opts.seeds) < 0:
            raise BenchError(f"--seeds {','.join(map(str, opts.seeds))}: give distinct seeds of 0 or more, e.g. 0,1,2")
        if opts.data is not None and not Path(opts.data).is_dir():
            raise BenchError(f"--data {opts.data} is not a folder; give a CelebAMask-HQ (or "
                             f"{{train,test}}/{{images,labels}}) folder, or leave it out for synthetic faces")
        if opts.steps is not None and opts.steps < 1:
            raise BenchError(f"--steps must be at least 1, got {opts.steps}")
        if opts.threads is not None and opts.threads < 1:
            raise BenchError(f"--threads must be at least 1, got {opts.threads}")
        opts.launch.check()
        self.opts, self.echo = opts, echo
        self.results = Path(opts.results)
        self.dir = self.results / self.folder_name()
        self.state_path = self.dir / "state.json"
        self.sizes = self.image_sizes()
        self.device = str(resolve_device(opts.device))
        self.current: Optional[Stage] = None  # the stage running now (named when a run is interrupted)

    # ------------------------------------------------------------------ layout
    def folder_name(self) -> str:
        """run_<preset>, plus the data folder's name and a hash of its path when --data is given."""
        if self.opts.data is None:
            return f"run_{self.opts.preset}"
        path = str(Path(self.opts.data).resolve())
        slug = re.sub(r"[^A-Za-z0-9_-]+", "-", Path(path).name).strip("-") or "data"
        return f"run_{self.opts.preset}_{slug}-{hashlib.sha1(path.encode()).hexdigest()[:6]}"

    def run_dir(self, variant: Variant, seed: int) -> Path:
        """runs/<variant>/seed<k>-<hash of the settings that decide the trajectory>: runs of other settings live
        side by side, and a longer --steps continues the same folder."""
        key = {k: v for k, v in self.train_options(variant, seed).items() if k not in ("steps", "keep_at")}
        key["recipe"] = dataclasses.asdict(presets.recipe(self.opts.preset, variant.model))
        key["recipe"].pop("steps")
        from bench.train import model_config

        key["model"] = model_config(variant.model, self.opts.preset, variant.kwargs())  # defaults included
        digest = hashlib.sha1(json.dumps(plain(key), sort_keys=True).encode()).hexdigest()[:8]
        return self.dir / "runs" / variant.slug / f"seed{seed}-{digest}"

    def image_sizes(self) -> dict[str, int]:
        """Image size of each variant at the preset (counted on the meta device)."""
        from bench.variants import build_model

        return {v.name: int(build_model(v.model, self.opts.preset, v.kwargs(), "meta").image_size)
                for v in self.variants}

    def data_dir(self, size: int) -> Path:
        """The data folder for images of ``size`` px: --data, or the trainer's default synthetic set."""
        from bench.synth import default_set_dir

        if self.opts.data is not None:
            return Path(display_path(self.opts.data))
        return Path(display_path(default_set_dir(size, self.budget.synth_n)))

    def train_steps(self, variant: Variant) -> int:
        return self.opts.steps or presets.recipe(self.opts.preset, variant.model).steps

    def precision(self, variant: Variant) -> str:
        """The recipe's precision of a variant's backbone: what it trains, samples and is timed at."""
        return presets.recipe(self.opts.preset, variant.model).precision

    # ------------------------------------------------------------------ state
    def load_state(self) -> dict:
        fresh = {"version": STATE_VERSION, "preset": self.opts.preset, "created": now(), "stages": {}}
        if self.state_path.exists():
            state = read_json(self.state_path, "bench run state file")
            stages = state.get("stages", {}) if isinstance(state, dict) else None
            bad = not isinstance(stages, dict) or any(not isinstance(r, dict) or not isinstance(r.get("outputs", {}),
                                                                                                 dict)
                                                      for r in stages.values())
            if bad:
                raise BenchError(f"{display_path(self.state_path)} is not a bench run state file; move it away (every "
                                 f"stage then runs again) or give another --results")
            if state.get("version") == STATE_VERSION:
                return state
            self.echo(f"note: {self.state_path} is from another version of sis-bench; every stage runs again")
        return fresh

    def save_state(self, state: dict) -> None:
        state["budget"] = plain(dataclasses.asdict(self.budget))
        state["budget_help"] = {f.name: f.metadata.get("help", "") for f in dataclasses.fields(presets.Budget)}
        state["recipes"] = {v.name: plain({**dataclasses.asdict(presets.recipe(self.opts.preset, v.model)),
                                           "steps": self.train_steps(v)}) for v in self.variants}
        state["seeds"] = list(self.opts.seeds)
        state["updated"] = now()
        write_json(self.state_path, state)

    # ------------------------------------------------------------------ the stages
    def stages(self) -> list[Stage]:
        b, o = self.budget, self.opts
        names = [v.name for v in self.variants]
        sizes = sorted(set(self.sizes.values()))
        data_settings = {"data": display_path(o.data) if o.data else None, "synth_n": b.synth_n, "sizes": sizes}
        stages = [Stage("data", "data: " + ("check --data" if o.data else f"synthetic faces ({b.synth_n})"),
                        data_settings, (), self.stage_data,
                        lambda out: all(Path(p).is_dir() for p in out.get("folders", [])))]
        trained = []
        for v in self.variants:
            for seed in o.seeds:
                name = f"train:{v.name}@{seed}"
                trained.append(name)
                stages.append(Stage(name, f"train {v.name}, seed {seed} ({o.preset} preset, {self.train_steps(v)} "
                                          f"steps)",
                                    {"model": v.name, **self.train_options(v, seed)}, ("data",),
                                    lambda v=v, seed=seed: self.stage_train(v, seed),
                                    lambda out: self.recorded(out, "checkpoint", self.dir).is_file()))
        trained = tuple(trained)
        first = tuple(f"train:{v.name}@{o.seeds[0]}" for v in self.variants)
        precision = {v.name: self.precision(v) for v in self.variants}  # each model's recipe precision
        stages.append(Stage("sample", f"sample grid ({b.sample_masks} test masks, {b.sample_steps} steps, every "
                                      f"model, seed {o.seeds[0]})",
                            {"models": names, "masks": b.sample_masks, "steps": b.sample_steps, "seed": SAMPLE_SEED,
                             "train_seed": o.seeds[0], "precision": precision},
                            first, self.stage_sample,
                            lambda out: all((self.recorded({"f": p}, "f", self.dir) / "samples.json").is_file()
                                            for p in out.get("folders", []))))
        stages.append(Stage("speed", f"speed ({b.speed_steps} steps, batches {list(b.speed_batch_sizes)}, "
                                     f"{self.device})",
                            {"models": names, "device": self.device, "machine": machine_fingerprint(),
                             "precision": precision,
                             **{k: getattr(b, k) for k in (
                                "speed_steps", "speed_batch_sizes", "speed_scales", "speed_warmup", "speed_repeats",
                                "speed_processes", "speed_scale_repeats", "speed_image_repeats", "full_image_max_seconds",
                                "paper_flops")}},
                            (), self.stage_speed, lambda out: (self.results / "speed.csv").is_file()))
        stages.append(Stage("parser", f"face parser ({b.parser_steps} steps)",
                            {"sizes": sizes, "steps": b.parser_steps, "batch": b.parser_batch, "seed": o.seeds[0]},
                            ("data",), self.stage_parser,
                            lambda out: all(Path(p).is_file() for p in out.get("parsers", {}).values())))
        stages.append(Stage("quality", f"quality ({b.quality_masks or 'all'} masks x {b.quality_samples} samples, "
                                       f"{b.quality_steps} steps, {len(names) * len(o.seeds)} runs; earlier "
                                       f"snapshots on {self.snapshot_masks() or 'all'} masks)",
                            {"models": names, "seeds": list(o.seeds), "masks": b.quality_masks,
                             "snapshot_masks": self.snapshot_masks(),
                             "samples": b.quality_samples, "steps": b.quality_steps, "seed": SAMPLE_SEED,
                             "fractions": list(b.quality_fractions),
                             "guidance": {v.name: presets.recipe(o.preset, v.model).guidance for v in self.variants},
                             "precision": precision,
                             "inception": str(o.inception_weights or ""), "alexnet": str(o.alexnet_weights or "")},
                            (*trained, "parser"), self.stage_quality,
                            lambda out: (self.results / "quality.csv").is_file()))
        stages.append(Stage("report", "report", {"name": self.report_name(), "reports": str(o.reports)},
                            ("sample", "speed", "quality", *trained), self.stage_report,
                            lambda out: self.recorded(out, "report", o.reports).is_file()))
        return stages

    def recorded(self, outputs: dict, key: str, folder: Path) -> Path:
        """A path of a stage's outputs in state.json, contained in ``folder`` (a one-line error if it is not)."""
        value = outputs.get(key)
        if not isinstance(value, str) or not value:
            return Path(self.dir) / "missing-output"  # no such file: the stage is not done
        path = Path(value).expanduser().resolve()  # recorded as written: relative to the folder bench run ran in
        if not path.is_relative_to(Path(folder).expanduser().resolve()):
            raise BenchError(f"{display_path(self.state_path)} names {value} as an output, which is outside "
                             f"{display_path(folder)}; the file was edited or comes from elsewhere: move it away "
                             f"(every stage then runs again) or give another --results")
        return path

    def report_name(self) -> str:
        return self.opts.report_name or (self.opts.preset if self.opts.data is None else self.folder_name()[4:])

    def dry_run(self) -> str:
        """The resolved settings of every stage, and the full training config of each run, as text."""
        launch = self.opts.launch
        training = (f"training as {launch.launcher} jobs (at most {launch.jobs} at once, {launch.gpus} GPU(s) each on "
                    f"CUDA, {launch.minutes} min)" if launch.launcher else "training in this process")
        lines = [f"bench run --dry-run: preset {self.opts.preset}, device {self.device}, {training}, "
                 f"state in {self.state_path}", ""]
        for i, stage in enumerate(self.stages(), 1):
            lines.append(f"[{i}] {stage.title}")
            if stage.name.startswith("train:"):
                v = next(v for v in self.variants if stage.name == f"train:{v.name}@{stage.settings['seed']}")
                settings = {"model": v.model, "variant": v.name, "model_overrides": v.kwargs(),
                            **presets.train_defaults(self.opts.preset, v.model),
                            **self.train_options(v, stage.settings["seed"]),
                            "recipe source": presets.recipe(self.opts.preset, v.model).source,
                            "run folder": display_path(self.run_dir(v, stage.settings["seed"]))}
            else:
                settings = stage.settings
            lines += [f"    {k}: {json.dumps(plain(val))}" for k, val in settings.items()]
        return "\n".join(lines)

    def run(self) -> Path:
        """Run every stage that is not done; returns the report's path."""
        from bench.runtime import set_threads

        set_threads(self.opts.threads)
        with folder_lock(self.dir, "a bench run's results", "wait for that bench run to finish (or give another "
                         "--results)"):
            return self._run()

    def _run(self) -> Path:
        """``run`` under the results folder's lock."""
        state = self.load_state()
        stages = self.stages()
        ran: set[str] = set()
        total = len(stages)
        self.echo(f"bench run: preset {self.opts.preset}, models {', '.join(v.name for v in self.variants)}, "
                  f"seeds {','.join(map(str, self.opts.seeds))}, device {self.device}; state in {self.state_path}")
        jobs = self.opts.launch.launcher is not None
        for i, stage in enumerate(stages, 1):
            record = state["stages"].get(stage.name, {})
            if jobs and stage.name.startswith("train:"):
                if stage is next(s for s in stages if s.name.startswith("train:")):  # all of them at once, as jobs
                    self.run_jobs([(k, s) for k, s in enumerate(stages, 1) if s.name.startswith("train:")], state,
                                  ran, total)
                continue
            if self.is_done(stage, record, ran):
                self.echo(f"\n== [{i}/{total}] {stage.title}: done on {record.get('finished')}, skipped "
                          f"(--force redoes it)")
                continue
            if stage.name.startswith("train:"):
                self.check_no_job(stage, record)
            self.echo(f"\n== [{i}/{total}] {stage.title}")
            self.current = stage
            state["stages"][stage.name] = {"status": "running", "settings": plain(stage.settings),
                                           "started": now()}
            self.save_state(state)
            tic = time.perf_counter()
            outputs = stage.run()
            seconds = time.perf_counter() - tic
            state["stages"][stage.name] = {"status": "done", "settings": plain(stage.settings),
                                           "outputs": plain(outputs), "seconds": round(seconds, 1),
                                           "finished": now()}
            self.save_state(state)
            ran.add(stage.name)
            self.echo(f"   {stage.name} done in {seconds:.1f} s")
        return self.recorded(state["stages"]["report"]["outputs"], "report", self.opts.reports)

    def is_done(self, stage: Stage, record: dict, ran: set[str]) -> bool:
        """Finished before with the same settings, its inputs not redone since and its outputs there."""
        return (not self.opts.force and record.get("status") == "done"
                and record.get("settings") == plain(stage.settings)
                and not ran.intersection(stage.deps) and stage.outputs_exist(record.get("outputs", {})))

    # ------------------------------------------------------------------ training as jobs
    def check_no_job(self, stage: Stage, record: dict) -> None:
        """Training here while a job of an earlier `bench run --launcher` may still train the same run: refused."""
        from bench.launch import _is_submitit_process

        job = record.get("job") if record.get("status") == "submitted" else None
        if not job or self.opts.force:
            return
        if job.get("launcher") == "slurm" or _is_submitit_process(job.get("id", "")):
            raise BenchError(f"{stage.name} was submitted as {job.get('launcher')} job {job.get('id')} "
                             f"({display_path(self.state_path)}); run with --launcher {job.get('launcher')} to "
                             f"collect it, or cancel the job and add --force to train from scratch")

    def run_jobs(self, stages: list[tuple[int, Stage]], state: dict, ran: set[str], total: int) -> None:
        """The training stages as jobs (``bench.launch``): recorded jobs collected, the others submitted, at most
        ``--jobs`` at once, each recorded in the state file when submitted and when finished."""
        from bench import launch as launch_module

        launch = self.opts.launch
        launcher = launch_module.Launcher(launch, self.dir / "jobs", cuda=self.jobs_on_cuda())
        queue, active = [], {}  # active: stage name -> (index, stage, job)
        for i, stage in stages:
            record = state["stages"].get(stage.name, {})
            if self.is_done(stage, record, ran):
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
            self.echo(f"\n== [{i}/{total}] {stage.title}: collecting {launch.launcher} job {job.job_id}, submitted "
                      f"on {record.get('started')}")
            active[stage.name] = (i, stage, job)
        failures = []
        try:
            while queue or active:
                while queue and len(active) < launcher.capacity and not failures:
                    i, stage = queue.pop(0)
                    active[stage.name] = (i, stage, self.submit(launcher, i, stage, state, total))
                finished = [name for name, (_, _, job) in active.items() if launcher.done(job)]
                for name in finished:
                    i, stage, job = active.pop(name)
                    try:
                        result = launcher.result(job)
                    except Exception as e:  # noqa: BLE001 - whatever the job raised, said in one line
                        failures.append(f"{name}: {launcher.error(job, e)}")
                        state["stages"][name] = {**state["stages"].get(name, {}), "status": "failed",
                                                 "failed": now()}
                        self.save_state(state)
                        self.echo(f"   {name}: {launcher.error(job, e)}")
                        continue
                    record = state["stages"].get(name, {})
                    seconds = time.time() - record.get("submitted_at", time.time())
                    run_dir = self.run_dir(*self.variant_seed(stage))
                    state["stages"][name] = {"status": "done", "settings": plain(stage.settings),
                                             "outputs": plain(self.train_outputs(run_dir, result)),
                                             "seconds": round(seconds, 1), "finished": now(),
                                             "job": record.get("job")}
                    self.save_state(state)
                    ran.add(name)
                    self.echo(f"   {name} done ({launch.launcher} job {job.job_id}, step {result['step']}) in "
                              f"{seconds:.1f} s")
                if failures and (launch.launcher != "local" or not active):
                    break
                if not finished:
                    time.sleep(launch_module.POLL_S)
        except KeyboardInterrupt:
            launcher.interrupt([job for _, _, job in active.values()])
            raise
        if failures:
            running = f"; still running: {', '.join(active)} (collected by the next bench run)" if active else ""
            raise BenchError(f"{len(failures)} training job(s) failed: {'; '.join(failures)}{running}. Run the same "
                             f"command again to submit them again (training resumes from the last checkpoint)")

    def submit(self, launcher, i: int, stage: Stage, state: dict, total: int):
        """Prepare one training run (its config, --force clearing it) and submit it; recorded in the state file."""
        from bench.launch import train_spec, write_spec

        variant, seed = self.variant_seed(stage)
        cfg, run_dir, _ = self.prepare_train(variant, seed)
        slug = re.sub(r"[^A-Za-z0-9_-]+", "-", stage.name).strip("-")
        spec = write_spec(train_spec(dataclasses.asdict(cfg), run_dir, self.job_device(),
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

    # ------------------------------------------------------------------ stage bodies
    def stage_data(self) -> dict:
        from bench.data import FaceDataset

        folders = []
        sizes = sorted(set(self.sizes.values()))
        if self.opts.data is None:
            from bench.synth import ensure_default_set

            for size in sizes:
                folders.append(str(ensure_default_set(self.data_dir(size), self.budget.synth_n, size)))
        else:
            folders.append(str(self.data_dir(0)))
        for folder, size in zip(folders, sizes):
            train, test = FaceDataset(folder, "train", size=size), FaceDataset(folder, "test", size=size)
            self.echo(f"   {folder}: {len(train)} train and {len(test)} test faces")
        return {"folders": folders}

    def snapshot_steps(self, variant: Variant) -> list[int]:
        """Steps of the snapshots kept: the budget's quality fractions, the last step included, so that a quality
        row's checkpoint stays as it was measured even when a longer --steps continues the run."""
        steps = self.train_steps(variant)
        return sorted({max(1, round(f * steps)) for f in self.budget.quality_fractions if f <= 1} | {steps})

    def snapshot_masks(self) -> int:
        """Test masks scored at the snapshots before a run's last step (0: the whole split, as the last step)."""
        b = self.budget
        if not b.quality_snapshot_masks:
            return b.quality_masks
        return min(b.quality_snapshot_masks, b.quality_masks) if b.quality_masks else b.quality_snapshot_masks

    def train_options(self, variant: Variant, seed: int) -> dict:
        """Trainer options of one run beyond the preset's table: steps, seed, snapshots, data and VAE."""
        o = self.opts
        options = dict(preset=o.preset, steps=self.train_steps(variant), seed=seed, vae=o.vae,
                       keep_at=self.snapshot_steps(variant))
        if o.data is not None:
            options["data"] = display_path(o.data)
        return {k: v for k, v in options.items() if v is not None}

    def prepare_train(self, variant: Variant, seed: int):
        """The config of one training run (--force first clears its folder): (TrainConfig, folder, resume)."""
        from bench.train import make_config

        run_dir = self.run_dir(variant, seed)
        if run_dir.exists() and self.opts.force:  # --force: asked to train from scratch
            shutil.rmtree(run_dir)
        resume = (run_dir / "checkpoints" / "last.pt").is_file()
        if resume:
            self.echo(f"   continuing {run_dir} from its last checkpoint")
        return make_config(variant, run_dir, resume=resume, **self.train_options(variant, seed)), run_dir, resume

    @staticmethod
    def train_outputs(run_dir: Path, result: dict) -> dict:
        return {"run": str(run_dir), "checkpoint": str(run_dir / "checkpoints" / "last.pt"), "step": result["step"],
                "wall_s": result["wall_s"]}

    def stage_train(self, variant: Variant, seed: int) -> dict:
        from bench.train import train

        cfg, run_dir, resume = self.prepare_train(variant, seed)
        result = train(cfg, run_dir, resume=resume, device=self.device, progress=True)
        return self.train_outputs(run_dir, result)

    def stage_sample(self) -> dict:
        """The same test masks and noise seeds through every model: the report's sample grid."""
        from bench.sample import load_run, write_samples

        b, folders = self.budget, []
        for v in self.variants:
            run = load_run(self.run_dir(v, self.opts.seeds[0]), self.device, precision=self.precision(v))
            out = self.dir / "samples" / v.slug
            write_samples(run, out, b.sample_masks, b.sample_steps, seed=SAMPLE_SEED, grid=False, progress=True)
            folders.append(str(out))
        return {"folders": folders}

    def stage_speed(self) -> dict:
        import models
        from bench.speed import SpeedConfig, run_speed

        b, out = self.budget, self.results / "speed.csv"
        device = "cuda" if self.device.startswith("cuda") else self.device
        names = [v.name for v in self.variants]
        # precision None: each model at its recipe's precision (the same table as here: bench.speed.recipe_precision).
        # A busy machine does not stop the run: after waiting for quiet, its rows are flagged and the report leaves
        # them out of its ratios, saying so.
        common = dict(preset=self.opts.preset, steps=b.speed_steps, image_repeats=b.speed_image_repeats,
                      device=device, seed=self.opts.seeds[0], vae=self.opts.vae, out=out, precision=None,
                      allow_busy=True)
        run_speed(SpeedConfig(models=names, batch_sizes=list(b.speed_batch_sizes), warmup=b.speed_warmup,
                              repeats=b.speed_repeats, processes=b.speed_processes,
                              full_image_max_seconds=b.full_image_max_seconds, **common),
                  echo=self.echo)
        by_size: dict[int, list[str]] = {}
        for v in self.variants:
            by_size.setdefault(self.sizes[v.name], []).append(v.name)
        for size, names_here in by_size.items():  # per-NFE cost at larger images, batch 1: the scaling plot
            if b.speed_scales:  # one interleaved sweep per image size, one process, no breakdown: cheap
                resolutions = [size * s for s in b.speed_scales]
                self.echo(f"   scaling: {', '.join(names_here)} at {', '.join(map(str, resolutions))} px "
                          "(per NFE, batch 1)")
                run_speed(SpeedConfig(models=names_here, batch_sizes=[1], resolutions=resolutions,
                                      warmup=SCALING_WARMUP, repeats=b.speed_scale_repeats, processes=1,
                                      full_image_max_seconds=0.0, breakdown=False, **common), echo=lambda *_: None)
        with_paper = [v.name for v in self.variants if "paper" in models.list_presets(v.model)]
        if b.paper_flops and with_paper:
            self.echo(f"   FLOPs of the paper presets of {', '.join(with_paper)} (meta device: nothing runs)")
            run_speed(SpeedConfig(models=with_paper, preset="paper", steps=b.speed_steps, flops_only=True, out=out),
                      echo=lambda *_: None)
        return {"csv": str(out)}

    def stage_parser(self) -> dict:
        from bench import parser as face_parser

        b, parsers = self.budget, {}
        for size in sorted(set(self.sizes.values())):
            train_cfg = face_parser.TrainConfig(steps=b.parser_steps, batch_size=b.parser_batch,
                                                seed=self.opts.seeds[0])
            result = face_parser.train_and_save(self.data_dir(size), size, train_cfg, self.dir / f"parser-{size}px.pt",
                                                device=self.device)
            self.echo(f"   parser {size} px: mIoU on real test images {result['test_miou']:.4f}")
            parsers[str(size)] = str(result["path"])
        return {"parsers": parsers}

    def stage_quality(self) -> dict:
        """Every run scored at its snapshots and at its last step, with its recipe's guidance."""
        import torch

        from bench.quality import append_rows, evaluate_run, find_resources

        b, out = self.budget, self.results / "quality.csv"
        resources = find_resources(self.opts.inception_weights, self.opts.alexnet_weights, set())
        for reason in dict.fromkeys(r for r in (resources.inception_missing, resources.alexnet_missing) if r):
            self.echo(f"   note: {reason}")
        for v in self.variants:
            size, guidance = self.sizes[v.name], presets.recipe(self.opts.preset, v.model).guidance
            for seed in self.opts.seeds:
                run = self.run_dir(v, seed)
                snapshots = [run / "checkpoints" / f"step_{k:07d}.pt" for k in self.snapshot_steps(v)]
                found = [c for c in snapshots if c.is_file()]
                if snapshots[-1] not in found:  # a run trained without its final snapshot: its last checkpoint
                    found.append(run / "checkpoints" / "last.pt")
                for checkpoint in found:
                    last = checkpoint in (snapshots[-1], run / "checkpoints" / "last.pt")
                    row, masks = evaluate_run(run, self.data_dir(size), resources, self.dir / f"parser-{size}px.pt",
                                              torch.device(self.device), batch_size=QUALITY_BATCH, progress=True,
                                              echo=self.echo, checkpoint=checkpoint, split="test",
                                              n_masks=b.quality_masks if last else self.snapshot_masks(),
                                              samples_per_mask=b.quality_samples,
                                              steps=b.quality_steps, guidance=guidance, seed=SAMPLE_SEED,
                                              precision=self.precision(v))
                    append_rows(out, [row], masks)
                    self.echo(f"   {v.name} seed {seed} step {row['train_step']}: mIoU {row['miou']:.4f} (parser "
                              f"ceiling {row['miou_ceiling']:.4f}), pixel diversity {row['pixel_diversity']:.4f}")
        return {"csv": str(out)}

    def stage_report(self) -> dict:
        from bench.report import build_report

        path = build_report(self.results, self.opts.reports, self.report_name(), self.opts.preset)
        self.echo(f"   wrote {path}")
        return {"report": str(path)}
