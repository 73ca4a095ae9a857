"""Flow-matching conventions (bench/flow.py): path, target, time laws, ODE solvers with NFE, guidance."""
import math

import pytest
import torch
import torch.nn as nn
from scipy import stats

from bench import flow


def test_path_endpoints_and_velocity_target():
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    assert torch.equal(flow.interpolate(x0, x1, torch.zeros(3)), x0)  # t = 0 is noise
    assert torch.equal(flow.interpolate(x0, x1, torch.ones(3)), x1)  # t = 1 is data
    t = torch.tensor([0.25, 0.5, 0.9])
    xt = flow.interpolate(x0, x1, t)
    torch.testing.assert_close(xt[1], 0.5 * (x0[1] + x1[1]))
    # the target is the time derivative of the path, the same at every t
    h = 1e-3
    dx = (flow.interpolate(x0.double(), x1.double(), t.double() + h) - xt.double()) / h
    torch.testing.assert_close(dx, flow.target_velocity(x0, x1).double(), rtol=1e-4, atol=1e-4)


class Oracle(nn.Module):
    """Predicts the exact target for a known (x0, x1): what a perfect backbone would do."""

    def __init__(self, x0, x1):
        super().__init__()
        self.x0, self.x1 = x0, x1

    def forward(self, x, t, mask):
        assert torch.allclose(x, flow.interpolate(self.x0, self.x1, t))  # the model sees x_t
        return self.x1 - self.x0


def test_loss_is_mse_against_target():
    g = torch.Generator().manual_seed(1)
    x0, x1, t = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g), torch.rand(4, generator=g)
    mask = torch.zeros(4, 19, 8, 8)
    assert flow.flow_loss(Oracle(x0, x1), x1, mask, t, x0).item() == pytest.approx(0.0, abs=1e-12)
    zero = lambda x, t, m: torch.zeros_like(x)  # noqa: E731
    assert flow.flow_loss(zero, x1, mask, t, x0).item() == pytest.approx(((x1 - x0) ** 2).mean().item(), rel=1e-6)


def test_time_distributions():
    g = torch.Generator().manual_seed(2)
    t_ln = flow.sample_time(20000, "logit-normal", g)
    t_u = flow.sample_time(20000, "uniform", g)
    assert 0 < t_ln.min() and t_ln.max() < 1
    # logit(t) ~ N(0, 1) for logit-normal; t ~ U(0, 1) for uniform (KS tests, and each fails the other's law)
    logit = torch.log(t_ln / (1 - t_ln)).numpy()
    assert stats.kstest(logit, "norm").pvalue > 1e-3
    assert stats.kstest(t_u.numpy(), "uniform").pvalue > 1e-3
    assert stats.kstest(t_ln.numpy(), "uniform").pvalue < 1e-6
    assert stats.kstest(torch.log(t_u / (1 - t_u)).numpy(), "norm").pvalue < 1e-6
    with pytest.raises(ValueError, match="logit-normal"):
        flow.sample_time(3, "beta")


def test_time_grid():
    grid = flow.time_grid(200)
    assert len(grid) == 201 and grid[0] == 0 and grid[-1] == 1
    assert torch.equal(grid, torch.tensor([i / 200 for i in range(201)], dtype=torch.float64))


@pytest.mark.parametrize("steps", [1, 7, 200])
def test_euler_exact_on_straight_paths_and_nfe(steps):
    """The velocity field of a straight path to x1 is integrated exactly by Euler, with NFE = steps."""
    g = torch.Generator().manual_seed(3)
    x0, x1 = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64), torch.randn(2, 3, 4, 4, generator=g,
                                                                                   dtype=torch.float64)
    times = []

    def v(x, t):
        times.append(t[0].item())
        return (x1 - x) / (1 - t.double().view(-1, 1, 1, 1))  # exact field: constant x1 - x0 along the path

    out, nfe = flow.integrate(v, x0, steps, "euler")
    torch.testing.assert_close(out, x1, rtol=1e-9, atol=1e-9)
    assert nfe == steps == len(times)
    assert times == pytest.approx([i / steps for i in range(steps)])  # evaluated on t_i = i / steps


