"""``bench run``: the whole comparison in one call: data, training, samples, speed, quality, report.

Stages, in order: ``data`` (the synthetic set, or a check of ``--data``), ``train:<variant>@<seed>`` for each
backbone or variant and each training seed, ``sample`` (the same test masks and noise through every model, for the
report's grid), ``speed``, ``parser`` (the face parser that scores mask adherence), ``quality`` and ``report``.
Every model trains, samples and is timed at its recipe's precision (``bench.presets``: bf16 at ``paper``, fp32 at
``cpu`` and ``tiny``), the sampled and timed models cast to it once.
They call the Python APIs of ``bench.train``, ``bench.sample``, ``bench.speed``, ``bench.parser``,
``bench.quality`` and ``bench.report``: the stage bodies are ``bench.stages``, the training jobs
``bench.train_jobs`` and what the options resolve to (budget, variants, folders) ``bench.run_setup``; this module
holds the order of the stages and the state file. What each preset spends is ``bench.presets`` (recipes per
backbone and the preset's budget), the same table ``bench train`` reads.

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
import json
import time
from pathlib import Path

from bench import presets
from bench.errors import BenchError
from bench.io import display_path, folder_lock, read_json, write_json
from bench.provenance import machine_fingerprint
from bench.run_setup import RunOptions, Stage, now, plain
from bench.runtime import set_threads
from bench.stages import QUALITY_BATCH, SAMPLE_SEED, SCALING_WARMUP
from bench.train_jobs import TrainingJobs

__all__ = ["Pipeline", "RunOptions", "Stage", "now", "plain", "QUALITY_BATCH", "SAMPLE_SEED", "SCALING_WARMUP",
           "STATE_VERSION"]

STATE_VERSION = 2
SPEED_SETTINGS = ("speed_steps", "speed_batch_sizes", "speed_scales", "speed_warmup", "speed_repeats",
                  "speed_processes", "speed_scale_repeats", "speed_image_repeats", "full_image_max_seconds",
                  "paper_flops")  # the budget's fields that decide the speed stage


class Pipeline(TrainingJobs):
    """The stages of one `bench run` and the state file that lets a re-run skip what is done."""

    def __init__(self, opts: RunOptions, echo=print):
        super().__init__(opts, echo)
        self.current: Stage | None = None  # the stage running now (named when a run is interrupted)

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
        """Every stage in order: data, training (each variant and seed), sample, speed, parser, quality, report."""
        trained = self.train_stages()
        return [self.data_stage(), *trained, *self.evaluation_stages(tuple(s.name for s in trained))]

    def data_stage(self) -> Stage:
        b, o = self.budget, self.opts
        settings = {"data": display_path(o.data) if o.data else None, "synth_n": b.synth_n,
                    "sizes": sorted(set(self.sizes.values()))}
        return Stage("data", "data: " + ("check --data" if o.data else f"synthetic faces ({b.synth_n})"), settings, (),
                     self.stage_data, lambda out: all(Path(p).is_dir() for p in out.get("folders", [])))

    def train_stages(self) -> list[Stage]:
        o = self.opts
        return [Stage(f"train:{v.name}@{seed}",
                      f"train {v.name}, seed {seed} ({o.preset} preset, {self.train_steps(v)} steps)",
                      {"model": v.name, **self.train_options(v, seed)}, ("data",),
                      lambda v=v, seed=seed: self.stage_train(v, seed),
                      lambda out: self.recorded(out, "checkpoint", self.dir).is_file())
                for v in self.variants for seed in o.seeds]

    def evaluation_stages(self, trained: tuple[str, ...]) -> list[Stage]:
        """sample, speed, parser, quality and report: what is done with the trained runs."""
        b, o = self.budget, self.opts
        names = [v.name for v in self.variants]
        first = tuple(f"train:{v.name}@{o.seeds[0]}" for v in self.variants)
        precision = {v.name: self.precision(v) for v in self.variants}  # each model's recipe precision
        return [
            Stage("sample", f"sample grid ({b.sample_masks} test masks, {b.sample_steps} steps, every model, seed "
                            f"{o.seeds[0]})",
                  {"models": names, "masks": b.sample_masks, "steps": b.sample_steps, "seed": SAMPLE_SEED,
                   "train_seed": o.seeds[0], "precision": precision},
                  first, self.stage_sample,
                  lambda out: all((self.recorded({"f": p}, "f", self.dir) / "samples.json").is_file()
                                  for p in out.get("folders", []))),
            Stage("speed", f"speed ({b.speed_steps} steps, batches {list(b.speed_batch_sizes)}, {self.device})",
                  {"models": names, "device": self.device, "machine": machine_fingerprint(), "precision": precision,
                   **{k: getattr(b, k) for k in SPEED_SETTINGS}},
                  (), self.stage_speed, lambda out: (self.results / "speed.csv").is_file()),
            Stage("parser", f"face parser ({b.parser_steps} steps)",
                  {"sizes": sorted(set(self.sizes.values())), "steps": b.parser_steps, "batch": b.parser_batch,
                   "seed": o.seeds[0]},
                  ("data",), self.stage_parser,
                  lambda out: all(Path(p).is_file() for p in out.get("parsers", {}).values())),
            self.quality_stage(trained, precision),
            Stage("report", "report", {"name": self.report_name(), "reports": str(o.reports)},
                  ("sample", "speed", "quality", *trained), self.stage_report,
                  lambda out: self.recorded(out, "report", o.reports).is_file()),
        ]

    def quality_stage(self, trained: tuple[str, ...], precision: dict) -> Stage:
        b, o = self.budget, self.opts
        names = [v.name for v in self.variants]
        return Stage("quality", f"quality ({b.quality_masks or 'all'} masks x {b.quality_samples} samples, "
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
                     lambda out: (self.results / "quality.csv").is_file())

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
                v, seed = self.variant_seed(stage)
                settings = {"model": v.model, "variant": v.name, "model_overrides": v.kwargs(),
                            **presets.train_defaults(self.opts.preset, v.model),
                            **self.train_options(v, seed),
                            "recipe source": presets.recipe(self.opts.preset, v.model).source,
                            "run folder": display_path(self.run_dir(v, seed))}
            else:
                settings = stage.settings
            lines += [f"    {k}: {json.dumps(plain(val))}" for k, val in settings.items()]
        return "\n".join(lines)

    # ------------------------------------------------------------------ running
    def run(self) -> Path:
        """Run every stage that is not done; returns the report's path."""
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
            if self.is_done(stage, record, ran, state["stages"]):
                self.echo(f"\n== [{i}/{total}] {stage.title}: done on {record.get('finished')}, skipped "
                          f"(--force redoes it)")
                continue
            if stage.name.startswith("train:"):
                self.check_no_job(stage, record)
            self.run_stage(i, total, stage, state)
            ran.add(stage.name)
        return self.recorded(state["stages"]["report"]["outputs"], "report", self.opts.reports)

    def run_stage(self, i: int, total: int, stage: Stage, state: dict) -> None:
        """Run one stage here, recorded in the state file as running, then as done with its outputs and time."""
        self.echo(f"\n== [{i}/{total}] {stage.title}")
        self.current = stage
        state["stages"][stage.name] = {"status": "running", "settings": plain(stage.settings), "started": now()}
        self.save_state(state)
        tic = time.perf_counter()
        outputs = stage.run()
        seconds = time.perf_counter() - tic
        state["stages"][stage.name] = {"status": "done", "settings": plain(stage.settings),
                                       "outputs": plain(outputs), "seconds": round(seconds, 1), "finished": now()}
        self.save_state(state)
        self.echo(f"   {stage.name} done in {seconds:.1f} s")

    def is_done(self, stage: Stage, record: dict, ran: set[str], records: dict | None = None) -> bool:
        """Finished before with the same settings, its inputs not redone since and its outputs there. Redone since:
        in this command (``ran``), or finished after it in an earlier one (``records``, the state file's stages): a
        training continued to more steps over several resumed commands makes the sample grid of its last checkpoint
        again, not keep the one of its earlier length."""
        finished = record.get("finished", "")
        later = records is not None and any(records.get(d, {}).get("finished", "") > finished for d in stage.deps)
        return (not self.opts.force and record.get("status") == "done"
                and record.get("settings") == plain(stage.settings) and not later
                and not ran.intersection(stage.deps) and stage.outputs_exist(record.get("outputs", {})))
