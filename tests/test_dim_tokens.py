"""DiM-SIS's sweeps on the token layout (issue 23): each block's causal conv and scan walk its order (rows or columns,
forward or reversed, or a snake, after the prefix) over the raster-ordered tokens, with no flip, transpose or gather.

Against the earlier path, which put the tokens in each block's order with transposes and flips and ran the
channel-major conv and kernel: the scan bit for bit at every block's order; each block's mixer and the whole model
(forward and every parameter's gradient) within fp32 rounding, since the projections now multiply on the token layout
and the causal conv rounds as the C kernel does.
"""
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from test_scan_tokens import (
    assert_close_results,
    assert_same,
    channel_major_mix,
    channel_major_model_pass,
    layout_copies,
    make_inputs,
    output_and_grads,
    reference,
    run,
    tokens,
)

import models
from models.dim import Sweep

pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest.py
VARIANTS = {"sweep": {}, "zigzag": {"scan": "zigzag"}, "pad0": {"pad": 0}}


def tiny(**overrides):
    torch.manual_seed(0)
    return models.create_model("dim", preset="tiny", **overrides)


def model_inputs(model, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, t = torch.randn(batch, *model.input_shape, generator=g), torch.rand(batch, generator=g)
    labels = torch.randint(0, model.num_classes, (batch, model.image_size, model.image_size), generator=g)
    return x, t, F.one_hot(labels, model.num_classes).permute(0, 3, 1, 2).float()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_blocks_scan_is_bit_identical_to_the_permuted_path(variant):
    model = tiny(**VARIANTS[variant])
    cfg = model.config
    orders = {block.mixer.orders[0] for block in model.blocks}
    assert len(orders) == (5 if variant == "zigzag" else 4)  # the four sweeps (rows forward: None), or five snakes
    for order in orders:
        assert order is None or isinstance(order, Sweep)
        x = make_inputs(cfg.sequence_length, dim=cfg.expand * cfg.width)
        assert_same(run(tokens, x, order), run(reference, x, order))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_blocks_mixer_computes_what_the_channel_major_path_did_without_layout_copies(variant):
    model = tiny(**VARIANTS[variant])
    cfg = model.config
    x = torch.randn(2, cfg.sequence_length, cfg.width, generator=torch.Generator().manual_seed(1))
    for index, block in enumerate(model.blocks):
        mixer = block.mixer
        paths = (partial(mixer, x), partial(channel_major_mix, mixer, x, None))  # the token layout, the earlier path
        results = [output_and_grads(mixer, fn) for fn in paths]
        assert_close_results(*results, rtol=1e-5, atol=1e-6, grad_rtol=1e-4, grad_atol=1e-5)
        assert layout_copies(partial(mixer, x)) == [], f"block {index}"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_the_model_computes_what_the_channel_major_path_did(monkeypatch, variant):
    """The whole DiM, forward and every parameter's gradient, within fp32 rounding of the earlier path."""
    model = tiny(**VARIANTS[variant])
    inputs = model_inputs(model)
    expected = channel_major_model_pass(model, inputs, monkeypatch)
    got = output_and_grads(model, lambda: model(*inputs))
    assert_close_results(got, expected, rtol=1e-5, atol=1e-5, grad_rtol=1e-4, grad_atol=1e-5)
