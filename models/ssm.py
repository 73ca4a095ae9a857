"""Selective scan (Mamba's S6 recurrence) with mamba-ssm's ``selective_scan_fn`` semantics.

    dt_l = softplus(delta_l + delta_bias)   (without softplus: delta_l + delta_bias)
    h_l  = exp(dt_l * A) * h_{l-1} + dt_l * B_l * u_l       (state, (D, N) per batch element, h_{-1} = 0)
    y_l  = C_l . h_l + D * u_l ;  out = y * silu(z)  if z is given

Shapes: u, delta, z (B, D, L); A (D, N); B, C (B, N, L) or grouped (B, G, N, L) with D % G == 0
(channel d reads group d // (D // G)); D, delta_bias (D,). Accumulation is in fp32 (fp64 for fp64
inputs); the output is cast back to u's dtype; the last state (B, D, N) stays in the accumulation dtype.

Implementations behind ``selective_scan`` (``SIS_BENCH_SCAN=auto|cpu|torch|ref|cuda`` forces one):
- ``cuda``: mamba-ssm's fused kernel, for CUDA tensors when ``mamba_ssm`` imports (optional extra).
- ``cpu``: a C kernel (models/csrc/selective_scan.c) built on first use with the system C compiler
  and cached per user; forward and backward, never a (B, D, L, N) tensor. The default on CPU.
- ``torch``: a chunked pure-PyTorch scan (checkpointed per chunk, so (B, D, chunk, N) at most);
  the fallback when no kernel can be built or mamba-ssm is missing on a GPU, and the fp64 path.
- ``ref``: ``selective_scan_ref``, the plain step-by-step loop (the tests' reference).
``selective_scan_tokens`` is the same scan on the models' token layout: u, delta, z (B, L, D) and B, C (B, L, N) or
(B, L, G, N) as views of the linear layers' outputs, along a scan order (raster, reversed, by columns, by columns
reversed or a snake of the token grid, after a prefix of tokens kept in place) that the C kernel walks by index
arithmetic; in and out in raster order, with no copies on the CPU kernel. ``causal_conv1d_tokens`` is Mamba's causal
conv (+ SiLU) along such an order on the same layout, also in the C kernel; ``token_kernels_run`` says where both run.
``grid_conv2d_tokens`` is SISMA's depthwise 3 x 3 grid conv (+ SiLU) on that layout, in the C kernel in fp32 on CPU.
On fake tensors (``bench plan``) the scan and the causal conv compute nothing and allocate and save what the
kernel of the tensors' device would (``models/scan_memory.py``; the token-layout entries' own autograd Functions on
fake CPU tensors); on the meta device they only give shapes.
A forced backend that cannot run raises RuntimeError rather than silently running another one.

The fused Mamba layer: ``fused_inner(t)`` gives mamba-ssm's ``mamba_inner_fn`` (causal conv, x_proj, dt_proj,
selective scan and out_proj in one autograd Function that recomputes the conv output and the step sizes in backward)
for CUDA tensors when mamba-ssm's scan and causal-conv1d's kernel both load and no backend is forced (``auto``), its
shape-only stand-in on fake CUDA tensors, and None elsewhere; ``models.mamba.SelfMamba`` uses it where its semantics
match. ``SIS_BENCH_SCAN=cuda`` keeps the unfused ``selective_scan_fn``. ``mamba_inner_reference`` is the same
computation from this module's parts, with ``mamba_inner_fn``'s signature: the CPU stand-in of the fused kernel.

Profiler ranges (``torch.profiler.record_function``, read by ``bench/breakdown.py``): every scan that computes runs
inside ``SCAN_LABEL``, each fused layer inside ``FUSED_LABEL``, and causal-conv1d's kernel and the C kernel's causal
conv on the token layout inside ``CAUSAL_CONV_LABEL``, so that work no aten operator shows (the C kernel called through
ctypes, the CUDA extensions' kernels) is still seen and attributed; shapes-only calls (meta, fake) open no range, and
no range opens while no profiler records (entering one costs microseconds).
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import hashlib
import importlib
import os
import platform
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from models.scan_memory import causal_conv1d_shapes, mamba_inner_shapes, selective_scan_shapes

BACKENDS = ("cuda", "cpu", "torch", "ref")
BACKEND_ENV = "SIS_BENCH_SCAN"
FLOPS_PER_STATE_STEP = 9  # exp, 2 mul for dt*A and dt*u*B, FMA update (2), C product and sum (2), ~1 misc
TORCH_CHUNK = 16  # positions per checkpointed chunk of the torch path: (B, D, 16, N) tensors at most
KERNEL_SOURCE = Path(__file__).with_name("csrc") / "selective_scan.c"
COMMON_FLAGS = ("-O3", "-ffast-math", "-fPIC", "-shared")  # fast-math: vector loops may call libmvec
KERNEL_FLAG_SETS = (  # tried in order: OpenMP threads, then single-threaded SIMD, then portable
    # the CPU's widest vectors (gcc and clang otherwise keep 256-bit ones on most AVX-512 CPUs): a scan position's 16
    # states are one 512-bit vector, 13-17% faster on a Xeon; where the flag is unknown (not x86) the next set is used
    ("-march=native", "-mprefer-vector-width=512", "-fopenmp"),
    ("-march=native", "-fopenmp"),
    ("-march=native", "-fopenmp-simd"),
    ("-fopenmp-simd",),
)
# profiler ranges (see the module docstring): one selective scan, one fused Mamba layer, one causal-conv1d kernel call
SCAN_LABEL = "sis_bench::selective_scan"
FUSED_LABEL = "sis_bench::mamba_inner_fused"
CAUSAL_CONV_LABEL = "sis_bench::causal_conv1d"
GRID_CONV_LABEL = "sis_bench::grid_conv2d"


def scan_flops(batch: int, dim: int, length: int, state: int) -> int:
    """FLOPs of one forward scan: about 9 per (batch, channel, position, state) element."""
    return FLOPS_PER_STATE_STEP * batch * dim * length * state


# --- instrumentation: which implementation ran, and scan FLOPs (FlopCounterMode cannot see them) ---

_USED_BACKENDS: set[str] = set()
_ACTIVE_COUNTERS: list["ScanFlopCounter"] = []


@dataclasses.dataclass
class ScanFlopCounter:
    """Accumulates ``scan_flops`` of every forward scan made while its ``count_scan_flops`` is active."""

    flops: int = 0
    calls: int = 0


@contextlib.contextmanager
def count_scan_flops():
    """Context manager yielding a ``ScanFlopCounter`` that counts the scans run inside it."""
    counter = ScanFlopCounter()
    _ACTIVE_COUNTERS.append(counter)
    try:
        yield counter
    finally:
        _ACTIVE_COUNTERS.remove(counter)


def used_backends() -> set[str]:
    """Names of the implementations ``selective_scan`` has run since the last reset."""
    return set(_USED_BACKENDS)


def reset_used_backends() -> None:
    """Forget which implementations ran."""
    _USED_BACKENDS.clear()


def _profiler_range(label: str | None):
    """A profiler range named ``label`` while a profiler records; otherwise (or without a label) nothing, at no cost."""
    if label and torch.autograd.profiler._is_profiler_enabled:  # a plain flag torch keeps for fast checks like this
        return torch.profiler.record_function(label)
    return contextlib.nullcontext()


def _record(backend: str, u: Tensor | tuple, A: Tensor) -> None:
    """Note that ``backend`` ran one scan of u's shape (a tensor or the shape) and count its FLOPs."""
    _USED_BACKENDS.add(backend)
    batch, dim, length = u if isinstance(u, tuple) else u.shape
    for counter in _ACTIVE_COUNTERS:
        counter.flops += scan_flops(batch, dim, length, A.shape[1])
        counter.calls += 1


# --- reference ---

