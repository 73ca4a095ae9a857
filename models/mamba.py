"""Mamba layers over token sequences: Self-Mamba (everything from the image tokens) and Cross-Mamba (SISMA).

Self-Mamba is Mamba's mixer: in_proj D -> 2 * d_inner gives the scanned stream u and the gate z; u goes
through a depthwise conv + SiLU, x_proj gives (dt, B, C), dt_proj lifts dt to d_inner, the selective
scan runs with softplus(dt + bias), the result is gated by silu(z) and projected back by out_proj.

Cross-Mamba (SISMA, after Mamba-ST) keeps dt and u from the image tokens but computes the selection
matrices B and C from the mask tokens m: m has its own input projection D -> d_inner, its own depthwise
conv + SiLU and its own projection to (B, C). Position l of the scan therefore reads and writes the
state according to the mask at token l, which is how the layout steers the image.

Token mixing is set by two options (``SismaConfig.scan`` and ``.conv``):

- scan order: "raster" (one scan in raster order), "bidirectional" (raster and its reverse, as in Vision
  Mamba, both through the same parameters, outputs summed) or "zigzag" (one continuous snake per block,
  consecutive blocks starting from opposite corners and cycling through all 8 snakes, as ZigMa's zigzag-8);
- conv: "causal1d" (Mamba's depthwise causal 1-D conv of width d_conv, in scan order) or "grid2d" (a
  depthwise 3 x 3 conv on the token grid, not causal, as Mamba-ST and U-Shape Mamba use).

raster + causal1d is strictly causal: output token l depends on tokens 0..l only, so the top of the image
never sees the bottom. It is kept as the ablation's reference point; the default is zigzag + grid2d
(models/sisma.py).

Fused path: a Self-Mamba with the causal 1-D conv and one scan order is exactly Mamba's layer run on its tokens in
that order (in_proj and out_proj act per token, so permuting the tokens before in_proj and un-permuting after out_proj
is the same as permuting u and z and un-permuting y). Where ``models.ssm.fused_inner`` gives mamba-ssm's
``mamba_inner_fn`` (CUDA with mamba-ssm and causal-conv1d), it runs the whole layer in one call with the same weights:
xz = in_proj.weight @ x (u then z), conv1d's (E, 1, W) weight and bias, x_proj.weight (dt, B, C), dt_proj.weight,
out_proj.weight, A = -exp(A_log), D, dt_proj.bias as delta_bias, softplus. Cross-Mamba (B and C from the mask), the
grid conv (the default) and two scan orders (bidirectional) take the unfused path, whose scan is still mamba-ssm's
selective_scan_fn on CUDA.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from models import ssm
from models.layers import flat_tokens
from models.ssm import causal_conv1d, causal_conv1d_tokens, grid_conv2d_tokens, selective_scan, selective_scan_tokens

SCAN_ORDERS = ("raster", "bidirectional", "zigzag")
RASTER_ORDER = dict(order=ssm.RASTER, grid=0, prefix=0)  # raster (None in a list of orders) for the token kernels
CONVS = ("causal1d", "grid2d")
GRID_CONV_KERNEL = 3
# Snake variants of consecutive blocks (see snake_order): each pair starts from opposite corners, so after
# any two blocks every token has been scanned after every other one.
ZIGZAG_CYCLE = (0, 6, 1, 7, 2, 4, 3, 5)
# Mamba's initialisation of the step size: softplus(dt_proj.bias) log-uniform in [DT_MIN, DT_MAX].
DT_MIN, DT_MAX, DT_FLOOR = 1e-3, 1e-1, 1e-4


def _fp32(t: Tensor) -> Tensor:
    """t in fp32 (A, D and the step-size bias enter the scan so), with no operator call when it already is."""
    return t if t.dtype == torch.float32 else t.float()


def tokens_linear(x: Tensor, weight_t: Tensor, batch: int) -> Tensor:
    """Tokens (batch * L, in) times a transposed weight (in, out) -> (batch, L, out): ``F.linear`` without bias on 2-D
    tokens.

    The product ``F.linear`` makes of 3-D tokens (the same ``mm``, so the same bits and gradients) without its
    reshape and two views per call, operator calls that count at batch 1; callers pass ``weight.transpose(0, 1)``,
    one call, where ``weight.t()`` is two."""
    return torch.mm(x, weight_t).view(batch, -1, weight_t.shape[1])


def scan_orders(kind: str, grid: int, block_index: int) -> list[ScanOrder | None]:
    """Token orders scanned by block ``block_index``; None stands for raster order itself."""
    if kind == "raster":
        return [None]
    if kind == "bidirectional":
        return [None, ScanOrder(grid)]
    if kind == "zigzag":
        return [ScanOrder(grid, snake=ZIGZAG_CYCLE[block_index % len(ZIGZAG_CYCLE)])]
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


def _reverse_odd_lines(x: Tensor) -> Tensor:
    """(..., g, g) -> a copy in which every other line (1, 3, ...) runs backwards."""
    out = x.new_empty(x.shape)
    out[..., 0::2, :] = x[..., 0::2, :]
    out[..., 1::2, :] = x[..., 1::2, :].flip(-1)
    return out


@dataclass(frozen=True)
class ScanOrder:
    """A token order other than raster: a snake (variant bits as in ``snake_order``) or raster reversed.

    ``to_scan`` and ``from_scan`` move the token axis (the last) in and out of this order with transposes and flips
    of the token grid, the same copies ``perm`` describes as an index; a gather along the last axis costs several
    times more on CPU.
    """

    grid: int
    snake: int | None = None  # None: raster reversed

    @property
    def kernel_order(self) -> dict:
        """The order as ``models.ssm.selective_scan_tokens`` and ``causal_conv1d_tokens`` take it: the snake's variant
        bits, or REVERSED, on this grid, with no prefix."""
        return dict(order=ssm.REVERSED if self.snake is None else self.snake, grid=self.grid, prefix=0)

    @property
    def perm(self) -> Tensor:
        """Raster positions in scan order: ``to_scan(s) == s[..., perm]``."""
        if self.snake is None:
            return torch.arange(self.grid * self.grid - 1, -1, -1)
        return snake_order(self.grid, self.snake)

    def _flip(self, x: Tensor) -> Tensor:
        """The grid flipped as the variant's bits 2 (rows) and 4 (columns) say: its own inverse."""
        dims = [dim for dim, bit in ((-2, 2), (-1, 4)) if self.snake & bit]
        return x.flip(dims) if dims else x

    def to_scan(self, s: Tensor) -> Tensor:
        """(..., L) in raster order -> (..., L) in this order."""
        if self.snake is None:
            return s.flip(-1)
        x = s.unflatten(-1, (self.grid, self.grid))
        if self.snake & 1:
            x = x.transpose(-1, -2)
        return _reverse_odd_lines(self._flip(x)).flatten(-2)

    def from_scan(self, s: Tensor) -> Tensor:
        """(..., L) in this order -> (..., L) in raster order."""
        if self.snake is None:
            return s.flip(-1)
        x = self._flip(_reverse_odd_lines(s.unflatten(-1, (self.grid, self.grid))))
        if self.snake & 1:
            x = x.transpose(-1, -2)
        return x.reshape(s.shape)


