"""Selective-scan speed: the C kernel and the pure-PyTorch fallback against the reference loop.

Run with ``pytest --benchmark-enable tests/test_bench_ssm.py``; each group holds one shape and one
pass (forward, or forward plus backward) for every implementation, so the table's ratios read as
speedups over ``ref``. The ``kernel threads`` groups time the C kernel on one thread and on all of
torch's threads (its results are the same bits on both; the ratio is its parallel speedup). The
``exp-bound`` group times exponentials alone, single-threaded, for the bound the kernel is measured
against (extra_info ``exponentials`` / median = exponentials per second).

Each benchmark checks what it timed (pytest-benchmark hands back the last call's result): the scan's output against
the float64 reference loop and its gradients' shapes and finiteness, the kernel's bits at one thread against all
threads, the exponentials' values. With --benchmark-disable (the default) each body runs once; the PyTorch and
reference loops then skip, as they take seconds and their accuracy is tests/test_ssm.py's.
"""
import pytest
import torch

from models import ssm

SHAPES = {"B1-D2048-L256-N16": (1, 2048, 256, 16), "B8-D256-L1024-N16": (8, 256, 1024, 16)}
IMPLEMENTATIONS = {"cpu": ssm.selective_scan_cpu, "torch": ssm.selective_scan_torch, "ref": ssm.selective_scan_ref}
ROUNDS = {"cpu": 50, "torch": 3, "ref": 3}  # the loops take seconds per call under autograd
WARMUP = {"cpu": 5, "torch": 1, "ref": 1}  # a few untimed calls wake the thread pool and warm the caches
EXP_BLOCK = 1 << 18  # floats per torch.exp call in the bound: 1 MiB, resident in cache


RTOL, ATOL = 6e-4, 2e-3  # tests/test_ssm.py's fp32 tolerance (mamba-ssm's own)


def scan_inputs(batch, dim, length, state, requires_grad):
    """Inputs at Mamba's magnitudes with every option on (D, z, delta_bias, softplus)."""
    g = torch.Generator().manual_seed(0)
    x = {
        "u": torch.randn(batch, dim, length, generator=g),
        "delta": torch.randn(batch, dim, length, generator=g) * 0.5 - 2.0,
        "A": -torch.arange(1, state + 1, dtype=torch.float32).repeat(dim, 1),
        "B": torch.randn(batch, state, length, generator=g),
        "C": torch.randn(batch, state, length, generator=g),
        "D": torch.ones(dim),
        "z": torch.randn(batch, dim, length, generator=g),
        "delta_bias": torch.randn(dim, generator=g) * 0.1,
    }
    for v in x.values():
        v.requires_grad_(requires_grad)
    return x


def check_timed(result, x, mode):
    """The timed call's result: the forward against the float64 reference loop, or one finite gradient per input."""
    if mode == "fwd":
        with torch.no_grad():
            expect = ssm.selective_scan_ref(**{k: v.double() for k, v in x.items()}, delta_softplus=True)
        torch.testing.assert_close(result.double(), expect, rtol=RTOL, atol=ATOL)
        return
    assert len(result) == len(x)
    for (name, v), g in zip(x.items(), result):
        assert g.shape == v.shape and torch.isfinite(g).all(), name


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_scan_speed(benchmark, mode, shape, impl):
    if benchmark.disabled and impl != "cpu":
        pytest.skip("the loops take seconds per call: timed and checked with --benchmark-enable")
    fn = IMPLEMENTATIONS[impl]
    x = scan_inputs(*SHAPES[shape], requires_grad=mode == "fwd+bwd")
    grad_out = torch.randn(SHAPES[shape][:3])
    benchmark.group = f"scan {mode} {shape}"
    benchmark.extra_info["threads"] = torch.get_num_threads()

    def forward():
        with torch.no_grad():
            return fn(**x, delta_softplus=True)

    def forward_backward():
        return torch.autograd.grad(fn(**x, delta_softplus=True), list(x.values()), grad_out)

    result = benchmark.pedantic(forward if mode == "fwd" else forward_backward,
                                rounds=ROUNDS[impl], iterations=1, warmup_rounds=WARMUP[impl])
    check_timed(result, x, mode)


@pytest.mark.parametrize("threads", ["1", "all"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_kernel_thread_scaling(benchmark, mode, shape, threads):
    """The C kernel on one thread against all threads, forward or forward plus backward: the same bits on both."""
    x = scan_inputs(*SHAPES[shape], requires_grad=mode == "fwd+bwd")
    grad_out = torch.randn(SHAPES[shape][:3])
    previous = torch.get_num_threads()
    n = 1 if threads == "1" else previous
    benchmark.group = f"kernel threads {mode} {shape}"
    benchmark.extra_info["threads"] = n

    def call():
        if mode == "fwd":
            with torch.no_grad():
                return ssm.selective_scan_cpu(**x, delta_softplus=True)
        return torch.autograd.grad(ssm.selective_scan_cpu(**x, delta_softplus=True), list(x.values()), grad_out)

    torch.set_num_threads(previous if n == 1 else 1)  # the other thread count, untimed
    try:
        other = call()
        torch.set_num_threads(n)
        result = benchmark.pedantic(call, rounds=ROUNDS["cpu"], iterations=1, warmup_rounds=WARMUP["cpu"])
    finally:
        torch.set_num_threads(previous)
    if mode == "fwd":
        result, other = (result,), (other,)
    assert len(result) == len(other) and all(torch.equal(a, b) for a, b in zip(result, other))


@pytest.mark.parametrize("what", ["torch.exp", "cpu-kernel-fwd"])
def test_exponential_rate_bound(benchmark, what):
    """Single-threaded: torch.exp on cached blocks vs the kernel's forward (one exponential per state step)."""
    batch, dim, length, state = SHAPES["B1-D2048-L256-N16"]
    exponentials = batch * dim * length * state
    benchmark.group = "exp-bound"
    benchmark.extra_info["exponentials"] = exponentials
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if what == "torch.exp":
            src, dst = -torch.rand(EXP_BLOCK) * 5, torch.empty(EXP_BLOCK)

            def run():
                for _ in range(exponentials // EXP_BLOCK):
                    torch.exp(src, out=dst)
                return dst
        else:
            x = scan_inputs(batch, dim, length, state, requires_grad=False)

            def run():
                return ssm.selective_scan_cpu(**x, delta_softplus=True)
        result = benchmark.pedantic(run, rounds=10, iterations=1, warmup_rounds=1)
    finally:
        torch.set_num_threads(threads)
    # the bound itself is read from the timings' table; what is checked is the values that were timed
    if what == "torch.exp":
        torch.testing.assert_close(result, src.exp())
    else:
        check_timed(result, x, "fwd")
