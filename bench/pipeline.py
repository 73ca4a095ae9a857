"""``bench run``: the whole comparison in one command: data, training, samples, speed, quality, report.

Stages, in order: ``data`` (the synthetic set, or a check of ``--data``), ``train:<model>`` for each backbone,
``sample`` (the same test masks and seeds through every model, for the report's grid), ``speed``, ``parser``
(the face parser that scores mask adherence), ``quality`` and ``report``. They call the Python APIs of
``bench.train``, ``bench.sample``, ``bench.speed``, ``bench.parser``, ``bench.quality`` and ``bench.report``.

What each preset spends is one table, ``BUDGETS`` (the trainer's own preset defaults fill what it leaves out).

Resuming: ``RESULTS/run_<preset>[_<data>]/state.json`` (written atomically) records each finished stage with the
settings that decided it, its outputs and its time. A re-run skips a stage that is done with the same settings
when no stage it depends on ran again; ``--force`` redoes every stage (training from scratch). A training stage
interrupted (Ctrl-C, SIGTERM, a kill) continues from the run's last checkpoint on the next ``bench run``.
Results rows are appended to ``RESULTS/speed.csv`` and ``RESULTS/quality.csv``, like the commands' own.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import os
import re
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import typer

from bench.cli import command
from bench.errors import BenchError, portable

STATE_VERSION = 1
SAMPLE_SEED = 0  # noise of grid sample i and of quality samples comes from (seed, i): the same for every model
SCALING_WARMUP = 1  # untimed calls before timing the extra (scaling) resolutions, which are timed per NFE only


@dataclass(frozen=True)
class Budget:
    """What `bench run` spends at one preset. None: the trainer's default for that preset (bench.train)."""

    note: str
    synth_n: Optional[int] = None       # faces in the default synthetic set (1 in 15 is in the test split)
    train_steps: Optional[int] = None   # training steps per backbone (--steps overrides)
    batch_size: Optional[int] = None    # training batch
    ema_decay: Optional[float] = None   # EMA of the sampled weights; its window must be well under train_steps
    warmup: Optional[int] = None        # learning-rate warm-up steps
    ckpt_every: Optional[int] = None    # checkpoint interval: how much an interrupted run can lose
    sample_every: Optional[int] = None  # the trainer's own sample grids
    parser_steps: int = 3000            # face-parser training steps (mask mIoU)
    parser_batch: int = 32
    grid_masks: int = 6                 # test masks in the report's sample grid (one sample per model each)
    grid_steps: int = 200               # Euler steps of the grid samples
    quality_masks: int = 0              # test masks scored (0: the whole test split)
    quality_samples: int = 10           # samples per mask (LPIPS/pixel diversity; sample 0 serves FID)
    quality_steps: int = 200            # Euler steps of the scored samples
    speed_steps: int = 200              # steps of one timed image (the paper's 200)
    speed_batch_sizes: tuple = (1, 8)   # batch 1 for latency, the largest for images/s
    speed_scales: tuple = (2, 4)        # more resolutions, times the preset's, timed per NFE at batch 1 (scaling)
    speed_warmup: int = 3
    speed_repeats: int = 10
    speed_scale_repeats: int = 3        # timed evaluations at the extra resolutions
    speed_image_repeats: int = 3
    full_image_max_seconds: float = 20.0  # a whole image longer than this is projected, not measured
    paper_flops: bool = True            # also count FLOPs of the paper presets at 256/512/1024 px (meta device)


