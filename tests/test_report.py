"""`bench report` on hand-made results: a row per backbone, valid plots, missing metrics with their reason,
and the numbers of the newest CSV rows (not older ones) in the Markdown."""
import csv
import json
import math

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from bench.cli import app
from bench.report import build_report
from bench.speed import COLUMNS as SPEED_COLUMNS

MODELS = ["sisma", "dit", "sdm"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PLOTS = ["latency.png", "scaling.png", "quality_latency.png", "loss.png", "samples.png"]
IMAGE_VS_PROJECTED = {"sisma": 1.01, "dit": 1.30}  # dit's whole image is 30% above its parts: flagged
PROVENANCE = dict(device="cpu", device_name="Test CPU (2 threads)", threads=2, torch="2.x", cuda="none",
                  precision="fp32", seed=0, commit="abc123", host_os="Linux")
# Per model: params, FLOPs per NFE at 32 px, seconds per NFE at batch 1 and 32 px.
SPEC = {"sisma": (3379468, 1.314e9, 0.0312), "dit": (3394828, 1.620e9, 0.0277), "sdm": (3281539, 1.789e9, 0.0451)}
STALE_LATENCY = 0.987654  # an older sisma row: its value must not reach the report
INCEPTION_REASON = "missing: Inception-v3 (FID/KID) weights not found at X.pth; pass --inception-weights FILE"
ALEXNET_REASON = "missing: AlexNet (LPIPS) weights not found at Y.pth; pass --alexnet-weights FILE"
QUALITY = {"sisma": dict(miou=0.61234, miou_ceiling=0.93456, pixel_diversity=0.21111, lpips_diversity=0.4321),
           "dit": dict(miou=0.55555, miou_ceiling=0.93456, pixel_diversity=0.19876, lpips_diversity=math.nan),
           "sdm": dict(miou=0.66666, miou_ceiling=0.93456, pixel_diversity=0.17654, lpips_diversity=math.nan)}


def write_csv(path, columns, rows):
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, columns, extrasaction="ignore")
        w.writeheader()
        w.writerows({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in rows)


def speed_row(model, resolution, batch, latency, stamp, mode="timed", preset="cpu"):
    params, flops, _ = SPEC[model]
    scale = (resolution / 32) ** 2
    row = dict(PROVENANCE, mode=mode, status="ok", error="", model=model, preset=preset, resolution=resolution,
               tokens_equiv=(resolution / 16) ** 2, params=params, flops_per_nfe=flops * scale, compile=False,
               steps=200, nfe=200, batch_size=batch, timestamp=stamp)
    if mode == "timed":
        projected = latency * 200
        row.update(latency_nfe_median_s=latency, latency_nfe_iqr_s=latency / 10, image_latency_projected_s=projected,
                   images_per_s_projected=batch / projected, peak_rss_delta_mib=12.5 * batch, scan_backend="cpu",
                   attention_kernel="flash-cpu", decode_latency_s=0.0)
        if model in IMAGE_VS_PROJECTED and batch == 1 and resolution == 32:  # measured whole images
            image = projected * IMAGE_VS_PROJECTED[model]
            row.update(image_latency_s=image, image_repeats=5, images_per_s=1 / image)
        if model == "sdm" and batch == 1 and resolution == 32:  # too few whole images: shown as projected
            row.update(image_latency_s=projected, image_repeats=2, images_per_s=1 / projected)
    else:
        row.update(device="meta", device_name="meta (shapes only, nothing executed)")
    return row


@pytest.fixture
def results(tmp_path):
    """A results folder as `bench run --preset cpu` leaves it, made by hand."""
    res = tmp_path / "results"
    res.mkdir()
    rows = [speed_row("sisma", 32, 1, STALE_LATENCY, "2025-01-01T00:00:00+00:00")]
    for model in MODELS:
        lat = SPEC[model][2]
        rows += [speed_row(model, 32, 1, lat, "2025-01-02T00:00:00+00:00"),
                 speed_row(model, 32, 8, lat * 5, "2025-01-02T00:00:01+00:00"),
                 speed_row(model, 64, 1, lat * 3.5, "2025-01-02T00:00:02+00:00")]
        rows += [speed_row(model, r, 1, None, "2025-01-02T00:00:03+00:00", mode="flops-only", preset="paper")
                 for r in (256, 512)]
    write_csv(res / "speed.csv", SPEED_COLUMNS, rows)

    quality = [dict(PROVENANCE, run=str(res / "runs" / "sisma"), model="sisma", preset="cpu", train_step=300,
                    miou=0.11111, miou_ceiling=0.9, pixel_diversity=0.3, lpips_diversity=math.nan,
                    fid=math.nan, timestamp="2025-01-01T00:00:00+00:00")]  # older: must not be used
    for i, model in enumerate(MODELS):
        run = res / "runs" / model
        run.mkdir(parents=True)
        (run / "config.json").write_text(json.dumps(dict(model=model, preset="cpu", synthetic=True, synth_n=2000,
                                                         data="data/x", space="pixel", batch_size=16, lr=1e-3,
                                                         ema_decay=0.99, p_uncond=0.1, precision="fp32")))
        steps = np.arange(10, 310, 10)
        write_csv(run / "loss.csv", ["step", "loss", "lr", "grad_norm", "steps_per_s", "wall_s"],
                  [dict(step=int(s), loss=1.2 * s ** -0.3 + 0.01 * i, lr=1e-3, grad_norm=1.0, steps_per_s=2.0,
                        wall_s=s / 2.0) for s in steps])
        q = QUALITY[model]
        quality.append(dict(PROVENANCE, run=str(run), model=model, preset="cpu", train_step=300, image_size=32,
                            data="data/x", split="test", n_masks=24, samples_per_mask=4, method="euler",
                            guidance=1.0, steps=20, nfe=20, fid=math.nan, kid=math.nan, kid_std=math.nan,
                            fid_status=INCEPTION_REASON, kid_status=INCEPTION_REASON,
                            lpips_status="ok" if not math.isnan(q["lpips_diversity"]) else ALEXNET_REASON,
                            timestamp=f"2025-01-02T00:01:0{i}+00:00", **q))
        # Sample folder: same masks and seeds for every model.
        out = res / "run_cpu" / "samples" / model
        (out / "masks").mkdir(parents=True)
        files = []
        rng = np.random.default_rng(i)
        for k in range(3):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(out / f"{k:05d}.png")
            Image.fromarray(np.full((32, 32), k + 1, np.uint8), mode="L").save(out / "masks" / f"{k:05d}.png")
            files.append({"index": k, "image": f"{k:05d}.png", "mask": f"masks/{k:05d}.png",
                          "mask_source": f"test-{1866 + k}"})
        (out / "samples.json").write_text(json.dumps(dict(
            run=str(run), model=model, preset="cpu", data="data/x", method="euler", steps=50, guidance=1.0, seed=0,
            train_step=300 if model == "sisma" else 150,
            files=files, provenance={"timestamp": "2025-01-02T00:00:00+00:00"})))
    write_csv(res / "quality.csv", list(dict.fromkeys(k for r in quality for k in r)), quality)
    return res


def table(md: str, heading: str) -> list[dict]:
    """Rows of the first Markdown table after ``heading``, as {column: cell}."""
    lines = md.splitlines()
    start = lines.index(heading)
    block = []
    for line in lines[start + 1:]:
        if line.startswith("|"):
            block.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif block or line.startswith("## "):
            break
    header, body = block[0], block[2:]
    return [dict(zip(header, cells)) for cells in body]


def by_model(rows: list[dict]) -> dict[str, dict]:
    return {r["model"]: r for r in rows}


def g4(v: float) -> str:
    return f"{v:.4g}"


def test_report_tables_plots_and_numbers(results, tmp_path):
    path = build_report(results, tmp_path / "reports", "t")
    md = path.read_text()

    speed = table(md, "## Speed")
    assert [r["model"] for r in speed] == MODELS  # one row per backbone, at the preset's 32 px
    assert "Training step of each column: SISMA 300, DiT-SIS 150, SDM 150." in md  # the grid says what it sampled
    for model, row in by_model(speed).items():
        params, flops, latency = SPEC[model]
        assert row["px"] == "32"
        assert row["params (M)"] == g4(params / 1e6)
        assert row["GFLOPs / NFE"] == g4(flops / 1e9)
        assert row["ms / NFE"] == g4(latency * 1e3)
        assert row["images / s"].startswith(g4(8 / (latency * 5 * 200)))  # the batch-8 row, projected
    sisma, dit, sdm = (by_model(speed)[m] for m in MODELS)
    assert sisma["s / image (200 steps)"] == g4(SPEC["sisma"][2] * 200 * 1.01)
    assert sisma["how"] == "measured (median of 5)"
    assert dit["how"] == "measured (median of 5); flag: 1.30 x steps x per-NFE + decode"
    assert sdm["how"].startswith("projected") and "2 whole images < 5" in sdm["how"]
    assert sdm["s / image (200 steps)"] == g4(SPEC["sdm"][2] * 200)
    assert g4(STALE_LATENCY * 1e3) not in md

    quality = table(md, "## Quality")
    assert [r["model"] for r in quality] == MODELS
    for model, row in by_model(quality).items():
        q = QUALITY[model]
        assert row["mask mIoU"] == f"{q['miou']:.3f}"  # one seed, no per-mask scores: no interval
        assert row["parser ceiling (real)"] == f"{q['miou_ceiling']:.3f}"
        assert row["pixel diversity"] == f"{q['pixel_diversity']:.3f}"
        assert row["FID"].startswith("missing [") and row["KID"] == row["FID"]
    assert by_model(quality)["sisma"]["LPIPS diversity"] == "0.432"
    assert by_model(quality)["dit"]["LPIPS diversity"].startswith("missing [")
    assert "0.111" not in md  # the older sisma quality row of the same run and step
    # Each missing cell points at a footnote that gives the reason.
    for cell in (by_model(quality)["dit"]["FID"], by_model(quality)["dit"]["LPIPS diversity"]):
        note = cell.removeprefix("missing ")
        reason = next(line for line in md.splitlines() if line.startswith(note + " "))
        assert ("Inception" in reason) if cell == by_model(quality)["dit"]["FID"] else ("AlexNet" in reason)

    paper = table(md, "## The paper's figures beside this report's")
    assert {"paper", "this harness, counted", "this report"} <= {r["source"] for r in paper}
    assert any(r["hardware"] == "NVIDIA RTX 4090" and r["s / image (200 steps)"] == "8.51" for r in paper)
    ours = [r for r in paper if r["source"] == "this report"]
    assert [r["model"] for r in ours] == MODELS and all(r["hardware"] == "Test CPU (2 threads)" for r in ours)

    training = by_model(table(md, "## Training"))
    assert set(training) == set(MODELS) and training["sisma"]["steps"] == "300"

    for name in PLOTS:
        png = tmp_path / "reports" / "t" / name
        assert png.read_bytes()[:8] == PNG_SIGNATURE, name
        with Image.open(png) as im:
            im.verify()
        assert f"](t/{name})" in md


def test_report_cli_and_errors(results, tmp_path):
    runner = CliRunner()
    ok = runner.invoke(app, ["report", "--results", str(results), "--reports", str(tmp_path / "out")])
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "out" / "cpu.md").is_file()  # named after the preset of the newest rows

    empty = tmp_path / "empty"
    empty.mkdir()
    bad = runner.invoke(app, ["report", "--results", str(empty), "--reports", str(tmp_path / "out")])
    assert bad.exit_code == 2
    assert bad.output.strip().startswith("error:") and len(bad.output.strip().splitlines()) == 1
    assert f"no result rows to report in {empty}" in bad.output and str(empty / "speed.csv") in bad.output

    missing = runner.invoke(app, ["report", "--results", str(results), "--reports", str(tmp_path / "out"),
                                  "--preset", "paper"])
    assert missing.exit_code == 2 and "paper" in missing.output