def _expand_groups(M: Tensor, D: int) -> Tensor:
    """(B, N, L) or (B, G, N, L) -> (B, D, N, L) view/expansion matching each channel to its group."""
    if M.dim() == 3:
        return M.unsqueeze(1).expand(M.shape[0], D, *M.shape[1:])
    B, G, N, L = M.shape
    return M.repeat_interleave(D // G, dim=1)


def _prepare_delta(delta: Tensor, delta_bias: Tensor | None, delta_softplus: bool, acc: torch.dtype) -> Tensor:
    """dt = softplus(delta + delta_bias) (or without softplus), in the accumulation dtype."""
    delta = delta.to(acc)
    if delta_bias is not None:
        delta = delta + delta_bias.to(acc)[..., None]
    return F.softplus(delta) if delta_softplus else delta


def _finish(y: Tensor, u: Tensor, D: Tensor | None, z: Tensor | None) -> Tensor:
    """Add the skip term D * u and the gate silu(z) to the scan output, in its dtype."""
    if D is not None:
        y = y + u.to(y.dtype) * D.to(y.dtype)[:, None]
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y


def selective_scan_ref(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
    z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
    return_last_state: bool = False,
):
    """Step-by-step reference: one small update per position, accumulated in fp32 (or fp64)."""
    acc = torch.float64 if u.dtype == torch.float64 else torch.float32
    dt = _prepare_delta(delta, delta_bias, delta_softplus, acc)
    A = A.to(acc)
    Bsz, Dim, L = u.shape
    Bx, Cx = _expand_groups(B.to(acc), Dim), _expand_groups(C.to(acc), Dim)  # (B, D, N, L)
    h = A.new_zeros(Bsz, Dim, A.shape[1])  # (B, D, N)
    ys = []
    # unbind once instead of indexing per step: indexing's backward would build a full-size zero
    # gradient per position, which makes the reference quadratic in L under autograd
    for dt_l, u_l, B_l, C_l in zip(dt.unbind(-1), u.to(acc).unbind(-1), Bx.unbind(-1), Cx.unbind(-1)):
        dA = torch.exp(dt_l[..., None] * A)  # (B, D, N)
        h = dA * h + (dt_l * u_l)[..., None] * B_l
        ys.append((h * C_l).sum(-1))  # (B, D)
    y = _finish(torch.stack(ys, dim=-1), u, D, z).to(u.dtype)  # (B, D, L)
    return (y, h) if return_last_state else y


# --- pure PyTorch: chunked and checkpointed ---

def _scan_chunk(h: Tensor, dt: Tensor, u: Tensor, A: Tensor, B: Tensor, C: Tensor):
    """Scan T positions from state h (B, D, N); dt, u (B, D, T); B, C (B, G, N, T) -> (y (B, D, T), h)."""
    Bsz, Dim, T = u.shape
    G, N = B.shape[1], A.shape[1]
    # position-major (T, B, D, N) so that every step below reads contiguous (B, D, N) slices
    decay = torch.exp(dt.permute(2, 0, 1)[..., None] * A)  # (T, B, D, N)
    drive = ((dt * u).permute(2, 0, 1).reshape(T, Bsz, G, Dim // G, 1)
             * B.permute(3, 0, 1, 2)[:, :, :, None]).view(T, Bsz, Dim, N)
    states = []
    for decay_t, drive_t in zip(decay, drive):
        h = decay_t * h + drive_t
        states.append(h)
    H = torch.stack(states).view(T, Bsz, G, Dim // G, N)
    y = (H * C.permute(3, 0, 1, 2)[:, :, :, None]).sum(-1).view(T, Bsz, Dim)
    return y.permute(1, 2, 0), h


def selective_scan_torch(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
    z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
    return_last_state: bool = False, chunk: int = TORCH_CHUNK,
):
    """Pure-PyTorch scan in chunks of positions, each recomputed in backward (no (B, D, L, N) tensor)."""
    acc = torch.float64 if u.dtype == torch.float64 else torch.float32
    dt = _prepare_delta(delta, delta_bias, delta_softplus, acc)
    uf, A = u.to(acc), A.to(acc)
    Bg = (B if B.dim() == 4 else B.unsqueeze(1)).to(acc)  # (B, G, N, L)
    Cg = (C if C.dim() == 4 else C.unsqueeze(1)).to(acc)
    h = A.new_zeros(u.shape[0], u.shape[1], A.shape[1])  # (B, D, N)
    recompute = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (u, delta, A, B, C, delta_bias))
    ys = []
    for l0 in range(0, u.shape[-1], chunk):
        part = (h, dt[..., l0:l0 + chunk], uf[..., l0:l0 + chunk], A, Bg[..., l0:l0 + chunk], Cg[..., l0:l0 + chunk])
        y, h = checkpoint(_scan_chunk, *part, use_reentrant=False) if recompute else _scan_chunk(*part)
        ys.append(y)
    y = _finish(torch.cat(ys, dim=-1), u, D, z).to(u.dtype)
    return (y, h) if return_last_state else y


# --- the C kernel: built on first use, loaded with ctypes ---

class _ScanArgs(ctypes.Structure):
    """Mirror of ScanArgs in selective_scan.c."""

    _fields_ = [(name, ctypes.c_int64) for name in ("batch", "dim", "length", "state", "groups")] + [
        (name, ctypes.c_void_p) for name in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")] + [
        ("softplus", ctypes.c_int32), ("threads", ctypes.c_int32), ("scratch", ctypes.c_void_p)]


class _ScanGrads(ctypes.Structure):
    """Mirror of ScanGrads in selective_scan.c."""

    _fields_ = [(name, ctypes.c_void_p) for name in (
        "dout", "dlast", "du", "ddelta", "dz", "dA", "dD", "dbias", "dB", "dC", "partial")]


def _cache_dir() -> Path:
    """Per-user cache folder for the compiled kernel ($XDG_CACHE_HOME or ~/.cache, then sis-bench)."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "sis-bench"


def _cpu_identity() -> str:
    """What -march=native depends on: the CPU model and feature flags (a shared home may span machines)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine() + platform.processor()
    keys = ("model name", "flags", "Features", "CPU part")
    return platform.machine() + "".join(sorted({ln for ln in lines if ln.split(":")[0].strip() in keys}))


def _compile_kernel() -> Path:
    """Return the cached shared library, compiling it (atomically) with $CC or cc if needed."""
    cc = os.environ.get("CC", "cc")
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise RuntimeError(f"no working C compiler ({cc}): {e}") from None
    identity = b"\0".join([KERNEL_SOURCE.read_bytes(), version.encode(), _cpu_identity().encode()])
    cache = _cache_dir()

    def target(flags):
        key = hashlib.sha256(identity + " ".join(COMMON_FLAGS + flags).encode()).hexdigest()[:16]
        return cache / f"selective_scan-{key}.so"

    for flags in KERNEL_FLAG_SETS:  # a build from an earlier process, with the best flags that worked
        if target(flags).exists():
            return target(flags)
    first_error = None
    for flags in KERNEL_FLAG_SETS:
        cache.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache, suffix=".so.tmp")
        os.close(fd)
        cmd = [cc, *COMMON_FLAGS, *flags, str(KERNEL_SOURCE), "-o", tmp, "-lm"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode == 0:
            os.replace(tmp, target(flags))  # atomic: a concurrent process sees no half-written library
            return target(flags)
        os.unlink(tmp)
        first_error = first_error or (result.stderr.strip().splitlines() or [f"exit {result.returncode}"])[-1]
    raise RuntimeError(f"compiling {KERNEL_SOURCE.name} with {cc} failed: {first_error}")


class _Kernel:
    """Loads the C kernel once per process; remembers why it could not be loaded."""

    def __init__(self):
        self._lib: ctypes.CDLL | None = None
        self.error: str | None = None
        self._tried = False
        self._warned = False

    def load(self) -> ctypes.CDLL | None:
        """The loaded library, or None (with ``error`` set) when it cannot be built."""
        if not self._tried:
            self._tried = True
            try:
                lib = ctypes.CDLL(str(_compile_kernel()))
            except (RuntimeError, OSError) as e:
                self.error = str(e)
            else:
                lib.ss_scratch_floats.restype = ctypes.c_int64
                lib.ss_scratch_floats.argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.c_int32]
                lib.ss_partial_floats.restype = ctypes.c_int64
                lib.ss_partial_floats.argtypes = [ctypes.c_int64] * 4
                lib.ss_forward.argtypes = [ctypes.POINTER(_ScanArgs), ctypes.c_void_p, ctypes.c_void_p]
                lib.ss_backward.argtypes = [ctypes.POINTER(_ScanArgs), ctypes.POINTER(_ScanGrads)]
                lib.ss_token_scratch_floats.restype = ctypes.c_int64
                lib.ss_token_scratch_floats.argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.c_int32]
                lib.ss_forward_tokens.argtypes = [ctypes.c_void_p] * 4
                lib.ss_backward_tokens.argtypes = [ctypes.c_void_p] * 3
                lib.ss_conv_scratch_floats.restype = ctypes.c_int64
                lib.ss_conv_scratch_floats.argtypes = [ctypes.c_int64, ctypes.c_int32]
                lib.ss_conv_forward_tokens.argtypes = [ctypes.c_void_p] * 3
                lib.ss_conv_backward_tokens.argtypes = [ctypes.c_void_p] * 6
                lib.ss_grid_conv_scratch_floats.restype = ctypes.c_int64
                lib.ss_grid_conv_scratch_floats.argtypes = [ctypes.c_int64, ctypes.c_int32]
                lib.ss_grid_conv_forward.argtypes = [ctypes.c_void_p] * 3
                lib.ss_grid_conv_backward.argtypes = [ctypes.c_void_p] * 6
                self._lib = lib
        return self._lib

    def warn_fallback(self) -> None:
        """One warning per process that the pure-PyTorch scan runs instead."""
        if not self._warned:
            self._warned = True
            warnings.warn(f"selective scan: C kernel unavailable ({self.error}); using the slower "
                          f"pure-PyTorch scan", RuntimeWarning, stacklevel=4)