BUDGETS = {
    # CI's end-to-end test: under a minute of CPU time (one thread, quiet machine).
    "tiny": Budget(
        note="a smoke test of the whole pipeline: 0.3M-parameter models at 16 px, 20 training steps, 4 test "
             "masks, 10 sampling steps; its numbers say nothing about the backbones.",
        synth_n=64, train_steps=20, batch_size=4, ema_decay=0.9, warmup=0, ckpt_every=10, sample_every=10,
        parser_steps=100, parser_batch=16, grid_masks=4, grid_steps=20, quality_masks=4, quality_samples=2,
        quality_steps=10, speed_batch_sizes=(1, 4), speed_scales=(2,), speed_warmup=1, speed_repeats=3,
        speed_scale_repeats=3, speed_image_repeats=1, full_image_max_seconds=5.0, paper_flops=False),
    # The embedded default: about 20 minutes on two CPU cores (estimate; tune here).
    "cpu": Budget(
        note="about 3.4M-parameter models at 32 px in pixel space (256 tokens, like the paper's latent grid), "
             "trained for a few hundred steps on synthetic faces: a small-scale comparison under one trainer, "
             "sampler, timer and protocol, not a reproduction of the paper's numbers. Quality uses fewer masks, "
             "samples and sampling steps than the paper's protocol (see the budget table).",
        synth_n=2000, train_steps=600, batch_size=8, ema_decay=0.98, warmup=20, ckpt_every=50, sample_every=200,
        parser_steps=1000, parser_batch=32, grid_masks=6, grid_steps=50, quality_masks=24, quality_samples=4,
        quality_steps=20, speed_batch_sizes=(1, 8), speed_scales=(2, 4), speed_warmup=2, speed_repeats=10,
        speed_scale_repeats=3, speed_image_repeats=2, full_image_max_seconds=15.0, paper_flops=True),
    # The paper's experiment, with --data CelebAMask-HQ on a GPU machine: days of training.
    "paper": Budget(
        note="the paper's setting (150k steps at batch 8, EMA 0.9999, the whole test split, 10 samples per mask, "
             "200 steps); meant for a GPU and the real CelebAMask-HQ (--data).",
        parser_steps=3000, parser_batch=32, grid_masks=8, grid_steps=200, quality_masks=0, quality_samples=10,
        quality_steps=200, speed_batch_sizes=(1, 8), speed_scales=(2,), speed_warmup=5, speed_repeats=20,
        speed_scale_repeats=10, speed_image_repeats=3, full_image_max_seconds=120.0, paper_flops=True),
}

BUDGET_HELP = {  # one line per Budget field, printed in the report's budget table
    "synth_n": "faces in the synthetic set (1 in 15 in the test split); blank: --data or the trainer's default",
    "train_steps": "training steps per backbone",
    "batch_size": "training batch",
    "ema_decay": "EMA decay of the sampled weights",
    "warmup": "learning-rate warm-up steps",
    "ckpt_every": "checkpoint interval (steps)",
    "sample_every": "interval of the trainer's own sample grids (steps)",
    "parser_steps": "face-parser training steps",
    "parser_batch": "face-parser batch",
    "grid_masks": "test masks in the sample grid",
    "grid_steps": "Euler steps of the grid samples",
    "quality_masks": "test masks scored (0: all)",
    "quality_samples": "samples per mask (diversity; sample 0 for FID)",
    "quality_steps": "Euler steps of the scored samples",
    "speed_steps": "Euler steps of one timed image",
    "speed_batch_sizes": "batch sizes timed",
    "speed_scales": "extra resolutions (x preset's) timed per NFE",
    "speed_warmup": "untimed evaluations before timing",
    "speed_repeats": "timed evaluations per setting",
    "speed_scale_repeats": "timed evaluations at the extra resolutions",
    "speed_image_repeats": "timed whole images per setting",
    "full_image_max_seconds": "longer images are projected, not measured (s)",
    "paper_flops": "FLOPs of the paper presets counted too",
}


@dataclass
class RunOptions:
    """The options of one `bench run`."""

    preset: str = "cpu"
    data: Optional[Path] = None
    models: list[str] = field(default_factory=lambda: ["sisma", "dit", "sdm"])
    steps: Optional[int] = None
    force: bool = False
    results: Path = Path("results")
    reports: Path = Path("reports")
    report_name: Optional[str] = None
    device: str = "auto"
    threads: Optional[int] = None
    seed: int = 0
    vae: Optional[str] = None
    inception_weights: Optional[Path] = None
    alexnet_weights: Optional[Path] = None


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


