"""`bench quality`: a tiny trained run scored end to end, missing weights, --require, reuse of images, errors."""
import dataclasses
import functools
import hashlib
import math

import pandas as pd
import pytest
import torch
from test_metrics import TINY_EXTRACTOR, TINY_FEATURES, _register_tiny_extractor
from typer.testing import CliRunner

from bench import metrics
from bench import parser as fp
from bench.cli import app
from bench.synth import generate_synthetic
from bench.train import make_config, train

SIZE = 16  # tiny preset


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A synthetic set (3 test faces), a 2-step tiny run trained on it, and a small parser."""
    root = tmp_path_factory.mktemp("quality")
    data = generate_synthetic(root / "faces", n=40, size=2 * SIZE, seed=0, workers=1, progress=False)
    run = root / "run"
    cfg = make_config("dit", run, preset="tiny", data=str(data), steps=2, batch_size=4, sample_every=100,
                      ckpt_every=2, grid_masks=1, grid_steps=1)
    train(cfg, run, device="cpu", progress=False)
    parser = root / "parser.pt"
    model = fp.train_parser(data, fp.ParserConfig(size=SIZE, width=8), fp.ParserTrainConfig(steps=10), progress=False)
    fp.save_parser(model, parser, {})
    return data, run, parser


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    return tmp_path / "hub" / "checkpoints"


def _quality(*args):
    return CliRunner().invoke(app, ["quality", *map(str, args)])


def test_quality_writes_a_row_with_missing_weights_marked(setup, tmp_path, empty_hub, monkeypatch):
    data, run, parser = setup
    out = tmp_path / "q.csv"
    args = ["--runs", run, "--data", data, "--steps", 2, "--samples-per-mask", 3, "--parser", parser, "--out", out]
    result = _quality(*args)
    assert result.exit_code == 0, result.output
    rows = pd.read_csv(out)
    assert len(rows) == 1
    row = rows.iloc[0]
    assert math.isnan(row.fid) and math.isnan(row.kid) and math.isnan(row.lpips_diversity)
    assert row.fid_status.startswith("missing: ") and "--inception-weights" in row.fid_status
    assert str(empty_hub / metrics.INCEPTION_WEIGHTS.filename) in row.fid_status
    assert "--alexnet-weights" in row.lpips_status
    assert row.pixel_diversity > 0 and 0 <= row.miou <= 1 and 0 <= row.miou_ceiling <= 1
    assert (row.model, row.preset, row.n_masks, row.samples_per_mask) == ("dit", "tiny", 3, 3)
    assert (row.steps, row.nfe, row.device) == (2, 2, "cpu") and "commit" in rows.columns
    assert str(row.parser_sha256) == hashlib.sha256(parser.read_bytes()).hexdigest()[:16]
    pngs = sorted((run / "eval").glob("*/*.png"))
    assert len(pngs) == 9  # 3 masks x 3 samples

    # Same settings again: images are reused (generation would fail), and a second row is appended.
    stamps = [p.stat().st_mtime_ns for p in pngs]
    monkeypatch.setattr("bench.sample.generate", lambda *a, **k: pytest.fail("regenerated existing images"))
    result = _quality(*args)
    assert result.exit_code == 0, result.output
    again = pd.read_csv(out)
    assert len(again) == 2 and again.pixel_diversity[0] == again.pixel_diversity[1]
    assert [p.stat().st_mtime_ns for p in pngs] == stamps


def test_quality_computes_fid_and_lpips_when_weights_exist(setup, tmp_path, empty_hub, monkeypatch):
    """The whole wiring with stand-in weight files: a tiny registered extractor for FID, a random AlexNet."""
    import torchvision

    data, run, parser = setup
    _register_tiny_extractor()
    torch.manual_seed(0)
    tiny = tmp_path / "tiny.pth"
    torch.save(torch.nn.Conv2d(3, TINY_FEATURES, 3, padding=1).state_dict(), tiny)
    alex = tmp_path / "alex.pth"
    torch.save({k: v for k, v in torchvision.models.alexnet().state_dict().items() if k.startswith("features.")}, alex)
    monkeypatch.setattr(metrics, "INCEPTION_WEIGHTS",
                        dataclasses.replace(metrics.INCEPTION_WEIGHTS, sha256=metrics.sha256_file(tiny)))
    monkeypatch.setattr(metrics, "ALEXNET_WEIGHTS",
                        dataclasses.replace(metrics.ALEXNET_WEIGHTS, sha256=metrics.sha256_file(alex)))
    monkeypatch.setattr(metrics, "fid_kid", functools.partial(metrics.fid_kid, extractor=TINY_EXTRACTOR))
    out = tmp_path / "q.csv"
    result = _quality("--runs", run, "--data", data, "--steps", 2, "--samples-per-mask", 3, "--parser", parser,
                      "--inception-weights", tiny, "--alexnet-weights", alex, "--require", "fid,lpips", "--out", out)
    assert result.exit_code == 0, result.output
    row = pd.read_csv(out).iloc[0]
    assert (row.fid_status, row.kid_status, row.lpips_status) == ("ok", "ok", "ok")
    assert row.fid > 0 and row.lpips_diversity > 0 and row.lpips_size == metrics.LPIPS_MIN_SIZE


def _one_line_error(result, *needles):
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for needle in needles:
        assert str(needle) in lines[0]


def test_require_turns_missing_weights_into_an_error(setup, tmp_path, empty_hub):
    data, run, parser = setup
    result = _quality("--runs", run, "--data", data, "--require", "fid,lpips", "--out", tmp_path / "q.csv")
    _one_line_error(result, metrics.INCEPTION_WEIGHTS.filename, "--inception-weights")
    assert not (tmp_path / "q.csv").exists()


def test_weights_that_cannot_be_fetched_are_missing_with_the_reason(setup, tmp_path, empty_hub, monkeypatch):
    """Downloads on, but the server is gone: each file is tried once, quickly, and its metrics are missing."""
    import socket
    import time

    from bench import weights

    data, run, parser = setup
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.delenv("SIS_BENCH_OFFLINE", raising=False)
    monkeypatch.setenv(weights.URL_ENV, f"http://127.0.0.1:{port}")
    opened = []
    real_open = weights.open_url
    monkeypatch.setattr(weights, "open_url", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    out = tmp_path / "q.csv"
    args = ["--runs", run, "--data", data, "--steps", 2, "--samples-per-mask", 3, "--parser", parser, "--out", out]
    tic = time.perf_counter()
    result = _quality(*args, "--require", "fid")
    _one_line_error(result, "--require fid", "fetching", metrics.INCEPTION_WEIGHTS.filename)
    assert time.perf_counter() - tic < 5
    weights.reset()  # a new process: the failures are forgotten
    opened.clear()
    result = _quality(*args)
    assert result.exit_code == 0, result.output
    row = pd.read_csv(out).iloc[0]
    assert row.fid_status.startswith("missing: ") and f"127.0.0.1:{port}" in row.fid_status
    assert "fetching" in row.lpips_status and "--alexnet-weights" in row.lpips_status
    assert sorted(opened) == sorted(f"http://127.0.0.1:{port}/{w.filename}"
                                    for w in (metrics.INCEPTION_WEIGHTS, metrics.ALEXNET_WEIGHTS))
    assert sorted(p.name for p in empty_hub.iterdir()) == []  # nothing partial, no temporary or lock file


def test_offline_flag_fetches_nothing(setup, tmp_path, empty_hub, monkeypatch):
    from bench import weights

    data, run, parser = setup
    monkeypatch.delenv("SIS_BENCH_OFFLINE", raising=False)
    monkeypatch.setattr(weights, "open_url", lambda *a, **k: pytest.fail("fetched while --offline"))
    result = _quality("--runs", run, "--data", data, "--steps", 2, "--samples-per-mask", 3, "--parser", parser,
                      "--out", tmp_path / "q.csv", "--offline")
    assert result.exit_code == 0, result.output
    row = pd.read_csv(tmp_path / "q.csv").iloc[0]
    assert "downloads are off (--offline)" in row.fid_status and "downloads are off" in row.lpips_status


def test_weights_with_the_wrong_hash_are_an_error(setup, tmp_path, empty_hub):
    data, run, parser = setup
    bad = tmp_path / "inception.pth"
    bad.write_bytes(b"something else")
    _one_line_error(_quality("--runs", run, "--inception-weights", bad, "--out", tmp_path / "q.csv"),
                    bad, "--inception-weights")


def test_run_without_checkpoints_is_an_error(setup, tmp_path):
    data, run, parser = setup
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((run / "config.json").read_text())
    _one_line_error(_quality("--runs", bare, "--parser", parser, "--out", tmp_path / "q.csv"),
                    bare / "checkpoints" / "last.pt", "bench train")


def test_empty_split_is_an_error(setup, tmp_path):
    data, run, parser = setup
    one = generate_synthetic(tmp_path / "one", n=1, size=2 * SIZE, seed=0, workers=1, progress=False)  # no test
    _one_line_error(_quality("--runs", run, "--data", one, "--parser", parser, "--out", tmp_path / "q.csv"),
                    one, "test")


def test_unknown_required_metric_is_an_error(tmp_path):
    _one_line_error(_quality("--require", "fid,is", "--out", tmp_path / "q.csv"), "'is'")


def test_a_row_scored_by_another_parser_is_not_scored_before(setup, tmp_path, empty_hub):
    """The pipeline skips a checkpoint scored before by the same parser: the same file, by its digest, not only by
    path and time (a parser retrained on another CPU has the same path and a different digest)."""
    from bench.quality import QualitySettings, Resources, scored_before
    data, run, parser = setup
    out = tmp_path / "q.csv"
    result = _quality("--runs", run, "--data", data, "--steps", 2, "--samples-per-mask", 3, "--parser", parser,
                      "--out", out)
    assert result.exit_code == 0, result.output
    settings = QualitySettings(data=str(data), samples_per_mask=3, steps=2, precision="fp32")
    resources = Resources(None, "missing", None, "missing")
    checkpoint = run / "checkpoints" / "last.pt"
    assert scored_before(out, checkpoint, SIZE, settings, resources, parser)
    rows = pd.read_csv(out, dtype={"parser_sha256": str})
    rows["parser_sha256"] = "0123456789abcdef"
    rows.to_csv(out, index=False)
    assert not scored_before(out, checkpoint, SIZE, settings, resources, parser)