_KERNEL = _Kernel()


def _ptr(t: Tensor | None) -> int | None:
    """Address of a tensor's data, or None (NULL) for an absent tensor."""
    return None if t is None else t.data_ptr()


def _fp32(t: Tensor | None) -> Tensor | None:
    """Contiguous fp32 copy (or the tensor itself when it already is one: the kernels only read their inputs, and an
    autograd Function saves its inputs as they are, so no detached alias is made, which costs a dispatch per tensor)."""
    if t is None or (t.dtype == torch.float32 and t.is_contiguous()):
        return t
    return t.detach().to(torch.float32).contiguous()


def _as_dtype(t: Tensor | None, dtype: torch.dtype | None) -> Tensor | None:
    """t in ``dtype``: itself when it already is (``Tensor.to`` would return it too, after an operator call that a
    kernel's wrapper makes a dozen times per scan)."""
    return t if t is None or t.dtype == dtype else t.to(dtype)


FLOAT_BYTES, INDEX_BYTES = 4, 8  # the kernels' fp32 scratch and int64 position tables
WORK_ALIGN = 64  # bytes: the kernels keep their scratch regions 64-byte aligned (whole vectors, whole cache lines)


class _WorkBuffers(threading.local):
    """Per Python thread: the kernels' work buffers by slot, kept from call to call (see _work_buffer)."""

    def __init__(self):
        self.buffers: dict[str, ctypes.Array] = {}


_WORK = _WorkBuffers()


