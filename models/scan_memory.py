"""Shape-only selective scan and causal conv for fake tensors: what the real kernels allocate and save, nothing
computed.

Fake tensors (``torch._subclasses.fake_tensor``, used by ``bench plan`` to predict GPU memory) carry no data, and
no kernel can run on them. These autograd Functions stand in for the kernels a real device would run, allocating
the same outputs and saving the same tensors for backward, so that memory is predicted as it will be:

- ``MambaScanShapes`` mirrors mamba-ssm's ``SelectiveScanFn`` (``mamba_ssm/ops/selective_scan_interface.py`` and
  ``csrc/selective_scan/selective_scan.cpp``). Forward: u, delta, B, C, z are made contiguous in the last
  dimension when they are not (copies); B and C (B, N, L) become (B, 1, N, L) views; the kernel allocates
  ``out`` like delta, ``out_z`` like z and the chunk states ``x`` (B, D, n_chunks, 2N) in A's dtype (fp32), with
  n_chunks = ceil(L / 2048); it saves u, delta, A, B, C, D, z, delta_bias, x and (with z) out, and returns
  out_z (with z) or out. Backward: dout made contiguous if needed; du and ddelta like u and delta, dz like z, dA, dD and
  ddelta_bias zero tensors like their inputs, and dB, dC zero fp32 tensors cast to B's and C's dtype.
- ``CpuScanShapes`` mirrors ``models.ssm._CpuScan`` (the C kernel): fp32 contiguous copies of every input (B and C
  transposed to (B, G, L, N)) are saved; fp32 ``out`` and the last state (B, D, N) are allocated and ``out`` is
  cast back to u's dtype. Backward: dout in fp32, du, ddelta and dz like u, per-batch dA (B, D, N), dD and
  dbias (B, D), dB and dC like the saved transposes, the per-thread partial sums, then the casts and sums.
- ``CausalConvShapes`` mirrors causal-conv1d's ``CausalConv1dFn`` (``causal_conv1d/causal_conv1d_interface.py``):
  x made contiguous if neither of its last two strides is 1, bias contiguous; ``out`` like x; x, weight and bias
  saved. Backward: dx like x, dweight and dbias like weight and bias.
- ``MambaInnerShapes`` mirrors mamba-ssm's ``MambaInnerFn`` (``mamba_inner_fn``, checkpoint level 1, B and C from
  x_proj), the fused Self-Mamba layer. Forward: under autocast the three projection weights are cast (and those
  copies saved); the conv output (B, E, L) and its per-position copy for x_proj, x_dbl (B L, R + 2N), the step sizes
  (E, B L), B and C as contiguous (B, 1, N, L), the kernel's out like the step sizes, its chunk states and out_z like
  z, and out_proj's input copy and output; saved: xz, the weights, x_dbl, A, B, C, D, delta_bias, the chunk states
  and out (the conv output and the step sizes are dropped and recomputed). Backward: the conv output and step sizes
  again, dxz like xz, out_proj's gradient (E, B L), the scan's du, ddelta, dB and dC (fp32, then cast) and a
  recomputed out_z, then the layouts mamba-ssm's backward copies through (out_z, ddelta and the conv gradient as
  (E, B L), dB and dC as (B L, N), the conv output as (B L, E)), the weight gradients and the conv's fp32 dweight and
  dbias.

The scratch buffers inside the kernels (a few kB per thread) are left out.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

MAMBA_CHUNK = 2048  # positions per chunk of mamba-ssm's forward kernel (n_chunks = ceil(L / 2048))


def _last_contiguous(t: Tensor | None) -> Tensor | None:
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


class MambaScanShapes(torch.autograd.Function):
    """mamba-ssm's SelectiveScanFn, allocations and saved tensors only (see the module docstring)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        u, delta, B, C, z = (_last_contiguous(t) for t in (u, delta, B, C, z))
        D = D.contiguous() if D is not None else None
        ctx.squeeze = B.dim() == 3, C.dim() == 3
        B = B.unsqueeze(1) if B.dim() == 3 else B
        C = C.unsqueeze(1) if C.dim() == 3 else C
        batch, dim, length = u.shape
        out = torch.empty_like(delta)
        x = u.new_empty(batch, dim, math.ceil(length / MAMBA_CHUNK), 2 * A.shape[1], dtype=A.dtype)
        out_z = torch.empty_like(z) if z is not None else None
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, x, out if z is not None else None)
        last = x[:, :, -1, 1::2]
        ctx.mark_non_differentiable(last)
        return (out_z if z is not None else out), last

    @staticmethod
    def backward(ctx, dout, dlast):
        u, delta, A, B, C, D, z, delta_bias, x, out = ctx.saved_tensors
        dout = _last_contiguous(dout)
        du, ddelta = torch.empty_like(u), torch.empty_like(delta)
        dA = torch.zeros_like(A)
        dB = torch.zeros_like(B, dtype=torch.float32).to(B.dtype)
        dC = torch.zeros_like(C, dtype=torch.float32).to(C.dtype)
        dD = torch.zeros_like(D) if D is not None else None
        dbias = torch.zeros_like(delta_bias) if delta_bias is not None else None
        dz = torch.empty_like(z) if z is not None else None
        dB = dB.squeeze(1) if ctx.squeeze[0] else dB
        dC = dC.squeeze(1) if ctx.squeeze[1] else dC
        return du, ddelta, dA, dB, dC, dD, dz, dbias, None


