"""The token-layout kernels: the scan (``ssm.selective_scan_tokens``), reading token-major views and walking each
scan order itself, gives bit for bit what the channel-major kernel gives on explicitly permuted copies (the path
the models took before), forward and backward, at any thread count; the causal conv (``ssm.causal_conv1d_tokens``)
gives what ``causal_conv1d`` gives on those copies up to fp32 rounding, the same bits at any thread count; so does
SISMA's 3 x 3 grid conv (``ssm.grid_conv2d_tokens``) against aten's conv on the channels-last grid.

The orders are the models' own objects: SISMA's (``models.mamba.ScanOrder``: raster reversed, the 8 snakes) and
DiM's (``models.dim.Sweep``: rows or columns, forward or reversed, or a snake, after a prefix of tokens kept first)."""
import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from models import ssm
from models.dim import Sweep
from models.mamba import RASTER_ORDER, ScanOrder, SelectiveSSM, snake_order

GRID = 9  # 81 tokens: crosses the kernel's 64-position blocks
PREFIX = 4  # DiM's prefix at its default pad: the time token and three separators
SISMA_ORDERS = [None, ScanOrder(GRID), *(ScanOrder(GRID, k) for k in range(8))]
DIM_ORDERS = [Sweep(0, GRID, columns=True), Sweep(0, GRID, columns=True, reverse=True),
              *(Sweep(PREFIX, GRID, columns=c, reverse=r) for c in (False, True) for r in (False, True)),
              Sweep(PREFIX, GRID, snake=3)]
ORDERS = SISMA_ORDERS + DIM_ORDERS
THREAD_ORDERS = [ScanOrder(GRID), ScanOrder(GRID, 3), Sweep(PREFIX, GRID, reverse=True),
                 Sweep(PREFIX, GRID, columns=True), Sweep(PREFIX, GRID, columns=True, reverse=True)]
THREADS_SHAPE = dict(batch=3, dim=2 * 150, groups=2)  # several backward channel blocks per group, a partial tile
RANK = 3  # dt's rank: the first RANK columns of the (batch, L, R + 2 G N) projection


def order_id(order):
    if order is None:
        return "raster"
    if isinstance(order, ScanOrder):
        return "reversed" if order.snake is None else f"snake{order.snake}"
    kind = f"snake{order.snake}" if order.snake is not None else "columns" if order.columns else "rows"
    return f"p{order.prefix}-{kind}" + ("-reversed" if order.reverse else "")


def kernel_order(order):
    """The keywords of the token kernels for a model's order (None: raster)."""
    return RASTER_ORDER if order is None else order.kernel_order


def length(order):
    """Tokens scanned: the order's prefix, then the grid."""
    return kernel_order(order)["prefix"] + GRID * GRID


def to_scan(order, s):
    """(..., L) raster -> scan order, as the models' earlier path did it (transposes and flips)."""
    return s if order is None else order.to_scan(s)


def from_scan(order, s):
    return s if order is None else order.from_scan(s)