def _work_buffer(slot: str, nbytes: int) -> int:
    """The 64-byte aligned address of at least ``nbytes`` that a kernel call uses and leaves: its thread scratch, the
    position table, the channel blocks' partial sums. Kept per Python thread and slot and grown when needed, so a call
    does not allocate (and fault in) them again: at batch 1 that was a tenth of a scan's time. Plain memory rather than
    tensors, so that memory accounting (bench plan) sees what the model holds, not this cache; nothing reads what a
    call left there."""
    buf = _WORK.buffers.get(slot)
    if buf is None or len(buf) < nbytes + WORK_ALIGN:
        buf = _WORK.buffers[slot] = ctypes.create_string_buffer(nbytes + WORK_ALIGN)
    return -(-ctypes.addressof(buf) // WORK_ALIGN) * WORK_ALIGN


def _thread_scratch(floats: str, *sizes: int) -> int:
    """The address of the kernel's thread scratch: ``floats(*sizes)`` floats (one of its ``*_scratch_floats``) for each
    of torch's threads."""
    return _work_buffer("scratch", torch.get_num_threads() * _kernel_floats(floats, *sizes) * FLOAT_BYTES)


@functools.cache
def _kernel_floats(name: str, *sizes: int) -> int:
    """A float count the kernel computes (its ``*_scratch_floats`` and ``ss_partial_floats``), asked of it once per
    shape: a call through ctypes costs microseconds, several per kernel call."""
    return getattr(_KERNEL.load(), name)(*sizes)


def _kernel_args(u, delta, A, Bt, Ct, D, z, delta_bias, softplus, backward) -> _ScanArgs:
    """ScanArgs for fp32 contiguous tensors (Bt, Ct in (B, G, L, N)), with thread scratch."""
    threads = torch.get_num_threads()
    batch, dim, length = u.shape
    groups, state = Bt.shape[1], A.shape[1]
    scratch = _thread_scratch("ss_scratch_floats", length, state, backward)
    return _ScanArgs(batch, dim, length, state, groups, *map(_ptr, (u, delta, A, Bt, Ct, D, z, delta_bias)),
                     int(softplus), threads, scratch)


class _CpuScan(torch.autograd.Function):
    """Autograd wrapper around the C kernel's forward and backward."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        grouped = B.dim() == 4
        Bt = _fp32((B if grouped else B.unsqueeze(1)).transpose(-1, -2))  # (B, G, L, N)
        Ct = _fp32((C if grouped else C.unsqueeze(1)).transpose(-1, -2))
        tensors = [_fp32(t) for t in (u, delta, A)] + [Bt, Ct] + [_fp32(t) for t in (D, z, delta_bias)]
        args = _kernel_args(*tensors, delta_softplus, backward=False)
        out = torch.empty(u.shape, dtype=torch.float32)
        last = torch.empty(u.shape[0], u.shape[1], A.shape[1], dtype=torch.float32)
        _KERNEL.load().ss_forward(ctypes.byref(args), out.data_ptr(), last.data_ptr())
        ctx.save_for_backward(*[t if t is not None else torch.empty(0) for t in tensors])
        ctx.absent = [t is None for t in tensors]
        ctx.grouped, ctx.softplus = grouped, delta_softplus
        ctx.dtypes = [t.dtype if t is not None else None for t in (u, delta, A, B, C, D, z, delta_bias)]
        ctx.set_materialize_grads(False)
        return _as_dtype(out, u.dtype), last

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, dlast):
        tensors = [None if gone else t for t, gone in zip(ctx.saved_tensors, ctx.absent)]
        u, delta, A, Bt, Ct, D, z, delta_bias = tensors
        batch, dim, length = u.shape
        groups, state = Bt.shape[1], A.shape[1]
        dout = torch.zeros_like(u) if dout is None else _fp32(dout)
        args = _kernel_args(*tensors, ctx.softplus, backward=True)
        du, ddelta = torch.empty_like(u), torch.empty_like(u)
        dz = torch.empty_like(u) if z is not None else None
        dA, dD, dbias = u.new_zeros(dim, state), u.new_zeros(dim), u.new_zeros(dim)  # the kernel sums over the batch
        dB, dC = torch.empty_like(Bt), torch.empty_like(Ct)
        partial = _work_buffer("partial", _kernel_floats("ss_partial_floats", dim, groups, length, state) * FLOAT_BYTES)
        dlast = _fp32(dlast)  # kept referenced: the kernel reads it through a raw pointer
        grads = _ScanGrads(*map(_ptr, (dout, dlast, du, ddelta, dz, dA, dD, dbias, dB, dC)), partial)
        _KERNEL.load().ss_backward(ctypes.byref(args), ctypes.byref(grads))
        dB, dC = dB.transpose(-1, -2), dC.transpose(-1, -2)  # (B, G, N, L)
        if not ctx.grouped:
            dB, dC = dB.squeeze(1), dC.squeeze(1)
        result = [du, ddelta, dA, dB, dC, dD if D is not None else None, dz,
                  dbias if delta_bias is not None else None]
        result = [_as_dtype(g, dtype) for g, dtype in zip(result, ctx.dtypes)]
        return (*result, None)


def selective_scan_cpu(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
    z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
    return_last_state: bool = False,
):
    """The C kernel (fp32 inside, any float dtype outside); raises RuntimeError if it cannot be built."""
    if any(t is not None and t.device.type != "cpu" for t in (u, delta, A, B, C, D, z, delta_bias)):
        raise ValueError("selective_scan_cpu: every tensor must be on the CPU (the kernel reads raw pointers)")
    if _KERNEL.load() is None:
        raise RuntimeError(f"the C selective-scan kernel is unavailable: {_KERNEL.error}")
    y, last = _CpuScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return (y, last) if return_last_state else y


# --- the token layout: the models' (batch, length, channels) streams scanned in any order without copies ---

# scan order codes (the C kernel's ORDER_*): raster, reversed, by columns (top to bottom, then left to right) and
# by columns reversed; 0..7 are the snakes of models.mamba.snake_order (variant bits)
RASTER, REVERSED, COLUMNS, COLUMNS_REVERSED = -1, -2, -3, -4
GRID_ORDERS = (COLUMNS, COLUMNS_REVERSED, *range(8))  # the orders that need the token grid's side


def order_positions(order: int, grid: int, length: int, prefix: int = 0) -> Tensor:
    """Raster token scanned at each step of ``order`` (the index arithmetic of the C kernel's order_position): the
    first ``prefix`` tokens in place, then the other ``length - prefix`` (a ``grid`` x ``grid`` grid) in the order."""
    steps = torch.arange(length - prefix)
    if order in (RASTER, REVERSED):
        grid_pos = steps if order == RASTER else steps.flip(0)
    elif order in (COLUMNS, COLUMNS_REVERSED):
        steps = steps if order == COLUMNS else steps.flip(0)
        grid_pos = steps % grid * grid + steps // grid
    else:
        r, c = steps // grid, steps % grid
        c = torch.where(r % 2 == 1, grid - 1 - c, c)
        if order & 4:
            c = grid - 1 - c
        if order & 2:
            r = grid - 1 - r
        grid_pos = c * grid + r if order & 1 else r * grid + c
    return torch.cat([torch.arange(prefix), prefix + grid_pos])


def _check_order(name: str, order: int, grid: int, prefix: int, length: int) -> None:
    """ValueError unless ``order`` is a code and, for a grid order, the tokens after the prefix fill the grid."""
    if order not in (RASTER, REVERSED, *GRID_ORDERS) or not 0 <= prefix <= length or (
            order in GRID_ORDERS and grid * grid != length - prefix):
        raise ValueError(f"{name}: order {order} on a {grid} x {grid} grid after {prefix} prefix tokens for L={length}")


class _TokenArgs(ctypes.Structure):
    """Mirror of TokenArgs in selective_scan.c."""

    _fields_ = [("base", _ScanArgs)] + [(name, ctypes.c_int64 * 3) for name in ("su", "sdelta", "sz", "sB", "sC")] + [
        ("order", ctypes.c_int32), ("grid", ctypes.c_int32), ("prefix", ctypes.c_int32),
        ("dtr", ctypes.c_void_p), ("wdt", ctypes.c_void_p), ("sdtr", ctypes.c_int64 * 3), ("rank", ctypes.c_int64)]


def _fp32_view(t: Tensor | None) -> Tensor | None:
    """fp32 tensor in its own layout: no copy when it already is fp32 (the kernel reads it through strides)."""
    return t if t is None or t.dtype == torch.float32 else t.detach().to(torch.float32)


def _token_args(u, delta, A, B, C, D, z, delta_bias, delta_proj_weight, softplus, order, grid, prefix, backward):
    """TokenArgs for token-major fp32 views u, delta, z (batch, L, E) and B, C (batch, L, N) or (batch, L, G, N) with
    unit state stride, with thread scratch; and the address of the position table (``_work_buffer``). With
    ``delta_proj_weight`` (E, R) contiguous, delta is the low-rank dt (batch, L, R) the kernel makes delta from."""
    threads = torch.get_num_threads()
    batch, length, dim = u.shape
    groups, state = _groups(B), A.shape[1]
    scratch = _thread_scratch("ss_token_scratch_floats", length, state, backward)
    base = _ScanArgs(batch, dim, length, state, groups, *map(_ptr, (u, delta, A, B, C, D, z, delta_bias)),
                     int(softplus), threads, scratch)
    none = (0, 0, 0)
    if delta_proj_weight is None:
        dtr, sdelta, sdtr, rank = None, delta.stride(), none, 0
    else:  # delta is made, not read: dt's strides are sdtr's
        dtr, sdelta, sdtr, rank = delta, none, delta.stride(), delta_proj_weight.shape[1]
    streams = [u.stride(), sdelta, z.stride() if z is not None else none]
    streams += [M.stride()[:3] if M.dim() == 4 else (*M.stride()[:2], 0) for M in (B, C)]
    triple = ctypes.c_int64 * 3
    args = _TokenArgs(base, *(triple(*st) for st in streams), order, grid, prefix, _ptr(dtr), _ptr(delta_proj_weight),
                      triple(*sdtr), rank)
    return args, _work_buffer("positions", length * INDEX_BYTES)


def _state_unit(M: Tensor) -> Tensor:
    """(batch, L, N) or (batch, L, G, N) -> the same as an fp32 view whose N states are adjacent."""
    M = _fp32_view(M)
    return M if M.stride(-1) == 1 else M.contiguous()


def _groups(M: Tensor) -> int:
    """G of a token-layout B or C: (batch, L, G, N), or (batch, L, N) for one group."""
    return M.shape[2] if M.dim() == 4 else 1


def _token_scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_proj_weight, delta_softplus, order, grid, prefix):
    """The C kernel's token-layout forward: the fp32 tensors as the kernel reads them, the fp32 output and last state
    (allocated only, on fake tensors)."""
    tensors = [_fp32_view(t) for t in (u, delta)] + [_fp32(A), _state_unit(B), _state_unit(C)] + [
        _fp32(D), _fp32_view(z), _fp32(delta_bias), _fp32(delta_proj_weight)]
    out = u.new_empty(u.shape, dtype=torch.float32)
    last = u.new_empty(u.shape[0], u.shape[2], A.shape[1], dtype=torch.float32)
    if not _is_fake(u):
        args, pos = _token_args(*tensors, delta_softplus, order, grid, prefix, backward=False)
        _KERNEL.load().ss_forward_tokens(ctypes.byref(args), pos, out.data_ptr(), last.data_ptr())
    return tensors, out, last


class _CpuTokenScan(torch.autograd.Function):
    """Autograd wrapper around the C kernel's token-layout forward and backward (see selective_scan_tokens). On fake
    tensors (``bench plan``) it allocates and saves the same tensors and computes nothing (its thread scratch, a few
    hundred kB, is left out)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_proj_weight, delta_softplus, order, grid, prefix):
        tensors, out, last = _token_scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_proj_weight,
                                                 delta_softplus, order, grid, prefix)
        ctx.save_for_backward(*[t if t is not None else torch.empty(0) for t in tensors])
        ctx.absent = [t is None for t in tensors]
        ctx.softplus, ctx.order = delta_softplus, (order, grid, prefix)
        ctx.dtypes = [t.dtype if t is not None else None
                      for t in (u, delta, A, B, C, D, z, delta_bias, delta_proj_weight)]
        ctx.set_materialize_grads(False)
        return _as_dtype(out, u.dtype), last

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, dlast):
        tensors = [None if gone else t for t, gone in zip(ctx.saved_tensors, ctx.absent)]
        u, delta, A, B, C, D, z, delta_bias, delta_proj_weight = tensors
        batch, length, dim = u.shape
        groups, state = _groups(B), A.shape[1]
        dout = u.new_zeros(u.shape) if dout is None else _fp32(dout)  # contiguous: the kernel reads it so
        du, ddelta = u.new_empty(u.shape), u.new_empty(u.shape)
        dz = u.new_empty(u.shape) if z is not None else None
        dA, dD, dbias = u.new_zeros(dim, state), u.new_zeros(dim), u.new_zeros(dim)
        dB, dC = u.new_empty(B.shape), u.new_empty(C.shape)  # (batch, L, [G,] N) contiguous: the kernel's layout
        dlast = _fp32(dlast)
        if not _is_fake(u):
            args, pos = _token_args(*tensors, ctx.softplus, *ctx.order, backward=True)
            partial = _work_buffer("partial", _kernel_floats("ss_partial_floats", dim, groups, length, state)
                                   * FLOAT_BYTES)
            grads = _ScanGrads(*map(_ptr, (dout, dlast, du, ddelta, dz, dA, dD, dbias, dB, dC)), partial)
            _KERNEL.load().ss_backward_tokens(ctypes.byref(args), ctypes.byref(grads), pos)
        dweight = None
        if delta_proj_weight is not None:  # delta = dt @ weight.T was made in the kernel: the product's gradients
            ddelta, dweight = _low_rank_grads(ddelta, delta, delta_proj_weight)
        result = [du, ddelta, dA, dB, dC, dD if D is not None else None, dz,
                  dbias if delta_bias is not None else None, dweight]
        result = [_as_dtype(g, dtype) for g, dtype in zip(result, ctx.dtypes)]
        return (*result, None, None, None, None)


