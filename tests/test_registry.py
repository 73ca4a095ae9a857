"""Backbone registry: built-in names and presets, one-line errors, plugins discovered through entry points."""
import sys

import pytest
import torch

import models
from models import registry
from models.info import describe

BUILT_IN = ["sisma", "dit", "sdm", "dim"]
PRESETS = ["paper", "cpu", "tiny"]


def test_built_in_backbones_and_presets():
    names = models.list_models()
    assert names[:len(BUILT_IN)] == BUILT_IN
    for name in BUILT_IN:
        assert models.list_presets(name) == PRESETS


def test_unknown_model_is_a_one_line_error_listing_the_models():
    with pytest.raises(models.UnknownModel) as info:
        models.create_model("unet9000")
    message = info.value.args[0]
    assert "\n" not in message and "unet9000" in message
    assert all(name in message for name in BUILT_IN)


def test_unknown_preset_is_a_one_line_error_listing_the_presets():
    with pytest.raises(models.UnknownModel) as info:
        models.create_model("sisma", preset="huge")
    message = info.value.args[0]
    assert "\n" not in message and "huge" in message
    assert all(preset in message for preset in PRESETS)


@pytest.mark.parametrize("name", BUILT_IN)
def test_describe_counts_on_the_meta_device(name):
    row = describe(name, "tiny")
    assert row["params"] > 0 and row["space"] == "pixel" and row["classes"] == 19


# --- plugins --------------------------------------------------------------------------------------------

PLUGIN_MODULE = "sisbench_toy_plugin"
PLUGIN_SOURCE = '''
import torch
import torch.nn as nn
from models.registry import register_model

class Toy(nn.Module):
    """A backbone that returns zero velocity."""
    space, input_shape, image_size, num_classes, num_tokens = "pixel", (3, 8, 8), 8, 19, None

    def __init__(self, width):
        super().__init__()
        self.width = width
        self.scale = nn.Parameter(torch.zeros(width))

    def forward(self, x, t, mask):
        return x * 0

@register_model("toy", presets={"tiny": 4, "cpu": 8})
def toy(preset="tiny", **overrides):
    return Toy({"tiny": 4, "cpu": 8}[preset])

def register_broken():
    raise RuntimeError("this plugin is broken on purpose")
'''


def install_plugin(root, entry_points: dict[str, str]) -> None:
    """Write a plugin module and the dist-info of a distribution that declares it, as pip would install it."""
    (root / f"{PLUGIN_MODULE}.py").write_text(PLUGIN_SOURCE)
    dist_info = root / "sisbench_toy_plugin-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: sisbench-toy-plugin\nVersion: 0.1\n")
    lines = [f"[{registry.ENTRY_POINT_GROUP}]"] + [f"{k} = {v}" for k, v in entry_points.items()]
    (dist_info / "entry_points.txt").write_text("\n".join(lines) + "\n")


@pytest.fixture
def fresh_registry(monkeypatch, tmp_path):
    """The built-in registry with plugins not yet loaded and tmp_path on sys.path; restored afterwards."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_PLUGINS_LOADED", False)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop(PLUGIN_MODULE, None)


@pytest.mark.parametrize("target", [PLUGIN_MODULE, f"{PLUGIN_MODULE}:toy"])
def test_plugin_registered_through_an_entry_point_shows_up(fresh_registry, target):
    """Entry points may name the module, or the registered constructor itself (it must not be called)."""
    install_plugin(fresh_registry, {"toy": target})
    assert models.list_models()[:len(BUILT_IN)] == BUILT_IN and "toy" in models.list_models()
    assert models.list_presets("toy") == ["tiny", "cpu"]
    model = models.create_model("toy", preset="cpu")
    assert model.width == 8
    x = torch.randn(1, 3, 8, 8)
    assert torch.equal(model(x, torch.zeros(1), torch.zeros(1, 19, 8, 8)), torch.zeros_like(x))


def test_broken_plugin_warns_and_the_rest_still_works(fresh_registry):
    install_plugin(fresh_registry, {"broken": f"{PLUGIN_MODULE}:register_broken"})
    with pytest.warns(UserWarning, match="broken"):
        names = models.list_models()
    assert names[:len(BUILT_IN)] == BUILT_IN


def test_models_command_rejects_an_unknown_preset_in_one_line():
    from typer.testing import CliRunner

    from bench.cli import app

    result = CliRunner().invoke(app, ["models", "--preset", "huge"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "'huge'" in lines[0] and "paper" in lines[0] and "tiny" in lines[0]
    ok = CliRunner().invoke(app, ["models", "--preset", "tiny"])
    assert ok.exit_code == 0 and all(m in ok.output for m in ("sisma", "dit", "sdm"))
