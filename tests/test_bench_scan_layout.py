"""Benchmark (issue 23): the causal-conv Mamba layers on the token layout (the C kernel's causal conv and scan walking
each order) against the earlier path (channel-major copies in each order), for DiM (its four sweeps) and SISMA with
conv=causal1d at the ``cpu`` preset; one NFE at batch 1 and one training step at batch 8, and the NFE's profile.

Disabled by default (pyproject: --benchmark-disable, so the NFE bodies run once as smoke tests and the training steps
are skipped); measure with
    OMP_NUM_THREADS=1 pytest --benchmark-enable tests/test_bench_scan_layout.py
(and again with OMP_NUM_THREADS=2). Both paths run on the same model and inputs, one after the other in each round,
so a busy moment of a shared machine falls on both; the table's time is the pair's. extra_info holds each path's
best round (ms), their ratio new / old read from the best rounds, and the thread count; the profile group holds the
shares of ``bench.breakdown.op_breakdown`` at one thread, and ``share_named_layout`` (the self time of the
operators in NAMED_LAYOUT_OPS, whatever their class). Nothing is asserted about the times: they depend on the
machine. The earlier path is ``SelectiveSSM.forward_tokens`` patched as it was (tests/test_scan_tokens.py).
"""
from __future__ import annotations

import contextlib
import functools
import time
from unittest import mock

import pytest
import torch
from test_scan_tokens import channel_major_forward_tokens

import models
from bench.breakdown import op_breakdown
from bench.flops import example_inputs
from models.mamba import SelectiveSSM

PRESET = "cpu"
MODELS = {"dim": ("dim", {}), "sisma-causal1d": ("sisma", {"conv": "causal1d"})}
PATHS = ("old", "new")
BATCH = {"nfe": 1, "train": 8}
ROUNDS = {"nfe": 30, "train": 6}
# the layout operators issue 23 names: copies, flips, permutes and transposes, gathers
NAMED_LAYOUT_OPS = frozenset({"aten::copy_", "aten::clone", "aten::contiguous", "aten::flip", "aten::permute",
                              "aten::transpose", "aten::index", "aten::index_select", "aten::gather"})


def path(name: str):
    """A context in which the Mamba layers take the ``name`` path: "old" (channel-major copies) or "new"."""
    if name == "old":
        return mock.patch.object(SelectiveSSM, "forward_tokens", channel_major_forward_tokens)
    return contextlib.nullcontext()


def make_passes(model_key: str, kind: str):
    """{path: zero-argument call of one NFE (no grad) or one training step (forward, MSE backward, AdamW step)} on
    one model and one set of inputs."""
    name, overrides = MODELS[model_key]
    torch.manual_seed(0)
    model = models.create_model(name, preset=PRESET, **overrides)
    x, t, mask = example_inputs(model, BATCH[kind], "cpu", generator=torch.Generator().manual_seed(0))
    if kind == "nfe":
        model.eval()

        def nfe(path_name):
            with path(path_name), torch.no_grad():
                model(x, t, mask)

        return {p: functools.partial(nfe, p) for p in PATHS}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    target = torch.randn_like(x)

    def step(path_name):
        with path(path_name):
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.mse_loss(model(x, t, mask), target).backward()
            opt.step()

    return {p: functools.partial(step, p) for p in PATHS}


@pytest.mark.benchmark(group="scan-layout")
@pytest.mark.parametrize("kind", ["nfe", "train"])
@pytest.mark.parametrize("model_key", list(MODELS))
def test_old_and_new_path_interleaved(benchmark, model_key, kind):
    if benchmark.disabled and kind == "train":
        pytest.skip("a training step of each path takes seconds and only matters as a timing: --benchmark-enable")
    passes = make_passes(model_key, kind)
    for fn in passes.values():  # untimed: the thread pool, the allocator and the kernel's build
        fn()
    best = dict.fromkeys(PATHS, float("inf"))

    def pair():
        for name, fn in passes.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)

    benchmark.pedantic(pair, rounds=ROUNDS[kind], iterations=1)
    benchmark.extra_info.update({f"{name}_ms": round(best[name] * 1e3, 2) for name in PATHS})
    benchmark.extra_info["threads"] = torch.get_num_threads()
    benchmark.extra_info["ratio_new_old"] = round(best["new"] / best["old"], 3)


@pytest.mark.benchmark(group="scan-layout-profile")
@pytest.mark.usefixtures("one_thread")  # fixture in conftest.py
@pytest.mark.parametrize("path_name", PATHS)
@pytest.mark.parametrize("model_key", list(MODELS))
def test_nfe_profile_shares(benchmark, model_key, path_name):
    """Operator self time of one NFE at batch 1 on one thread by class, and the named layout operators' share."""
    fn = make_passes(model_key, "nfe")[path_name]
    fn()
    result = {}

    def profiled():
        result["breakdown"] = op_breakdown(fn, torch.device("cpu"))

    benchmark.pedantic(profiled, rounds=1, iterations=1)
    breakdown = result["breakdown"]
    columns = breakdown.columns()
    named = sum(s for (op, _cls), s in breakdown.ops.items() if op in NAMED_LAYOUT_OPS)
    benchmark.extra_info.update(columns)
    benchmark.extra_info["share_named_layout"] = round(named / breakdown.total_s, 4)
    assert abs(sum(v for k, v in columns.items() if k.startswith("share_")) - 1) < 1e-3