def _low_rank_grads(ddelta: Tensor, dt: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """Gradients of dt (batch, L, R) and weight (E, R) from ddelta (batch, L, E) for delta = F.linear(dt, weight), as
    autograd computes them for that product (its 2-D mm of dt's (batch L, R) view and weight.T; aten's mm_mat1_backward
    and mm_mat2_backward, weight.T column-major): the same operations, so the same bits."""
    dt2 = dt.reshape(-1, dt.shape[-1])  # a view of a linear layer's output, as F.linear folds it
    grad = ddelta.view(-1, ddelta.shape[-1])
    if dt2.stride(0) == 1 and dt2.stride(1) == dt2.shape[0]:  # column-major dt: aten answers in its layout
        ddt = weight.t().mm(grad.t()).t()
    else:
        ddt = grad.mm(weight)
    return ddt.reshape(dt.shape), grad.t().mm(dt2)


def token_kernels_run(*tensors: Tensor | None) -> bool:
    """True when the C kernel's token-layout entries (scan and causal conv) take these tensors: all on the CPU, none
    fp64 or meta, and the ``cpu`` backend chosen (built, and not forced away by SIS_BENCH_SCAN). Fake CPU tensors
    (``bench plan``'s CPU check) take them too, and only allocate and save what the kernels would."""
    # plain attribute checks, is_cpu rather than a device object per tensor (a meta tensor is not is_cpu): this runs
    # per kernel call, where the interpreter's objects are cold in the caches and each touch costs microseconds
    u = tensors[0]
    return (u.is_cpu and u.dtype != torch.float64 and all(t is None or t.is_cpu for t in tensors)
            and _choose_backend(u) == "cpu")


def _to_scan_order(s: Tensor | None, perm: Tensor | None) -> Tensor | None:
    """(batch, L, ...) in raster order -> (batch, ..., L) in scan order (``perm``: None for raster)."""
    return s if s is None else (s if perm is None else s[:, perm]).movedim(1, -1)


def _from_scan_order(y: Tensor, perm: Tensor | None) -> Tensor:
    """(batch, E, L) in scan order -> (batch, L, E) in raster order."""
    y = y.transpose(1, 2)
    return y if perm is None else y[:, torch.argsort(perm)]


def _order_perm(order: int, grid: int, length: int, prefix: int, device: torch.device) -> Tensor | None:
    """The fallbacks' gather index of a scan order; None for raster, which needs none."""
    return None if order == RASTER else order_positions(order, grid, length, prefix).to(device)


def selective_scan_tokens(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
    z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
    order: int = RASTER, grid: int = 0, prefix: int = 0, return_last_state: bool = False,
    delta_proj_weight: Tensor | None = None,
):
    """``selective_scan`` on the token layout, along a scan order, in raster order in and out.

    u, delta, z (batch, L, E) and B, C (batch, L, N) or (batch, L, G, N), any strides (views of linear layers'
    outputs): step l of the scan reads and writes token ``order_positions(order, grid, L, prefix)[l]``; the output
    is (batch, L, E) in raster order and the last state (batch, E, N) that of the last step. On CPU the C kernel
    reads and writes these layouts and walks the order itself (no copies); elsewhere the streams are put in
    scan order, channel-major, for ``selective_scan`` and its output put back.

    With ``delta_proj_weight`` (E, R) (mamba_inner_fn's delta_proj_weight), delta is the low-rank dt (batch, L, R)
    and the scan's delta is ``F.linear(delta, delta_proj_weight)``: on CPU in fp32 the C kernel makes it per tile
    (the same bits as that product; the (batch, L, E) delta is neither written nor read), elsewhere the product is
    made first. Its gradients are the product's.
    """
    batch, length, dim = u.shape
    _check_order("selective_scan_tokens", order, grid, prefix, length)
    kernel = token_kernels_run(u, delta, A, B, C, D, z, delta_bias, delta_proj_weight)
    if delta_proj_weight is not None and not (
            kernel and delta.dtype == delta_proj_weight.dtype == torch.float32 and not _ACTIVE_COUNTERS):
        # the product as the model would make it: in its dtype (a cast model's), counted while FLOPs are counted
        delta, delta_proj_weight = F.linear(delta, delta_proj_weight), None
    if kernel:
        state = A.shape[-1]
        for name, M in (("B", B), ("C", C)):
            if M.dim() not in (3, 4) or M.shape[:2] != (batch, length) or M.shape[-1] != state or (
                    M.dim() == 4 and dim % M.shape[2]):
                raise ValueError(f"selective_scan_tokens: expected {name} (B, L, N) or (B, L, G, N) with D % G == 0"
                                 f" for u {tuple(u.shape)} and N={state}, got {tuple(M.shape)}")
        rank = delta_proj_weight.shape[1] if delta_proj_weight is not None else None
        if (delta.shape != (u.shape if rank is None else (batch, length, rank)) or A.shape[0] != dim
                or (z is not None and z.shape != u.shape)
                or (rank is not None and (delta_proj_weight.shape != (dim, rank) or rank < 1))):
            raise ValueError(f"selective_scan_tokens: u, delta, z must be (B, L, D) and A (D, N), or delta (B, L, R) "
                             f"with delta_proj_weight (D, R); got u {tuple(u.shape)}, delta {tuple(delta.shape)}, A "
                             f"{tuple(A.shape)}, delta_proj_weight "
                             f"{None if rank is None else tuple(delta_proj_weight.shape)}")
        fake = _is_fake(u)
        _record("fake" if fake else "cpu", (batch, dim, length), A)
        with _profiler_range(None if fake else SCAN_LABEL):
            inputs = (u, delta, A, B, C, D, z, delta_bias, delta_proj_weight)
            if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
                y, last = _CpuTokenScan.apply(*inputs, delta_softplus, order, grid, prefix)
            else:  # sampling: no autograd node to make
                _tensors, y, last = _token_scan_forward(*inputs, delta_softplus, order, grid, prefix)
                y = y if u.dtype == torch.float32 else y.to(u.dtype)
        return (y, last) if return_last_state else y
    perm = _order_perm(order, grid, length, prefix, u.device)
    result = selective_scan(_to_scan_order(u, perm), _to_scan_order(delta, perm), A,
                            _to_scan_order(B, perm).contiguous(), _to_scan_order(C, perm).contiguous(), D,
                            z=_to_scan_order(z, perm), delta_bias=delta_bias, delta_softplus=delta_softplus,
                            return_last_state=return_last_state)
    y, last = result if return_last_state else (result, None)
    y = _from_scan_order(y, perm)
    return (y, last) if return_last_state else y


# --- the causal conv on the token layout: Mamba's conv along a scan order, in the C kernel ---

class _ConvArgs(ctypes.Structure):
    """Mirror of ConvArgs in selective_scan.c."""

    _fields_ = [(name, ctypes.c_int64) for name in ("batch", "dim", "length", "width")] + [
        (name, ctypes.c_void_p) for name in ("x", "weight", "bias")] + [("sx", ctypes.c_int64 * 3)] + [
        (name, ctypes.c_int32) for name in ("order", "grid", "prefix", "threads")] + [("scratch", ctypes.c_void_p)]


def _conv_args(x: Tensor, weight: Tensor, bias: Tensor | None, order: tuple[int, int, int], backward: bool):
    """ConvArgs for an fp32 (batch, L, E) view x and contiguous fp32 weight (E, W), bias (E,), with thread scratch;
    and the address of the position table."""
    threads = torch.get_num_threads()
    batch, length, dim = x.shape
    scratch = _thread_scratch("ss_conv_scratch_floats", length, backward)
    args = _ConvArgs(batch, dim, length, weight.shape[1], x.data_ptr(), weight.data_ptr(), _ptr(bias),
                     (ctypes.c_int64 * 3)(*x.stride()), *order, threads, scratch)
    return args, _work_buffer("positions", length * INDEX_BYTES)


def _save_conv(ctx, tensors: tuple, inputs: tuple) -> None:
    """Save a depthwise conv's kernel tensors (x, weight, bias) for its backward, and its inputs' dtypes."""
    ctx.save_for_backward(*[t if t is not None else torch.empty(0) for t in tensors])
    ctx.has_bias = inputs[2] is not None
    ctx.dtypes = [t.dtype if t is not None else None for t in inputs]


def _conv_grad_buffers(ctx, dout: Tensor):
    """A depthwise conv's saved (x, weight, bias), dout as the kernel reads it (contiguous fp32) and empty dx,
    dweight, dbias for the kernel to fill."""
    x, weight, bias = ctx.saved_tensors
    bias = bias if ctx.has_bias else None
    dbias = torch.empty_like(bias) if bias is not None else None
    return x, weight, bias, _fp32(dout), x.new_empty(x.shape), torch.empty_like(weight), dbias


def _conv_grads(ctx, dx: Tensor, dweight: Tensor, dbias: Tensor | None) -> list:
    """The filled gradients in the dtypes of the conv's inputs."""
    return [_as_dtype(g, dtype) for g, dtype in zip((dx, dweight, dbias), ctx.dtypes)]


class _CpuTokenConv(torch.autograd.Function):
    """Autograd wrapper around the C kernel's causal conv + SiLU on the token layout (see causal_conv1d_tokens); on
    fake tensors, as _CpuTokenScan, the same allocations and saved tensors without computing."""

    @staticmethod
    def forward(ctx, x, weight, bias, order, grid, prefix):
        tensors = (_fp32_view(x), _fp32(weight), _fp32(bias))
        out = x.new_empty(x.shape, dtype=torch.float32)
        if not _is_fake(x):
            args, pos = _conv_args(*tensors, (order, grid, prefix), backward=False)
            _KERNEL.load().ss_conv_forward_tokens(ctypes.byref(args), pos, out.data_ptr())
        _save_conv(ctx, tensors, (x, weight, bias))
        ctx.order = (order, grid, prefix)
        return _as_dtype(out, x.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        x, weight, bias, dout, dx, dweight, dbias = _conv_grad_buffers(ctx, dout)
        if not _is_fake(x):
            args, pos = _conv_args(x, weight, bias, ctx.order, backward=True)
            _KERNEL.load().ss_conv_backward_tokens(ctypes.byref(args), dout.data_ptr(), pos, dx.data_ptr(),
                                                   dweight.data_ptr(), _ptr(dbias))
        return (*_conv_grads(ctx, dx, dweight, dbias), None, None, None)


def causal_conv1d_tokens(x: Tensor, weight: Tensor, bias: Tensor | None = None, order: int = RASTER, grid: int = 0,
                         prefix: int = 0) -> Tensor:
    """``causal_conv1d`` with SiLU along a scan order, on the token layout: x (batch, L, E) in raster order, any
    strides, weight (E, W), bias (E,) -> (batch, L, E) contiguous in raster order.

    Step l of the conv is token ``order_positions(order, grid, L, prefix)[l]``, as in ``selective_scan_tokens``, and
    the steps before the first read as zero. On CPU the C kernel walks the order over x as it lies; elsewhere x is
    put in scan order, channel-major, for ``causal_conv1d`` and its output put back.
    """
    batch, length, dim = x.shape
    _check_order("causal_conv1d_tokens", order, grid, prefix, length)
    if weight.dim() != 2 or weight.shape[0] != dim or (bias is not None and bias.shape != (dim,)):
        raise ValueError(f"causal_conv1d_tokens: expected weight ({dim}, W) and bias ({dim},) for x {tuple(x.shape)}, "
                         f"got {tuple(weight.shape)} and {None if bias is None else tuple(bias.shape)}")
    if token_kernels_run(x, weight, bias):
        with _profiler_range(None if _is_fake(x) else CAUSAL_CONV_LABEL):
            return _CpuTokenConv.apply(x, weight, bias, order, grid, prefix)
    perm = _order_perm(order, grid, length, prefix, x.device)
    return _from_scan_order(causal_conv1d(_to_scan_order(x, perm), weight, bias, activation="silu"), perm).contiguous()


# --- the 3 x 3 grid conv on the token layout: SISMA's depthwise conv + SiLU, in the C kernel ---

class _GridConvArgs(ctypes.Structure):
    """Mirror of GridConvArgs in selective_scan.c."""

    _fields_ = [(name, ctypes.c_int64) for name in ("batch", "grid", "dim")] + [
        (name, ctypes.c_void_p) for name in ("x", "weight", "bias")] + [("sx", ctypes.c_int64 * 2),
                                                                      ("threads", ctypes.c_int32)]


def _grid_conv_args(x: Tensor, weight: Tensor, bias: Tensor | None, grid: int) -> _GridConvArgs:
    """GridConvArgs for an fp32 (batch, L, E) view x with unit channel stride, contiguous fp32 weight (E, 3, 3)."""
    return _GridConvArgs(x.shape[0], grid, x.shape[2], x.data_ptr(), weight.data_ptr(), _ptr(bias),
                         (ctypes.c_int64 * 2)(*x.stride()[:2]), torch.get_num_threads())


def _grid_conv_forward(x: Tensor, weight: Tensor, bias: Tensor | None, grid: int):
    """The C kernel's forward: fp32 (x, weight, bias) as the kernel reads them, and the fp32 output (allocated only,
    on fake tensors)."""
    x32 = _fp32_view(x)
    tensors = (x32 if x32.stride(2) == 1 else x32.contiguous(), _fp32(weight), _fp32(bias))
    out = x.new_empty(x.shape, dtype=torch.float32)
    if not _is_fake(x):
        scratch = _thread_scratch("ss_grid_conv_scratch_floats", grid, 0)
        _KERNEL.load().ss_grid_conv_forward(ctypes.byref(_grid_conv_args(*tensors, grid)), scratch, out.data_ptr())
    return tensors, out


class _CpuGridConv(torch.autograd.Function):
    """Autograd wrapper around the C kernel's grid conv + SiLU (see grid_conv2d_tokens); on fake tensors the same
    allocations and saved tensors without computing. The backward recomputes the pre-activation from x, so only
    x (the input's own storage, a view) is kept for it."""

    @staticmethod
    def forward(ctx, x, weight, bias, grid):
        tensors, out = _grid_conv_forward(x, weight, bias, grid)
        _save_conv(ctx, tensors, (x, weight, bias))
        ctx.grid = grid
        return _as_dtype(out, x.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        x, weight, bias, dout, dx, dweight, dbias = _conv_grad_buffers(ctx, dout)
        if not _is_fake(x):
            lib = _KERNEL.load()
            scratch = _thread_scratch("ss_grid_conv_scratch_floats", ctx.grid, 1)
            lib.ss_grid_conv_backward(ctypes.byref(_grid_conv_args(x, weight, bias, ctx.grid)), dout.data_ptr(),
                                      scratch, dx.data_ptr(), dweight.data_ptr(), _ptr(dbias))
        return (*_conv_grads(ctx, dx, dweight, dbias), None)


def grid_conv2d_tokens(x: Tensor, weight: Tensor, bias: Tensor | None, grid: int) -> Tensor:
    """SiLU of the depthwise 3 x 3 conv (zero padding 1) on the token grid, on the token layout: x (batch, grid * grid,
    E) in raster order, any strides, weight (E, 1, 3, 3) as ``nn.Conv2d(E, E, 3, padding=1, groups=E)`` holds it, bias
    (E,) -> (batch, grid * grid, E) contiguous.

    On CPU in fp32 the C kernel reads x as it lies (the same bits at any thread count); elsewhere (other dtypes, CUDA,
    the meta device) ``F.conv2d`` on the channels-last view of the grid that (batch, L, E) contiguous is.
    """
    batch, length, dim = x.shape
    if length != grid * grid or weight.shape != (dim, 1, 3, 3) or (bias is not None and bias.shape != (dim,)):
        raise ValueError(f"grid_conv2d_tokens: expected x (batch, {grid}*{grid}, E), weight (E, 1, 3, 3) and bias "
                         f"(E,), got {tuple(x.shape)}, {tuple(weight.shape)} and "
                         f"{None if bias is None else tuple(bias.shape)}")
    fp32 = x.dtype == weight.dtype == torch.float32 and (bias is None or bias.dtype == torch.float32)
    # bf16 (a cast model, autocast) keeps aten's bf16 conv; while FLOPs are counted (bench.flops runs
    # count_scan_flops beside FlopCounterMode, which cannot see the C kernel) aten's conv runs, so it is counted
    if fp32 and not _ACTIVE_COUNTERS and token_kernels_run(x, weight, bias):
        with _profiler_range(None if _is_fake(x) else GRID_CONV_LABEL):
            if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or
                                            (bias is not None and bias.requires_grad)):
                return _CpuGridConv.apply(x, weight, bias, grid)
            out = _grid_conv_forward(x, weight, bias, grid)[1]  # sampling: no autograd node to make
            return out if x.dtype == torch.float32 else out.to(x.dtype)
    planes = x.contiguous().view(batch, grid, grid, dim).permute(0, 3, 1, 2)  # a view: channels-last NCHW
    return F.silu(F.conv2d(planes, weight, bias, padding=1, groups=dim)).permute(0, 2, 3, 1).reshape(batch, length, dim)


# the autograd nodes of the C kernel's Functions, as the profiler names them in a backward pass (no forward range holds
# them): the class of work each one does, for bench/breakdown.py
BACKWARD_NODES = {f"{fn.__name__}Backward": cls for fn, cls in (
    (_CpuScan, "scan"), (_CpuTokenScan, "scan"), (_CpuTokenConv, "conv"), (_CpuGridConv, "conv"))}


# --- CUDA: mamba-ssm and causal-conv1d, imported lazily and only with CUDA present ---

@functools.cache
def _cuda_op(module: str, name: str):
    """``module.name`` if CUDA is available and the (optional) package imports, else None."""
    if not torch.cuda.is_available():
        return None
    try:
        loaded = importlib.import_module(module)
    except Exception:  # noqa: BLE001 - a broken optional CUDA extension raises anything from ImportError to OSError
        return None
    # mamba-ssm >= 2.3.2.post1 installs without its compiled scan unless MAMBA_KEEP_CUDA_BUILD=TRUE: the module
    # imports, sets selective_scan_cuda to None, and selective_scan_fn raises when called
    if getattr(loaded, "selective_scan_cuda", True) is None:
        return None
    return getattr(loaded, name)


@functools.cache
def _warn_missing_cuda_op(package: str) -> None:
    """One warning per process that a CUDA tensor runs the PyTorch path because ``package`` is missing."""
    warnings.warn(f"{package} or its compiled CUDA kernel is not installed (see docs/gpu.md; "
                  f"`bench doctor` says why); using the slower PyTorch implementation on CUDA",
                  RuntimeWarning, stacklevel=4)


def causal_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str | None = "silu") -> Tensor:
    """Depthwise causal 1-D convolution: x (B, D, L), weight (D, W), bias (D,) -> (B, D, L)."""
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"causal_conv1d: activation must be None, 'silu' or 'swish', got {activation!r}")
    if x.is_cuda and _is_fake(x):  # bench plan's memory: what causal-conv1d's kernel keeps (SiLU fused or not)
        return causal_conv1d_shapes(x, weight, bias)
    if x.is_cuda:
        fused = _cuda_op("causal_conv1d", "causal_conv1d_fn")
        if fused is not None:
            with _profiler_range(CAUSAL_CONV_LABEL):
                return fused(x, weight, bias, activation=activation)
        _warn_missing_cuda_op("causal-conv1d")
    width = weight.shape[1]
    y = F.conv1d(F.pad(x, (width - 1, 0)), weight.unsqueeze(1), bias, groups=x.shape[1])  # left pad: causal
    return y if activation is None else F.silu(y)


