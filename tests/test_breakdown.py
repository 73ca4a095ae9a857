"""Where an NFE's time goes: the operator classes of profiler events, the profiled shares of a small module and of the
backbones (the selective scan seen through its profiler range), and the breakdown figure."""
from __future__ import annotations

import contextlib

import pandas as pd
import pytest
import torch
import torch.nn as nn

import models
from bench import plots
from bench.breakdown import OP_CLASSES, classify, op_breakdown
from bench.flops import example_inputs
from models.ssm import CAUSAL_CONV_LABEL, FUSED_LABEL, GRID_CONV_LABEL, SCAN_LABEL

CPU = torch.device("cpu")
NAMES = {
    "matmul": ["aten::addmm", "aten::mm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear", "aten::mv",
               "aten::_addmm_activation", "aten::mkldnn_linear", "mkldnn::_linear_pointwise"],
    "attention": ["aten::scaled_dot_product_attention", "aten::_scaled_dot_product_flash_attention_for_cpu",
                  "aten::_scaled_dot_product_efficient_attention", "aten::_flash_attention_forward",
                  "aten::_scaled_dot_product_cudnn_attention", "aten::softmax", "aten::_safe_softmax"],
    "scan": [SCAN_LABEL, FUSED_LABEL, "_CpuScanBackward", "_CpuTokenScanBackward"],
    "conv": [CAUSAL_CONV_LABEL, GRID_CONV_LABEL, "aten::convolution", "aten::_convolution", "aten::conv1d",
             "aten::conv2d", "aten::mkldnn_convolution", "_CpuTokenConvBackward", "_CpuGridConvBackward",
             "aten::_slow_conv2d_forward", "aten::thnn_conv2d", "aten::_conv_depthwise2d", "aten::cudnn_convolution",
             "aten::slow_conv_dilated2d"],
    "norm_elementwise": ["aten::native_layer_norm", "aten::layer_norm", "aten::native_group_norm", "aten::rms_norm",
                         "aten::_native_batch_norm_legit_no_training", "aten::add", "aten::add_", "aten::mul_",
                         "aten::silu", "aten::gelu", "aten::softplus", "aten::exp", "aten::rsqrt", "aten::mean",
                         "aten::sum", "aten::where"],
    "layout": ["aten::copy_", "aten::contiguous", "aten::clone", "aten::_to_copy", "aten::permute", "aten::transpose",
               "aten::t", "aten::view", "aten::reshape", "aten::as_strided", "aten::expand", "aten::unsqueeze",
               "aten::select", "aten::slice", "aten::flip", "aten::cat", "aten::stack", "aten::roll", "aten::index",
               "aten::gather", "aten::constant_pad_nd", "aten::reflection_pad2d", "aten::unfold", "aten::im2col",
               "aten::upsample_nearest2d"],
    "other": ["aten::empty", "aten::empty_strided", "aten::zeros", "aten::full", "aten::fill_", "aten::avg_pool2d",
              "aten::normal_", "aten::_convert_indices_from_coo_to_csr", "cudaLaunchKernel", "_CpuScan",
              "a made-up op"],
}


@pytest.mark.parametrize("cls", NAMES)
def test_classify_puts_every_name_in_its_class(cls):
    assert {name: classify(name) for name in NAMES[cls]} == dict.fromkeys(NAMES[cls], cls)


def test_every_class_is_tested_and_has_a_plot_colour():
    assert tuple(NAMES) == OP_CLASSES == tuple(plots.OP_CLASS_COLOURS)


class LinearTransposeNorm(nn.Module):
    """A matmul, a layout copy and a normalisation: three classes of known operators."""

    def __init__(self, width: int = 64):
        super().__init__()
        self.linear, self.norm = nn.Linear(width, width), nn.LayerNorm(width)

    def forward(self, x):
        return self.norm(self.linear(x).transpose(0, 1).contiguous())  # (L, B, D): a copy


def warmed(module: nn.Module, *inputs):
    """A zero-argument call of ``module`` on ``inputs`` without gradients, called once already."""
    def call():
        with torch.no_grad():
            return module(*inputs)

    call()
    return call


