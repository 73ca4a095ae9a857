"""Where the time of one network evaluation (NFE) goes: operator self time by class, from ``torch.profiler``.

``op_breakdown`` profiles a few calls of an already warmed callable and sums the SELF time of every profiler event
(an aten operator, a ``record_function`` range, an autograd Function) that ran inside them: its time less that of the
events it opened, so nothing is counted twice. Host time (``self_cpu_time_total``) on CPU; on CUDA device time
(``self_device_time_total``: the kernels each event launched itself), with synchronisation before and after. Each
call runs inside the profiler range ``CALL_LABEL`` and only the events within it count: ones on aten's worker threads
are already inside the wall time of the operator that started them, and the profiler's own start and stop stay out.
The range's own time is left out: on CPU it is the Python between operators, so ``profile_nfe_ms`` is below the
wall-clock latency of ``bench speed`` (more so for small models, and the profiler adds its own cost per operator); on
CUDA the device's idle gaps are not in it either. The CUDA runtime's calls (cudaLaunchKernel, ...) launch rather
than compute: they are left out (their kernels' time is their operator's).

Classes (``classify``, on the name without its namespace and leading and trailing underscores: ``aten::add_`` -> add,
``aten::_to_copy`` -> to_copy); the first rule that matches wins:
- scan: the selective scan's range ``models.ssm.SCAN_LABEL`` and every event inside it (its autograd Function, whose
  own time is the C kernel called through ctypes or mamba-ssm's CUDA kernel; the elementwise operators of the
  pure-PyTorch scan; the casts and copies the scan makes), and the fused Mamba layer's range
  ``models.ssm.FUSED_LABEL`` with the events inside it that would be ``other`` (``mamba_inner_fn``'s autograd
  Function, whose own time is mamba-ssm's causal-conv and scan kernels, and its allocations; its projections keep
  their class);
- conv: the causal conv's range ``models.ssm.CAUSAL_CONV_LABEL`` and the grid conv's ``GRID_CONV_LABEL`` (C or CUDA
  kernels no aten operator shows) and every event inside them, and every convolution: ``conv`` or ``convolution`` as a
  word of the name (convolution, conv2d, mkldnn_convolution, slow_conv2d_forward, thnn_conv2d, conv_depthwise2d,
  cudnn_convolution, ...);
- in a backward pass, the autograd nodes of the C kernel's Functions (``models.ssm.BACKWARD_NODES``), whose own time is
  the kernel's backward: the scan's are scan, the convs' conv;
- attention: scaled_dot_product_*, any name with ``attention`` (the flash, efficient and cudnn kernels) and softmax;
- matmul: mm, addmm, bmm, baddbmm, matmul, linear, addmv, mv, dot, einsum and their variants (``MATMUL_OPS``);
- layout: operators that move or reinterpret data without arithmetic (``LAYOUT_OPS``: copies and casts, views,
  permutes and transposes, cat and stack, flips and rolls, gathers and scatters, padding, unfold, nearest-neighbour
  upsampling); a view's self time is about 0, but its calls count;
- norm_elementwise: normalisations (``norm`` as a word of the name: layer_norm, group_norm, rms_norm, batch_norm,
  ...) and elementwise arithmetic, activations, comparisons and reductions (``ELEMENTWISE_OPS``: add, mul, silu,
  gelu, exp, softplus, mean, sum, where, ...);
- other: everything else, allocation included (empty, zeros, full, fill_), pooling, and the events of a compiled
  graph (so a breakdown is meaningful for eager models only).
"""
from __future__ import annotations

import contextlib
import os
import re
import sys
from dataclasses import dataclass

import torch
from torch.autograd import DeviceType
from torch.autograd.profiler_util import FunctionEvent
from torch.profiler import ProfilerActivity, profile, record_function

from models.ssm import BACKWARD_NODES, CAUSAL_CONV_LABEL, FUSED_LABEL, GRID_CONV_LABEL, SCAN_LABEL