def make_inputs(length, batch=2, dim=24, groups=1, state=16, seed=0):
    """Leaf tensors: one (batch, L, 2E) projection (u then z), delta, A, one (batch, L, R + 2 G N) projection
    (dt, then B and C), D and delta_bias."""
    g = torch.Generator().manual_seed(seed)
    R = RANK
    return {
        "xz": torch.randn(batch, length, 2 * dim, generator=g),
        "delta": torch.randn(batch, length, dim, generator=g) * 0.5 - 2.0,
        "A": -torch.arange(1, state + 1, dtype=torch.float32).repeat(dim, 1) * (
            1 + 0.1 * torch.rand(dim, state, generator=g)),
        "proj": torch.randn(batch, length, R + 2 * groups * state, generator=g),
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


def reference(x, order):
    """The earlier path: copies in scan order, channel-major, through the channel-major kernel entry, and back."""
    def scan_copy(s):
        return None if s is None else to_scan(order, s.movedim(1, -1)).contiguous()  # (batch, [G,] N or E, L)

    y, last = ssm.selective_scan_cpu(scan_copy(x["u"]), scan_copy(x["delta"]), x["A"], scan_copy(x["B"]),
                                     scan_copy(x["C"]), x["D"], scan_copy(x["z"]), x["delta_bias"], True,
                                     return_last_state=True)
    return from_scan(order, y).transpose(1, 2), last


def tokens(x, order):
    return ssm.selective_scan_tokens(**x, delta_softplus=True, **kernel_order(order), return_last_state=True)


def run(fn, x, order, groups=1, z=True, seed=1):
    """Outputs, last state and the gradients of every leaf of a random projection of both."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in x.items()}
    y, last = fn(views(leaves, groups, z), order)
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


def at_thread_counts(fn):
    """``fn()`` at 1, 2, 3 and 4 threads: {threads: result}."""
    threads = torch.get_num_threads()
    try:
        results = {}
        for n in (1, 2, 3, 4):
            torch.set_num_threads(n)
            results[n] = fn()
        return results
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("order", ORDERS, ids=order_id)
def test_order_positions_are_the_models_orders(order):
    expected = torch.arange(GRID * GRID) if order is None else order.perm
    assert torch.equal(ssm.order_positions(length=length(order), **kernel_order(order)), expected)


def test_order_positions_name_the_snakes_and_refuse_a_wrong_grid():
    assert torch.equal(ssm.order_positions(5, GRID, GRID * GRID), snake_order(GRID, 5))
    x = views(make_inputs(PREFIX + GRID * GRID), 1)
    with pytest.raises(ValueError, match="prefix"):
        ssm.selective_scan_tokens(**x, order=ssm.COLUMNS, grid=GRID)  # the prefix left out: 85 tokens, not 81
    with pytest.raises(ValueError, match="order"):
        ssm.causal_conv1d_tokens(x["u"], torch.ones(24, 3), order=8, grid=GRID, prefix=PREFIX)


@pytest.mark.parametrize("order", ORDERS, ids=order_id)
@pytest.mark.parametrize("groups,state,z", [(1, 16, True), (2, 16, False), (1, 5, True)], ids=["N16", "G2-noz", "N5"])
def test_token_scan_is_bit_identical_to_the_permuted_path(order, groups, state, z):
    x = make_inputs(length(order), groups=groups, state=state)
    assert_same(run(tokens, x, order, groups, z), run(reference, x, order, groups, z))


@pytest.mark.parametrize("order", THREAD_ORDERS, ids=order_id)
def test_token_scan_is_bit_identical_at_any_thread_count(order):
    x = make_inputs(length(order), seed=7, **THREADS_SHAPE)
    results = at_thread_counts(lambda: run(tokens, x, order, THREADS_SHAPE["groups"]))
    for n in results:
        assert_same(results[n], results[1])
    assert_same(results[1], run(reference, x, order, THREADS_SHAPE["groups"]))


def test_kernel_calls_from_two_python_threads_at_once_keep_their_own_work_buffers():
    """The kernels' scratch, position tables and partial sums are kept between calls per Python thread: two threads
    scanning different orders and shapes at once (the GIL is released in the kernel) get what each gets alone."""
    import threading

    jobs = [(ScanOrder(GRID, 3), make_inputs(length(ScanOrder(GRID, 3)), seed=3, **THREADS_SHAPE)),
            (Sweep(PREFIX, GRID, reverse=True), make_inputs(length(Sweep(PREFIX, GRID)), seed=4, dim=40))]
    groups = [THREADS_SHAPE["groups"], 1]
    alone = [run(tokens, x, order, g) for (order, x), g in zip(jobs, groups)]
    together = [[] for _ in jobs]

    def work(i):
        for _ in range(5):
            together[i].append(run(tokens, jobs[i][1], jobs[i][0], groups[i]))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, results in enumerate(together):
        assert len(results) == 5
        for result in results:
            assert_same(result, alone[i])
    addresses = {ssm._work_buffer("scratch", 1)}
    other = threading.Thread(target=lambda: addresses.add(ssm._work_buffer("scratch", 1)))
    other.start()
    other.join()
    assert len(addresses) == 2 and all(a % ssm.WORK_ALIGN == 0 for a in addresses)


@pytest.mark.parametrize("order", [ScanOrder(GRID), ScanOrder(GRID, 6), Sweep(PREFIX, GRID, columns=True)],
                         ids=order_id)
def test_other_backends_take_the_permuted_path(monkeypatch, order):
    """Where the C kernel does not run (here the torch backend), the same result within mamba-ssm's tolerance."""
    x = make_inputs(length(order), groups=2)
    expected = run(tokens, x, order, 2)
    monkeypatch.setenv(ssm.BACKEND_ENV, "torch")
    got = run(tokens, x, order, 2)
    torch.testing.assert_close(got[0], expected[0], rtol=6e-4, atol=2e-3)
    for name in expected[2]:
        torch.testing.assert_close(got[2][name], expected[2][name], rtol=6e-4, atol=2e-3)


# --- delta made in the kernel from the low-rank dt (delta_proj_weight, as mamba_inner_fn takes it) ---

def low_rank_run(x, order, groups, fused, seed=1):
    """``run`` with dt, the first RANK columns of proj, and dt_proj's weight (E, RANK) as leaves in place of delta:
    the scan given dt and the weight (``fused``), or the delta the product of the two makes, as the models made it."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in x.items() if k != "delta"}
    args = views({**leaves, "delta": x["delta"]}, groups)
    dt = leaves["proj"][..., :RANK]  # a strided view, as x_proj's output is
    if fused:
        args.update(delta=dt, delta_proj_weight=leaves["weight"])
    else:
        args["delta"] = torch.nn.functional.linear(dt, leaves["weight"])
    y, last = ssm.selective_scan_tokens(**args, delta_softplus=True, **kernel_order(order), return_last_state=True)
    g = torch.Generator().manual_seed(seed)
    ((y * torch.randn(y.shape, generator=g)).sum() + (last * torch.randn(last.shape, generator=g)).sum()).backward()
    return y, last, {k: v.grad for k, v in leaves.items()}


def low_rank_inputs(order, seed=5, **shape):
    x = make_inputs(length(order), seed=seed, **shape)
    x["weight"] = torch.randn(x["delta"].shape[-1], RANK, generator=torch.Generator().manual_seed(seed + 1)) * 0.5
    return x


def product_is_a_chain(x):
    """True when aten's product of dt and the weight sums its RANK terms as one chain of fused multiply-adds from
    k = 0, the kernel's order (each step's exact product and sum in fp64, rounded once to fp32): then the bits agree."""
    dt, weight = x["proj"][..., :RANK], x["weight"]
    chain = torch.zeros(*dt.shape[:-1], weight.shape[0])
    for k in range(RANK):
        chain = (dt[..., k, None].double() * weight[:, k].double() + chain.double()).float()
    return torch.equal(torch.nn.functional.linear(dt, weight), chain)


@pytest.mark.parametrize("order", [None, ScanOrder(GRID, 5), Sweep(PREFIX, GRID, columns=True, reverse=True)],
                         ids=order_id)
@pytest.mark.parametrize("groups", [1, 2])
def test_delta_made_in_the_kernel_is_the_product_it_replaces(order, groups):
    """Output, last state and the gradients of every leaf (dt's projection and the weight included) the same as
    with delta made by F.linear first, bit for bit where aten sums the product as the kernel does (MKL does), else
    within mamba-ssm's tolerances; and the same bits at 1 to 4 threads."""
    x = low_rank_inputs(order, groups=groups)
    fused = at_thread_counts(lambda: low_rank_run(x, order, groups, fused=True))
    for n in fused:
        assert_same(fused[n], fused[1])
    expected = low_rank_run(x, order, groups, fused=False)
    if product_is_a_chain(x):
        assert_same(fused[1], expected)
    else:
        for got, want in zip((*fused[1][:2], *fused[1][2].values()), (*expected[:2], *expected[2].values())):
            torch.testing.assert_close(got, want, rtol=6e-4, atol=2e-3)


def test_delta_made_from_dt_refuses_a_weight_of_another_shape():
    x = low_rank_inputs(None)
    args = views(x, 1)
    args.update(delta=x["proj"][..., :RANK], delta_proj_weight=x["weight"][:, :2])
    with pytest.raises(ValueError, match="delta_proj_weight"):
        ssm.selective_scan_tokens(**args)


# --- the causal conv along a scan order on the token layout ---

def conv_inputs(order, batch=2, dim=40, seed=0):
    """Leaves: one (batch, L, 2E) projection whose first half is the conv's input (a strided view, as the models'
    u can be), weight (E, W) and bias (E,); W is DiM's d_conv (3) for its orders, SISMA's (4) for the others."""
    g = torch.Generator().manual_seed(seed)
    width = 3 if isinstance(order, Sweep) else 4
    return {"xz": torch.randn(batch, length(order), 2 * dim, generator=g),
            "weight": torch.randn(dim, width, generator=g) * 0.5, "bias": torch.randn(dim, generator=g) * 0.1}


def conv_tokens(x, weight, bias, order):
    return ssm.causal_conv1d_tokens(x, weight, bias, **kernel_order(order))


def conv_reference(x, weight, bias, order):
    """The earlier path: a channel-major copy in scan order through ``causal_conv1d``, and back."""
    y = ssm.causal_conv1d(to_scan(order, x.transpose(1, 2)).contiguous(), weight, bias, activation="silu")
    return from_scan(order, y).transpose(1, 2)


def conv_run(fn, c, order, bias=True, seed=1):
    """The conv's output and the gradients of its leaves for a random projection of it."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in c.items()}
    x = leaves["xz"][..., :leaves["weight"].shape[0]]
    y = fn(x, leaves["weight"], leaves["bias"] if bias else None, order)
    (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(seed))).sum().backward()
    return y, {k: v.grad for k, v in leaves.items() if v.grad is not None}


def assert_conv_same_at_thread_counts(results):
    """``conv_run`` results at several thread counts: output and every gradient the same bits as at one thread."""
    for n in results:
        assert torch.equal(results[n][0], results[1][0]), f"forward differs at {n} threads"
        for name in results[1][1]:
            assert torch.equal(results[n][1][name], results[1][1][name]), f"d{name} differs at {n} threads"


@pytest.mark.parametrize("order", ORDERS, ids=order_id)
def test_token_conv_gives_the_permuted_causal_conv(order):
    """The same values up to fp32 rounding: the kernel's sums and SiLU round as C rounds them, not as aten's conv."""
    c = conv_inputs(order)
    for bias in (True, False):
        (y, grads), (y_ref, grads_ref) = (conv_run(fn, c, order, bias) for fn in (conv_tokens, conv_reference))
        assert y.is_contiguous() and y.shape == y_ref.shape
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
        assert grads.keys() == grads_ref.keys()
        for name in grads_ref:
            torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("order", THREAD_ORDERS, ids=order_id)
def test_token_conv_is_bit_identical_at_any_thread_count(order):
    c = conv_inputs(order, batch=THREADS_SHAPE["batch"], dim=THREADS_SHAPE["dim"], seed=7)
    assert_conv_same_at_thread_counts(at_thread_counts(lambda: conv_run(conv_tokens, c, order)))


def test_token_conv_elsewhere_takes_the_permuted_path(monkeypatch):
    order = Sweep(PREFIX, GRID, columns=True, reverse=True)
    c = conv_inputs(order)
    expected = conv_run(conv_tokens, c, order)
    monkeypatch.setenv(ssm.BACKEND_ENV, "torch")
    assert not ssm.token_kernels_run(c["xz"])
    got = conv_run(conv_tokens, c, order)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-6)
    for name in expected[1]:
        torch.testing.assert_close(got[1][name], expected[1][name], rtol=1e-5, atol=1e-5)


def grid_conv_inputs(batch=2, grid=GRID, dim=40, seed=0):
    """Leaves: one (batch, L, 2E) projection whose first half is the conv's input (a strided view, as SISMA's u is),
    the depthwise weight (E, 1, 3, 3) and bias (E,)."""
    g = torch.Generator().manual_seed(seed)
    return {"xz": torch.randn(batch, grid * grid, 2 * dim, generator=g),
            "weight": torch.randn(dim, 1, 3, 3, generator=g) * 0.5, "bias": torch.randn(dim, generator=g) * 0.1}


def grid_conv_tokens(x, weight, bias, grid):
    return ssm.grid_conv2d_tokens(x, weight, bias, grid)


def grid_conv_reference(x, weight, bias, grid):
    """The earlier path: aten's depthwise conv on the channels-last view of a contiguous copy, then SiLU."""
    batch, length, dim = x.shape
    planes = x.contiguous().view(batch, grid, grid, dim).permute(0, 3, 1, 2)
    y = torch.nn.functional.conv2d(planes, weight, bias, padding=1, groups=dim)
    return torch.nn.functional.silu(y).permute(0, 2, 3, 1).reshape(batch, length, dim)