# --- seeds, intervals, paired differences, ablations, quality against training --------------------------------

VARIANTS = ["sisma", "sisma:conv=causal1d:scan=raster", "sisma:scan=raster", "dit", "dit:cond=add", "sdm"]
QUALITY_LEVEL = {"sisma": 0.6, "sisma:conv=causal1d:scan=raster": 0.3, "sisma:scan=raster": 0.7, "dit": 0.6,
                 "dit:cond=add": 0.65, "sdm": 0.7}
N_MASKS, K = 30, 19


def mask_counts(model: str, seed: int, step: int, mask: int):
    """Per-class intersections and unions of one mask: dit's equal sisma's exactly (no difference to detect)."""
    base = "sisma" if model == "dit" else model
    rng = np.random.default_rng([seed, step, mask, sum(map(ord, base))])
    union = rng.integers(20, 60, K)
    level = QUALITY_LEVEL[model] * (0.5 + 0.5 * step / 300)
    return rng.binomial(union, level), union


@pytest.fixture
def seeded_results(tmp_path):
    """Results of `bench run --models <VARIANTS> --seeds 0,1`: two checkpoints per run, per-mask scores."""
    return make_seeded_results(tmp_path)


def make_seeded_results(tmp_path, snapshot_masks: int = N_MASKS):
    """The results of ``seeded_results``, the step-150 snapshots scored on the first ``snapshot_masks`` masks."""
    from bench.io import ResultsFile
    from bench.rows import SpeedRow

    res = tmp_path / "results"
    speed = []
    for model, latency in zip(VARIANTS, (0.030, 0.031, 0.029, 0.027, 0.026, 0.045)):
        times = latency * (1 + 0.01 * np.linspace(-1, 1, 20))
        speed.append(dict(PROVENANCE, mode="timed", status="ok", model=model, preset="cpu", resolution=32,
                          params=3_000_000, flops_per_nfe=1.5e9, steps=200, nfe=200, batch_size=1, compile=False,
                          latency_nfe_median_s=float(np.median(times)), latency_nfe_iqr_s=0.001,
                          latency_nfe_all_s=" ".join(f"{t:.6g}" for t in times),
                          image_latency_projected_s=latency * 200, timestamp="2025-01-02T00:00:00+00:00"))
    ResultsFile(res / "speed.csv", SpeedRow).append(speed)
    write_runs(res, VARIANTS, snapshot_masks=snapshot_masks)
    return res


