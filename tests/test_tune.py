"""`bench tune lr`: a rate at which training diverges is recorded as such and the sweep goes on."""
import csv
import math

from typer.testing import CliRunner

from bench.cli import app
from bench.tune import best_rates

DIVERGING_LR = 1e4  # clipped gradients times this rate blow the weights up within a few steps


def test_a_diverging_rate_is_a_row_of_the_sweep_not_its_end(workdir):
    args = ["tune", "lr", "--preset", "tiny", "--models", "sdm", "--lrs", f"{DIVERGING_LR:g},1e-3", "--steps", "10",
            "--results", "res", "--threads", "1"]
    out = CliRunner().invoke(app, args)
    assert out.exit_code == 0, out.output
    assert "diverged: loss is nan" in out.output and "lowest held-out loss: sdm 0.001" in out.output
    with (workdir / "res" / "lr_sweep.csv").open() as f:
        rows = {float(r["lr"]): r for r in csv.DictReader(f)}
    diverged, ok = rows[DIVERGING_LR], rows[1e-3]
    assert diverged["heldout_loss"] == "" and int(diverged["train_steps"]) < 10  # stopped where it met the nan
    assert float(ok["heldout_loss"]) > 0 and int(ok["train_steps"]) == 10


def test_best_rates_skip_diverged_runs():
    rows = [{"model": "dim", "lr": 8e-3, "heldout_loss": math.nan}, {"model": "dim", "lr": 1e-3, "heldout_loss": 0.2},
            {"model": "dim", "lr": 2e-3, "heldout_loss": 0.15}]
    assert best_rates(rows) == {"dim": 2e-3}