def grid_conv_run(fn, c, grid, bias=True, seed=1):
    return conv_run(lambda x, w, b, _order: fn(x, w, b, grid), c, None, bias, seed)


@pytest.mark.parametrize("grid,dim", [(GRID, 40), (16, 256), (1, 3)], ids=["g9-E40", "g16-E256", "g1-E3"])
def test_grid_conv_gives_aten_conv(grid, dim):
    """The same values up to fp32 rounding (the kernel sums the bias and taps in its own order, with its own SiLU),
    forward and every gradient, with and without a bias, on a strided view with a partial channel tile."""
    c = grid_conv_inputs(grid=grid, dim=dim)
    for bias in (True, False):
        (y, grads), (y_ref, grads_ref) = (grid_conv_run(fn, c, grid, bias) for fn in (
            grid_conv_tokens, grid_conv_reference))
        assert y.is_contiguous() and y.shape == y_ref.shape
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
        assert grads.keys() == grads_ref.keys()
        for name in grads_ref:
            torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-4, atol=1e-5, msg=name)


def test_grid_conv_is_bit_identical_at_any_thread_count():
    c = grid_conv_inputs(batch=THREADS_SHAPE["batch"], dim=THREADS_SHAPE["dim"], seed=7)
    assert_conv_same_at_thread_counts(at_thread_counts(lambda: grid_conv_run(grid_conv_tokens, c, GRID)))


