"""Memory of a training step or a sampling step, simulated on fake tensors: no GPU, no memory, no compute.

``bench plan`` runs the real model code on ``torch._subclasses.fake_tensor.FakeTensorMode`` tensors that say
they live on a CUDA device (or on the CPU, to check the simulation against a real CPU run). What a GPU run
would keep in memory is then followed tensor by tensor:

- ``LiveTensors`` (a ``TorchDispatchMode``): every storage an operator allocates is counted from its
  allocation until it is freed (a weak reference to the storage), rounded up to the CUDA caching allocator's
  512-byte granularity; ``peak`` is the most that was alive at once, the quantity
  ``torch.cuda.max_memory_allocated`` measures (less the kernels' own workspaces, which are not tensors).
- ``SavedTensors`` (``torch.autograd.graph.saved_tensors_hooks``): the bytes autograd keeps for backward,
  unique storages only, parameters excluded: the activations.
- ``backward``: the autograd engine refuses to run on fake CUDA tensors without a CUDA driver (it stashes the
  device's streams first), so the backward graph is walked here instead, in the engine's order (the ready
  node created last runs first; gradients summed per input, reduced to the input's shape and cast to its dtype
  as the engine's ``validate_outputs`` does), under ``no_grad``, dropping every node once it ran, so its saved
  tensors are freed when the engine would free them. On real CPU tensors it gives the engine's peak to within a
  fraction of a percent (``tests/test_plan.py``).
- ``cuda_autocast``: what ``torch.autocast("cuda", dtype)`` does on entry and exit (enabled flag, dtype, nesting,
  the weight-cast cache dropped at the outermost exit), without its refusal to run where CUDA is absent.
- ``GpuAttention`` (a ``TorchFunctionMode``): ``scaled_dot_product_attention`` on fake CUDA tensors calls the
  kernel a GPU would pick (flash attention for fp16/bf16 with head size <= 256, else memory-efficient
  attention), whose memory (output and log-sum-exp saved, no L x L matrix) differs from the math fallback
  that fake tensors would otherwise take.

The selective scan and the causal conv of SISMA take a shape-only path on fake tensors that allocates and saves
what mamba-ssm's and causal-conv1d's kernels (CUDA) or the C kernel (CPU) do (``models/scan_memory.py``).
"""
from __future__ import annotations

import contextlib
import heapq
import warnings
import weakref

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

ALLOCATION_ROUND = 512  # the CUDA caching allocator hands out blocks in multiples of 512 bytes
FLASH_MAX_HEAD_DIM = 256


def round_allocation(nbytes: int) -> int:
    """Bytes an allocation of ``nbytes`` takes in the CUDA caching allocator (multiples of 512, at least 512)."""
    return max(ALLOCATION_ROUND, -(-nbytes // ALLOCATION_ROUND) * ALLOCATION_ROUND) if nbytes else 0


def _tensors(tree) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


class LiveTensors(TorchDispatchMode):
    """Bytes of the tensor storages allocated by operators under this mode that are still alive, and their peak.

    An operator's output whose storage is not one of its inputs' is a new allocation (views and in-place results
    share an input's storage); it is counted until the storage is freed.
    """

    def __init__(self, device: str | None = None):
        super().__init__()
        self.device = device  # a device type: only storages there are counted (None: all)
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}

    def reset_peak(self) -> None:
        self.peak = self.live

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)

    def track(self, t: torch.Tensor, inputs: set[int] = frozenset()) -> None:
        """Count ``t``'s storage from now until it is freed (once; not if it is one of ``inputs``)."""
        if self.device is not None and t.device.type != self.device:
            return
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self._sizes or key in inputs:
            return
        size = round_allocation(storage.nbytes())
        self._sizes[key] = size
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = {_storage_key(t) for t in _tensors((args, kwargs))}
        out = func(*args, **kwargs)
        for t in _tensors(out):
            self.track(t, inputs)
        return out


class SavedTensors(torch.autograd.graph.saved_tensors_hooks):
    """Bytes of the unique storages autograd saves for backward while active, ``exclude`` (parameters) left out."""

    def __init__(self, exclude=()):
        self.bytes = 0
        self._seen = {_storage_key(t) for t in exclude}

        def pack(t: torch.Tensor):
            key = _storage_key(t)
            if key not in self._seen:
                self._seen.add(key)
                self.bytes += round_allocation(t.untyped_storage().nbytes())
            return t.detach()  # not t itself: a saved output would then hold its own node (a leak)

        super().__init__(pack, lambda t: t)