# --- dispatch ---

@functools.cache
def _fake_tensor_class():
    """torch's FakeTensor class, imported on first use (once: this is asked on every scan)."""
    from torch._subclasses.fake_tensor import FakeTensor

    return FakeTensor


def _is_fake(t: Tensor) -> bool:
    """True for a FakeTensor (shapes and devices without data, as bench plan uses them)."""
    return isinstance(t, _fake_tensor_class())


def _check_shapes(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor) -> None:
    """Raise ValueError, saying what was expected, on inconsistent shapes."""
    if u.dim() != 3 or delta.shape != u.shape or A.dim() != 2 or A.shape[0] != u.shape[1]:
        raise ValueError(f"selective_scan: expected u, delta (B, D, L) and A (D, N), got u {tuple(u.shape)}, "
                         f"delta {tuple(delta.shape)}, A {tuple(A.shape)}")
    for name, M in (("B", B), ("C", C)):
        ok = M.dim() in (3, 4) and M.shape[0] == u.shape[0] and M.shape[-2:] == (A.shape[1], u.shape[2])
        if not ok or (M.dim() == 4 and u.shape[1] % M.shape[1]):
            raise ValueError(f"selective_scan: expected {name} (B, N, L) or (B, G, N, L) with D % G == 0 for "
                             f"u {tuple(u.shape)} and N={A.shape[1]}, got {tuple(M.shape)}")