def test_grid_conv_elsewhere_takes_aten_conv(monkeypatch):
    c = grid_conv_inputs()
    monkeypatch.setenv(ssm.BACKEND_ENV, "torch")
    assert not ssm.token_kernels_run(c["xz"])
    got, expected = (grid_conv_run(fn, c, GRID) for fn in (grid_conv_tokens, grid_conv_reference))
    assert torch.equal(got[0], expected[0])
    for name in expected[1]:
        assert torch.equal(got[1][name], expected[1][name]), name


def test_grid_conv_refuses_a_shape_that_is_not_its_grid():
    c = grid_conv_inputs()
    with pytest.raises(ValueError, match="expected x"):
        ssm.grid_conv2d_tokens(c["xz"][..., :40], c["weight"], c["bias"], GRID + 1)
    with pytest.raises(ValueError, match="weight"):
        ssm.grid_conv2d_tokens(c["xz"][..., :40], c["weight"][:, :, :2], c["bias"], GRID)


# --- the Mamba layers on the token layout against their earlier channel-major computation ---

# operators that copy data into another layout; none may run in a Mamba layer's forward on the CPU kernels
LAYOUT_COPIES = frozenset({"copy_", "clone", "_to_copy", "contiguous", "cat", "stack", "flip", "index", "index_select",
                           "gather", "take", "constant_pad_nd"})


