"""The token-layout scan (``ssm.selective_scan_tokens``): the C kernel reading token-major views and walking each
scan order itself gives, bit for bit, what the channel-major kernel gives on explicitly permuted copies (the path
the models took before), forward and backward, at any thread count."""
import pytest
import torch

from models import ssm
from models.mamba import ScanOrder, snake_order

GRID = 9  # 81 tokens: crosses the kernel's 64-position blocks
ORDERS = [ssm.RASTER, ssm.REVERSED, *range(8)]
THREADS_SHAPE = dict(batch=3, dim=2 * 150, groups=2)  # several backward channel blocks per group


def order_id(code):
    return {ssm.RASTER: "raster", ssm.REVERSED: "reversed"}.get(code, f"snake{code}")


def make_inputs(batch=2, dim=24, groups=1, state=16, seed=0):
    """Leaf tensors: one (batch, L, 2E) projection (u then z), delta, A, one (batch, L, R + 2 G N) projection
    (dt, then B and C), D and delta_bias."""
    g = torch.Generator().manual_seed(seed)
    L, R = GRID * GRID, 3
    return {
        "xz": torch.randn(batch, L, 2 * dim, generator=g),
        "delta": torch.randn(batch, L, dim, generator=g) * 0.5 - 2.0,
        "A": -torch.arange(1, state + 1, dtype=torch.float32).repeat(dim, 1) * (
            1 + 0.1 * torch.rand(dim, state, generator=g)),
        "proj": torch.randn(batch, L, R + 2 * groups * state, generator=g),
        "D": torch.randn(dim, generator=g), "delta_bias": torch.rand(dim, generator=g) * 0.1 - 4.0,
    }


def views(x, groups, z=True):
    """The scan's arguments as the models make them: u and z halves of xz, B and C slices of proj (position
    stride R + 2 G N, state stride 1), grouped (batch, L, G, N) when groups > 1."""
    dim, state = x["delta"].shape[-1], x["A"].shape[-1]
    bc = x["proj"][..., -2 * groups * state:].unflatten(-1, (2, groups, state))
    if groups == 1:
        bc = bc.squeeze(-2)
    return {"u": x["xz"][..., :dim], "delta": x["delta"], "A": x["A"], "B": bc.select(2, 0), "C": bc.select(2, 1),
            "D": x["D"], "z": x["xz"][..., dim:] if z else None, "delta_bias": x["delta_bias"]}


def reference(x, code):
    """The earlier path: copies in scan order, channel-major, through the channel-major kernel entry, and back."""
    order = None if code == ssm.RASTER else ScanOrder(GRID, None if code == ssm.REVERSED else code)

    def to_scan(s):
        if s is None:
            return None
        s = s.movedim(1, -1)  # (batch, [G,] N or E, L)
        return (s if order is None else order.to_scan(s)).contiguous()

    y, last = ssm.selective_scan_cpu(to_scan(x["u"]), to_scan(x["delta"]), x["A"], to_scan(x["B"]), to_scan(x["C"]),
                                     x["D"], to_scan(x["z"]), x["delta_bias"], True, return_last_state=True)
    y = y if order is None else order.from_scan(y)
    return y.transpose(1, 2), last


def tokens(x, code):
    return ssm.selective_scan_tokens(**x, delta_softplus=True, order=code, grid=GRID, return_last_state=True)