OP_CLASSES = ("matmul", "attention", "scan", "conv", "norm_elementwise", "layout", "other")
DEFAULT_CALLS = 3
CALL_LABEL = "sis_bench::profiled_call"  # the range around each profiled call of op_breakdown
US = 1e-6  # profiler times are in microseconds
MS = 1e3
SHARE_DIGITS = 4
# torch < 2.4 names the device time after CUDA
SELF_DEVICE_TIME = ("self_device_time_total" if hasattr(FunctionEvent, "self_device_time_total")
                    else "self_cuda_time_total")

MATMUL_OPS = frozenset({
    "mm", "addmm", "addmm_activation", "bmm", "baddbmm", "addbmm", "matmul", "linalg_matmul", "chain_matmul",
    "linear", "addmv", "mv", "dot", "vdot", "einsum", "int_mm", "scaled_mm", "grouped_mm", "mkldnn_linear",
    "linear_pointwise",  # mkldnn::_linear_pointwise, torch.compile's CPU linear
})
LAYOUT_OPS = frozenset({
    "copy", "contiguous", "clone", "to", "to_copy", "detach", "alias", "lift_fresh",
    "view", "view_as", "reshape", "reshape_alias", "unsafe_view", "as_strided", "expand", "expand_as",
    "unsqueeze", "squeeze", "select", "slice", "narrow", "split", "split_with_sizes", "unsafe_split",
    "tensor_split", "chunk", "unsafe_chunk", "unbind", "unflatten", "flatten", "movedim", "moveaxis",
    "permute", "transpose", "swapaxes", "t", "flip", "roll", "rot90", "repeat", "repeat_interleave", "tile",
    "cat", "concat", "concatenate", "stack", "index", "index_select", "gather", "scatter", "scatter_add",
    "index_put", "index_copy", "take", "take_along_dim", "pad", "constant_pad_nd", "unfold", "im2col",
    "col2im", "pixel_shuffle", "pixel_unshuffle", "mT", "mH", "resolve_conj", "resolve_neg",
})
LAYOUT_PREFIXES = ("reflection_pad", "replication_pad", "upsample_nearest")
ELEMENTWISE_OPS = frozenset({
    "add", "sub", "rsub", "mul", "div", "true_divide", "neg", "reciprocal", "abs", "sign", "square", "sqrt",
    "rsqrt", "pow", "exp", "exp2", "expm1", "log", "log1p", "log2", "sin", "cos", "erf", "floor", "ceil", "round",
    "silu", "gelu", "relu", "relu6", "leaky_relu", "elu", "mish", "hardtanh", "hardswish", "hardsigmoid",
    "sigmoid", "tanh", "softplus", "clamp", "clamp_min", "clamp_max", "clip", "where", "masked_fill", "lerp",
    "addcmul", "addcdiv", "maximum", "minimum", "max", "min", "amax", "amin", "mean", "sum", "prod", "var", "std",
    "var_mean", "std_mean", "cumsum", "any", "all", "eq", "ne", "lt", "le", "gt", "ge", "logical_and", "logical_or",
    "logical_not", "bitwise_and", "bitwise_or", "bitwise_not", "and", "or", "iand", "ior", "dropout", "native_dropout",
})
CONV_WORD = re.compile(r"(?:^|_)conv(?:olution)?(?:_|\d|$)")  # conv2d, slow_conv_dilated2d; not convert
NORM_WORD = re.compile(r"(?:^|_)norm(?:_|$)")  # layer_norm, native_batch_norm_legit; not normal
RUNTIME_CALL = re.compile(r"^cu(?:da)?[A-Z]")  # cudaLaunchKernel, cuLaunchKernel: host calls of the CUDA runtime
# profiler ranges whose class the events inside them take: (class, True: all of them | False: those that are other)
RANGE_CLASSES = {SCAN_LABEL: ("scan", True), CAUSAL_CONV_LABEL: ("conv", True), GRID_CONV_LABEL: ("conv", True),
                 FUSED_LABEL: ("scan", False)}