class _Operators(TorchDispatchMode):
    """Records the name of every aten operator dispatched while active."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def layout_copies(fn) -> list[str]:
    """The layout-copying operators ``fn()`` runs, without grad."""
    with torch.no_grad(), _Operators() as ops:
        fn()
    return [name for name in ops.names if name in LAYOUT_COPIES]


def channel_major_mix(layer, x, m):
    """The layers' earlier computation: channel-major streams, each order's copies through SelectiveSSM.forward."""
    w_u, w_z = layer.in_proj.weight.chunk(2, dim=0)
    xt = x.transpose(1, 2)
    ms = layer.mask_proj.weight @ m.transpose(1, 2) if layer.cross else None
    y = layer.ssm(w_u @ xt, w_z @ xt, ms, layer.orders)
    return (layer.out_proj.weight @ y).transpose(1, 2)


def channel_major_forward_tokens(self, u, z, m, orders):
    """``SelectiveSSM.forward_tokens`` as it was for the causal conv: ``forward`` on channel-major copies in each
    order (patched in to run a whole model the earlier way)."""
    y = self.forward(u.transpose(1, 2), z.transpose(1, 2), None if m is None else m.transpose(1, 2), orders)
    return y.transpose(1, 2)


def output_and_grads(module, fn):
    """``fn()``'s output and the gradient of every parameter of ``module`` for a fixed projection of it."""
    module.zero_grad()
    y = fn()
    (y * torch.linspace(-1, 1, y.numel()).view(y.shape)).sum().backward()
    return y.detach(), {k: p.grad.clone() for k, p in module.named_parameters() if p.grad is not None}


