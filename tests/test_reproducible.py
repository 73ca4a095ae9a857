"""Bit-reproducible CPU training: the same run twice, and a run resumed half-way, end with identical weights.

Each backbone trains 6 tiny-preset steps on two threads (so that every parallel kernel really splits its work),
twice from scratch and once as 3 steps plus --resume to 6; the checkpoints' ``model`` and ``ema`` tensors must be
equal bit for bit (torch.equal, no tolerance). Loader worker processes must not change a run either. The promise
is for one thread count: torch's own CPU kernels (oneDNN convolutions, vectorised elementwise ops such as GELU)
split their work by it, so runs on different thread counts may differ in the last bits. The selective-scan
kernel promises more, the same bits at any thread count: tests/test_ssm.py checks it.
"""
from pathlib import Path

import pytest
import torch

from bench.checkpoint import load
from bench.synth import ensure_synthetic
from bench.train import make_config, train

BACKBONES = ["sisma", "dit", "sdm", "dim"]
THREADS = 2
STEPS = 6


@pytest.fixture(scope="module")
def two_threads():
    """Training on two intra-op threads; the previous count is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """One small synthetic set (tiny models train at 16 px)."""
    return ensure_synthetic(tmp_path_factory.mktemp("faces"), n=12, size=32, seed=0, progress=False)


def run(run_dir: Path, data: Path, model: str, steps: int, resume: bool = False, **options) -> dict:
    """Train ``model`` (tiny preset) to ``steps`` in ``run_dir`` and return its last checkpoint."""
    if resume:
        cfg = make_config(model, run_dir, resume=True, steps=steps)
    else:
        cfg = make_config(model, run_dir, preset="tiny", data=str(data), steps=steps, grid_steps=2, grid_masks=1,
                          sample_every=1000, **options)
    train(cfg, run_dir, resume=resume, progress=False)
    return load(run_dir / "checkpoints" / "last.pt")


def assert_bit_identical(a: dict, b: dict) -> None:
    """The checkpoints' model and EMA weights are equal bit for bit; the first differing tensor is named."""
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for name, tensor in a[part].items():
            other = b[part][name]
            diff = (tensor.double() - other.double()).abs().max().item() if tensor.is_floating_point() else None
            assert torch.equal(tensor, other), f"{part}.{name} differs (max abs difference {diff})"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data, two_threads):
    """One 6-step run per backbone, shared by the tests below."""
    runs = {}

    def get(model: str) -> dict:
        if model not in runs:
            runs[model] = run(tmp_path_factory.mktemp(f"{model}-ref"), data, model, STEPS)
        return runs[model]
    return get


@pytest.mark.parametrize("model", BACKBONES)
def test_two_runs_end_with_identical_weights(model, reference, data, tmp_path):
    again = run(tmp_path / "again", data, model, STEPS)
    assert again["step"] == STEPS
    assert_bit_identical(reference(model), again)


@pytest.mark.parametrize("model", BACKBONES)
def test_resumed_run_ends_with_identical_weights(model, reference, data, tmp_path):
    half = run(tmp_path / "resumed", data, model, STEPS // 2)
    assert half["step"] == STEPS // 2
    resumed = run(tmp_path / "resumed", data, model, STEPS, resume=True)
    assert resumed["step"] == STEPS
    assert_bit_identical(reference(model), resumed)


def test_loader_workers_do_not_change_the_weights(reference, data, tmp_path):
    """Two DataLoader worker processes load the same batches in the same order: the run ends as with none."""
    with_workers = run(tmp_path / "workers", data, "dit", STEPS, workers=2)
    assert with_workers["config"]["workers"] == 2
    assert_bit_identical(reference("dit"), with_workers)
