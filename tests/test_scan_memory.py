"""The scan and conv on fake tensors allocate and save what the real kernels do; mamba-ssm without its kernel."""
import sys
import types

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from models import ssm


def _inputs(batch=2, dim=16, length=24, state=4):
    g = torch.Generator().manual_seed(0)
    return dict(u=torch.randn(batch, dim, length, generator=g), delta=torch.rand(batch, dim, length, generator=g),
                A=-torch.rand(dim, state, generator=g), B=torch.randn(batch, state, length, generator=g),
                C=torch.randn(batch, state, length, generator=g), D=torch.randn(dim, generator=g),
                z=torch.randn(batch, dim, length, generator=g), delta_bias=torch.rand(dim, generator=g))


def _scan(inputs: dict, backward: bool = True):
    """Bytes saved for backward by one scan, its output's shape and dtype, the gradients' shapes and dtypes."""
    saved = []

    def pack(t):
        saved.append(t.untyped_storage().nbytes())
        return t

    inputs = {k: v.requires_grad_() for k, v in inputs.items()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = ssm.selective_scan(**inputs, delta_softplus=True)
    grads = {}
    if backward:
        out.sum().backward()
        grads = {k: (tuple(v.grad.shape), v.grad.dtype) for k, v in inputs.items()}
    return sum(saved), tuple(out.shape), out.dtype, grads


def test_fake_cpu_scan_saves_what_the_c_kernel_saves():
    if ssm._KERNEL.load() is None:
        pytest.skip(f"the C kernel is unavailable: {ssm._KERNEL.error}")
    ssm.reset_used_backends()
    real = _scan(_inputs())
    assert ssm.used_backends() == {"cpu"}
    ssm.reset_used_backends()
    with FakeTensorMode() as mode:
        fake = _scan({k: mode.from_tensor(v) for k, v in _inputs().items()})
    assert ssm.used_backends() == {"fake"}
    assert fake == real


def test_fake_cuda_scan_saves_what_mamba_ssm_saves():
    """u, delta, A, B, C, D, z, delta_bias, the chunk states x (B, D, 1, 2N) in fp32 and out."""
    with FakeTensorMode():
        saved, shape, dtype, _ = _scan({k: torch.empty(v.shape, device="cuda") for k, v in _inputs().items()},
                                       backward=False)
    b, d, length, n = 2, 16, 24, 4
    inputs = 4 * (3 * b * d * length + d * n + 2 * b * n * length + 2 * d)
    assert saved == inputs + 4 * b * d * 2 * n + 4 * b * d * length
    assert shape == (b, d, length) and dtype == torch.float32


def test_fake_cuda_conv_saves_what_causal_conv1d_saves():
    saved = []

    def pack(t):
        saved.append(t.untyped_storage().nbytes())
        return t

    with FakeTensorMode():
        x, w, b = (torch.empty(*shape, device="cuda", requires_grad=True) for shape in ((2, 16, 24), (16, 4), (16,)))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = ssm.causal_conv1d(x, w, b, activation="silu")
    assert sum(saved) == 4 * (2 * 16 * 24 + 16 * 4 + 16) and y.shape == x.shape


def test_mamba_ssm_without_its_compiled_scan_is_not_chosen(monkeypatch):
    """mamba-ssm >= 2.3.2.post1 imports without selective_scan_cuda (its interface sets it to None)."""
    from models import ssm

    interface = types.ModuleType("mamba_ssm.ops.selective_scan_interface")
    interface.selective_scan_cuda = None
    interface.selective_scan_fn = lambda *a, **k: pytest.fail("called a scan without its kernel")
    monkeypatch.setitem(sys.modules, "mamba_ssm.ops.selective_scan_interface", interface)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    ssm._cuda_op.cache_clear()
    try:
        assert ssm._cuda_op("mamba_ssm.ops.selective_scan_interface", "selective_scan_fn") is None
        interface.selective_scan_cuda = object()
        ssm._cuda_op.cache_clear()
        assert ssm._cuda_op("mamba_ssm.ops.selective_scan_interface", "selective_scan_fn") is not None
    finally:
        ssm._cuda_op.cache_clear()