def assert_close_results(got, expected, rtol, atol, grad_rtol, grad_atol):
    torch.testing.assert_close(got[0], expected[0], rtol=rtol, atol=atol)
    assert got[1].keys() == expected[1].keys()
    for name in expected[1]:
        torch.testing.assert_close(got[1][name], expected[1][name], rtol=grad_rtol, atol=grad_atol, msg=name)


def channel_major_model_pass(model, inputs, monkeypatch):
    """``output_and_grads`` of a model the earlier way: every causal-conv Mamba layer on channel-major copies."""
    with monkeypatch.context() as patch:
        patch.setattr(SelectiveSSM, "forward_tokens", channel_major_forward_tokens)
        return output_and_grads(model, lambda: model(*inputs))


@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
@pytest.mark.parametrize("scan,block", [("raster", 0), ("bidirectional", 0), ("zigzag", 1), ("zigzag", 6)])
@pytest.mark.parametrize("conv", ["grid2d", "causal1d"])
def test_mamba_layers_compute_what_the_channel_major_path_did(cross, scan, block, conv):
    """Same outputs and parameter gradients up to fp32 rounding: the products now run on the token layout and the
    causal conv in the C kernel, so the sums' order and rounding, not the arithmetic, may differ; no layout copy."""
    from models.mamba import CrossMamba, SelfMamba, scan_orders

    torch.manual_seed(0)
    cls = CrossMamba if cross else SelfMamba
    layer = cls(32, orders=scan_orders(scan, 8, block), conv=conv, grid=8, d_state=16)
    g = torch.Generator().manual_seed(1)
    x, m = torch.randn(2, 64, 32, generator=g), torch.randn(2, 64, 32, generator=g)
    results = [output_and_grads(layer, fn) for fn in (
        lambda: layer.mix(x, m if cross else None), lambda: channel_major_mix(layer, x, m))]
    assert_close_results(*results, rtol=1e-5, atol=1e-6, grad_rtol=1e-4, grad_atol=1e-5)
    assert layout_copies(lambda: layer.mix(x, m if cross else None)) == []