def run(fn, x, code, groups=1, z=True, seed=1):
    """Outputs, last state and the gradients of every leaf of a random projection of both."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in x.items()}
    y, last = fn(views(leaves, groups, z), code)
    g = torch.Generator().manual_seed(seed)
    loss = (y * torch.randn(y.shape, generator=g)).sum() + (last * torch.randn(last.shape, generator=g)).sum()
    loss.backward()
    return y, last, {k: v.grad for k, v in leaves.items() if v is not None}


def assert_same(a, b):
    y, last, grads = a
    y2, last2, grads2 = b
    assert torch.equal(y, y2) and torch.equal(last, last2), "forward differs"
    for name in grads:
        assert torch.equal(grads[name], grads2[name]), f"d{name} differs"


def test_order_positions_are_the_models_orders():
    for code in ORDERS:
        expected = torch.arange(GRID * GRID) if code == ssm.RASTER else ScanOrder(
            GRID, None if code == ssm.REVERSED else code).perm
        assert torch.equal(ssm.order_positions(code, GRID, GRID * GRID), expected)
    assert torch.equal(ssm.order_positions(5, GRID, GRID * GRID), snake_order(GRID, 5))


@pytest.mark.parametrize("code", ORDERS, ids=order_id)
@pytest.mark.parametrize("groups,state,z", [(1, 16, True), (2, 16, False), (1, 5, True)], ids=["N16", "G2-noz", "N5"])
def test_token_scan_is_bit_identical_to_the_permuted_path(code, groups, state, z):
    x = make_inputs(groups=groups, state=state)
    assert_same(run(tokens, x, code, groups, z), run(reference, x, code, groups, z))


@pytest.mark.parametrize("code", [ssm.REVERSED, 3], ids=order_id)
def test_token_scan_is_bit_identical_at_any_thread_count(code):
    x = make_inputs(seed=7, **THREADS_SHAPE)
    threads = torch.get_num_threads()
    results = {}
    try:
        for n in (1, 2, 3, 4):
            torch.set_num_threads(n)
            results[n] = run(tokens, x, code, THREADS_SHAPE["groups"])
    finally:
        torch.set_num_threads(threads)
    for n in results:
        assert_same(results[n], results[1])
    assert_same(results[1], run(reference, x, code, THREADS_SHAPE["groups"]))


@pytest.mark.parametrize("code", [ssm.REVERSED, 6], ids=order_id)
def test_other_backends_take_the_permuted_path(monkeypatch, code):
    """Where the C kernel does not run (here the torch backend), the same result within mamba-ssm's tolerance."""
    x = make_inputs(groups=2)
    expected = run(tokens, x, code, 2)
    monkeypatch.setenv(ssm.BACKEND_ENV, "torch")
    got = run(tokens, x, code, 2)
    torch.testing.assert_close(got[0], expected[0], rtol=6e-4, atol=2e-3)
    for name in expected[2]:
        torch.testing.assert_close(got[2][name], expected[2][name], rtol=6e-4, atol=2e-3)


# --- the Mamba layers on the token layout against their earlier channel-major computation ---

def channel_major_mix(layer, x, m):
    """The layers' earlier computation: channel-major streams, each order's copies through SelectiveSSM.forward."""
    w_u, w_z = layer.in_proj.weight.chunk(2, dim=0)
    xt = x.transpose(1, 2)
    ms = layer.mask_proj.weight @ m.transpose(1, 2) if layer.cross else None
    y = layer.ssm(w_u @ xt, w_z @ xt, ms, layer.orders)
    return (layer.out_proj.weight @ y).transpose(1, 2)


@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
@pytest.mark.parametrize("scan,block", [("raster", 0), ("bidirectional", 0), ("zigzag", 1), ("zigzag", 6)])
@pytest.mark.parametrize("conv", ["grid2d", "causal1d"])
def test_mamba_layers_compute_what_the_channel_major_path_did(cross, scan, block, conv):
    """Same outputs and parameter gradients up to fp32 rounding: the products now run on the token layout, so
    the matrix products' summation order, not the arithmetic, may differ."""
    from models.mamba import CrossMamba, SelfMamba, scan_orders

    torch.manual_seed(0)
    cls = CrossMamba if cross else SelfMamba
    layer = cls(32, orders=scan_orders(scan, 8, block), conv=conv, grid=8, d_state=16)
    g = torch.Generator().manual_seed(1)
    x, m = torch.randn(2, 64, 32, generator=g), torch.randn(2, 64, 32, generator=g)
    results = []
    for fn in (lambda: layer.mix(x, m if cross else None), lambda: channel_major_mix(layer, x, m)):
        layer.zero_grad()
        y = fn()
        (y * torch.linspace(-1, 1, y.numel()).view(y.shape)).sum().backward()
        results.append((y.detach(), {k: p.grad.clone() for k, p in layer.named_parameters()}))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    for name in results[1][1]:
        torch.testing.assert_close(results[0][1][name], results[1][1][name], rtol=1e-4, atol=1e-5, msg=name)
