"""`bench run --preset tiny` end to end: interrupted in training, resumed without redoing finished stages (training
continues from its checkpoint), a report with a row per backbone and its plots, and a re-run that skips everything."""
import csv
import dataclasses
import json

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import bench.train
from bench.checkpoint import load
from bench.cli import app
from bench.presets import BUDGETS, recipe

MODELS = ["sisma", "sisma:scan=raster", "dit:cond=add"]  # a backbone, a variant of it, a variant of another
STAGES = ["data", "train:sisma@0", "train:sisma:scan=raster@0", "train:dit:cond=add@0", "sample", "speed", "parser",
          "quality", "report"]
PLOTS = ["latency.png", "scaling.png", "quality_latency.png", "quality_training.png", "loss.png", "samples.png"]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """An empty working folder (the synthetic faces go to ./data); torch's thread count restored afterwards."""
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    yield tmp_path
    torch.set_num_threads(threads)


def table_models(md: str, heading: str) -> list[str]:
    """First-column cells of the first Markdown table after ``heading``."""
    lines = md.splitlines()
    rows = []
    for line in lines[lines.index(heading) + 1:]:
        if line.startswith("|"):
            rows.append(line.strip("|").split("|")[0].strip())
        elif rows or line.startswith("## "):
            break
    return rows[2:]