@pytest.mark.parametrize("scan", ["raster", "bidirectional", "zigzag"])
def test_sisma_with_the_causal_conv_computes_what_the_channel_major_path_did(monkeypatch, scan):
    """The whole model, forward and every parameter's gradient, within fp32 rounding of the earlier path."""
    import models

    torch.manual_seed(0)
    model = models.create_model("sisma", preset="tiny", scan=scan, conv="causal1d")
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(2, *model.input_shape, generator=g), torch.rand(2, generator=g)
    labels = torch.randint(0, model.num_classes, (2, model.image_size, model.image_size), generator=g)
    mask = torch.nn.functional.one_hot(labels, model.num_classes).permute(0, 3, 1, 2).float()
    expected = channel_major_model_pass(model, (x, t, mask), monkeypatch)
    got = output_and_grads(model, lambda: model(x, t, mask))
    assert_close_results(got, expected, rtol=1e-5, atol=1e-5, grad_rtol=1e-4, grad_atol=1e-5)


@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
@pytest.mark.parametrize("scan", ["raster", "bidirectional", "zigzag"])
def test_the_causal_conv_layers_under_bf16_autocast_are_as_close_to_fp32_as_the_channel_major_path(
        monkeypatch, cross, scan):
    """bf16 rounds the token layout's products and the channel-major ones differently, so the two paths differ by
    bf16 noise; the token path (whose conv runs in fp32 in the C kernel) stays as close to the fp32 output."""
    from models.mamba import CrossMamba, SelfMamba, scan_orders

    torch.manual_seed(0)
    layer = (CrossMamba if cross else SelfMamba)(32, orders=scan_orders(scan, 8, 1), conv="causal1d", d_state=16)
    g = torch.Generator().manual_seed(1)
    x, m = torch.randn(2, 64, 32, generator=g), torch.randn(2, 64, 32, generator=g) if cross else None
    with torch.no_grad():
        exact = layer.mix(x, m)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            token = layer.mix(x, m)
            monkeypatch.setattr(SelectiveSSM, "forward_tokens", channel_major_forward_tokens)
            channel_major = layer.mix(x, m)
    assert token.dtype == channel_major.dtype == torch.bfloat16
    error = {name: ((y.float() - exact).norm() / exact.norm()).item() for name, y in (
        ("token", token), ("channel_major", channel_major))}
    assert error["token"] < 1.25 * error["channel_major"], error


@pytest.mark.parametrize("conv", ["causal1d", "grid2d"])
def test_on_fake_cpu_tensors_the_token_path_saves_what_it_saves_on_real_ones(conv):
    """``bench plan``'s CPU check: fake CPU tensors take the token kernels' autograd Functions, which compute nothing
    but save the same bytes as on real tensors."""
    from bench import memsim
    from models.mamba import CrossMamba

    def saved_bytes(fake):
        with memsim.fake_device("cpu") if fake else contextlib.nullcontext():
            torch.manual_seed(0)
            layer = CrossMamba(32, orders=[Sweep(0, 8, columns=True)], conv=conv, grid=8, d_state=16)
            x, m = torch.randn(2, 64, 32, requires_grad=True), torch.randn(2, 64, 32)
            saved = memsim.SavedTensors(exclude=list(layer.parameters()))
            with saved:
                y = layer.mix(x, m)
            assert y.shape == x.shape and memsim.is_fake(y) == fake
            return saved.bytes

    ssm.reset_used_backends()
    real = saved_bytes(False)
    assert ssm.used_backends() == {"cpu"}
    assert saved_bytes(True) == real and "fake" in ssm.used_backends()