class TokenConv(nn.Module):
    """Depthwise conv + SiLU on (B, E, L) streams: causal 1-D in scan order, or 3 x 3 on the token grid."""

    def __init__(self, channels: int, kind: str, d_conv: int, grid: int):
        super().__init__()
        if kind not in CONVS:
            raise ValueError(f"unknown conv {kind!r}; available: {', '.join(CONVS)}")
        self.kind, self.grid = kind, grid
        if kind == "causal1d":
            self.conv1d = nn.Conv1d(channels, channels, d_conv, groups=channels)  # applied causally
        else:
            self.conv2d = nn.Conv2d(channels, channels, GRID_CONV_KERNEL, padding=GRID_CONV_KERNEL // 2,
                                    groups=channels)

    @property
    def on_grid(self) -> bool:
        """True when the conv runs on the grid (raster layout), before the tokens are put in scan order."""
        return self.kind == "grid2d"

    def forward(self, s: Tensor) -> Tensor:
        if self.kind == "causal1d":
            return causal_conv1d(s, self.conv1d.weight[:, 0], self.conv1d.bias, activation="silu")
        B, E, L = s.shape
        return F.silu(self.conv2d(s.view(B, E, self.grid, self.grid))).view(B, E, L)

    def causal_tokens(self, s: Tensor, order: dict) -> Tensor:
        """The causal conv + SiLU along a scan order (``kernel_order``'s keywords) on token-major (B, L, E) streams,
        without putting them in that order: (B, L, E) contiguous in raster order."""
        return causal_conv1d_tokens(s, self.conv1d.weight[:, 0], self.conv1d.bias, **order)

    def grid_tokens(self, s: Tensor) -> Tensor:
        """The grid conv + SiLU on token-major (B, L, E) streams, without moving them (``grid_conv2d_tokens``: the C
        kernel on CPU reads the linear layer's view as it lies)."""
        return grid_conv2d_tokens(s, self.conv2d.weight, self.conv2d.bias, self.grid)