@pytest.mark.parametrize("steps", [1, 5, 50])
def test_euler_grid_and_heun_exact_for_time_linear_field(steps):
    """For dx/dt = a + b t: Heun (trapezoid) is exact; Euler's error is the left-Riemann one, b / (2 steps)."""
    a, b = torch.tensor([0.3, -1.0], dtype=torch.float64), torch.tensor([2.0, 0.5], dtype=torch.float64)
    v = lambda x, t: (a + b * t.double().view(-1, 1)).expand_as(x)  # noqa: E731
    x0 = torch.zeros(1, 2, dtype=torch.float64)
    exact = a + b / 2
    heun, nfe_heun = flow.integrate(v, x0, steps, "heun")
    euler, nfe_euler = flow.integrate(v, x0, steps, "euler")
    torch.testing.assert_close(heun[0], exact, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(euler[0], exact - b / (2 * steps), rtol=1e-12, atol=1e-12)
    assert nfe_heun == 2 * steps == flow.NFE_PER_STEP["heun"] * steps
    assert nfe_euler == steps


def test_orders_of_accuracy():
    """On dx/dt = -x, halving the step halves Euler's error (order 1) and quarters Heun's (order 2)."""
    v = lambda x, t: -x  # noqa: E731
    x0 = torch.ones(1, 1, dtype=torch.float64)
    exact = math.exp(-1)
    err = {(m, s): abs(flow.integrate(v, x0, s, m)[0].item() - exact) for m in flow.METHODS for s in (20, 40)}
    assert err[("euler", 20)] / err[("euler", 40)] == pytest.approx(2, rel=0.05)
    assert err[("heun", 20)] / err[("heun", 40)] == pytest.approx(4, rel=0.05)


class MaskSum(nn.Module):
    """A velocity that depends on the mask; records the batch size of every call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, mask):
        self.calls.append(x.shape[0])
        return x * t.view(-1, 1, 1, 1) + mask.sum(1, keepdim=True) + 0.1


def test_guidance_formula_and_one_batched_call():
    model = MaskSum()
    g = torch.Generator().manual_seed(4)
    x, t = torch.randn(3, 1, 4, 4, generator=g), torch.rand(3, generator=g)
    mask = torch.zeros(3, 19, 4, 4)
    mask[:, 1] = 1
    v_c, v_u = model(x, t, mask), model(x, t, flow.null_mask(mask))
    model.calls.clear()
    # s = 1 is the plain conditional velocity, one call on the unchanged batch
    torch.testing.assert_close(flow.guided_velocity(model, mask, 1.0)(x, t), v_c)
    assert model.calls == [3]
    model.calls.clear()
    for s in (0.0, 2.5):
        torch.testing.assert_close(flow.guided_velocity(model, mask, s)(x, t), v_u + s * (v_c - v_u))
    assert model.calls == [6, 6]  # both halves in one call each time
    model.calls.clear()
    _, nfe = flow.integrate(flow.guided_velocity(model, mask, 2.0), x, 4)
    assert nfe == 4 and model.calls == [6] * 4  # a guided call counts as one NFE


def test_mask_dropout():
    mask = torch.ones(4, 19, 2, 2)
    out = flow.drop_masks(mask, torch.tensor([True, False, True, False]))
    assert out[[0, 2]].abs().sum() == 0
    assert torch.equal(out[[1, 3]], mask[[1, 3]])
    assert torch.equal(flow.null_mask(mask), torch.zeros_like(mask))


def test_unknown_method():
    with pytest.raises(ValueError, match="euler"):
        flow.integrate(lambda x, t: x, torch.zeros(1, 1), 3, "rk4")
