"""Selective scan: every CPU backend against a float64 step-by-step reference, dispatch, fallbacks, counters."""
import itertools
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

from models import ssm
from models.ssm import causal_conv1d, count_scan_flops, scan_flops, selective_scan, selective_scan_ref

RTOL, ATOL = 6e-4, 2e-3  # mamba-ssm's own fp32 tolerance
CPU_BACKENDS = ["cpu", "torch"]
# length crosses the C kernel's 64-position blocks and the torch path's 16-position chunks
BATCH, DIM, LENGTH, STATE, GROUPS = 2, 6, 70, 16, 2
FLAGS = ("grouped", "D", "z", "delta_bias", "delta_softplus", "return_last_state")
COMBOS = list(itertools.product([False, True], repeat=len(FLAGS)))


def combo_id(combo):
    return "-".join(name for name, on in zip(FLAGS, combo) if on) or "plain"


def make_inputs(grouped=False, D=True, z=True, delta_bias=True, delta_softplus=True,
                batch=BATCH, dim=DIM, length=LENGTH, state=STATE, seed=0):
    """Random inputs with Mamba's magnitudes: S4D-real A = -(1..N), dt = softplus of small values."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    bc = (batch, GROUPS, state, length) if grouped else (batch, state, length)
    raw = rand(batch, dim, length) * 0.5 - 2.0
    x = {
        "u": rand(batch, dim, length),
        "delta": raw if delta_softplus else F.softplus(raw),  # positive either way
        "A": -torch.arange(1, state + 1, dtype=torch.float64).repeat(dim, 1) * (1 + 0.1 * rand(dim, state).abs()),
        "B": rand(*bc), "C": rand(*bc),
        "D": rand(dim) if D else None,
        "z": rand(batch, dim, length) if z else None,
        # Mamba's dt bias: inverse softplus of dt in [1e-3, 0.1] (tiny positive shifts without softplus)
        "delta_bias": (torch.expm1(torch.rand(dim, generator=g, dtype=torch.float64) * 0.1 + 1e-3).log()
                       if delta_softplus else 0.01 * torch.rand(dim, generator=g, dtype=torch.float64))
        if delta_bias else None,
    }
    return x


def run(fn, x, dtype, delta_softplus, return_last_state, seed=1):
    """Run fn on x cast to dtype; loss = random projection of y (and last state); return outputs and grads."""
    leaves = {k: (v.detach().to(dtype).requires_grad_() if v is not None else None) for k, v in x.items()}
    out = fn(**leaves, delta_softplus=delta_softplus, return_last_state=return_last_state)
    y, last = out if return_last_state else (out, None)
    g = torch.Generator().manual_seed(seed)
    loss = (y.double() * torch.randn(y.shape, generator=g, dtype=torch.float64)).sum()
    if last is not None:
        loss = loss + (last.double() * torch.randn(last.shape, generator=g, dtype=torch.float64)).sum()
    loss.backward()
    grads = {k: v.grad for k, v in leaves.items() if v is not None}
    return y, last, grads


@pytest.fixture
def backend(request, monkeypatch):
    """Force one implementation through the dispatcher, as SIS_BENCH_SCAN does."""
    monkeypatch.setenv(ssm.BACKEND_ENV, request.param)
    ssm.reset_used_backends()
    yield request.param
    assert ssm.used_backends() == {request.param}


@pytest.mark.parametrize("backend", CPU_BACKENDS, indirect=True)
@pytest.mark.parametrize("combo", COMBOS, ids=combo_id)
def test_matches_float64_reference(backend, combo):
    grouped, D, z, delta_bias, softplus, last_state = combo
    x = make_inputs(grouped, D, z, delta_bias, softplus)
    y_ref, last_ref, g_ref = run(selective_scan_ref, x, torch.float64, softplus, last_state)
    y, last, grads = run(selective_scan, x, torch.float32, softplus, last_state)
    assert y.dtype == torch.float32 and y.shape == (BATCH, DIM, LENGTH)
    torch.testing.assert_close(y.double(), y_ref, rtol=RTOL, atol=ATOL)
    if last_state:
        assert last.shape == (BATCH, DIM, STATE)
        torch.testing.assert_close(last.double(), last_ref, rtol=RTOL, atol=ATOL)
    assert grads.keys() == g_ref.keys()
    for name in grads:
        assert grads[name].shape == x[name].shape, name
        torch.testing.assert_close(grads[name].double(), g_ref[name], rtol=RTOL, atol=ATOL, msg=name)


@pytest.mark.parametrize("backend", CPU_BACKENDS, indirect=True)
def test_generic_state_size_and_odd_shapes(backend):
    """A state size other than 16 (the kernel's generic path), more groups, a short sequence."""
    x = make_inputs(grouped=True, batch=3, dim=8, length=5, state=5, seed=3)
    y_ref, last_ref, g_ref = run(selective_scan_ref, x, torch.float64, True, True)
    y, last, grads = run(selective_scan, x, torch.float32, True, True)
    torch.testing.assert_close(y.double(), y_ref, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(last.double(), last_ref, rtol=RTOL, atol=ATOL)
    for name in grads:
        torch.testing.assert_close(grads[name].double(), g_ref[name], rtol=RTOL, atol=ATOL, msg=name)


@pytest.mark.parametrize("backend", CPU_BACKENDS, indirect=True)
def test_gradient_through_last_state_only(backend):
    """Only the last state feeds the loss: the output's gradient is absent, the state's is not."""
    x = make_inputs(seed=4)
    grads = []
    for fn, dtype in ((selective_scan_ref, torch.float64), (selective_scan, torch.float32)):
        u = x["u"].detach().to(dtype).requires_grad_()
        _, last = fn(u, *(x[k].to(dtype) for k in ("delta", "A", "B", "C")),
                     delta_softplus=True, return_last_state=True)
        last.sum().backward()
        grads.append(u.grad.double())
    torch.testing.assert_close(grads[1], grads[0], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("backend", CPU_BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_give_half_outputs(backend, dtype):
    x = make_inputs(seed=5)
    y_ref = selective_scan_ref(**{k: v.to(dtype) for k, v in x.items()}, delta_softplus=True)
    y, last, grads = run(selective_scan, x, dtype, True, True)
    assert y.dtype == dtype and last.dtype == torch.float32  # fp32 state, as mamba-ssm
    assert all(g.dtype == dtype for g in grads.values())
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=2e-2, atol=2e-2)  # both round once to dtype


@pytest.mark.parametrize("backend", CPU_BACKENDS, indirect=True)
def test_keeps_no_batch_dim_length_state_tensor_for_backward(backend):
    """What autograd saves is far smaller than one (B, D, L, N) tensor (the reference saves L of them)."""
    x = make_inputs(seed=6)
    full = BATCH * DIM * LENGTH * STATE
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
        run(selective_scan, x, torch.float32, True, True)
    assert sizes and max(sizes) < full / 2


# 150 channels per group: the backward's channel blocks (16 channels, the last one 6) are several per thread at every
# thread count below, and so are the forward's rows; 70 positions x 16 states span several reduction tiles.
THREADS_SHAPE = dict(batch=3, dim=2 * 150, length=LENGTH)


@pytest.mark.parametrize("state", [STATE, 5], ids=["N16", "N5"])
def test_kernel_is_bit_identical_at_any_thread_count(monkeypatch, state):
    """Forward and backward give the same bits on 1, 2, 3 and 4 threads (no sum depends on the scheduling)."""
    monkeypatch.setenv(ssm.BACKEND_ENV, "cpu")
    x = make_inputs(grouped=True, state=state, seed=7, **THREADS_SHAPE)
    threads = torch.get_num_threads()
    results = {}
    try:
        for n in (1, 2, 3, 4):
            torch.set_num_threads(n)
            results[n] = run(selective_scan, x, torch.float32, True, True)
    finally:
        torch.set_num_threads(threads)
    y1, last1, g1 = results[1]
    for n, (y, last, grads) in results.items():
        assert torch.equal(y, y1) and torch.equal(last, last1), f"forward differs on {n} threads"
        for name in g1:
            assert torch.equal(grads[name], g1[name]), f"d{name} differs on {n} threads"


def test_kernel_with_many_channels_per_block_matches_reference(monkeypatch):
    """Several channel blocks per group, the last one short (the thread-count test's shape): the reference's values."""
    monkeypatch.setenv(ssm.BACKEND_ENV, "cpu")
    x = make_inputs(grouped=True, seed=16, **THREADS_SHAPE)
    y_ref, last_ref, g_ref = run(selective_scan_ref, x, torch.float64, True, True)
    y, last, grads = run(selective_scan, x, torch.float32, True, True)
    torch.testing.assert_close(y.double(), y_ref, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(last.double(), last_ref, rtol=RTOL, atol=ATOL)
    for name in grads:
        torch.testing.assert_close(grads[name].double(), g_ref[name], rtol=RTOL, atol=ATOL, msg=name)


def test_auto_picks_the_c_kernel_on_cpu_and_torch_for_float64(monkeypatch):
    monkeypatch.delenv(ssm.BACKEND_ENV, raising=False)
    x = make_inputs(seed=8)
    ssm.reset_used_backends()
    selective_scan(**{k: v.float() for k, v in x.items()}, delta_softplus=True)
    assert ssm.used_backends() == {"cpu"}
    ssm.reset_used_backends()
    selective_scan(**x, delta_softplus=True)
    assert ssm.used_backends() == {"torch"}


@pytest.mark.parametrize("compiler", ["missing", "failing"])
def test_warns_once_and_falls_back_when_the_kernel_cannot_be_built(compiler, monkeypatch, tmp_path):
    if compiler == "missing":
        monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    else:  # answers --version, fails every compile
        fake = tmp_path / "fake-cc"
        fake.write_text('#!/bin/sh\n[ "$1" = --version ] && echo fake-cc 1.0 && exit 0\n'
                        'echo "fake-cc: error" >&2\nexit 1\n')
        fake.chmod(0o755)
        monkeypatch.setenv("CC", str(fake))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(ssm.BACKEND_ENV, raising=False)
    monkeypatch.setattr(ssm, "_KERNEL", ssm._Kernel())
    x = {k: v.float() for k, v in make_inputs(seed=9).items()}
    ssm.reset_used_backends()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = selective_scan(**x, delta_softplus=True)
        selective_scan(**x, delta_softplus=True)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "pure-PyTorch" in messages[0] and "\n" not in messages[0]
    assert ssm.used_backends() == {"torch"}
    torch.testing.assert_close(y, selective_scan_ref(**x, delta_softplus=True), rtol=RTOL, atol=ATOL)
    monkeypatch.setenv(ssm.BACKEND_ENV, "cpu")  # forcing the unavailable kernel is an error, not a fallback
    with pytest.raises(RuntimeError, match="unavailable"):
        selective_scan(**x)


def test_kernel_is_compiled_once_into_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    paths = [ssm._compile_kernel(), ssm._compile_kernel()]
    assert paths[0] == paths[1] and paths[0].parent == tmp_path / "sis-bench"
    assert [p.name for p in (tmp_path / "sis-bench").iterdir()] == [paths[0].name]  # no temp files left


def test_kernel_built_without_openmp_matches_reference(monkeypatch, tmp_path):
    """The last-resort flags (no OpenMP, no -march=native) build a single-threaded kernel that still agrees."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(ssm, "KERNEL_FLAG_SETS", ssm.KERNEL_FLAG_SETS[-1:])
    monkeypatch.setattr(ssm, "_KERNEL", ssm._Kernel())
    x = make_inputs(grouped=True, seed=15)
    y_ref, last_ref, g_ref = run(selective_scan_ref, x, torch.float64, True, True)
    y, last, grads = run(ssm.selective_scan_cpu, x, torch.float32, True, True)
    torch.testing.assert_close(y.double(), y_ref, rtol=RTOL, atol=ATOL)
    for name in grads:
        torch.testing.assert_close(grads[name].double(), g_ref[name], rtol=RTOL, atol=ATOL, msg=name)


def test_forcing_cuda_on_a_cpu_machine_is_a_clear_error(monkeypatch):
    """SIS_BENCH_SCAN=cuda with CPU tensors raises (forcing means no silent substitute); auto never does."""
    monkeypatch.setenv(ssm.BACKEND_ENV, "cuda")
    x = {k: v.float() for k, v in make_inputs(delta_softplus=False, seed=10).items()}
    with pytest.raises(RuntimeError, match="SIS_BENCH_SCAN=cuda needs CUDA tensors and mamba-ssm"):
        selective_scan(**x)
    monkeypatch.setenv(ssm.BACKEND_ENV, "gpu")
    with pytest.raises(RuntimeError, match="not one of auto"):
        selective_scan(**x)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only machine")
def test_no_cuda_package_is_imported_without_cuda():
    x = {k: v.float() for k, v in make_inputs(delta_softplus=False, seed=11).items()}
    selective_scan(**x)
    causal_conv1d(x["u"], torch.randn(DIM, 4), None)
    assert "mamba_ssm" not in sys.modules and "causal_conv1d" not in sys.modules


def test_shape_errors_say_what_was_expected():
    x = {k: v.float() for k, v in make_inputs(delta_softplus=False, seed=12).items()}
    with pytest.raises(ValueError, match=r"expected B \(B, N, L\) or \(B, G, N, L\)"):
        selective_scan(**{**x, "B": x["B"][..., :-1]})
    with pytest.raises(ValueError, match="D % G == 0"):
        selective_scan(**{**x, "B": torch.randn(BATCH, 4, STATE, LENGTH)})


def test_flop_counter_and_scan_flops():
    assert scan_flops(2, 3, 5, 7) == 9 * 2 * 3 * 5 * 7
    x = {k: v.float() for k, v in make_inputs(delta_softplus=False, seed=13).items()}
    selective_scan(**x)  # outside: not counted
    with count_scan_flops() as counter:
        selective_scan(**x)
        selective_scan(**x)
    selective_scan(**x)
    assert counter.calls == 2 and counter.flops == 2 * scan_flops(BATCH, DIM, LENGTH, STATE)


@pytest.mark.parametrize("activation", [None, "silu"])
def test_causal_conv1d_matches_a_direct_sum(activation):
    g = torch.Generator().manual_seed(14)
    x, w, b = torch.randn(2, 3, 9, generator=g), torch.randn(3, 4, generator=g), torch.randn(3, generator=g)
    y = causal_conv1d(x, w, b, activation)
    expect = torch.zeros_like(x) + b[:, None]
    for t in range(9):
        for k in range(4):  # tap k looks back W - 1 - k positions; positions before 0 are zero
            if t - 3 + k >= 0:
                expect[..., t] += w[:, k] * x[..., t - 3 + k]
    torch.testing.assert_close(y, expect if activation is None else F.silu(expect))
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d(x, w, b, "relu")
