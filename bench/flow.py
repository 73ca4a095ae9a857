"""Flow matching: the one statement of the conventions every trainer, sampler and metric follows.

Conventions
-----------
- Time runs from noise to data: ``t = 0`` is noise ``x0 ~ N(0, I)``, ``t = 1`` is the data ``x1``
  (pixels in [-1, 1], or VAE latents times the scale factor), and the path between them is straight:
  ``x_t = t * x1 + (1 - t) * x0``.
- The backbone predicts the velocity ``v(x_t, t, mask)``; its target is ``d x_t / dt = x1 - x0`` and the
  loss is the mean squared error over every element of the batch.
- Training time is logit-normal by default, ``t = sigmoid(n)`` with ``n ~ N(0, 1)`` (more weight on the
  middle of the path, where the velocity is hardest to predict); ``uniform`` draws ``t ~ U(0, 1)``.
- Classifier-free guidance: in training each sample's mask is replaced, with probability ``p_uncond``,
  by the null mask (all zeros, no class anywhere). At sampling ``v = v_u + s * (v_c - v_u)`` on every
  channel, with ``v_c`` the velocity given the mask and ``v_u`` given the null mask, both halves in ONE
  batched network call. ``s = 1`` turns guidance off (one plain conditional call, no doubled batch).
- Sampling integrates dx/dt = v from t = 0 to t = 1 on the uniform grid ``t_i = i / steps``,
  ``i = 0 .. steps``. The number of function evaluations (NFE) is the number of network calls one
  trajectory costs; a guided call counts as one NFE (it is one call, on a doubled batch).
  * Euler: ``x_{i+1} = x_i + h * v(x_i, t_i)``, one NFE per step: NFE = steps (200 steps = 200 NFE).
  * Heun (explicit trapezoid): predictor ``x' = x_i + h * v(x_i, t_i)``, corrector
    ``x_{i+1} = x_i + h/2 * (v(x_i, t_i) + v(x', t_{i+1}))``, two NFE on EVERY step, the last one included
    (the flow has no singularity at t = 1, unlike the EDM sigma = 0 end point): NFE = 2 * steps.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

TIME_DISTS = ("logit-normal", "uniform")
METHODS = ("euler", "heun")
NFE_PER_STEP = {"euler": 1, "heun": 2}

Velocity = Callable[[Tensor, Tensor], Tensor]  # (x (B, ...), t (B,)) -> v with x's shape


def sample_time(n: int, dist: str = "logit-normal", generator: torch.Generator | None = None) -> Tensor:
    """(n,) training times in (0, 1), drawn on the generator's device."""
    device = generator.device if generator is not None else None
    if dist == "logit-normal":
        return torch.sigmoid(torch.randn(n, generator=generator, device=device))
    if dist == "uniform":
        return torch.rand(n, generator=generator, device=device)
    raise ValueError(f"unknown time distribution {dist!r}; expected one of {', '.join(TIME_DISTS)}")


def interpolate(x0: Tensor, x1: Tensor, t: Tensor) -> Tensor:
    """x_t = t * x1 + (1 - t) * x0, with t (B,) broadcast over the other dimensions."""
    t = t.view(-1, *([1] * (x1.dim() - 1))).to(x1.dtype)
    return t * x1 + (1 - t) * x0


def target_velocity(x0: Tensor, x1: Tensor) -> Tensor:
    """The velocity of the straight path: x1 - x0."""
    return x1 - x0


def null_mask(mask: Tensor) -> Tensor:
    """The unconditional mask: all-zero one-hot (no class anywhere)."""
    return torch.zeros_like(mask)


def drop_masks(mask: Tensor, drop: Tensor) -> Tensor:
    """Replace the masks of the samples where ``drop`` (B,) is True by the null mask."""
    keep = (~drop).to(mask.dtype).view(-1, *([1] * (mask.dim() - 1)))
    return mask * keep


def flow_loss(model: nn.Module, x1: Tensor, mask: Tensor, t: Tensor, x0: Tensor) -> Tensor:
    """MSE between the predicted velocity at x_t and the target x1 - x0, computed in fp32."""
    v = model(interpolate(x0, x1, t), t, mask)
    return F.mse_loss(v.float(), target_velocity(x0, x1).float())


def guided_velocity(model: nn.Module, mask: Tensor, guidance: float = 1.0) -> Velocity:
    """The sampling velocity v(x, t) for a fixed batch of masks; guidance s != 1 batches both halves."""
    if guidance == 1.0:
        return lambda x, t: model(x, t, mask)
    both_masks = torch.cat([mask, null_mask(mask)])

    def velocity(x: Tensor, t: Tensor) -> Tensor:
        v_c, v_u = model(torch.cat([x, x]), torch.cat([t, t]), both_masks).chunk(2)
        return v_u + guidance * (v_c - v_u)

    return velocity


def time_grid(steps: int) -> Tensor:
    """t_i = i / steps for i = 0 .. steps, in float64 so that the grid is exact before any cast."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    return torch.arange(steps + 1, dtype=torch.float64) / steps


def integrate(velocity: Velocity, x0: Tensor, steps: int, method: str = "euler") -> tuple[Tensor, int]:
    """Solve dx/dt = velocity(x, t) from t = 0 (x0) to t = 1; returns (x at t = 1, NFE per trajectory)."""
    if method not in METHODS:
        raise ValueError(f"unknown sampling method {method!r}; expected one of {', '.join(METHODS)}")
    grid = time_grid(steps).tolist()
    nfe = 0

    def v(x: Tensor, t: float) -> Tensor:
        nonlocal nfe
        nfe += 1
        return velocity(x, torch.full((x.shape[0],), t, device=x.device, dtype=x.dtype)).to(x.dtype)

    x = x0
    for t, t_next in zip(grid[:-1], grid[1:]):
        h = t_next - t
        d = v(x, t)
        if method == "euler":
            x = x + h * d
        else:
            d_next = v(x + h * d, t_next)
            x = x + (h / 2) * (d + d_next)
    return x, nfe