def write_runs(res, variants, snapshot_masks: int = N_MASKS, again: bool = False, **row):
    """Quality rows and per-mask scores of ``variants`` at seeds 0 and 1, steps 150 and 300, with their run folders;
    ``again``: runs trained a second time, in new folders (other counts, later rows); ``row``: extra columns."""
    from bench.io import ResultsFile
    from bench.rows import MaskScoreRow, QualityRow

    quality, masks = [], []
    for model in variants:
        for seed in (0, 1):
            run = res / ("runs-again" if again else "runs") / model.replace(":", "_") / f"seed{seed}"
            run.mkdir(parents=True)
            (run / "config.json").write_text(json.dumps(dict(model=model.split(":")[0], preset="cpu", batch_size=8,
                                                             data="data/x", space="pixel", lr=1e-3)))
            for step in (150, 300):
                key = f"{'again-' if again else ''}{model}-{seed}-{step}"
                n_masks = snapshot_masks if step == 150 else N_MASKS
                inter_union = [mask_counts(model, seed + 10 * again, step, i) for i in range(n_masks)]
                ceiling = [mask_counts("sdm", 99 - again, 300, i) for i in range(n_masks)]
                for i, ((inter, union), (ci, cu)) in enumerate(zip(inter_union, ceiling)):
                    masks.append(dict(eval_key=key, model=model, preset="cpu", train_seed=seed, train_step=step, mask=i,
                                      mask_source=f"test-{1900 + i}", samples=2, pixel_diversity=0.2 + 0.001 * i,
                                      inter=" ".join(map(str, inter)), union=" ".join(map(str, union)),
                                      ceiling_inter=" ".join(map(str, ci)), ceiling_union=" ".join(map(str, cu))))
                quality.append(dict(PROVENANCE, run=str(run), model=model, preset="cpu", train_seed=seed,
                                    train_step=step, train_steps=300, image_size=32, n_masks=n_masks,
                                    samples_per_mask=2, method="euler", guidance=1.0, steps=20, nfe=20,
                                    fid_status=INCEPTION_REASON, kid_status=INCEPTION_REASON,
                                    lpips_status=ALEXNET_REASON, miou=0.5, miou_ceiling=0.7, pixel_diversity=0.2,
                                    eval_key=key, timestamp=f"2025-01-0{2 + again}T00:01:00+00:00", **row))
    ResultsFile(res / "quality_masks.csv", MaskScoreRow).append(masks)
    ResultsFile(res / "quality.csv", QualityRow).append(quality)