def _choose_backend(u: Tensor) -> str:
    """The implementation to run: SIS_BENCH_SCAN if set, else the fastest that works for u."""
    forced = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if forced not in BACKENDS + ("auto",):
        raise RuntimeError(f"{BACKEND_ENV}={forced!r} is not one of auto, {', '.join(BACKENDS)}")
    if forced == "cuda" and not (u.is_cuda and _cuda_op("mamba_ssm.ops.selective_scan_interface",
                                                          "selective_scan_fn")):
        raise RuntimeError(f"{BACKEND_ENV}=cuda needs CUDA tensors and mamba-ssm with its compiled kernel "
                           f"(MAMBA_KEEP_CUDA_BUILD=TRUE pip install mamba-ssm --no-build-isolation; `bench doctor` "
                           f"says what is missing); the inputs are on {u.device}. Unset {BACKEND_ENV} to choose "
                           f"automatically")
    if forced == "cpu" and u.device.type != "cpu":
        raise RuntimeError(f"{BACKEND_ENV}=cpu needs CPU tensors; the inputs are on {u.device}")
    if forced != "auto":
        return forced
    if u.is_cuda:
        if _cuda_op("mamba_ssm.ops.selective_scan_interface", "selective_scan_fn") is not None:
            return "cuda"
        _warn_missing_cuda_op("mamba-ssm")
        return "torch"
    if u.is_cpu and u.dtype != torch.float64:  # the kernel is fp32; fp64 keeps fp64
        if _KERNEL.load() is not None:
            return "cpu"
        _KERNEL.warn_fallback()
    return "torch"


