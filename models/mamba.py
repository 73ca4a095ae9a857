"""Mamba layers over token sequences: Self-Mamba (everything from the image tokens) and Cross-Mamba (SISMA).

Self-Mamba is Mamba's mixer: in_proj D -> 2 * d_inner gives the scanned stream u and the gate z; u goes
through a depthwise causal conv + SiLU, x_proj gives (dt, B, C), dt_proj lifts dt to d_inner, the selective
scan runs with softplus(dt + bias), the result is gated by silu(z) and projected back by out_proj.

Cross-Mamba (SISMA, after Mamba-ST) keeps dt and u from the image tokens but computes the selection
matrices B and C from the mask tokens m: m has its own input projection D -> d_inner, its own depthwise
causal conv + SiLU and its own projection to (B, C). Position l of the scan therefore reads and writes the
state according to the mask at token l, which is how the layout steers the image.

Scan order: tokens are scanned along one or more orders (permutations of the raster positions), each with
its own conv, projections, A, D and dt; the gated outputs are summed. ``scan_orders`` gives the orders of
one block for the ablation options: "raster" (one scan, the default and what the presets use),
"bidirectional" (raster plus its reverse, as in Vision Mamba) and "zigzag" (one continuous snake scan per
block, the block cycling through 8 snakes: rows or columns, from each corner, as ZigMa's zigzag-8).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch import Tensor

from models.ssm import causal_conv1d, selective_scan

SCAN_ORDERS = ("raster", "bidirectional", "zigzag")
# Mamba's initialisation of the step size: softplus(dt_proj.bias) log-uniform in [DT_MIN, DT_MAX].
DT_MIN, DT_MAX, DT_FLOOR = 1e-3, 1e-1, 1e-4


def scan_orders(kind: str, grid: int, block_index: int) -> list[Tensor | None]:
    """Token orders scanned by block ``block_index``: permutations of raster positions, None for raster itself."""
    L = grid * grid
    if kind == "raster":
        return [None]
    if kind == "bidirectional":
        return [None, torch.arange(L - 1, -1, -1)]
    if kind == "zigzag":
        return [snake_order(grid, variant=block_index % 8)]
    raise ValueError(f"unknown scan order {kind!r}; available: {', '.join(SCAN_ORDERS)}")


def snake_order(grid: int, variant: int) -> Tensor:
    """Boustrophedon path over the grid, so consecutive tokens are always spatial neighbours.

    variant bits: 1 = columns instead of rows, 2 = start from the bottom, 4 = start from the right.
    """
    idx = torch.arange(grid * grid).view(grid, grid)  # raster positions
    if variant & 1:
        idx = idx.t()
    if variant & 2:
        idx = idx.flip(0)
    if variant & 4:
        idx = idx.flip(1)
    idx = idx.clone()
    idx[1::2] = idx[1::2].flip(1)  # every other line runs backwards
    return idx.flatten()


class SelectiveSSM(nn.Module):
    """One scan: depthwise causal conv + SiLU on u, projections to (dt, B, C), S4D-real A, skip D.

    With ``cross`` the projection of u gives only dt; B and C come from the (projected) mask stream through
    its own conv and projection.
    """

    def __init__(self, d_inner: int, d_state: int, dt_rank: int, d_conv: int, cross: bool):
        super().__init__()
        self.d_state, self.dt_rank, self.cross = d_state, dt_rank, cross
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner)  # applied causally
        self.x_proj = nn.Linear(d_inner, dt_rank if cross else dt_rank + 2 * d_state, bias=False)
        if cross:
            self.mask_conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner)
            self.mask_x_proj = nn.Linear(d_inner, 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, d_inner)
        self.A_log = nn.Parameter(torch.empty(d_inner, d_state))
        self.D = nn.Parameter(torch.empty(d_inner))
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """Mamba's init: A = -(1..N) per channel (S4D-real), D = 1, dt from log-uniform [DT_MIN, DT_MAX]."""
        d_inner, N = self.A_log.shape
        self.A_log.copy_(torch.log(torch.arange(1, N + 1, dtype=torch.float32)).expand(d_inner, N))
        self.D.fill_(1.0)
        bound = self.dt_rank ** -0.5  # keeps the variance of dt_proj's output at init
        nn.init.uniform_(self.dt_proj.weight, -bound, bound)
        dt = torch.exp(torch.rand(d_inner) * (math.log(DT_MAX) - math.log(DT_MIN)) + math.log(DT_MIN))
        dt = dt.clamp(min=DT_FLOOR)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus

    def forward(self, u: Tensor, z: Tensor, m: Tensor | None = None) -> Tensor:
        """u, z (B, E, L) in scan order, m (B, E, L) projected mask stream (cross only) -> y (B, E, L)."""
        N, R = self.d_state, self.dt_rank
        # Projections are written weight @ (B, E, L): channels-first in and out, as the conv and scan want.
        u = causal_conv1d(u, self.conv1d.weight[:, 0], self.conv1d.bias, activation="silu")  # (B, E, L)
        proj = self.x_proj.weight @ u  # (B, R, L), or (B, R + 2N, L) without cross
        if self.cross:
            dt = proj
            m = causal_conv1d(m, self.mask_conv1d.weight[:, 0], self.mask_conv1d.bias, activation="silu")
            B, C = (self.mask_x_proj.weight @ m).split([N, N], dim=1)  # (B, N, L) each, from the mask
        else:
            dt, B, C = proj.split([R, N, N], dim=1)
        delta = self.dt_proj.weight @ dt  # (B, E, L); dt_proj's bias enters the scan as delta_bias
        A = -torch.exp(self.A_log.float())  # (E, N)
        return selective_scan(u, delta, A, B, C, self.D.float(), z=z, delta_bias=self.dt_proj.bias.float(),
                              delta_softplus=True)


