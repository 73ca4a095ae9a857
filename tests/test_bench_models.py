"""Micro-benchmarks: one forward of each backbone at the tiny preset (inference), forward + backward, and one
optimiser step at the cpu preset and recipe.

Disabled by default (pyproject: --benchmark-disable, so each body runs once as a smoke test); measure with
    pytest --benchmark-enable tests/test_bench_models.py
Each benchmark checks what it timed (shape, finite values, the weights' update), never the time itself; SISMA's
training step against DiT-SIS's is bounded in tests/test_bench_sisma_dit.py (slow).
"""
from __future__ import annotations

import pytest
import torch

import models
from bench.flops import example_inputs
from bench.presets import recipe

BATCH = 4
PRESET = "tiny"


@pytest.fixture(params=["sisma", "dit", "sdm"])
def backbone(request):
    """(name, model, (x, t, mask)) at the tiny preset, seeded."""
    torch.manual_seed(0)
    model = models.create_model(request.param, preset=PRESET)
    return request.param, model, example_inputs(model, BATCH, "cpu", generator=torch.Generator().manual_seed(0))


def test_forward(benchmark, backbone):
    name, model, (x, t, mask) = backbone
    model.eval()

    def forward():
        with torch.inference_mode():
            return model(x, t, mask)

    benchmark.extra_info.update(model=name, preset=PRESET, batch=BATCH, threads=torch.get_num_threads())
    v = benchmark(forward)
    assert v.shape == x.shape and torch.isfinite(v).all()


def test_forward_backward(benchmark, backbone):
    name, model, (x, t, mask) = backbone
    model.train()

    def step():
        model.zero_grad(set_to_none=True)
        loss = model(x, t, mask).square().mean()
        loss.backward()
        return loss

    benchmark.extra_info.update(model=name, preset=PRESET, batch=BATCH, threads=torch.get_num_threads())
    loss = benchmark(step)
    assert torch.isfinite(loss)


TRAIN_PRESET = "cpu"


@pytest.mark.parametrize("name", ["sisma", "dit", "sdm"])
def test_training_step_cpu_preset(benchmark, name):
    """One AdamW step of the flow-matching loss at the cpu preset and its recipe's batch: finite, weights updated."""
    from bench.flow import flow_loss

    torch.manual_seed(0)
    model = models.create_model(name, preset=TRAIN_PRESET).train()
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = recipe(TRAIN_PRESET, name).batch_size
    x1, t, mask = example_inputs(model, batch, "cpu", generator=torch.Generator().manual_seed(0))
    x0 = torch.randn_like(x1)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = flow_loss(model, x1, mask, t, x0)
        loss.backward()
        opt.step()
        return loss

    benchmark.extra_info.update(model=name, preset=TRAIN_PRESET, batch=batch, threads=torch.get_num_threads())
    loss = benchmark.pedantic(step, rounds=5, iterations=1, warmup_rounds=1)
    assert torch.isfinite(loss)
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    after = list(model.parameters())
    assert all(torch.isfinite(p).all() for p in after) and any(not torch.equal(a, b) for a, b in zip(after, before))
