"""``bench tune lr``."""
from __future__ import annotations

from pathlib import Path

import typer

from bench.cli.common import app, command, split_list
from bench.errors import BenchError
from bench.runtime import DEVICE_HELP

tune_app = typer.Typer(help="Tune the small presets' recipes (learning-rate sweep).", no_args_is_help=True)
app.add_typer(tune_app, name="tune")


@command("lr", parent=tune_app)
def lr_cmd(
    preset: str = typer.Option("cpu", "--preset", help="Preset whose recipe is tuned (cpu or tiny)."),
    models: str = typer.Option("sisma,dit,sdm", "--models", help="Comma-separated backbones or variants."),
    lrs: str = typer.Option("3e-4,1e-3,2e-3,4e-3", "--lrs", help="Comma-separated learning rates to try."),
    steps: int = typer.Option(300, "--steps", help="Training steps of each run."),
    seed: int = typer.Option(0, "--seed", help="Training seed of every run."),
    results: Path = typer.Option(Path("results"), "--results", help="Folder of lr_sweep.csv and the sweep's runs."),
    threads: int = typer.Option(None, "--threads", help="CPU threads of torch (default: torch's choice)."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
):
    """Train each model at each learning rate and print the held-out flow-matching loss; rows go to lr_sweep.csv."""
    import pandas as pd

    from bench.runtime import set_threads
    from bench.tune import best_rates, lr_sweep

    try:
        rates = [float(v) for v in split_list(lrs)]
    except ValueError:
        raise BenchError(f"--lrs takes comma-separated numbers, e.g. 3e-4,1e-3; got {lrs!r}") from None
    set_threads(threads)
    rows = lr_sweep(preset, split_list(models), rates, steps, seed, results, device, echo=typer.echo)
    table = pd.DataFrame(rows).pivot(index="lr", columns="model", values="heldout_loss")
    typer.echo(table.to_markdown(floatfmt=".5f"))
    typer.echo("lowest held-out loss: " + ", ".join(f"{m} {lr:g}" for m, lr in best_rates(rows).items()))
