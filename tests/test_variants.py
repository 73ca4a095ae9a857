"""Variants from the command line: a registered backbone plus config overrides, named the same everywhere."""
from __future__ import annotations

import pytest
from typer.testing import CliRunner

from bench.cli import app
from bench.errors import BenchError
from bench.variants import Variant, build_model, parse_models, parse_variant


def test_a_variant_is_a_backbone_plus_typed_overrides_with_a_stable_name():
    v = parse_variant("sisma:scan=raster:conv=causal1d:depth=3")
    assert v == Variant("sisma", (("conv", "causal1d"), ("depth", 3), ("scan", "raster")))
    assert v.name == "sisma:conv=causal1d:depth=3:scan=raster" and v.slug == "sisma_conv-causal1d_depth-3_scan-raster"
    model = build_model(v, "tiny", device="meta")
    assert (model.config.scan, model.config.conv, len(model.blocks)) == ("raster", "causal1d", 3)
    assert build_model("dit:cond=add", "tiny", device="meta").config.cond == "add"
    assert [x.name for x in parse_models("sisma, dit:cond=add ,sisma")] == ["sisma", "dit:cond=add"]


@pytest.mark.parametrize("text, words", [
    ("unet", ["unknown model 'unet'", "sisma"]),
    ("sisma:spin=raster", ["no config field 'spin'", "scan", "conv"]),
    ("sisma:scan=spiral", ["unknown scan order 'spiral'", "bidirectional", "zigzag"]),
    ("sisma:depth=two", ["depth takes a int"]),
    ("dit:cond", ["key=value"]),
])
def test_bad_variants_are_one_line_errors_listing_what_exists(text, words):
    with pytest.raises(BenchError) as info:
        parse_variant(text)
    message = str(info.value)
    assert "\n" not in message and all(w in message for w in words), message


def test_commands_take_variants_and_reject_bad_ones_in_one_line(tmp_path):
    runner = CliRunner()
    bad = runner.invoke(app, ["speed", "--models", "sisma:scan=spiral", "--out", str(tmp_path / "s.csv")])
    assert bad.exit_code == 2 and bad.output.startswith("error:") and len(bad.output.strip().splitlines()) == 1
    ok = runner.invoke(app, ["speed", "--flops-only", "--preset", "tiny", "--models", "sisma:scan=raster,dit:cond=add",
                             "--resolutions", "16", "--out", str(tmp_path / "s.csv")])
    assert ok.exit_code == 0, ok.output
    rows = (tmp_path / "s.csv").read_text()
    assert "sisma:scan=raster" in rows and "dit:cond=add" in rows