def _fp32(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach().to(torch.float32).contiguous()


class CpuScanShapes(torch.autograd.Function):
    """models.ssm._CpuScan (the C kernel), allocations and saved tensors only (see the module docstring)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        grouped = B.dim() == 4
        Bt = _fp32((B if grouped else B.unsqueeze(1)).transpose(-1, -2))
        Ct = _fp32((C if grouped else C.unsqueeze(1)).transpose(-1, -2))
        tensors = [_fp32(t) for t in (u, delta, A)] + [Bt, Ct] + [_fp32(t) for t in (D, z, delta_bias)]
        out = u.new_empty(u.shape, dtype=torch.float32)
        last = u.new_empty(u.shape[0], u.shape[1], A.shape[1], dtype=torch.float32)
        ctx.save_for_backward(*tensors)
        ctx.grouped = grouped
        ctx.dtypes = [t.dtype if t is not None else None for t in (u, delta, A, B, C, D, z, delta_bias)]
        return out.to(u.dtype), last

    @staticmethod
    def backward(ctx, dout, dlast):
        u, delta, A, Bt, Ct, D, z, delta_bias = ctx.saved_tensors
        batch, dim, length = u.shape
        groups, state = Bt.shape[1], A.shape[1]
        dout = _fp32(dout)
        du, ddelta = torch.empty_like(u), torch.empty_like(u)
        dz = torch.empty_like(u) if z is not None else None
        dA, dD, dbias = u.new_empty(batch, dim, state), u.new_empty(batch, dim), u.new_empty(batch, dim)
        dB, dC = torch.empty_like(Bt), torch.empty_like(Ct)
        partial = u.new_zeros(torch.get_num_threads(), 2, groups, length, state)
        del partial
        dB, dC = dB.transpose(-1, -2), dC.transpose(-1, -2)
        if not ctx.grouped:
            dB, dC = dB.squeeze(1), dC.squeeze(1)
        result = [du, ddelta, dA.sum(0), dB, dC, dD.sum(0) if D is not None else None, dz,
                  dbias.sum(0) if delta_bias is not None else None]
        return (*[g if g is None else g.to(t) for g, t in zip(result, ctx.dtypes)], None)


class CausalConvShapes(torch.autograd.Function):
    """causal-conv1d's CausalConv1dFn, allocations and saved tensors only (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        if x.stride(2) != 1 and x.stride(1) != 1:
            x = x.contiguous()
        bias = bias.contiguous() if bias is not None else None
        ctx.save_for_backward(x, weight, bias)
        return torch.empty_like(x)

    @staticmethod
    def backward(ctx, dout):
        x, weight, bias = ctx.saved_tensors
        return torch.empty_like(x), torch.empty_like(weight), (torch.empty_like(bias) if bias is not None else None)


def selective_scan_shapes(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          return_last_state=False):
    """The shape-only scan of the kernel u's device would run: mamba-ssm on CUDA, the C kernel on the CPU."""
    fn = MambaScanShapes if u.is_cuda else CpuScanShapes
    y, last = fn.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return (y, last) if return_last_state else y


def causal_conv1d_shapes(x, weight, bias=None):
    """The shape-only causal conv of causal-conv1d (its SiLU is fused: one output)."""
    return CausalConvShapes.apply(x, weight, bias)


def _per_position(t: Tensor) -> Tensor:
    """(B, E, L) -> (B L, E), as einops' "b d l -> (b l) d" lays it out (a copy unless already so)."""
    return t.transpose(1, 2).reshape(-1, t.shape[1])


def _channels_first(t: Tensor) -> Tensor:
    """(B, E, L) -> (E, B L), as "b d l -> d (b l)" (a copy unless already so)."""
    return t.transpose(0, 1).reshape(t.shape[1], -1)


def _batch_first(t: Tensor, batch: int) -> Tensor:
    """(E, B L) -> (B, E, L) view, as "d (b l) -> b d l"."""
    return t.view(t.shape[0], batch, -1).transpose(0, 1)


class MambaInnerShapes(torch.autograd.Function):
    """mamba-ssm's MambaInnerFn, allocations and saved tensors only (see the module docstring)."""

    @staticmethod
    def forward(ctx, xz, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, out_proj_weight, A, D, delta_bias,
                out_proj_bias):  # the one argument that may be None comes last (bench.memsim.backward pairs the rest)
        if torch.is_autocast_enabled("cuda"):
            dtype = torch.get_autocast_dtype("cuda")
            x_proj_weight, dt_proj_weight, out_proj_weight = (w.to(dtype) for w in (
                x_proj_weight, dt_proj_weight, out_proj_weight))
            out_proj_bias = out_proj_bias.to(dtype) if out_proj_bias is not None else None
        xz = _last_contiguous(xz)
        batch, length = xz.shape[0], xz.shape[-1]
        rank, state = dt_proj_weight.shape[1], A.shape[1]
        x, z = xz.chunk(2, dim=1)
        conv_out = torch.empty_like(x)  # causal_conv1d_fwd
        x_dbl = F.linear(_per_position(conv_out), x_proj_weight)
        delta = _batch_first(dt_proj_weight @ x_dbl[:, :rank].t(), batch)
        B = x_dbl[:, rank:rank + state].reshape(batch, length, state).transpose(1, 2).unsqueeze(1).contiguous()
        C = x_dbl[:, -state:].reshape(batch, length, state).transpose(1, 2).unsqueeze(1).contiguous()
        D = D.contiguous()
        out = torch.empty_like(delta)  # the scan kernel's outputs
        chunks = x.new_empty(batch, x.shape[1], math.ceil(length / MAMBA_CHUNK), 2 * state, dtype=A.dtype)
        out_z = torch.empty_like(z)
        del conv_out, delta  # checkpoint level 1: recomputed in backward
        ctx.save_for_backward(xz, conv_weight, conv_bias, x_dbl, x_proj_weight, dt_proj_weight, out_proj_weight, A,
                              B, C, D, delta_bias, chunks, out)
        ctx.has_out_bias = out_proj_bias is not None
        return F.linear(out_z.transpose(1, 2), out_proj_weight, out_proj_bias)

    @staticmethod
    def backward(ctx, dout):
        (xz, conv_weight, conv_bias, x_dbl, x_proj_weight, dt_proj_weight, out_proj_weight, A, B, C, D, delta_bias,
         chunks, out) = ctx.saved_tensors
        batch, width, length = xz.shape
        rank, state = dt_proj_weight.shape[1], A.shape[1]
        x, z = xz.chunk(2, dim=1)
        dout = _last_contiguous(dout)
        conv_out = torch.empty_like(x)  # recomputed
        delta = _batch_first(dt_proj_weight @ x_dbl[:, :rank].t(), batch)
        dxz = torch.empty_like(xz)
        dout = dout.reshape(-1, dout.shape[-1]).t()  # (D_model, B L)
        dout_y = _batch_first(out_proj_weight.t() @ dout, batch)
        # the scan's backward: du, ddelta, dA, dB, dC (fp32 then cast), dD, ddelta_bias, dz into dxz, out_z again
        dconv_out, ddelta = torch.empty_like(conv_out), torch.empty_like(delta)
        dA = torch.zeros_like(A)
        dB = torch.zeros_like(B, dtype=torch.float32).to(B.dtype)
        dC = torch.zeros_like(C, dtype=torch.float32).to(C.dtype)
        dD, ddelta_bias = torch.zeros_like(D), torch.zeros_like(delta_bias)
        out_z = torch.empty_like(out)
        del dout_y
        dout_proj_weight = dout @ _channels_first(out_z).t()
        dout_proj_bias = dout.sum(1) if ctx.has_out_bias else None
        dx_dbl = torch.empty_like(x_dbl)
        dx_dbl[:, rank:rank + state] = dB.squeeze(1).transpose(1, 2).reshape(-1, state)
        dx_dbl[:, -state:] = dC.squeeze(1).transpose(1, 2).reshape(-1, state)
        del dB, dC
        ddelta = _channels_first(ddelta)
        ddt_proj_weight = ddelta @ x_dbl[:, :rank]
        dx_dbl[:, :rank] = (dt_proj_weight.t() @ ddelta).t()
        dconv_out = _channels_first(dconv_out)
        dx_proj_weight = dx_dbl.t() @ _per_position(conv_out)
        dconv_out = torch.addmm(dconv_out, x_proj_weight.t(), dx_dbl.t(), out=dconv_out)
        # the conv's backward writes dx into dxz; its weight and bias gradients are fp32
        dconv_weight = torch.zeros_like(conv_weight, dtype=torch.float32)
        dconv_bias = torch.zeros_like(conv_bias, dtype=torch.float32)
        return (dxz, dconv_weight, dconv_bias, dx_proj_weight, ddt_proj_weight, dout_proj_weight, dA, dD, ddelta_bias,
                dout_proj_bias)


def mamba_inner_shapes(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight,
                       out_proj_bias, A, B=None, C=None, D=None, delta_bias=None, B_proj_bias=None, C_proj_bias=None,
                       delta_softplus=True, checkpoint_lvl=1):
    """The shape-only ``mamba_inner_fn`` in the form SelfMamba calls it: B and C from x_proj, conv bias, D and
    delta_bias given, checkpoint level 1."""
    if (B is not None or C is not None or B_proj_bias is not None or C_proj_bias is not None or checkpoint_lvl != 1
            or conv1d_bias is None or D is None or delta_bias is None):
        raise NotImplementedError("mamba_inner_shapes: only B and C from x_proj (no biases), with the conv's bias, D "
                                  "and delta_bias, at checkpoint level 1")
    return MambaInnerShapes.apply(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight,
                                  A, D, delta_bias, out_proj_bias)