def selective_scan(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
    z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
    return_last_state: bool = False,
):
    """Selective scan with mamba-ssm's signature, dispatched to the fastest implementation available."""
    _check_shapes(u, delta, A, B, C)
    if _is_fake(u) and os.environ.get(BACKEND_ENV, "auto").strip().lower() not in ("torch", "ref"):
        # fake tensors (bench plan's memory): allocate and save what the kernel of u's device would
        _record("fake", u, A)
        return selective_scan_shapes(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    if u.is_meta:  # shapes only (FLOPs counted on the meta device by bench/flops.py): nothing to compute
        _record("meta", u, A)
        acc = torch.float64 if u.dtype == torch.float64 else torch.float32
        y, last = torch.empty_like(u), u.new_empty(u.shape[0], u.shape[1], A.shape[1], dtype=acc)
        return (y, last) if return_last_state else y
    backend = _choose_backend(u)
    _record(backend, u, A)
    if backend == "cuda":
        impl = _cuda_op("mamba_ssm.ops.selective_scan_interface", "selective_scan_fn")
    else:
        impl = {"cpu": selective_scan_cpu, "torch": selective_scan_torch, "ref": selective_scan_ref}[backend]
    with _profiler_range(SCAN_LABEL):
        return impl(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)


# --- the fused Mamba layer: mamba-ssm's mamba_inner_fn ---

FUSED_BACKEND = "cuda-fused"  # the name used_backends() reports for mamba_inner_fn


@functools.cache
def _fused_op():
    """mamba-ssm's ``mamba_inner_fn`` when CUDA, its compiled scan and causal-conv1d's compiled conv are all there."""
    fn = _cuda_op("mamba_ssm.ops.selective_scan_interface", "mamba_inner_fn")
    if fn is None:
        return None
    module = importlib.import_module("mamba_ssm.ops.selective_scan_interface")
    if getattr(module, "causal_conv1d_fwd_function", None) is None:  # it imports causal-conv1d itself, optionally
        return None
    return fn


def fused_inner(t: Tensor):
    """The implementation of ``mamba_inner_fn`` for inputs like ``t``, or None where it does not run (see the module
    docstring). The callable it returns records each call in ``used_backends()``."""
    forced = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if forced != "auto" or not t.is_cuda:
        return None
    if _is_fake(t):
        return _recording("fake", mamba_inner_shapes)
    fn = _fused_op()
    return None if fn is None else _recording(FUSED_BACKEND, fn, FUSED_LABEL)


def _recording(name: str, fn, label: str | None = None):
    """``fn`` noting each call in ``used_backends()`` under ``name``, inside the profiler range ``label`` if given."""
    def call(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight, out_proj_bias, A,
             *args, **kwargs):
        _record(name, (xz.shape[0], xz.shape[1] // 2, xz.shape[2]), A)
        with _profiler_range(label):
            return fn(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight,
                      out_proj_bias, A, *args, **kwargs)

    return call


def mamba_inner_reference(
    xz: Tensor, conv1d_weight: Tensor, conv1d_bias: Tensor | None, x_proj_weight: Tensor, delta_proj_weight: Tensor,
    out_proj_weight: Tensor, out_proj_bias: Tensor | None, A: Tensor, B: Tensor | None = None, C: Tensor | None = None,
    D: Tensor | None = None, delta_bias: Tensor | None = None, B_proj_bias: Tensor | None = None,
    C_proj_bias: Tensor | None = None, delta_softplus: bool = True, checkpoint_lvl: int = 1,
) -> Tensor:
    """What mamba-ssm's ``mamba_inner_fn`` computes, from this module's conv and scan (any device, autograd through
    the parts; ``checkpoint_lvl`` only changes what the kernel keeps for backward).

    xz (batch, 2 E, L): the input projection, x then z along the channels; conv1d_weight (E, 1, W) and conv1d_bias
    (E,) of the depthwise causal conv (then SiLU) applied to x; x_proj_weight (R [+ N] [+ N], E) projects the conv's
    output per position to the step-size rank R, then B's N states where B is None, then C's where C is None (with
    B_proj_bias, C_proj_bias added); delta_proj_weight (E, R) lifts the step sizes to E channels; the selective scan
    runs with A (E, N), D (E,), z as the gate, delta_bias (E,) and softplus; out_proj_weight (D_model, E) and
    out_proj_bias map the result per position: (batch, L, D_model). Under autocast the three projection weights are
    cast to autocast's dtype, as the kernel does.
    """
    batch, two_e, length = xz.shape
    E, R, N = two_e // 2, delta_proj_weight.shape[1], A.shape[-1]
    if conv1d_weight.shape != (E, 1, conv1d_weight.shape[-1]) or delta_proj_weight.shape[0] != E:
        raise ValueError(f"mamba_inner: conv1d_weight must be (E, 1, W) and delta_proj_weight (E, R) for xz "
                         f"{tuple(xz.shape)}; got {tuple(conv1d_weight.shape)} and {tuple(delta_proj_weight.shape)}")
    expected = R + (N if B is None else 0) + (N if C is None else 0)
    if x_proj_weight.shape != (expected, E):
        raise ValueError(f"mamba_inner: x_proj_weight must be ({expected}, {E}), got {tuple(x_proj_weight.shape)}")
    if torch.is_autocast_enabled(xz.device.type):
        dtype = torch.get_autocast_dtype(xz.device.type)
        x_proj_weight, delta_proj_weight, out_proj_weight = (w.to(dtype) for w in (
            x_proj_weight, delta_proj_weight, out_proj_weight))
        out_proj_bias = out_proj_bias.to(dtype) if out_proj_bias is not None else None
    x, z = xz.chunk(2, dim=1)
    u = causal_conv1d(x, conv1d_weight[:, 0], conv1d_bias, activation="silu")  # (batch, E, L)
    proj = x_proj_weight @ u  # (batch, R [+ N] [+ N], L): per position, as F.linear on (batch L, E)
    dt, rest = proj[:, :R], proj[:, R:]
    if B is None:
        B, rest = rest[:, :N], rest[:, N:]
        B = B + B_proj_bias.to(B.dtype)[:, None] if B_proj_bias is not None else B
    if C is None:
        C = rest[:, :N]
        C = C + C_proj_bias.to(C.dtype)[:, None] if C_proj_bias is not None else C
    delta = delta_proj_weight @ dt  # (batch, E, L)
    y = selective_scan(u, delta, A, B.contiguous(), C.contiguous(), D, z=z, delta_bias=delta_bias,
                       delta_softplus=delta_softplus)
    return F.linear(y.transpose(1, 2), out_proj_weight, out_proj_bias)