def classify(name: str) -> str:
    """The class in OP_CLASSES of a profiler event named ``name`` (the rule: the module docstring)."""
    if name in (SCAN_LABEL, FUSED_LABEL):
        return "scan"
    if name in (CAUSAL_CONV_LABEL, GRID_CONV_LABEL):
        return "conv"
    if name in BACKWARD_NODES:
        return BACKWARD_NODES[name]
    base = name.rpartition("::")[2].strip("_")
    if CONV_WORD.search(base):
        return "conv"
    if base.startswith("scaled_dot_product") or "attention" in base or "softmax" in base:
        return "attention"
    if base in MATMUL_OPS:
        return "matmul"
    if base in LAYOUT_OPS or base.startswith(LAYOUT_PREFIXES):
        return "layout"
    if base in ELEMENTWISE_OPS or NORM_WORD.search(base):
        return "norm_elementwise"
    return "other"


@dataclass(frozen=True)
class Breakdown:
    """Operator self time of one call by class (seconds), operator calls by class, and seconds per (name, class)."""

    seconds: dict[str, float]
    counts: dict[str, int]
    ops: dict[tuple[str, str], float]

    @property
    def total_s(self) -> float:
        """Seconds per call: the sum of the classes."""
        return sum(self.seconds.values())

    def columns(self) -> dict:
        """Row columns: ``profile_nfe_ms`` and ``share_<class>`` for each class (fractions of it, summing to 1)."""
        total = self.total_s
        shares = {f"share_{c}": round(self.seconds[c] / total, SHARE_DIGITS) if total else 0.0 for c in OP_CLASSES}
        return {"profile_nfe_ms": total * MS, **shares}

    def top_ops(self, n: int = 10) -> list[tuple[str, str, float]]:
        """The ``n`` costliest (operator, class, milliseconds per call), costliest first."""
        ranked = sorted(self.ops.items(), key=lambda item: -item[1])[:n]
        return [(name, cls, seconds * MS) for (name, cls), seconds in ranked]


def op_breakdown(fn, device: torch.device, calls: int = DEFAULT_CALLS) -> Breakdown:
    """Profile ``calls`` calls of the warmed zero-argument ``fn`` on ``device``: where each call's time went."""
    if calls < 1:
        raise ValueError(f"calls must be at least 1, got {calls}")
    device = torch.device(device)
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize(device)
    with native_stderr_silenced(), profile(activities=activities) as prof:
        for _ in range(calls):
            with record_function(CALL_LABEL):
                fn()
        if cuda:
            torch.cuda.synchronize(device)
    return _aggregate(prof.events(), SELF_DEVICE_TIME if cuda else "self_cpu_time_total", calls)


@contextlib.contextmanager
def native_stderr_silenced():
    """Standard error (the file descriptor, which C++ writes to) sent to the null device: the profiler's library
    prints a line at every start and stop (and, without a GPU, an error about it) that says nothing to a user."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _aggregate(events, time_attribute: str, calls: int) -> Breakdown:
    """Sum the self time (``time_attribute``, microseconds) of the events inside each call's range, per call."""
    seconds, counts, ops = dict.fromkeys(OP_CLASSES, 0.0), dict.fromkeys(OP_CLASSES, 0), {}
    roots = [e for e in events if e.name == CALL_LABEL and e.device_type == DeviceType.CPU]
    stack = [(child, None) for root in roots for child in root.cpu_children]  # (event, its range's RANGE_CLASSES)
    while stack:
        event, inside = stack.pop()
        stack += [(child, RANGE_CLASSES.get(event.name, inside)) for child in event.cpu_children]
        if RUNTIME_CALL.match(event.name):
            continue
        cls = classify(event.name)
        if inside is not None and (inside[1] or cls == "other"):
            cls = inside[0]
        spent = getattr(event, time_attribute) * US / calls
        seconds[cls] += spent
        counts[cls] += 1
        ops[event.name, cls] = ops.get((event.name, cls), 0.0) + spent
    return Breakdown(seconds=seconds, counts={c: round(n / calls) for c, n in counts.items()}, ops=ops)