def test_report_gives_intervals_paired_differences_and_the_ablations(seeded_results, tmp_path):
    md = build_report(seeded_results, tmp_path / "reports", "s").read_text()
    quality = by_model(table(md, "## Quality"))
    assert list(quality) == VARIANTS
    for row in quality.values():
        assert row["seeds"] == "0,1" and row["masks x samples"] == f"{N_MASKS} x 2"
        value, interval = row["mask mIoU"].split(" ", 1)
        low, high = (float(v) for v in interval.strip("[]").split(", "))
        assert low < float(value) < high and high - low < 0.1
    diffs = by_model(table(md, "### Differences from SISMA"))
    assert diffs["dit"]["mIoU - sisma"] == "+0.000 [+0.000, +0.000], no detectable difference"
    raster = diffs["sisma:conv=causal1d:scan=raster"]["mIoU - sisma"]
    upper = raster.split("[")[1].split(",")[1].strip()
    assert raster.startswith("-0.") and "no detectable" not in raster and upper.startswith("-")
    ablation = by_model(table(md, "### SISMA's token mixing: scan order x conv"))
    assert set(ablation) == {"sisma", "sisma:conv=causal1d:scan=raster", "sisma:scan=raster"}
    assert ablation["sisma:conv=causal1d:scan=raster"]["causal"] == "yes"
    assert ablation["sisma:scan=raster"]["causal"] == "no"
    assert ablation["sisma"]["a token sees"] == "the whole image"
    assert ablation["sisma:scan=raster"]["a token sees"] == ("the tokens before it and at most 12 token rows below "
                                                             "(of 16)")
    # the report says which setting scored best, here one that sees less than the default
    assert "The default (`sisma`) has the highest mean mask mIoU of the settings that see the whole image." in md
    assert "`sisma:scan=raster`, which sees less of the image, scores higher than the default `sisma` (+0." in md
    assert ablation["sisma"]["mIoU - sisma"] == "(reference)"
    assert set(by_model(table(md, "### DiT-SIS: cross-attention against the aligned mask"))) == {"dit", "dit:cond=add"}
    curves = by_model(table(md, "### Quality against training"))
    assert set(curves) == set(VARIANTS) and all(r["step 150"] != "-" and r["step 300"] != "-" for r in curves.values())
    spread = 1 + 0.01 * np.linspace(-1, 1, 20)
    ratio = float(np.median(0.045 * spread) / np.median(0.030 * spread))
    assert f"SDM / SISMA time per network evaluation: {ratio:.2f} [" in md
    assert "different scale and hardware, not a target" in md
    assert (tmp_path / "reports" / "s" / "quality_training.png").is_file()