class SelectiveSSM(nn.Module):
    """Conv + SiLU on u, projections to (dt, B, C), S4D-real A, skip D; one set of parameters for every order.

    With ``cross`` the projection of u gives only dt; B and C come from the (projected) mask stream through
    its own conv and projection.
    """

    # kept in fp32 when a model is cast for inference (bench.runtime.cast_for_inference): A = -exp(A_log), the skip D
    # and the step-size bias enter the scan in fp32, as mamba-ssm passes them
    fp32_parameters = ("A_log", "D", "dt_proj.bias")

    def __init__(self, d_inner: int, d_state: int, dt_rank: int, d_conv: int, cross: bool, conv: str, grid: int):
        super().__init__()
        self.d_state, self.dt_rank, self.cross = d_state, dt_rank, cross
        self.conv = TokenConv(d_inner, conv, d_conv, grid)
        self.x_proj = nn.Linear(d_inner, dt_rank if cross else dt_rank + 2 * d_state, bias=False)
        if cross:
            self.mask_conv = TokenConv(d_inner, conv, d_conv, grid)
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

    def forward(self, u: Tensor, z: Tensor, m: Tensor | None, orders: list[ScanOrder | None]) -> Tensor:
        """u, z (B, E, L) and the projected mask stream m (B, E, L) (cross only), all in raster order ->
        y (B, E, L) in raster order: the scans along every order, summed. The channel-major path, on copies in each
        order: ``forward_tokens`` takes it where the C kernel does not run and the conv is the causal one."""
        if self.conv.on_grid:  # the 2-D conv does not depend on the order: run it once
            u = self.conv(u)
            m = self.mask_conv(m) if self.cross else None
        y = 0
        for order in orders:
            up, zp, mp = (s if s is None or order is None else order.to_scan(s) for s in (u, z, m))
            if not self.conv.on_grid:  # the causal conv runs along the scan
                up = self.conv(up)
                mp = self.mask_conv(mp) if self.cross else None
            yp = self.scan(up, zp, mp)
            y = y + (yp if order is None else order.from_scan(yp))
        return y

    def forward_tokens(self, u: Tensor, z: Tensor, m: Tensor | None, orders: list[ScanOrder | None]) -> Tensor:
        """``forward`` on token-major streams: u, z, m (B, L, E) in raster order -> y (B, L, E) in raster order.

        Nothing is moved: the grid conv runs channels-last, the causal conv and the scan kernel walk each order over
        the linear layers' tensors (``causal_conv1d_tokens``, ``selective_scan_tokens``), and the projections act per
        token on their own layout: once for all the orders after the grid conv, once per order after the causal conv,
        whose output depends on the order. Where the C kernel does not run (CUDA, the PyTorch fallbacks) the causal
        conv takes ``forward`` on channel-major copies in each order, the layout causal-conv1d's kernel reads."""
        if not self.conv.on_grid and not ssm.token_kernels_run(u):
            y = self.forward(u.transpose(1, 2), z.transpose(1, 2), m.transpose(1, 2) if m is not None else None,
                             orders)
            return y.transpose(1, 2)
        if self.conv.on_grid:  # the 2-D conv and so the projections do not depend on the order: made once
            u, m = self.conv.grid_tokens(u), self.mask_conv.grid_tokens(m) if self.cross else None
            streams = self.project_tokens(u, m, low_rank=len(orders) == 1)
        A, D, delta_bias = -torch.exp(_fp32(self.A_log)), _fp32(self.D), _fp32(self.dt_proj.bias)
        y = None
        for order in orders:
            where = RASTER_ORDER if order is None else order.kernel_order
            if not self.conv.on_grid:
                mo = self.mask_conv.causal_tokens(m, where) if self.cross else None
                streams = self.project_tokens(self.conv.causal_tokens(u, where), mo, low_rank=True)
            uo, delta, B, C, weight = streams
            yp = selective_scan_tokens(uo, delta, A, B, C, D, z=z, delta_bias=delta_bias, delta_softplus=True,
                                       delta_proj_weight=weight, **where)
            y = yp if y is None else y + yp
        return y

    def project_tokens(self, u: Tensor, m: Tensor | None, low_rank: bool) -> tuple[Tensor, ...]:
        """Convolved token-major u (and m, cross only) (B, L, E) -> the scan's u, delta (B, L, E) and B, C (B, L, N),
        per token on the linear layers' layout (B and C are views of one projection without cross), and None; with
        ``low_rank``, dt (B, L, R) in delta's place and dt_proj's weight for the scan to make delta from (on CPU the
        kernel does, without a (B, L, E) tensor). Not where orders share delta: delta's gradient would then reach the
        weight as one product per order, summed, not as the product of their sum, which has other bits."""
        N, R, batch = self.d_state, self.dt_rank, u.shape[0]
        proj = tokens_linear(flat_tokens(u), self.x_proj.weight.transpose(0, 1), batch)  # (B, L, R), or R + 2N
        if self.cross:
            dt = proj
            B, C = tokens_linear(flat_tokens(m), self.mask_x_proj.weight.transpose(0, 1), batch).split([N, N], -1)
        else:
            dt, B, C = proj.split([R, N, N], dim=-1)  # views: the kernel reads B and C with their strides
        if low_rank:
            return u, dt, B, C, self.dt_proj.weight
        delta = F.linear(dt, self.dt_proj.weight)  # (B, L, E); dt_proj's bias enters the scan as delta_bias
        return u, delta, B, C, None

    def scan(self, u: Tensor, z: Tensor, m: Tensor | None) -> Tensor:
        """One selective scan of (B, E, L) streams already convolved, in scan order."""
        N, R = self.d_state, self.dt_rank
        # Projections are written weight @ (B, E, L): channels-first in and out, as the scan wants.
        proj = self.x_proj.weight @ u  # (B, R, L), or (B, R + 2N, L) without cross
        if self.cross:
            dt = proj
            B, C = (self.mask_x_proj.weight @ m).split([N, N], dim=1)  # (B, N, L) each, from the mask
        else:
            dt, B, C = proj.split([R, N, N], dim=1)
        delta = self.dt_proj.weight @ dt  # (B, E, L); dt_proj's bias enters the scan as delta_bias
        A = -torch.exp(self.A_log.float())  # (E, N)
        return selective_scan(u, delta, A, B, C, self.D.float(), z=z, delta_bias=self.dt_proj.bias.float(),
                              delta_softplus=True)