def test_breakdown_of_a_small_module_has_its_classes_and_shares_summing_to_one(one_thread):
    b = op_breakdown(warmed(LinearTransposeNorm(), torch.randn(4, 16, 64)), CPU, calls=2)
    assert set(b.seconds) == set(b.counts) == set(OP_CLASSES)
    for cls in ("matmul", "layout", "norm_elementwise"):
        assert b.seconds[cls] > 0 and b.counts[cls] >= 1
    assert b.seconds["scan"] == b.seconds["attention"] == b.seconds["conv"] == 0
    assert b.total_s == pytest.approx(sum(b.seconds.values()))
    columns = b.columns()
    assert list(columns) == ["profile_nfe_ms"] + [f"share_{c}" for c in OP_CLASSES]
    assert columns["profile_nfe_ms"] == pytest.approx(b.total_s * 1e3)
    assert sum(columns[f"share_{c}"] for c in OP_CLASSES) == pytest.approx(1, abs=1e-3)
    assert all(round(columns[f"share_{c}"], 4) == columns[f"share_{c}"] for c in OP_CLASSES)
    top = b.top_ops(3)
    assert len(top) == 3 and [ms for *_, ms in top] == sorted((ms for *_, ms in top), reverse=True)
    assert {name for name, cls, _ in top} <= {name for name, _ in b.ops} and all(cls in OP_CLASSES for _, cls, _ in top)
    # one linear, one contiguous copy and one layer norm per call, whatever the number of profiled calls
    assert b.counts == op_breakdown(warmed(LinearTransposeNorm(), torch.randn(4, 16, 64)), CPU, calls=3).counts


def test_breakdown_refuses_no_calls():
    with pytest.raises(ValueError, match="at least 1"):
        op_breakdown(lambda: None, CPU, calls=0)


@pytest.mark.parametrize("name, has_scan", [("sisma", True), ("dit", False)])
def test_the_scan_shows_for_sisma_only(name, has_scan, one_thread):
    torch.manual_seed(0)
    model = models.create_model(name, preset="tiny").eval()
    b = op_breakdown(warmed(model, *example_inputs(model, 1, CPU)), CPU, calls=1)
    assert (b.seconds["scan"] > 0) == has_scan and (b.counts["scan"] > 0) == has_scan
    assert (b.seconds["attention"] > 0) == (not has_scan)
    assert ((GRID_CONV_LABEL, "conv") in b.ops) == has_scan  # SISMA's grid conv, in the C kernel, is seen as conv
    assert sum(b.columns()[f"share_{c}"] for c in OP_CLASSES) == pytest.approx(1, abs=1e-3)


def test_the_scan_range_opens_only_while_a_profiler_records(monkeypatch, one_thread):
    """Outside a profile the scan enters no range (it costs microseconds); inside one, the range holds everything the
    scan ran, here the elementwise operators of the pure-PyTorch scan."""
    from models.ssm import _profiler_range

    assert isinstance(_profiler_range(SCAN_LABEL), contextlib.nullcontext)
    torch.manual_seed(0)
    model = models.create_model("sisma", preset="tiny").eval()
    monkeypatch.setenv("SIS_BENCH_SCAN", "torch")
    b = op_breakdown(warmed(model, *example_inputs(model, 1, CPU)), CPU, calls=1)
    assert {name for (name, cls) in b.ops if cls == "scan"} > {SCAN_LABEL, "aten::exp", "aten::mul"}
    assert b.counts["scan"] > 10


def test_breakdown_figure_draws_a_panel_per_device():
    def table(scale):
        return pd.DataFrame({"model": ["sisma", "dit", "sdm"],
                             **{c: [scale * (i + 1), scale, 0.0] for i, c in enumerate(OP_CLASSES)}})

    fig = plots.breakdown_figure([("cpu, 1 thread", table(1.0)), ("NVIDIA H100, bf16", table(0.1))])
    assert len(fig.axes) == 2 and [ax.get_title() for ax in fig.axes] == ["cpu, 1 thread", "NVIDIA H100, bf16"]
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["SISMA", "DiT-SIS", "SDM"]
    assert len(fig.legends) == 1 and len(fig.legends[0].get_texts()) == len(OP_CLASSES)
    assert plots.breakdown_figure([]) is None
