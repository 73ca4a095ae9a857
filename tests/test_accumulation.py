"""Gradient accumulation and activation checkpointing follow the plain training trajectory (CPU, fp32)."""
from pathlib import Path

import pytest
import torch

from bench import recompute
from bench.checkpoint import load
from bench.errors import BenchError
from bench.synth import ensure_synthetic
from bench.train import make_config, micro_batches, train
from bench.variants import build_model

# Checkpointing recomputes the same operations: the same numbers. Accumulation sums the micro-batches'
# gradients in another order than one batch-mean backward: equal to float rounding.
ACCUMULATED_TOL = dict(rtol=1e-5, atol=1e-6)

pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest.py


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return ensure_synthetic(tmp_path_factory.mktemp("faces"), n=24, size=32, seed=0, progress=False)


def run(tmp_path, data, model, name, **options):
    folder = tmp_path / name
    cfg = make_config(model, folder, preset="tiny", data=str(data), steps=3, batch_size=4, log_every=1,
                      grid_steps=1, grid_masks=1, sample_every=1000, **options)
    train(cfg, folder, progress=False)
    state = load(Path(folder) / "checkpoints" / "last.pt")
    losses = [float(line.split(",")[1]) for line in (folder / "loss.csv").read_text().splitlines()[1:]]
    return losses, state


@pytest.mark.parametrize("model", ["sisma", "dit", "sdm"])
def test_checkpointed_and_accumulated_steps_follow_the_plain_ones(data, tmp_path, model):
    plain_loss, plain = run(tmp_path, data, model, "plain")
    variants = {"checkpointed": dict(checkpointing=True), "accumulated": dict(micro_batch=2),
                "both": dict(micro_batch=1, checkpointing=True)}
    for name, options in variants.items():
        losses, state = run(tmp_path, data, model, name, **options)
        assert state["config"]["micro_batch"] == options.get("micro_batch", 0)
        tol = dict(rtol=0, atol=0) if "micro_batch" not in options else ACCUMULATED_TOL
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(plain_loss), **tol, msg=name)
        for key, value in plain["model"].items():
            torch.testing.assert_close(state["model"][key], value, **tol, msg=f"{name}: {key}")


def test_micro_batches_and_checks(data, tmp_path):
    assert micro_batches(8, 0) == [slice(0, 8)]
    assert micro_batches(8, 2) == [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8)]
    with pytest.raises(BenchError, match="does not divide --batch-size 4"):
        make_config("dit", tmp_path / "bad", preset="tiny", data=str(data), batch_size=4, micro_batch=3)


def test_checkpointing_wraps_the_blocks_and_keeps_the_state_dict():
    expected = {"sisma": 2, "dit": 3, "sdm": None}
    for name, depth in expected.items():
        model = build_model(name, "tiny", {}, "cpu")
        keys = list(model.state_dict())
        n = recompute.enable(model)
        sdm = model if depth is None else None
        assert n == (depth if depth else len(sdm.encoder) + 1 + len(sdm.decoder))
        assert list(model.state_dict()) == keys and recompute.enabled(model)
    with pytest.raises(BenchError, match="no blocks to checkpoint"):
        recompute.enable(torch.nn.Linear(2, 2))