@contextlib.contextmanager
def cuda_autocast(dtype: torch.dtype, enabled: bool = True):
    """``torch.autocast("cuda", dtype)`` as its ``__enter__``/``__exit__`` set it, for fake CUDA tensors."""
    prev, prev_dtype, prev_cache = (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"),
                                    torch.is_autocast_cache_enabled())
    torch.set_autocast_enabled("cuda", enabled)
    torch.set_autocast_dtype("cuda", dtype)
    torch.autocast_increment_nesting()
    torch.set_autocast_cache_enabled(True)
    try:
        yield
    finally:
        if torch.autocast_decrement_nesting() == 0:
            torch.clear_autocast_cache()
        torch.set_autocast_enabled("cuda", prev)
        torch.set_autocast_dtype("cuda", prev_dtype)
        torch.set_autocast_cache_enabled(prev_cache)


def is_fake(t) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


class GpuAttention(TorchFunctionMode):
    """SDPA on fake CUDA tensors through the fused kernel a GPU would choose (see the module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and is_fake(args[0]) and args[0].is_cuda:
            return gpu_attention(*args, **kwargs)
        return func(*args, **kwargs)


def gpu_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """Flash attention for fp16/bf16 and head size <= 256 (multiple of 8), else memory-efficient attention."""
    if torch.is_autocast_enabled("cuda"):  # SDPA is on autocast's lower-precision list
        dtype = torch.get_autocast_dtype("cuda")
        q, k, v = (x.to(dtype) for x in (q, k, v))
    head = q.shape[-1]
    if (attn_mask is None and q.dtype in (torch.float16, torch.bfloat16) and head <= FLASH_MAX_HEAD_DIM
            and head % 8 == 0):
        return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, False,
                                                                  scale=scale)[0]
    needs_lse = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, attn_mask, needs_lse, dropout_p,
                                                                  is_causal, scale=scale)[0]


@contextlib.contextmanager
def fake_device(device: str = "cuda"):
    """A FakeTensorMode in which tensors may be created on ``device`` (cuda or cpu) without it being there,
    with attention dispatched as on a GPU; yields the mode."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()
    with mode, (GpuAttention() if torch.device(device).type == "cuda" else contextlib.nullcontext()), \
            warnings.catch_warnings():
        # checkpoint's recomputation enters torch.autocast("cuda"), which warns that CUDA is absent (and is
        # switched back on by the caller's context_fn)
        warnings.filterwarnings("ignore", "CUDA is not available", UserWarning)
        yield mode


# ---------------------------------------------------------------------------------------------- backward

@torch.no_grad()
def backward(holder: list, grad: torch.Tensor | None = None) -> None:
    """``holder.pop().backward(grad)`` without the autograd engine (see the module docstring).

    The loss is passed in a list the caller holds no other reference to, so that the graph can be freed as it
    runs. Non-reentrant activation checkpoints recompute once per block (one ``GraphExecGroup``).
    """
    from torch.utils.checkpoint import GraphExecGroup

    root = holder.pop()
    first = root.grad_fn
    pending: dict = {}  # node -> number of edges into it not yet run
    stack, seen = [first], {first}
    while stack:
        node = stack.pop()
        for child, _ in node.next_functions:
            if child is not None:
                pending[child] = pending.get(child, 0) + 1
                if child not in seen:
                    seen.add(child)
                    stack.append(child)
    del stack, seen
    grads = {first: [torch.ones_like(root) if grad is None else grad]}
    ready = [(-first._sequence_nr(), id(first), first)]
    del root, first, grad, node
    with GraphExecGroup():
        while ready:
            node = heapq.heappop(ready)[2]
            inputs = grads.pop(node)
            outputs = _apply(node, inputs)
            del inputs
            for (child, slot), g in zip(node.next_functions, outputs):
                if child is None:
                    continue
                buffer = grads.setdefault(child, [None] * len(child._input_metadata))
                if g is not None:
                    meta = child._input_metadata[slot]
                    if tuple(g.shape) != tuple(meta.shape):
                        g = g.sum_to_size(meta.shape)
                    if g.dtype != meta.dtype:
                        g = g.to(meta.dtype)
                    buffer[slot] = g if buffer[slot] is None else buffer[slot] + g
                pending[child] -= 1
                if pending[child] == 0:
                    del pending[child]
                    heapq.heappush(ready, (-child._sequence_nr(), id(child), child))
                g = buffer = None
            del outputs, node


def _apply(node, inputs: list) -> tuple:
    if callable(node):  # a C++ node
        out = node(*inputs)
    else:  # a Python autograd.Function's node: missing gradients materialised as zeros, the engine's default
        inputs = [torch.zeros(m.shape, dtype=m.dtype, device=m.device) if g is None else g
                  for g, m in zip(inputs, node._input_metadata)]
        out = node.apply(*inputs)
    return out if isinstance(out, tuple) else (out,)