def test_curves_use_the_masks_every_checkpoint_has_when_snapshots_score_fewer(tmp_path):
    """Snapshots scored on the first 12 of 30 masks: each curve point is the mIoU over those 12 (means over seeds of
    the pooled per-class IoU), while the quality table keeps all 30 masks of the last step."""
    from bench.stats import miou_of

    res = make_seeded_results(tmp_path, snapshot_masks=12)
    md = build_report(res, tmp_path / "reports", "s").read_text()
    assert all(r["masks x samples"] == f"{N_MASKS} x 2" for r in table(md, "## Quality"))
    curves = by_model(table(md, "### Quality against training"))
    for model in VARIANTS:
        for step in (150, 300):
            per_seed = []
            for seed in (0, 1):
                inter, union = (np.stack(a) for a in zip(*[mask_counts(model, seed, step, i) for i in range(12)]))
                per_seed.append(miou_of(inter.sum(0), union.sum(0)))
            assert curves[model][f"step {step}"].startswith(f"{np.mean(per_seed):.3f} [")
    assert "every point of these curves uses the masks all its checkpoints have (12)" in md
    assert "every point of these curves" not in build_report(make_seeded_results(tmp_path / "all"),
                                                             tmp_path / "r2", "s").read_text()


def test_runs_scored_by_two_parsers_are_compared_only_within_one(tmp_path):
    """The default backbones trained again and scored by another parser, their variants not: every difference pairs
    runs of one parser (a variant against the default's older runs), the ranking uses SISMA's parser, and the report
    says which parser scored which run."""
    old = make_seeded_results(tmp_path / "old")
    before = build_report(old, tmp_path / "r-old", "s").read_text()
    again = ["sisma", "dit", "dit:cond=add", "sdm"]
    write_runs(old, again, again=True, parser_sha256="a" * 16)  # trained and scored again elsewhere
    md = build_report(old, tmp_path / "r-new", "s").read_text()

    quality = by_model(table(md, "## Quality"))
    assert {m: r["parser"] for m, r in quality.items()} == {m: "A" if m in again else "B" for m in VARIANTS}
    was_ceiling = by_model(table(before, "## Quality"))["sisma"]["parser ceiling (real)"]
    assert quality["sisma"]["parser ceiling (real)"] != was_ceiling  # the new runs' own rows
    assert "These runs were scored by more than one face parser" in md
    assert f"A, sha256 {'a' * 16}: SISMA" in md and "B, digest not recorded" in md
    # a variant's difference from SISMA is the one against SISMA's runs of its own parser: as before the retraining
    was, now = (by_model(table(text, "### Differences from SISMA")) for text in (before, md))
    for variant in ("sisma:conv=causal1d:scan=raster", "sisma:scan=raster"):
        assert now[variant]["mIoU - sisma"] == was[variant]["mIoU - sisma"]
    assert now["sdm"]["mIoU - sisma"] != was["sdm"]["mIoU - sisma"]  # both retrained: the new runs' difference
    # the token-mixing table shows SISMA's runs of the variants' parser, and says so
    mixing_was, mixing = (by_model(table(text, "### SISMA's token mixing: scan order x conv")) for text in (before, md))
    assert mixing == mixing_was
    assert "`sisma`'s row in this table is its runs scored by the same face parser as the other settings" in md
    assert "scores higher than the default `sisma`" in md  # the verdict of the variants' own parser
    dit = by_model(table(md, "### DiT-SIS: cross-attention against the aligned mask"))
    assert dit["dit"]["mask mIoU"] == quality["dit"]["mask mIoU"]  # both retrained: no substitution
    # the ranking and its settling use SISMA's parser; the variants are left out, saying why
    assert "SISMA (scan=raster): scored by another face parser" in md
    assert "Mask mIoU of generated images (mean over seeds, 95% interval; parser in brackets): SISMA 0.600 [" in md
    settled = table(md, "### Is the ranking settled?")
    named = " ".join(" ".join(r.values()) for r in settled)
    assert "raster" not in named and "SISMA" in named