def write_json(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


class Pipeline:
    """The stages of one `bench run` and the state file that lets a re-run skip what is done."""

    def __init__(self, opts: RunOptions, echo=typer.echo):
        import models

        if opts.preset not in BUDGETS:
            raise BenchError(f"unknown preset {opts.preset!r} for bench run; use one of {', '.join(BUDGETS)}")
        unknown = [m for m in opts.models if m not in models.list_models()]
        if unknown or not opts.models:
            raise BenchError(f"unknown model {', '.join(map(repr, unknown)) or '(none given)'} in --models; "
                             f"available: {', '.join(models.list_models())}")
        for m in opts.models:
            if opts.preset not in models.list_presets(m):
                raise BenchError(f"model {m!r} has no preset {opts.preset!r}; available: "
                                 f"{', '.join(models.list_presets(m))}")
        if opts.data is not None and not Path(opts.data).is_dir():
            raise BenchError(f"--data {opts.data} is not a folder; give a CelebAMask-HQ (or "
                             f"{{train,test}}/{{images,labels}}) folder, or leave it out for synthetic faces")
        if opts.steps is not None and opts.steps < 1:
            raise BenchError(f"--steps must be at least 1, got {opts.steps}")
        if opts.threads is not None and opts.threads < 1:
            raise BenchError(f"--threads must be at least 1, got {opts.threads}")
        self.opts, self.echo = opts, echo
        self.budget = BUDGETS[opts.preset]
        self.results = Path(opts.results)
        self.dir = self.results / self.folder_name()
        self.state_path = self.dir / "state.json"
        self.sizes = self.image_sizes()
        self.device = self.resolve_device()
        self.current: Optional[Stage] = None  # the stage running now (named when a run is interrupted)

    # ------------------------------------------------------------------ layout
    def folder_name(self) -> str:
        """run_<preset>, plus the data folder's name and a hash of its path when --data is given."""
        if self.opts.data is None:
            return f"run_{self.opts.preset}"
        path = str(Path(self.opts.data).resolve())
        slug = re.sub(r"[^A-Za-z0-9_-]+", "-", Path(path).name).strip("-") or "data"
        return f"run_{self.opts.preset}_{slug}-{hashlib.sha1(path.encode()).hexdigest()[:6]}"

    def run_dir(self, model: str) -> Path:
        return self.dir / "runs" / model

    def image_sizes(self) -> dict[str, int]:
        """Image size of each model at the preset (counted on the meta device)."""
        import torch

        from models import create_model

        sizes = {}
        for m in self.opts.models:
            with torch.device("meta"):
                sizes[m] = int(create_model(m, self.opts.preset).image_size)
        return sizes

    def resolve_device(self) -> str:
        import torch

        if self.opts.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.opts.device.startswith("cuda") and not torch.cuda.is_available():
            raise BenchError(f"--device {self.opts.device}: no CUDA device is available; use --device cpu or auto")
        return self.opts.device

    def data_dir(self, size: int) -> Path:
        """The data folder for images of ``size`` px: --data, or the trainer's default synthetic set."""
        if self.opts.data is not None:
            return Path(portable(self.opts.data))
        from bench.train import PRESET_DEFAULTS, default_data_dir

        n = self.budget.synth_n or PRESET_DEFAULTS[self.opts.preset]["synth_n"]
        return Path(portable(default_data_dir(size, n)))

    def synth_n(self) -> int:
        from bench.train import PRESET_DEFAULTS

        return self.budget.synth_n or PRESET_DEFAULTS[self.opts.preset]["synth_n"]

    # ------------------------------------------------------------------ state
    def load_state(self) -> dict:
        if self.state_path.is_file():
            try:
                state = json.loads(self.state_path.read_text())
                if state.get("version") == STATE_VERSION:
                    return state
            except (OSError, json.JSONDecodeError):
                pass
            self.echo(f"note: {self.state_path} is unreadable or from another version; every stage runs again")
        return {"version": STATE_VERSION, "preset": self.opts.preset, "created": now(), "stages": {}}

    def save_state(self, state: dict) -> None:
        state["budget"] = plain(dataclasses.asdict(self.budget))
        state["budget"]["train_steps"] = self.train_steps()
        state["budget_help"] = BUDGET_HELP
        state["updated"] = now()
        write_json(state, self.state_path)

    def train_steps(self) -> int:
        from bench.train import PRESET_DEFAULTS

        return self.opts.steps or self.budget.train_steps or PRESET_DEFAULTS[self.opts.preset]["steps"]

    # ------------------------------------------------------------------ the stages
    def stages(self) -> list[Stage]:
        b, o = self.budget, self.opts
        data_settings = {"data": portable(o.data) if o.data else None, "synth_n": self.synth_n(),
                         "sizes": sorted(set(self.sizes.values()))}
        stages = [Stage("data", "data: " + ("check --data" if o.data else f"synthetic faces ({self.synth_n()})"),
                        data_settings, (), self.stage_data,
                        lambda out: all(Path(p).is_dir() for p in out.get("folders", [])))]
        for m in o.models:
            stages.append(Stage(f"train:{m}", f"train {m} ({o.preset} preset, {self.train_steps()} steps)",
                                {"model": m, **self.train_options(m)}, ("data",),
                                lambda m=m: self.stage_train(m),
                                lambda out: Path(out.get("checkpoint", "")).is_file()))
        trained = tuple(f"train:{m}" for m in o.models)
        stages.append(Stage("sample", f"sample grid ({b.grid_masks} test masks, {b.grid_steps} steps, every model)",
                            {"models": o.models, "masks": b.grid_masks, "steps": b.grid_steps, "seed": SAMPLE_SEED},
                            trained, self.stage_sample,
                            lambda out: all((Path(p) / "samples.json").is_file() for p in out.get("folders", []))))
        stages.append(Stage("speed", f"speed ({b.speed_steps} steps, batches {list(b.speed_batch_sizes)}, "
                                     f"{self.device})",
                            {"models": o.models, "device": self.device, **{k: getattr(b, k) for k in (
                                "speed_steps", "speed_batch_sizes", "speed_scales", "speed_warmup", "speed_repeats",
                                "speed_scale_repeats",
                                "speed_image_repeats", "full_image_max_seconds", "paper_flops")}},
                            (), self.stage_speed, lambda out: (self.results / "speed.csv").is_file()))
        stages.append(Stage("parser", f"face parser ({b.parser_steps} steps)",
                            {"sizes": data_settings["sizes"], "steps": b.parser_steps, "batch": b.parser_batch,
                             "seed": o.seed}, ("data",), self.stage_parser,
                            lambda out: all(Path(p).is_file() for p in out.get("parsers", {}).values())))
        stages.append(Stage("quality", f"quality ({b.quality_masks or 'all'} masks x {b.quality_samples} samples, "
                                       f"{b.quality_steps} steps)",
                            {"models": o.models, "masks": b.quality_masks, "samples": b.quality_samples,
                             "steps": b.quality_steps, "seed": SAMPLE_SEED,
                             "inception": str(o.inception_weights or ""), "alexnet": str(o.alexnet_weights or "")},
                            (*trained, "parser"), self.stage_quality,
                            lambda out: (self.results / "quality.csv").is_file()))
        stages.append(Stage("report", "report", {"name": self.report_name(), "reports": str(o.reports)},
                            ("sample", "speed", "quality", *trained), self.stage_report,
                            lambda out: Path(out.get("report", "")).is_file()))
        return stages

    def report_name(self) -> str:
        return self.opts.report_name or (self.opts.preset if self.opts.data is None else self.folder_name()[4:])

    def run(self) -> Path:
        """Run every stage that is not done; returns the report's path."""
        if self.opts.threads:
            import torch

            torch.set_num_threads(self.opts.threads)
        state = self.load_state()
        stages = self.stages()
        ran: set[str] = set()
        total = len(stages)
        self.echo(f"bench run: preset {self.opts.preset}, models {', '.join(self.opts.models)}, device {self.device}; "
                  f"state in {self.state_path}")
        for i, stage in enumerate(stages, 1):
            record = state["stages"].get(stage.name, {})
            done = (not self.opts.force and record.get("status") == "done"
                    and record.get("settings") == plain(stage.settings)
                    and not ran.intersection(stage.deps) and stage.outputs_exist(record.get("outputs", {})))
            if done:
                self.echo(f"\n== [{i}/{total}] {stage.title}: done on {record.get('finished')}, skipped "
                          f"(--force redoes it)")
                continue
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
        return Path(state["stages"]["report"]["outputs"]["report"])

    # ------------------------------------------------------------------ stage bodies
    def stage_data(self) -> dict:
        from bench.data import FaceDataset

        folders = []
        if self.opts.data is None:
            from bench.synth import ensure_synthetic
            from bench.train import SYNTH_SEED, SYNTH_UPSCALE

            for size in sorted(set(self.sizes.values())):
                folders.append(str(ensure_synthetic(self.data_dir(size), self.synth_n(), SYNTH_UPSCALE * size,
                                                    SYNTH_SEED)))
        else:
            folders.append(str(self.data_dir(0)))
        for folder, size in zip(folders, sorted(set(self.sizes.values()))):
            train, test = FaceDataset(folder, "train", size=size), FaceDataset(folder, "test", size=size)
            self.echo(f"   {folder}: {len(train)} train and {len(test)} test faces")
        return {"folders": folders}

    def train_options(self, model: str) -> dict:
        """Trainer options of a model's run: the budget's entries (None: the trainer's preset default)."""
        b, o = self.budget, self.opts
        options = dict(preset=o.preset, steps=self.train_steps(), batch_size=b.batch_size, ema_decay=b.ema_decay,
                       warmup=b.warmup, ckpt_every=b.ckpt_every, sample_every=b.sample_every, seed=o.seed,
                       vae=o.vae)
        if o.data is None:
            options["synth_n"] = self.synth_n()
        else:
            options["data"] = portable(o.data)
        return {k: v for k, v in options.items() if v is not None}

    def stage_train(self, model: str) -> dict:
        from bench.train import make_config, train

        run_dir = self.run_dir(model)
        last = run_dir / "checkpoints" / "last.pt"
        options = self.train_options(model)
        if run_dir.exists() and (self.opts.force or not last.is_file()):
            # --force, or a run stopped before its first checkpoint: nothing to continue from.
            shutil.rmtree(run_dir)
        resume = last.is_file()
        if resume:
            try:
                cfg = make_config(model, run_dir, resume=True, **options)
            except BenchError as e:
                self.echo(f"   the run in {run_dir} has other settings ({e}); training from scratch")
                shutil.rmtree(run_dir)
                resume = False
        if resume:
            self.echo(f"   continuing {run_dir} from its last checkpoint")
        else:
            cfg = make_config(model, run_dir, **options)
        result = train(cfg, run_dir, resume=resume, device=self.device, progress=True)
        return {"run": str(run_dir), "checkpoint": str(last), "step": result["step"], "wall_s": result["wall_s"]}

    def stage_sample(self) -> dict:
        """The same test masks and noise seeds through every model: the report's sample grid."""
        from bench.data import onehot, write_label_png
        from bench.provenance import provenance
        from bench.sample import generate, load_run, run_masks, save_png, to_uint8
        from bench.train import save_json

        b, folders = self.budget, []
        for model in self.opts.models:
            run = load_run(self.run_dir(model), self.device)
            names, labels = run_masks(run, b.grid_masks)
            images, nfe = generate(run, onehot(labels), range(b.grid_masks), SAMPLE_SEED, b.grid_steps,
                                   progress=True)
            out = self.dir / "samples" / model
            (out / "masks").mkdir(parents=True, exist_ok=True)
            pix, files = to_uint8(images), []
            for i in range(b.grid_masks):
                save_png(pix[i], out / f"{i:05d}.png")
                write_label_png(labels[i].numpy(), out / "masks" / f"{i:05d}.png")
                files.append({"index": i, "image": f"{i:05d}.png", "mask": f"masks/{i:05d}.png",
                              "mask_source": names[i]})
            record = {"run": str(self.run_dir(model)), "model": model, "preset": self.opts.preset,
                      "data": run.config["data"], "space": run.config["space"], "train_step": run.step,
                      "method": "euler", "steps": b.grid_steps, "nfe": nfe, "guidance": 1.0, "seed": SAMPLE_SEED,
                      "n": b.grid_masks, "masks": "test split", "files": files,
                      "provenance": provenance(self.device, "fp32", b.grid_masks, b.grid_steps, nfe, SAMPLE_SEED)}
            save_json(record, out / "samples.json")
            folders.append(str(out))
        return {"folders": folders}

    def stage_speed(self) -> dict:
        from bench.speed import SpeedConfig, run_speed
        from models import list_presets

        b, out = self.budget, self.results / "speed.csv"
        device = "cuda" if self.device.startswith("cuda") else self.device  # bench speed takes cpu or cuda
        common = dict(preset=self.opts.preset, steps=b.speed_steps, image_repeats=b.speed_image_repeats,
                      device=device, seed=self.opts.seed, vae=self.opts.vae, out=out)
        run_speed(SpeedConfig(models=self.opts.models, batch_sizes=list(b.speed_batch_sizes), warmup=b.speed_warmup,
                              repeats=b.speed_repeats, full_image_max_seconds=b.full_image_max_seconds, **common),
                  echo=self.echo)
        for model in self.opts.models:  # per-NFE cost at larger images, batch 1: the scaling plot
            if b.speed_scales:
                resolutions = [self.sizes[model] * s for s in b.speed_scales]
                self.echo(f"   scaling: {model} at {', '.join(map(str, resolutions))} px (per NFE, batch 1)")
                run_speed(SpeedConfig(models=[model], batch_sizes=[1], resolutions=resolutions, warmup=SCALING_WARMUP,
                                      repeats=b.speed_scale_repeats, full_image_max_seconds=0.0, **common),
                          echo=lambda *_: None)
        with_paper = [m for m in self.opts.models if "paper" in list_presets(m)]
        if b.paper_flops and with_paper:
            self.echo(f"   FLOPs of the paper presets of {', '.join(with_paper)} (meta device: nothing runs)")
            run_speed(SpeedConfig(models=with_paper, preset="paper", steps=b.speed_steps, flops_only=True, out=out),
                      echo=lambda *_: None)
        return {"csv": str(out)}

    def stage_parser(self) -> dict:
        from bench import parser as face_parser

        b, parsers = self.budget, {}
        for size in sorted(set(self.sizes.values())):
            data = self.data_dir(size)
            path = self.dir / f"parser-{size}px.pt"
            train_cfg = face_parser.TrainConfig(steps=b.parser_steps, batch_size=b.parser_batch, seed=self.opts.seed)
            model = face_parser.train_parser(data, face_parser.ParserConfig.for_size(size), train_cfg, self.device)
            test_miou = face_parser.evaluate(model, data, "test")
            face_parser.save_parser(model, path, {"data": str(data), **dataclasses.asdict(train_cfg),
                                                  "test_miou": test_miou})
            self.echo(f"   parser {size} px: mIoU on real test images {test_miou:.4f}")
            parsers[str(size)] = str(path)
        return {"parsers": parsers}

    def stage_quality(self) -> dict:
        import torch

        from bench.quality import append_rows, evaluate_run, find_resources

        b, out = self.budget, self.results / "quality.csv"
        resources = find_resources(self.opts.inception_weights, self.opts.alexnet_weights, set())
        for reason in dict.fromkeys(r for r in (resources.inception_missing, resources.alexnet_missing) if r):
            self.echo(f"   note: {reason}")
        for model in self.opts.models:
            size = self.sizes[model]
            row = evaluate_run(self.run_dir(model), self.data_dir(size), resources,
                               self.dir / f"parser-{size}px.pt", torch.device(self.device),
                               batch_size=64, progress=True, split="test", n_masks=b.quality_masks,
                               samples_per_mask=b.quality_samples, steps=b.quality_steps, seed=SAMPLE_SEED)
            append_rows(out, [row])
            self.echo(f"   {model}: mIoU {row['miou']:.4f} (parser ceiling {row['miou_ceiling']:.4f}), "
                      f"pixel diversity {row['pixel_diversity']:.4f}")
        return {"csv": str(out)}

    def stage_report(self) -> dict:
        from bench.report import build_report

        path = build_report(self.results, self.opts.reports, self.report_name(), self.opts.preset)
        self.echo(f"   wrote {path}")
        return {"report": str(path)}


@command("run")
def run_cmd(
    preset: str = typer.Option("cpu", "--preset", help="tiny (a two-minute smoke test), cpu (the default, about "
                               "20 minutes on two cores) or paper (the paper's experiment: a GPU and --data)."),
    data: Optional[Path] = typer.Option(None, "--data", help="Data folder: CelebAMask-HQ as distributed, or "
                                        "{train,test}/{images,labels}. Default: synthetic faces in ./data."),
    models: str = typer.Option("sisma,dit,sdm", "--models", help="Comma-separated backbones to compare."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Training steps per backbone (default: the preset's "
                                        "budget; a larger value continues finished runs)."),
    force: bool = typer.Option(False, "--force", help="Redo every stage, training from scratch."),
    results: Path = typer.Option(Path("results"), "--results", "--out", help="Folder for result rows (speed.csv, "
                                 "quality.csv), runs, samples and the state file run_<preset>/state.json."),
    reports: Path = typer.Option(Path("reports"), "--reports", help="Folder the report goes to."),
    report_name: Optional[str] = typer.Option(None, "--report-name", help="Report file name without .md "
                                              "(default: the preset)."),
    device: str = typer.Option("auto", "--device", help="auto (cuda if available), cpu, cuda, cuda:N."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads of torch for every stage (default: "
                                          "torch's choice); recorded in the result rows."),
    seed: int = typer.Option(0, "--seed", help="Seed of training and of the parser."),
    vae: Optional[str] = typer.Option(None, "--vae", help="AutoencoderKL for latent-space models (paper preset): "
                                      "a local diffusers folder or a hub id in the HF cache."),
    inception_weights: Optional[Path] = typer.Option(None, "--inception-weights", help="Inception file for FID/KID "
                                                     "(default: torch's hub cache)."),
    alexnet_weights: Optional[Path] = typer.Option(None, "--alexnet-weights", help="AlexNet file for LPIPS "
                                                   "(default: torch's hub cache)."),
):
    """The whole comparison: data, training of each backbone, samples, speed, quality, report in reports/.

    Finished stages are skipped on a re-run; an interrupted training continues from its last checkpoint.
    """
    from bench.train import TrainingInterrupted

    opts = RunOptions(preset=preset, data=data, models=[m.strip() for m in models.split(",") if m.strip()],
                      steps=steps, force=force, results=results, reports=reports, report_name=report_name,
                      device=device, threads=threads, seed=seed, vae=vae, inception_weights=inception_weights,
                      alexnet_weights=alexnet_weights)
    pipeline = Pipeline(opts)
    try:
        path = pipeline.run()
    except (TrainingInterrupted, KeyboardInterrupt) as e:
        signum = e.signum if isinstance(e, TrainingInterrupted) else signal.SIGINT
        where = f" in stage {pipeline.current.name}" if pipeline.current else ""
        saved = "; the training checkpoint was saved" if isinstance(e, TrainingInterrupted) else ""
        typer.echo(f"\ninterrupted by {signal.Signals(signum).name}{where}{saved}. Run the same `bench run` "
                   f"command again: finished stages are skipped and training continues from its last checkpoint",
                   err=True)
        raise typer.Exit(128 + signum)
    typer.echo(f"\nreport: {path}")
