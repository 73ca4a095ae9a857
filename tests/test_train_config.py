"""One source of truth for training options: the preset fills the recipe, the dataclass field makes the option."""
import dataclasses
from typing import Optional

import pytest
import typer
from typer.testing import CliRunner

from bench import presets
from bench.cli import app
from bench.cli.common import options_from
from bench.errors import BenchError
from bench.presets import doc
from bench.train import TrainConfig, check_config, make_config, option_fields


def test_a_hand_built_config_is_refused_in_one_line_naming_the_unset_fields():
    with pytest.raises(BenchError) as e:
        TrainConfig(model="sisma", preset="cpu")
    message = str(e.value)
    assert "\n" not in message and "make_config" in message
    for name in ("lr", "warmup", "ckpt_every", "sample_every", "workers", "steps", "batch_size"):
        assert name in message
    with pytest.raises(BenchError, match=r"leaves lr unset"):  # one field missing: named alone
        TrainConfig(**{**presets.train_defaults("cpu", "sisma"), "model": "sisma", "preset": "cpu", "lr": None})


def test_make_config_takes_every_recipe_and_bookkeeping_field_from_the_preset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = make_config("sisma", tmp_path / "run", preset="cpu")
    expected = presets.train_defaults("cpu", "sisma")
    assert {k: getattr(cfg, k) for k in expected} == expected
    cfg.warmup = None  # unset after it was made: refused where it is used
    with pytest.raises(BenchError, match="leaves warmup unset"):
        check_config(cfg)


def train_command():
    return typer.main.get_command(app).commands["train"]


def test_bench_train_has_one_option_per_field_with_its_help():
    params = {p.name: p for p in train_command().params}
    for f in dataclasses.fields(TrainConfig):
        if f.name not in option_fields():
            assert f.name not in params  # recorded by the harness, not an option
        elif f.name != "model":  # the command's argument
            assert params[f.name].opts[0] == "--" + f.name.replace("_", "-")
            assert params[f.name].help == f.metadata["help"] and params[f.name].help
    result = CliRunner().invoke(app, ["train", "--help"])
    assert result.exit_code == 0 and "--keep-at" in result.output and "--grid-masks" in result.output


def test_a_field_added_to_the_dataclass_becomes_an_option():
    @dataclasses.dataclass
    class Extended(TrainConfig):
        new_knob: Optional[int] = doc("Help of the new knob.", default=None)

    names = [f.name for f in dataclasses.fields(Extended)]
    seen = {}
    demo = typer.Typer()

    @demo.command()
    @options_from(Extended, names, after="model")
    def run(model: str = typer.Argument(...), **options):
        seen.update(options)

    result = CliRunner().invoke(demo, ["--help"])
    words = " ".join(result.output.replace("│", " ").split())  # the help as one line, without the box
    assert result.exit_code == 0 and "--new-knob" in words and "Help of the new knob." in words
    assert CliRunner().invoke(demo, ["sisma", "--new-knob", "3"]).exit_code == 0
    assert seen["new_knob"] == 3 and seen["lr"] is None and "model" not in seen


def test_options_reach_make_config_typed_and_unset_ones_as_none(tmp_path, monkeypatch):
    import bench.cli.train

    given = {}

    class Stop(Exception):
        pass

    def capture(model, run_dir, resume=False, **options):
        given.update(options)
        raise Stop

    monkeypatch.setattr(bench.cli.train, "make_config", capture)
    args = ["train", "dit", "--out", str(tmp_path / "run"), "--lr", "0.01", "--keep-at", "3", "--keep-at", "5",
            "--no-cache-latents", "--data", "faces"]
    assert isinstance(CliRunner().invoke(app, args).exception, Stop)
    assert given["lr"] == 0.01 and given["keep_at"] == [3, 5] and given["cache_latents"] is False
    assert given["data"] == "faces" and given["steps"] is None and given["checkpointing"] is None
    assert set(given) == set(option_fields()) - {"model"}
