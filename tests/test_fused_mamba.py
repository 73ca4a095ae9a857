"""SISMA's Self-Mamba through mamba-ssm's fused ``mamba_inner_fn``: the wiring of the weights checked on the CPU.

The fused kernel needs CUDA; here ``models.ssm.mamba_inner_reference`` (the same computation with the same signature,
written from mamba-ssm's semantics) stands in for it, and Self-Mamba's fused path must give the unfused path's output
and gradients. tests/test_gpu.py compares the real kernel with this reference.
"""
import pytest
import torch
from test_scan_tokens import channel_major_forward_tokens

from models import ssm
from models.mamba import SelectiveSSM, SelfMamba, scan_orders

pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest.py
GRID, WIDTH = 4, 32


@pytest.fixture
def reference_kernel(monkeypatch):
    """fused_inner gives the CPU reference for CPU tensors, recorded as the fused kernel would be."""
    calls = []

    def fused_inner(t):
        calls.append(tuple(t.shape))
        return ssm._recording(ssm.FUSED_BACKEND, ssm.mamba_inner_reference)

    monkeypatch.setattr(ssm, "fused_inner", fused_inner)
    return calls


def layer(scan: str, conv: str = "causal1d", block: int = 1) -> SelfMamba:
    torch.manual_seed(0)
    m = SelfMamba(WIDTH, orders=scan_orders(scan, GRID, block), conv=conv, grid=GRID, d_state=8)
    with torch.no_grad():
        for p in m.parameters():  # random weights everywhere, so that a swapped argument shows
            if p.dim() > 1:
                p.normal_(0, 0.3)
        for conv in m.ssm.conv.children():
            conv.bias.normal_(0, 0.3)
    return m


def unfused(m: SelfMamba, x: torch.Tensor) -> torch.Tensor:
    return m.mix(x, None)


@pytest.mark.parametrize("scan", ["raster", "zigzag"])
def test_fused_path_gives_the_unfused_output_and_gradients(reference_kernel, scan):
    m = layer(scan)
    assert m.fusable
    x = torch.randn(2, GRID * GRID, WIDTH, requires_grad=True)
    ssm.reset_used_backends()
    fused = m(x)
    assert reference_kernel and ssm.used_backends() >= {ssm.FUSED_BACKEND}
    g = torch.randn_like(fused)
    grads_fused = torch.autograd.grad(fused, [x, *m.parameters()], g)
    plain = unfused(m, x)
    grads_plain = torch.autograd.grad(plain, [x, *m.parameters()], g)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    names = ["x"] + [n for n, _ in m.named_parameters()]
    for name, a, b in zip(names, grads_fused, grads_plain):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_fused_path_under_bf16_autocast(reference_kernel, monkeypatch):
    m = layer("zigzag")
    x = torch.randn(2, GRID * GRID, WIDTH)
    # unfused in the fused kernel's layout: bf16 rounds the token layout's products (the CPU path) differently
    monkeypatch.setattr(SelectiveSSM, "forward_tokens", channel_major_forward_tokens)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fused, plain = m(x), unfused(m, x)
    assert fused.dtype == plain.dtype == torch.bfloat16
    torch.testing.assert_close(fused.float(), plain.float(), rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("scan, conv", [("bidirectional", "causal1d"), ("raster", "grid2d"), ("zigzag", "grid2d")])
def test_other_layers_stay_unfused(reference_kernel, scan, conv):
    m = layer(scan, conv)
    assert not m.fusable
    ssm.reset_used_backends()
    m(torch.randn(1, GRID * GRID, WIDTH))
    assert not reference_kernel and ssm.FUSED_BACKEND not in ssm.used_backends()


def test_fused_kernel_is_chosen_only_for_cuda_tensors(monkeypatch):
    """No CUDA tensors, or a forced scan backend: the unfused path (fused_inner gives nothing)."""
    assert ssm.fused_inner(torch.empty(1, 8, 4)) is None
    monkeypatch.setenv(ssm.BACKEND_ENV, "cuda")
    assert ssm.fused_inner(torch.empty(1, 8, 4)) is None


def test_reference_checks_the_layout_of_its_arguments():
    m = layer("raster")
    xz = torch.randn(1, 2 * m.ssm.D.shape[0], GRID * GRID)
    s = m.ssm
    A = -torch.exp(s.A_log)
    with pytest.raises(ValueError, match="conv1d_weight must be"):
        ssm.mamba_inner_reference(xz, s.conv.conv1d.weight[:, 0], s.conv.conv1d.bias, s.x_proj.weight,
                                  s.dt_proj.weight, m.out_proj.weight, None, A, D=s.D)
    with pytest.raises(ValueError, match="x_proj_weight must be"):
        ssm.mamba_inner_reference(xz, s.conv.conv1d.weight, s.conv.conv1d.bias, s.x_proj.weight[:-1],
                                  s.dt_proj.weight, m.out_proj.weight, None, A, D=s.D)


def test_shape_only_stand_in_has_the_kernels_outputs_and_gradient_shapes():
    """bench plan's stand-in (fake tensors) returns what the reference returns, and gradients of every input's shape
    (the weights' in fp32, as mamba-ssm's backward gives them)."""
    from bench import memsim
    from models.scan_memory import mamba_inner_shapes

    def args(device):
        torch.manual_seed(0)
        m = layer("raster")
        s = m.ssm
        xz = torch.randn(2, 2 * s.D.shape[0], GRID * GRID, device=device, requires_grad=True)
        return m, (xz, s.conv.conv1d.weight, s.conv.conv1d.bias, s.x_proj.weight, s.dt_proj.weight,
                   m.out_proj.weight, None, -torch.exp(s.A_log.float()), None, None, s.D.float())

    m, real = args("cpu")
    out = ssm.mamba_inner_reference(*real, delta_bias=m.ssm.dt_proj.bias.float())
    used = [(n, p) for n, p in m.named_parameters() if not n.startswith("in_proj")]  # xz is given
    expected = [g.shape for g in torch.autograd.grad(out.sum(), [real[0]] + [p for _, p in used])]
    with memsim.fake_device("cpu"):
        fm, fake = args("cpu")
        fout = mamba_inner_shapes(*fake, delta_bias=fm.ssm.dt_proj.bias.float())
        assert fout.shape == out.shape and fout.dtype == out.dtype
        fused = [p for n, p in fm.named_parameters() if not n.startswith("in_proj")]
        grads = torch.autograd.grad(fout.sum(), [fake[0], *fused], allow_unused=True)
    assert len(grads) == len(expected)
    for name, g, shape in zip(["xz"] + [n for n, _ in used], grads, expected):
        assert g is not None and g.shape == shape, name