def test_tiny_run_interrupted_resumed_and_skipped(workdir, monkeypatch):
    results, reports = workdir / "res", workdir / "rep"
    # One thread: on a shared, loaded machine two intra-op threads can make tiny models 100x slower.
    args = ["run", "--preset", "tiny", "--results", str(results), "--reports", str(reports), "--threads", "1",
            "--models", ",".join(MODELS)]
    state_path = results / "run_tiny" / "state.json"
    runner = CliRunner()
    real_train = bench.train.train
    budget = BUDGETS["tiny"]
    assert budget.quality_fractions == (0.5, 1.0) and budget.quality_masks > 0
    calls = []

    # 1. sisma and its variant train; dit:cond=add is killed after its first checkpoint (as SIGKILL would).
    def killed_during_dit(cfg, run_dir, resume=False, device=None, progress=True):
        calls.append(cfg.variant)
        if cfg.model == "dit":
            real_train(dataclasses.replace(cfg, steps=budget.ckpt_every), run_dir, resume, device, progress=False)
            raise KeyboardInterrupt
        return real_train(cfg, run_dir, resume, device, progress=False)

    monkeypatch.setattr(bench.train, "train", killed_during_dit)
    first = runner.invoke(app, args)
    assert first.exit_code == 130, first.output
    assert calls == MODELS
    state = json.loads(state_path.read_text())
    assert state["stages"]["data"]["status"] == "done" and state["stages"]["train:sisma@0"]["status"] == "done"
    assert state["stages"]["train:dit:cond=add@0"]["status"] == "running" and "sample" not in state["stages"]
    dit_run, = (results / "run_tiny" / "runs" / "dit_cond-add").glob("seed0-*")  # seed0-<hash of its settings>
    assert load(dit_run / "checkpoints" / "last.pt")["step"] == budget.ckpt_every

    # 2. The same command again: sisma not retrained, dit continues from its checkpoint, the rest runs.
    resumed = []

    def recording(cfg, run_dir, resume=False, device=None, progress=True):
        start = load(run_dir / "checkpoints" / "last.pt")["step"] if resume else 0
        resumed.append((cfg.variant, resume, start))
        return real_train(cfg, run_dir, resume, device, progress=False)

    monkeypatch.setattr(bench.train, "train", recording)
    second = runner.invoke(app, args)
    assert second.exit_code == 0, second.output
    assert resumed == [("dit:cond=add", True, budget.ckpt_every)]
    assert "train sisma, seed 0 (tiny preset, 20 steps): done on" in second.output
    state2 = json.loads(state_path.read_text())
    assert list(state2["stages"]) == STAGES and all(s["status"] == "done" for s in state2["stages"].values())
    assert state2["stages"]["train:sisma@0"] == state["stages"]["train:sisma@0"]
    with (dit_run / "loss.csv").open() as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == list(range(1, recipe("tiny", "dit").steps + 1))

    report = reports / "tiny.md"
    md = report.read_text()
    assert table_models(md, "## Speed") == MODELS
    assert table_models(md, "## Quality") == MODELS
    assert table_models(md, "## Training") == MODELS
    assert "smoke test" in md
    for name in PLOTS:
        with Image.open(reports / "tiny" / name) as im:
            assert im.format == "PNG" and min(im.size) > 100
    assert "### SISMA's token mixing: scan order x conv" in md  # the ablation: sisma against sisma:scan=raster
    with (results / "quality.csv").open() as f:
        rows = list(csv.DictReader(f))
    steps = recipe("tiny", "sisma").steps
    # every run scored at half and at all of its steps (budget.quality_fractions), with its per-mask scores
    assert sorted((r["model"], int(r["train_step"])) for r in rows) == sorted(
        (m, k) for m in MODELS for k in (steps // 2, steps))
    with (results / "quality_masks.csv").open() as f:
        masks = list(csv.DictReader(f))
    assert len(masks) == len(rows) * budget.quality_masks
    assert {m["eval_key"] for m in masks} == {r["eval_key"] for r in rows}

    # 3. Once more: every stage is skipped and nothing is appended or retrained.
    resumed.clear()
    speed_rows = (results / "speed.csv").read_text()
    third = runner.invoke(app, args)
    assert third.exit_code == 0, third.output
    assert resumed == [] and third.output.count("skipped") == len(STAGES)
    assert json.loads(state_path.read_text())["stages"] == state2["stages"]
    assert (results / "speed.csv").read_text() == speed_rows


def test_run_rejects_bad_options(workdir):
    runner = CliRunner()
    for args, words in ((["--preset", "huge"], "huge"), (["--models", "sisma,nope"], "nope"),
                        (["--data", str(workdir / "absent")], "absent"), (["--steps", "0"], "--steps")):
        result = runner.invoke(app, ["run", *args, "--results", str(workdir / "r")])
        assert result.exit_code == 2, result.output
        assert result.output.startswith("error:") and words in result.output
    assert not (workdir / "r").exists()


def test_dry_run_prints_each_stage_and_each_runs_recipe_and_does_nothing(workdir):
    result = CliRunner().invoke(app, ["run", "--preset", "cpu", "--dry-run", "--results", str(workdir / "r"),
                                      "--models", "sisma,dit:cond=add", "--seeds", "0,1"])
    assert result.exit_code == 0, result.output
    out = result.output
    for stage in ["train sisma, seed 0", "train sisma, seed 1", "train dit:cond=add, seed 1", "speed", "quality"]:
        assert stage in out
    cpu = recipe("cpu", "sisma")
    assert f"lr: {cpu.lr}" in out and f"batch_size: {cpu.batch_size}" in out and f"steps: {cpu.steps}" in out
    assert 'model_overrides: {"cond": "add"}' in out
    assert not (workdir / "r").exists() and not (workdir / "data").exists()


def test_train_and_run_read_the_same_recipe(workdir):
    from bench.pipeline import Pipeline, RunOptions
    from bench.train import make_config
    from bench.variants import parse_variant

    for model in ["sisma", "dit", "sdm"]:
        cfg = make_config(model, workdir / "runs" / model, preset="cpu")
        pipe = Pipeline(RunOptions(preset="cpu", models=[model], results=workdir / "r"))
        via_run = make_config(parse_variant(model), workdir / "runs" / (model + "-run"),
                              **pipe.train_options(pipe.variants[0], 0))
        # the same config, but for the snapshots bench run keeps to score quality against training
        assert {**dataclasses.asdict(cfg), "keep_at": via_run.keep_at} == dataclasses.asdict(via_run)
        r = recipe("cpu", model)
        assert (cfg.lr, cfg.batch_size, cfg.steps, cfg.ema_decay) == (r.lr, r.batch_size, r.steps, r.ema_decay)