class MambaMixer(nn.Module):
    """Mamba layer on tokens (B, L, D) -> (B, L, D): one ``SelectiveSSM`` scanned along each of ``orders``."""

    def __init__(self, d_model: int, cross: bool, orders: list[ScanOrder | None] = (None,), conv: str = "causal1d",
                 grid: int | None = None, d_state: int = 16, expand: int = 2, d_conv: int = 4,
                 dt_rank: int | None = None):
        super().__init__()
        d_inner = expand * d_model
        dt_rank = dt_rank or math.ceil(d_model / 16)
        if conv == "grid2d" and not grid:
            raise ValueError("conv 'grid2d' needs the token grid size")
        self.cross = cross
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        if cross:
            self.mask_proj = nn.Linear(d_model, d_inner, bias=False)
        self.ssm = SelectiveSSM(d_inner, d_state, dt_rank, d_conv, cross, conv, grid or 0)
        self.orders = list(orders)  # reorderings of the token grid: no tensors, so nothing to move between devices
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)

    def mix(self, x: Tensor, m: Tensor | None) -> Tensor:
        """x (B, L, D), m (B, L, D) mask tokens or None -> (B, L, D)."""
        # token-major throughout: u and z as two products so that each is a contiguous (B, L, E), the layout the
        # channels-last grid conv takes as it is; the products on 2-D tokens (tokens_linear), each made (B, L, .) for
        # the kernels by a view
        wt, E, batch = self.in_proj.weight.transpose(0, 1), self.in_proj.out_features // 2, x.shape[0]  # wt (D, 2E)
        tokens = flat_tokens(x)  # (B * L, D)
        u, z = tokens_linear(tokens, wt[:, :E], batch), tokens_linear(tokens, wt[:, E:], batch)  # slices: fewer calls
        ms = tokens_linear(flat_tokens(m), self.mask_proj.weight.transpose(0, 1), batch) if self.cross else None
        y = self.ssm.forward_tokens(u, z, ms, self.orders)
        return tokens_linear(flat_tokens(y), self.out_proj.weight.transpose(0, 1), batch)


