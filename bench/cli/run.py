"""``bench run``."""
from __future__ import annotations

import signal
from pathlib import Path
from typing import Optional

import typer

from bench.cli.common import at_least, command, int_list, offline_option, split_list
from bench.launch import JOB_MINUTES
from bench.runtime import DEVICE_HELP


@command("run")
def run_cmd(
    preset: str = typer.Option("cpu", "--preset", help="tiny (a two-minute smoke test), cpu (the default, about "
                               "26 minutes on two cores) or paper (the paper's experiment: a GPU and --data)."),
    data: Optional[Path] = typer.Option(None, "--data", help="Data folder: CelebAMask-HQ as distributed, or "
                                        "{train,test}/{images,labels}. Default: synthetic faces in ./data."),
    models: str = typer.Option("sisma,dit,sdm", "--models", help="Comma-separated backbones or variants to compare, "
                               "e.g. sisma,sisma:scan=raster,dit:cond=add,sdm."),
    seeds: str = typer.Option("0", "--seeds", help="Comma-separated training seeds: each model is trained once per "
                              "seed (the report's confidence intervals use them)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Training steps per run (default: the preset's "
                                        "recipe; a larger value continues finished runs)."),
    force: bool = typer.Option(False, "--force", help="Redo every stage, training from scratch."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved settings of every stage (each run's "
                                 "recipe included) and exit."),
    results: Path = typer.Option(Path("results"), "--results", "--out", help="Folder for result rows (speed.csv, "
                                 "quality.csv), runs, samples and the state file run_<preset>/state.json."),
    reports: Path = typer.Option(Path("reports"), "--reports", help="Folder the report goes to."),
    report_name: Optional[str] = typer.Option(None, "--report-name", help="Report file name without .md "
                                              "(default: the preset)."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads of torch for every stage (default: "
                                          "torch's choice; 1 in each training job of --launcher local with --jobs "
                                          "above 1); recorded in the result rows."),
    vae: Optional[str] = typer.Option(None, "--vae", help="AutoencoderKL for latent-space models (paper preset): "
                                      "a local diffusers folder or a hub id (from the HF cache, fetched there on "
                                      "first use)."),
    inception_weights: Optional[Path] = typer.Option(None, "--inception-weights", help="Inception file for FID/KID "
                                                     "(default: torch's hub cache, fetched there on first use)."),
    offline: bool = offline_option(),
    alexnet_weights: Optional[Path] = typer.Option(None, "--alexnet-weights", help="AlexNet file for LPIPS "
                                                   "(default: torch's hub cache, fetched there on first use)."),
    launcher: Optional[str] = typer.Option(None, "--launcher", help="Train each run as its own job: slurm (sbatch "
                                           "through submitit; a re-run collects the recorded jobs) or local (one "
                                           "process per job on this machine). Default: train in this process. The "
                                           "other stages run here, after the training jobs. Needs the cluster extra."),
    jobs: int = typer.Option(1, "--jobs", help="With --launcher: at most this many training jobs at once."),
    gpus_per_job: int = typer.Option(1, "--gpus-per-job", help="With --launcher on CUDA: GPUs per training job "
                                     "(torchrun over them when more than one)."),
    job_minutes: int = typer.Option(JOB_MINUTES, "--job-minutes", help="With --launcher: a training job's time limit "
                                    "(a job that runs out is requeued and resumes from its last checkpoint)."),
    slurm: Optional[str] = typer.Option(None, "--slurm", help="With --launcher slurm: extra sbatch options as "
                                        "KEY=VALUE pairs, e.g. partition=gpu,account=abc,qos=high."),
):
    """The whole comparison: data, training of each backbone, samples, speed, quality, report in reports/.

    Finished stages are skipped on a re-run; an interrupted training continues from its last checkpoint.
    """
    from bench.launch import LaunchOptions, parse_slurm_options
    from bench.pipeline import Pipeline, RunOptions
    from bench.train import TrainingInterrupted

    at_least(0, seeds=min(int_list(seeds, "--seeds") or [0]))
    at_least(1, steps=steps)
    launch = LaunchOptions(launcher=launcher, jobs=jobs, gpus=gpus_per_job, minutes=job_minutes,
                           slurm=parse_slurm_options(slurm), threads=threads)
    opts = RunOptions(preset=preset, data=data, models=split_list(models), seeds=int_list(seeds, "--seeds") or [],
                      steps=steps, force=force, results=results, reports=reports, report_name=report_name,
                      device=device, threads=threads, vae=vae, inception_weights=inception_weights,
                      alexnet_weights=alexnet_weights, launch=launch)
    pipeline = Pipeline(opts, echo=typer.echo)
    if dry_run:
        typer.echo(pipeline.dry_run())
        return
    try:
        path = pipeline.run()
    except (TrainingInterrupted, KeyboardInterrupt) as e:
        signum = e.signum if isinstance(e, TrainingInterrupted) else signal.SIGINT
        where = f" in stage {pipeline.current.name}" if pipeline.current else ""
        saved = "; the training checkpoint was saved" if isinstance(e, TrainingInterrupted) else ""
        typer.echo(f"\ninterrupted by {signal.Signals(signum).name}{where}{saved}. Run the same `bench run` "
                   f"command again: finished stages are skipped and training continues from its last checkpoint",
                   err=True)
        raise typer.Exit(128 + signum) from None
    typer.echo(f"\nreport: {path}")