class MambaMixer(nn.Module):
    """Mamba layer on tokens (B, L, D) -> (B, L, D), one ``SelectiveSSM`` per scan order, outputs summed."""

    def __init__(self, d_model: int, cross: bool, orders: list[Tensor | None] = (None,), d_state: int = 16,
                 expand: int = 2, d_conv: int = 4, dt_rank: int | None = None):
        super().__init__()
        d_inner = expand * d_model
        dt_rank = dt_rank or math.ceil(d_model / 16)
        self.cross = cross
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        if cross:
            self.mask_proj = nn.Linear(d_model, d_inner, bias=False)
        self.ssms = nn.ModuleList(SelectiveSSM(d_inner, d_state, dt_rank, d_conv, cross) for _ in orders)
        for i, perm in enumerate(orders):
            if perm is not None:
                self.register_buffer(f"perm{i}", perm, persistent=False)
                self.register_buffer(f"inv{i}", torch.argsort(perm), persistent=False)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)

    def mix(self, x: Tensor, m: Tensor | None) -> Tensor:
        """x (B, L, D), m (B, L, D) mask tokens or None -> (B, L, D)."""
        w_u, w_z = self.in_proj.weight.chunk(2, dim=0)
        xt = x.transpose(1, 2)  # (B, D, L)
        u, z = w_u @ xt, w_z @ xt  # (B, E, L) each, contiguous
        ms = self.mask_proj.weight @ m.transpose(1, 2) if self.cross else None  # (B, E, L)
        y = 0
        for i, ssm in enumerate(self.ssms):
            perm = getattr(self, f"perm{i}", None)
            if perm is None:
                y = y + ssm(u, z, ms)
            else:  # scan in this order, then put every output back at its raster position
                y_perm = ssm(u[..., perm], z[..., perm], None if ms is None else ms[..., perm])
                y = y + y_perm[..., getattr(self, f"inv{i}")]
        return (self.out_proj.weight @ y).transpose(1, 2)  # (B, L, D)


class SelfMamba(MambaMixer):
    """Mamba over the image tokens: the scanned input, dt, B and C all come from x."""

    def __init__(self, d_model: int, **kw):
        super().__init__(d_model, cross=False, **kw)

    def forward(self, x: Tensor) -> Tensor:
        return self.mix(x, None)


class CrossMamba(MambaMixer):
    """Mamba over the image tokens whose selection matrices B and C are computed from the mask tokens m."""

    def __init__(self, d_model: int, **kw):
        super().__init__(d_model, cross=True, **kw)

    def forward(self, x: Tensor, m: Tensor) -> Tensor:
        return self.mix(x, m)