class SelfMamba(MambaMixer):
    """Mamba over the image tokens: the scanned input, dt, B and C all come from x."""

    def __init__(self, d_model: int, **kw):
        super().__init__(d_model, cross=False, **kw)

    @property
    def fusable(self) -> bool:
        """True when the layer is Mamba's own on reordered tokens: causal 1-D conv, one scan order."""
        return not self.ssm.conv.on_grid and len(self.orders) == 1

    def forward(self, x: Tensor) -> Tensor:
        fused = ssm.fused_inner(x) if self.fusable else None
        if fused is not None:
            return self.mix_fused(x, fused)
        return self.mix(x, None)

    def mix_fused(self, x: Tensor, fused) -> Tensor:
        """x (B, L, D) -> (B, L, D) through ``fused`` (mamba_inner_fn's signature; see the module docstring)."""
        order = self.orders[0]
        xz = self.in_proj.weight @ x.transpose(1, 2)  # (B, 2E, L): u then z, as mamba_inner_fn splits it
        if order is not None:
            xz = order.to_scan(xz)  # tokens in scan order
        s = self.ssm
        conv = s.conv.conv1d
        out = fused(xz, conv.weight, conv.bias, s.x_proj.weight, s.dt_proj.weight, self.out_proj.weight, None,
                    -torch.exp(s.A_log.float()), None, None, s.D.float(), delta_bias=s.dt_proj.bias.float(),
                    delta_softplus=True)
        return out if order is None else order.from_scan(out.transpose(1, 2)).transpose(1, 2)  # raster order


class CrossMamba(MambaMixer):
    """Mamba over the image tokens whose selection matrices B and C are computed from the mask tokens m."""

    def __init__(self, d_model: int, **kw):
        super().__init__(d_model, cross=True, **kw)

    def forward(self, x: Tensor, m: Tensor) -> Tensor:
        return self.mix(x, m)
