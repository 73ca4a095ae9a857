"""The backbone contract (models.backbone.Backbone), checked for every registered backbone and a plugin.

Parametrized over ``models.list_models()``: a backbone added to the registry, in this repository or as a plugin,
gets these tests for free. Every preset is built on the meta device; the smallest preset is also run: shapes,
gradients to every parameter, mask and time dependence, the null mask, one-line shape errors.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import models
from models.backbone import SPACES, Backbone

RUN_MAX_PARAMS = 5_000_000  # presets up to this size are run on the CPU in the tests, bigger ones only on meta
PLUGIN = "contract-plugin"


# A plugin backbone registered here (as an entry point would), so that the contract is seen to apply to plugins.
@dataclasses.dataclass(frozen=True)
class _PluginConfig:
    space: str = "pixel"
    in_channels: int = 3
    input_size: int = 8
    image_size: int = 8
    num_classes: int = 19
    width: int = 16


class _PluginNet(nn.Module):
    """Image, mask and time as channels of a two-layer conv net."""

    def __init__(self, cfg: _PluginConfig):
        super().__init__()
        self.config, self.space, self.num_tokens = cfg, cfg.space, None
        self.input_shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
        self.image_size, self.num_classes = cfg.image_size, cfg.num_classes
        self.net = nn.Sequential(nn.Conv2d(cfg.in_channels + cfg.num_classes + 1, cfg.width, 3, padding=1),
                                 nn.SiLU(), nn.Conv2d(cfg.width, cfg.in_channels, 3, padding=1))

    def forward(self, x, t, mask):
        if x.dim() != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"x must be (B, {', '.join(map(str, self.input_shape))}), got {tuple(x.shape)}")
        want = (x.shape[0], self.num_classes, self.image_size, self.image_size)
        if tuple(mask.shape) != want:
            raise ValueError(f"mask must be {want}, got {tuple(mask.shape)}")
        return self.net(torch.cat([x, mask, t.view(-1, 1, 1, 1).expand(-1, 1, *x.shape[-2:])], dim=1))


if PLUGIN not in models.list_models():
    @models.register_model(PLUGIN, presets=("tiny",))
    def _plugin(preset: str = "tiny", **overrides) -> _PluginNet:
        return _PluginNet(dataclasses.replace(_PluginConfig(), **overrides))


CASES = [(name, preset) for name in models.list_models() for preset in models.list_presets(name)]


def _params_on_meta(name: str, preset: str) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in models.create_model(name, preset=preset).parameters())


def _runnable() -> list[tuple[str, str]]:
    """Per backbone, its smallest preset, if it is small enough to run here."""
    out = []
    for name in models.list_models():
        preset = min(models.list_presets(name), key=lambda p: _params_on_meta(name, p))
        if _params_on_meta(name, preset) <= RUN_MAX_PARAMS:
            out.append((name, preset))
    return out


RUNNABLE = _runnable()


def _awake(name: str, preset: str) -> nn.Module:
    """The backbone with its zero-initialised tensors (adaLN-Zero, zero output layers) given random values, so
    that every path carries signal and gradient."""
    torch.manual_seed(0)
    model = models.create_model(name, preset=preset)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def _inputs(model, batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *model.input_shape, generator=g)
    t = torch.rand(batch, generator=g)
    S, K = model.image_size, model.num_classes
    coarse = torch.randint(0, K, (batch, 1, max(1, S // 4), max(1, S // 4)), generator=g).float()
    labels = F.interpolate(coarse, size=(S, S), mode="nearest")[:, 0].long()
    return x, t, F.one_hot(labels, K).permute(0, 3, 1, 2).float()


@pytest.mark.parametrize("name, preset", CASES)
def test_builds_on_the_meta_device_with_the_contract_attributes(name, preset):
    with torch.device("meta"):
        model = models.create_model(name, preset=preset)
    assert isinstance(model, Backbone) and isinstance(model, nn.Module)
    assert dataclasses.is_dataclass(model.config)
    assert model.space in SPACES
    assert len(model.input_shape) == 3 and all(isinstance(n, int) and n > 0 for n in model.input_shape)
    assert model.image_size > 0 and model.num_classes > 0
    assert model.num_tokens is None or model.num_tokens > 0
    assert sum(p.numel() for p in model.parameters()) > 0
    assert all(p.device.type == "meta" for p in model.parameters())


def test_the_plugin_is_registered_and_checked():
    assert (PLUGIN, "tiny") in CASES and (PLUGIN, "tiny") in RUNNABLE
    assert {"sisma", "dit", "sdm", "dim"} <= {name for name, _ in RUNNABLE}


@pytest.mark.parametrize("name, preset", RUNNABLE)
def test_output_is_a_velocity_of_the_input_shape(name, preset, one_thread):
    model = models.create_model(name, preset=preset)
    x, t, mask = _inputs(model)
    v = model(x, t, mask)
    assert v.shape == x.shape and v.dtype == x.dtype and torch.isfinite(v).all()


@pytest.mark.parametrize("name, preset", RUNNABLE)
def test_gradients_reach_every_parameter(name, preset, one_thread):
    model = _awake(name, preset)
    x, t, mask = _inputs(model)
    model(x, t, mask).square().mean().backward()
    dead = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not dead, f"no gradient reaches: {dead}"


@pytest.mark.parametrize("name, preset", RUNNABLE)
def test_the_mask_and_the_time_steer_the_output(name, preset, one_thread):
    model = _awake(name, preset).eval()
    x, t, mask = _inputs(model, seed=0)
    _, _, other = _inputs(model, seed=1)
    with torch.no_grad():
        v = model(x, t, mask)
        assert torch.equal(v, model(x, t, mask.clone())), "the same inputs must give the same output"
        # equal inputs give bitwise-equal outputs, so any change well above fp32 rounding is real
        assert (v - model(x, t, other)).abs().max() > 1e-5, "a different mask must change the output"
        assert (v - model(x, 1 - t, mask)).abs().max() > 1e-5, "a different time must change the output"
        null = model(x, t, torch.zeros_like(mask))  # classifier-free guidance's null mask runs and differs
        assert null.shape == v.shape and (v - null).abs().max() > 1e-5


@pytest.mark.parametrize("name, preset", RUNNABLE)
def test_wrong_shapes_are_value_errors_naming_the_expected_shape(name, preset):
    model = models.create_model(name, preset=preset)
    x, t, mask = _inputs(model)
    K, S = model.num_classes, model.image_size
    for bad in [(2, K - 1, S, S), (2, K, 2 * S, 2 * S), (3, K, S, S)]:
        with pytest.raises(ValueError) as info:
            model(x, t, torch.zeros(bad))
        assert str(S) in str(info.value) and str(tuple(bad)) in str(info.value)
    C, H, W = model.input_shape
    with pytest.raises(ValueError, match=str(C)):
        model(torch.zeros(2, C + 1, H, W), t, mask)
