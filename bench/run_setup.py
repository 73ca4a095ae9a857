"""What one ``bench run`` resolves from its options: the preset's budget, the variants, the folder layout.

The stage bodies (``bench.stages``), the training jobs (``bench.train_jobs``) and the state machinery
(``bench.pipeline``) all read these; nothing here runs a stage.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import models
from bench import presets
from bench.errors import BenchError
from bench.io import display_path
from bench.launch import LaunchOptions
from bench.runtime import resolve_device
from bench.synth import default_set_dir
from bench.train import model_config
from bench.variants import Variant, build_model, parse_models


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


def check_options(opts: RunOptions, variants: list[Variant]) -> None:
    """One-line errors for options that cannot make a run, before anything is written."""
    for v in variants:
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


class RunSetup:
    """The options of one `bench run` checked and resolved: budget, variants, image sizes, device and folders."""

    def __init__(self, opts: RunOptions, echo=print):
        self.budget = presets.budget(opts.preset)
        self.variants: list[Variant] = parse_models([str(m) for m in opts.models])
        check_options(opts, self.variants)
        self.opts, self.echo = opts, echo
        self.results = Path(opts.results)
        self.dir = self.results / self.folder_name()
        self.state_path = self.dir / "state.json"
        self.sizes = self.image_sizes()
        self.device = str(resolve_device(opts.device))

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
        key["model"] = model_config(variant.model, self.opts.preset, variant.kwargs())  # defaults included
        digest = hashlib.sha1(json.dumps(plain(key), sort_keys=True).encode()).hexdigest()[:8]
        return self.dir / "runs" / variant.slug / f"seed{seed}-{digest}"

    def image_sizes(self) -> dict[str, int]:
        """Image size of each variant at the preset (counted on the meta device)."""
        return {v.name: int(build_model(v.model, self.opts.preset, v.kwargs(), "meta").image_size)
                for v in self.variants}

    def data_dir(self, size: int) -> Path:
        """The data folder for images of ``size`` px: --data, or the trainer's default synthetic set."""
        if self.opts.data is not None:
            return Path(display_path(self.opts.data))
        return Path(display_path(default_set_dir(size, self.budget.synth_n)))

    def train_steps(self, variant: Variant) -> int:
        return self.opts.steps or presets.recipe(self.opts.preset, variant.model).steps

    def precision(self, variant: Variant) -> str:
        """The recipe's precision of a variant's backbone: what it trains, samples and is timed at."""
        return presets.recipe(self.opts.preset, variant.model).precision

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

    def report_name(self) -> str:
        return self.opts.report_name or (self.opts.preset if self.opts.data is None else self.folder_name()[4:])

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
