"""The bodies of ``bench run``'s stages: data, training, sample grid, speed, face parser, quality and report.

Each returns the outputs the state file records (``bench.pipeline``); each calls the Python API of the command
that does the same work alone (``bench.train``, ``bench.sample``, ``bench.speed``, ``bench.parser``,
``bench.quality``, ``bench.report``).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

import bench.train  # a module: tests replace its train
import models
from bench import parser as face_parser
from bench import presets
from bench.data import FaceDataset
from bench.quality import QualitySettings, append_rows, evaluate_run, find_resources, scored_before
from bench.report import build_report
from bench.run_setup import RunSetup
from bench.sample import load_run, write_samples
from bench.speed import SpeedConfig, run_speed
from bench.synth import ensure_default_set
from bench.variants import Variant

SAMPLE_SEED = 0  # noise of grid sample i and of quality samples comes from (seed, i): the same for every model
SCALING_WARMUP = 1  # untimed calls before timing the extra (scaling) resolutions, which are timed per NFE only
QUALITY_BATCH = 64


class StageBodies(RunSetup):
    """What each stage of one `bench run` does."""

    def stage_data(self) -> dict:
        folders = []
        sizes = sorted(set(self.sizes.values()))
        if self.opts.data is None:
            for size in sizes:
                folders.append(str(ensure_default_set(self.data_dir(size), self.budget.synth_n, size)))
        else:
            folders.append(str(self.data_dir(0)))
        for folder, size in zip(folders, sizes):
            train, test = FaceDataset(folder, "train", size=size), FaceDataset(folder, "test", size=size)
            self.echo(f"   {folder}: {len(train)} train and {len(test)} test faces")
        return {"folders": folders}

    # ------------------------------------------------------------------ training
    def prepare_train(self, variant: Variant, seed: int):
        """The config of one training run (--force first clears its folder): (TrainConfig, folder, resume)."""
        run_dir = self.run_dir(variant, seed)
        if run_dir.exists() and self.opts.force:  # --force: asked to train from scratch
            shutil.rmtree(run_dir)
        resume = (run_dir / "checkpoints" / "last.pt").is_file()
        if resume:
            self.echo(f"   continuing {run_dir} from its last checkpoint")
        config = bench.train.make_config(variant, run_dir, resume=resume, **self.train_options(variant, seed))
        return config, run_dir, resume

    @staticmethod
    def train_outputs(run_dir: Path, result: dict) -> dict:
        return {"run": str(run_dir), "checkpoint": str(run_dir / "checkpoints" / "last.pt"), "step": result["step"],
                "wall_s": result["wall_s"]}

    def stage_train(self, variant: Variant, seed: int) -> dict:
        cfg, run_dir, resume = self.prepare_train(variant, seed)
        result = bench.train.train(cfg, run_dir, resume=resume, device=self.device, progress=True)
        return self.train_outputs(run_dir, result)

    # ------------------------------------------------------------------ evaluation
    def stage_sample(self) -> dict:
        """The same test masks and noise seeds through every model: the report's sample grid."""
        b, folders = self.budget, []
        for v in self.variants:
            run = load_run(self.run_dir(v, self.opts.seeds[0]), self.device, precision=self.precision(v))
            out = self.dir / "samples" / v.slug
            write_samples(run, out, b.sample_masks, b.sample_steps, seed=SAMPLE_SEED, grid=False, progress=True)
            folders.append(str(out))
        return {"folders": folders}

    def stage_speed(self) -> dict:
        b, out = self.budget, self.results / "speed.csv"
        names = [v.name for v in self.variants]
        common = self.speed_common(out)
        run_speed(SpeedConfig(models=names, batch_sizes=list(b.speed_batch_sizes), warmup=b.speed_warmup,
                              repeats=b.speed_repeats, processes=b.speed_processes,
                              full_image_max_seconds=b.full_image_max_seconds, **common),
                  echo=self.echo)
        self.speed_scaling(common)
        with_paper = [v.name for v in self.variants if "paper" in models.list_presets(v.model)]
        if b.paper_flops and with_paper:
            self.echo(f"   FLOPs of the paper presets of {', '.join(with_paper)} (meta device: nothing runs)")
            run_speed(SpeedConfig(models=with_paper, preset="paper", steps=b.speed_steps, flops_only=True, out=out),
                      echo=lambda *_: None)
        return {"csv": str(out)}

    def speed_common(self, out: Path) -> dict:
        """The SpeedConfig fields every timing of the speed stage shares."""
        b = self.budget
        device = "cuda" if self.device.startswith("cuda") else self.device
        # precision None: each model at its recipe's precision (the same table as here: bench.speed.recipe_precision).
        # A busy machine does not stop the run: after waiting for quiet, its rows are flagged and the report leaves
        # them out of its ratios, saying so.
        return dict(preset=self.opts.preset, steps=b.speed_steps, image_repeats=b.speed_image_repeats,
                    device=device, seed=self.opts.seeds[0], vae=self.opts.vae, out=out, precision=None,
                    allow_busy=True)

    def speed_scaling(self, common: dict) -> None:
        """Per-NFE cost at larger images, batch 1 (the scaling plot): one interleaved sweep per image size, one
        process, no breakdown: cheap."""
        b = self.budget
        if not b.speed_scales:
            return
        by_size: dict[int, list[str]] = {}
        for v in self.variants:
            by_size.setdefault(self.sizes[v.name], []).append(v.name)
        for size, names_here in by_size.items():
            resolutions = [size * s for s in b.speed_scales]
            self.echo(f"   scaling: {', '.join(names_here)} at {', '.join(map(str, resolutions))} px "
                      "(per NFE, batch 1)")
            run_speed(SpeedConfig(models=names_here, batch_sizes=[1], resolutions=resolutions,
                                  warmup=SCALING_WARMUP, repeats=b.speed_scale_repeats, processes=1,
                                  full_image_max_seconds=0.0, breakdown=False, **common), echo=lambda *_: None)

    def stage_parser(self) -> dict:
        b, parsers = self.budget, {}
        for size in sorted(set(self.sizes.values())):
            train_cfg = face_parser.ParserTrainConfig(steps=b.parser_steps, batch_size=b.parser_batch,
                                                      seed=self.opts.seeds[0])
            result = face_parser.train_and_save(self.data_dir(size), size, train_cfg, self.dir / f"parser-{size}px.pt",
                                                device=self.device)
            self.echo(f"   parser {size} px: mIoU on real test images {result['test_miou']:.4f}")
            parsers[str(size)] = str(result["path"])
        return {"parsers": parsers}

    def stage_quality(self) -> dict:
        """Every run scored at its snapshots and at its last step, with its recipe's guidance; a checkpoint whose
        images were scored before on as many masks (a longer --steps continuing the runs) is not scored again."""
        out = self.results / "quality.csv"
        resources = find_resources(self.opts.inception_weights, self.opts.alexnet_weights, set())
        for reason in dict.fromkeys(r for r in (resources.inception_missing, resources.alexnet_missing) if r):
            self.echo(f"   note: {reason}")
        for v in self.variants:
            for seed in self.opts.seeds:
                for checkpoint, n_masks in self.quality_checkpoints(v, seed):
                    self.score_checkpoint(v, seed, checkpoint, n_masks, resources, out)
        return {"csv": str(out)}

    def quality_checkpoints(self, variant: Variant, seed: int) -> list[tuple[Path, int]]:
        """The checkpoints of one run that the quality stage scores, each with its number of masks: the snapshots
        found, and the last step (its snapshot, or last.pt for a run trained without it) on the most masks."""
        run = self.run_dir(variant, seed)
        last = run / "checkpoints" / "last.pt"
        snapshots = [run / "checkpoints" / f"step_{k:07d}.pt" for k in self.snapshot_steps(variant)]
        found = [c for c in snapshots if c.is_file()]
        if snapshots[-1] not in found:
            found.append(last)
        return [(c, self.budget.quality_masks if c in (snapshots[-1], last) else self.snapshot_masks())
                for c in found]

    def score_checkpoint(self, variant: Variant, seed: int, checkpoint: Path, n_masks: int, resources,
                         out: Path) -> None:
        """One checkpoint scored and its rows appended to ``out``, unless they are there already."""
        b, size = self.budget, self.sizes[variant.name]
        settings = QualitySettings(data=str(self.data_dir(size)), split="test", n_masks=n_masks,
                                   samples_per_mask=b.quality_samples, steps=b.quality_steps,
                                   guidance=presets.recipe(self.opts.preset, variant.model).guidance,
                                   seed=SAMPLE_SEED, precision=self.precision(variant))
        parser = self.dir / f"parser-{size}px.pt"
        if out.is_file() and scored_before(out, checkpoint, size, settings, resources, parser):
            self.echo(f"   {variant.name} seed {seed} {checkpoint.name}: scored before on as many masks, skipped")
            return
        fields = {k: v for k, v in vars(settings).items() if k != "data"}
        row, masks = evaluate_run(self.run_dir(variant, seed), Path(settings.data), resources, parser,
                                  torch.device(self.device), batch_size=QUALITY_BATCH, progress=True, echo=self.echo,
                                  checkpoint=checkpoint, **fields)
        append_rows(out, [row], masks)
        self.echo(f"   {variant.name} seed {seed} step {row['train_step']}: mIoU {row['miou']:.4f} (parser "
                  f"ceiling {row['miou_ceiling']:.4f}), pixel diversity {row['pixel_diversity']:.4f}")

    def stage_report(self) -> dict:
        path = build_report(self.results, self.opts.reports, self.report_name(), self.opts.preset)
        self.echo(f"   wrote {path}")
        return {"report": str(path)}
