"""``bench speed``."""
from __future__ import annotations

from pathlib import Path

import typer

from bench.cli.common import command, int_list, offline_option, split_list
from bench.runtime import DEVICE_HELP
from bench.speed import MIN_IMAGE_REPEATS


@command("speed")
def speed_cmd(
    models: str = typer.Option("sisma,dit,sdm", "--models", "-m", help="Comma-separated backbones or variants to "
                               "measure (e.g. sisma,sisma:scan=raster,dit)."),
    preset: str = typer.Option("cpu", "--preset", "-p", help="Size preset of every model: paper, cpu or tiny."),
    steps: int = typer.Option(200, "--steps", help="Euler steps of one whole image (1 NFE per step)."),
    batch_sizes: str = typer.Option("1,4", "--batch-sizes", help="Comma-separated batch sizes; "
                                    "larger ones give the images/s throughput."),
    resolutions: str = typer.Option(None, "--resolutions", help="Comma-separated image resolutions in pixels "
                                    "(default: the preset's; with --flops-only the preset's x1, x2, x4)."),
    precision: str = typer.Option(None, "--precision", help="fp32, bf16 or fp16 for every model (default: each "
                                  "model's recipe precision at the preset: bf16 at paper, fp32 at cpu and tiny); the "
                                  "model is cast to it once."),
    warmup: int = typer.Option(3, "--warmup", help="Untimed network evaluations before timing."),
    repeats: int = typer.Option(None, "--repeats", help="Interleaved rounds per timing process: each round times one "
                                "call of every model and batch size in a shuffled order (default: the preset's, 5 "
                                "at cpu, 6 at paper, 3 at tiny)."),
    processes: int = typer.Option(None, "--processes", help="Timing processes, one after another, each a fresh "
                                  "interpreter (default: the preset's, 6 at cpu, 5 at paper, 1 at tiny; 1 times in "
                                  "this process); a ratio's interval is Student's t over the processes."),
    allow_busy: bool = typer.Option(False, "--allow-busy", help="Time even when other processes compete for the "
                                    "CPUs or the calibration runs slow; the rows are flagged busy and the report "
                                    "leaves them out of its ratios (default: wait, then refuse)."),
    breakdown: bool = typer.Option(True, "--breakdown/--no-breakdown", help="Profile where one network "
                                   "evaluation's time goes, by operator class, at the smallest batch (after the first "
                                   "process's rounds)."),
    quiet_wait: float = typer.Option(60.0, "--quiet-wait", help="Seconds to wait for a quiet machine, before the "
                                     "sweep and after a busy round, before refusing."),
    image_repeats: int = typer.Option(MIN_IMAGE_REPEATS, "--image-repeats", help="Timed whole images per setting, "
                                      f"after an untimed one (the report shows fewer than {MIN_IMAGE_REPEATS} as "
                                      "projected)."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    compile: bool = typer.Option(False, "--compile/--no-compile", help="torch.compile every model alike."),
    tf32: bool = typer.Option(False, "--tf32/--no-tf32", help="Allow TF32 for fp32 matmuls and convs on CUDA."),
    flops_only: bool = typer.Option(False, "--flops-only", help="Only parameters and FLOPs, on the meta device "
                                    "(no memory, no time): works at any preset and resolution."),
    full_image_max_seconds: float = typer.Option(30.0, "--full-image-max-seconds", help="Time budget of a "
                                                 "whole-image measurement (the untimed image and every timed one, "
                                                 "by the projection); when they do not fit, the image latency is "
                                                 "only projected (per-NFE x steps + decode), in its own column."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random weights and inputs."),
    vae: str = typer.Option(None, "--vae", help="Decoder of latent models: diffusers AutoencoderKL folder or "
                            "hub id (default: the SD-VAE, fetched on first use; when it cannot be had, its "
                            "architecture with random weights, which costs the same)."),
    threads: int = typer.Option(None, "--threads", help="CPU threads for torch (default: torch's choice)."),
    out: Path = typer.Option(Path("results/speed.csv"), "--out", "-o", help="CSV the rows are appended to."),
    offline: bool = offline_option(),
):
    """Parameters, FLOPs, latency per NFE and per image, memory and throughput of each backbone.

    Models are timed in interleaved rounds, shuffled per round, in fresh processes, on a quiet machine.

    Per-round times go to speed_rounds.csv beside --out, and a report pairs its ratios by round.

    Another machine's rows: run `bench speed --out gpu.csv` there, then append them to results/speed.csv
    (docs/timing.md).
    """
    from bench.speed import SpeedConfig, run_speed

    cfg = SpeedConfig(
        models=split_list(models), preset=preset, steps=steps,
        batch_sizes=int_list(batch_sizes, "--batch-sizes") or [], resolutions=int_list(resolutions, "--resolutions"),
        precision=precision, warmup=warmup, repeats=repeats, processes=processes, allow_busy=allow_busy,
        quiet_wait=quiet_wait, breakdown=breakdown, image_repeats=image_repeats, device=device,
        compile=compile, tf32=tf32, flops_only=flops_only, full_image_max_seconds=full_image_max_seconds,
        seed=seed, vae=vae, threads=threads, out=out,
    )
    run_speed(cfg, echo=typer.echo)
    typer.echo(f"\nrows appended to {out}")