def test_paired_differences_refuse_runs_of_two_parsers():
    from bench.report.estimates import Scores, paired, parser_of
    counts = np.ones((1, 3, K), dtype=np.int64)

    def runs(parser):
        rows = pd.DataFrame({"parser_sha256": [parser], "train_seed": [0]})
        return Scores("m", 300, rows, [0], sources=["a", "b", "c"], inter=counts, union=counts * 2,
                      ceiling_inter=counts, ceiling_union=counts, pixel=np.zeros((1, 3)), lpips=np.zeros((1, 3)))

    assert parser_of(runs(None)) == "" and parser_of(runs("a" * 16)) == "a" * 16
    assert paired(runs("a" * 16), runs("a" * 16))["miou"].value == 0
    assert paired(runs("a" * 16), runs("b" * 16)) == {} and paired(runs(None), runs("a" * 16)) == {}


def test_time_to_quality_names_the_machines_the_runs_trained_on():
    """From the runs' own loss logs; a run resumed on another machine is said to mix them."""
    from types import SimpleNamespace

    from bench.report.quality import time_source
    ctx = SimpleNamespace(sel=SimpleNamespace(quality=pd.DataFrame({"device_name": ["Scoring CPU (2 threads)"]})))
    log = pd.DataFrame({"step": [10, 20], "cpu_s": [1.0, 2.0], "threads": [2, 2], "machine": ["CPU A", "CPU A"]})
    one = time_source(ctx, {"sisma": {0: log}}, "cpu_s")
    assert "on CPU A, 2 thread(s)" in one and "mix" not in one and "Scoring" not in one
    moved = time_source(ctx, {"sisma": {0: log}, "dit": {0: log.assign(machine=["CPU A", "CPU B"])}}, "cpu_s")
    assert "on CPU A and CPU B (the times of these runs mix machines)" in moved
    older = time_source(ctx, {"sisma": {0: log.drop(columns="machine")}}, "cpu_s")
    assert "on Scoring CPU, 2 thread(s)" in older  # logs older than the column: the scoring machine
