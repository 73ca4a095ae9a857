"""`bench speed`: columns and values of a timed run, FLOP counts against hand counts, the power-law fit,
one-line errors, out-of-memory rows and append-only output."""
from __future__ import annotations

import csv
import math

import pandas as pd
import pytest
import torch
import torch.nn as nn
from typer.testing import CliRunner

from bench import speed, timing
from bench.cli import app
from bench.errors import BenchError
from bench.flops import count_flops, equivalent_tokens, fit_power_law
from models.ssm import scan_flops, selective_scan

STEPS = 4  # whole images of 4 Euler steps keep the timed tests short
# One thread: on a shared, loaded machine two intra-op threads can make tiny convolutions 20x slower.
# --allow-busy --quiet-wait 0: these tests check what is measured, not the machine's quiet (tests/test_quiet.py does)
QUICK = ["--steps", str(STEPS), "--preset", "tiny", "--warmup", "1", "--repeats", "3", "--image-repeats", "1",
         "--device", "cpu", "--threads", "1", "--allow-busy", "--quiet-wait", "0"]


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def quick_config(tmp_path, **kw) -> speed.SpeedConfig:
    base = dict(models=["sisma", "dit", "sdm"], preset="tiny", steps=STEPS, batch_sizes=[1, 2], warmup=1,
                repeats=3, image_repeats=1, device="cpu", threads=1, out=tmp_path / "speed.csv", allow_busy=True,
                quiet_wait=0.0)
    return speed.SpeedConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def timed_rows(tmp_path_factory):
    """One CLI run of every backbone at the tiny preset, batch sizes 1 and 2; the rows of its CSV."""
    out = tmp_path_factory.mktemp("speed") / "speed.csv"
    result = CliRunner().invoke(app, ["speed", "--models", "sisma,dit,sdm", "--batch-sizes", "1,2",
                                      "--out", str(out), *QUICK])
    assert result.exit_code == 0, result.output
    return read_csv(out)


def test_timed_run_writes_every_column_with_sensible_values(timed_rows):
    assert list(timed_rows[0]) == speed.COLUMNS
    assert [(r["model"], int(r["batch_size"])) for r in timed_rows] == [
        (m, b) for m in ("sisma", "dit", "sdm") for b in (1, 2)]
    for r in timed_rows:
        assert r["mode"] == "timed" and r["status"] == "ok" and r["device"] == "cpu"
        assert int(r["steps"]) == STEPS and int(r["nfe"]) == STEPS
        med, lo = float(r["latency_nfe_median_s"]), float(r["latency_nfe_min_s"])
        assert 0 < lo <= med and float(r["latency_nfe_iqr_s"]) >= 0 and float(r["latency_nfe_std_s"]) >= 0
        # measured and projected whole-image latency live in separate columns, both filled here
        assert float(r["image_latency_s"]) > 0 and int(r["image_repeats"]) == 1
        assert float(r["image_latency_projected_s"]) == pytest.approx(
            med * STEPS + float(r["decode_latency_s"]), rel=1e-4)
        assert float(r["images_per_s"]) == pytest.approx(int(r["batch_size"]) / float(r["image_latency_s"]), rel=1e-4)
        assert int(r["flops_per_nfe"]) == int(r["flops_counter"]) + int(r["flops_scan"]) > 0
        assert int(r["params"]) > 0 and int(r["threads"]) == 1 and r["torch"] == torch.__version__
        assert float(r["peak_rss_delta_mib"]) >= 0 and r["peak_cuda_allocated_mib"] == ""
        assert r["decoder"] == speed.PIXEL_DECODER_LABEL
    for r in timed_rows:  # where the time goes: profiled at the smallest batch only, shares summing to 1
        shares = [float(r[f"share_{c}"]) for c in ("matmul", "attention", "scan", "conv", "norm_elementwise",
                                                    "layout", "other")] if r["profile_nfe_ms"] else []
        assert (float(r["profile_nfe_ms"]) > 0 and sum(shares) == pytest.approx(1, abs=1e-3)) if \
            r["batch_size"] == "1" else r["profile_nfe_ms"] == ""
        assert float(r["achieved_gflops"]) > 0 and float(r["calibration_gflops"]) > 0 and r["sweep"]
    by_model = {r["model"]: r for r in timed_rows}
    assert int(by_model["sisma"]["flops_scan"]) > 0 and by_model["sisma"]["scan_backend"] not in ("", "none")
    assert by_model["sisma"]["attention_kernel"] == "none"
    assert int(by_model["dit"]["flops_scan"]) == 0 and by_model["dit"]["scan_backend"] == "none"
    assert by_model["dit"]["attention_kernel"] not in ("", "none")  # SDPA ran, and we say which kernel


def test_whole_image_beyond_budget_is_projected_not_measured(tmp_path):
    rows = speed.run_speed(quick_config(tmp_path, models=["dit"], batch_sizes=[1], full_image_max_seconds=0.0,
                                        breakdown=False), echo=lambda s: None)
    row = rows.iloc[0]
    assert pd.isna(row["profile_nfe_ms"])  # --no-breakdown: nothing profiled
    assert math.isnan(float(row["image_latency_s"])) and math.isnan(float(row["images_per_s"]))
    projected = row["latency_nfe_median_s"] * STEPS + row["decode_latency_s"]
    assert row["image_latency_projected_s"] == pytest.approx(projected)
    assert row["nfe"] == STEPS
    written = read_csv(tmp_path / "speed.csv")[0]
    assert written["image_latency_s"] == "" and float(written["image_latency_projected_s"]) > 0


class LinearAndScan(nn.Module):
    """A Linear layer followed by one selective scan: FLOPs countable by hand."""

    def __init__(self, d_in, dim, state):
        super().__init__()
        self.proj = nn.Linear(d_in, dim)
        self.A = nn.Parameter(torch.empty(dim, state))

    def forward(self, x):  # x (B, L, d_in)
        u = self.proj(x).transpose(1, 2)  # (B, D, L)
        b = u.new_empty(u.shape[0], self.A.shape[1], u.shape[2])  # (B, N, L)
        return selective_scan(u, u, self.A, b, b)


def test_flops_on_meta_match_hand_count():
    batch, length, d_in, dim, state = 3, 10, 8, 16, 4
    with torch.device("meta"):
        model = LinearAndScan(d_in, dim, state)
        x = torch.empty(batch, length, d_in)
    flops = count_flops(model, x)
    assert flops.counter == 2 * batch * length * d_in * dim  # a multiply-add counts as two
    assert flops.scan == scan_flops(batch, dim, length, state) == 9 * batch * dim * length * state
    assert flops.total == flops.counter + flops.scan


def test_meta_count_of_a_backbone_equals_its_real_count_and_the_scan_formula():
    import models
    from bench.flops import example_inputs

    torch.manual_seed(0)
    real = models.create_model("sisma", preset="tiny").eval()
    with torch.device("meta"):
        meta = models.create_model("sisma", preset="tiny").eval()
    on_cpu = count_flops(real, *example_inputs(real, 2, "cpu"))
    on_meta = count_flops(meta, *example_inputs(meta, 2, "meta"))
    assert on_cpu == on_meta
    cfg = meta.config
    scans_per_block = 2  # Self-Mamba and Cross-Mamba, one raster scan each
    expected_scan = cfg.depth * scans_per_block * scan_flops(2, cfg.expand * cfg.width, meta.num_tokens, cfg.d_state)
    assert on_meta.scan == expected_scan


def test_sdm_paper_flops_at_256_px():
    """SDM costs about 3.4 TFLOPs per forward at 256 px (multiply-add = 2)."""
    base = speed.eval_model("sdm", "paper", {}, "meta")
    s = speed.describe_setting("sdm", "paper", 256, base)
    assert s.flops.total == pytest.approx(3.4e12, rel=0.03)
    assert s.flops.scan == 0 and s.params == pytest.approx(653.06e6, rel=0.005)


def test_power_law_fit_recovers_the_exponent():
    x = [64, 256, 1024, 4096]
    k, a = fit_power_law(x, [3.0 * v ** 1.7 for v in x])
    assert k == pytest.approx(1.7) and a == pytest.approx(3.0)
    assert fit_power_law([256, 256], [1.0, 2.0]) is None
    assert equivalent_tokens(256) == 256 and equivalent_tokens(512) == 4 * equivalent_tokens(256)


def test_flops_only_cli_sweeps_resolutions_and_fits_exponents(tmp_path):
    out = tmp_path / "flops.csv"
    result = CliRunner().invoke(app, ["speed", "--flops-only", "--preset", "tiny", "--models", "sisma,sdm",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = read_csv(out)
    assert [(r["model"], int(r["resolution"])) for r in rows] == [
        (m, px) for m in ("sisma", "sdm") for px in (16, 32, 64)]
    assert all(r["mode"] == "flops-only" and r["device"] == "meta" and r["latency_nfe_median_s"] == "" for r in rows)
    sisma = [r for r in rows if r["model"] == "sisma"]
    # SISMA's FLOPs are linear in the tokens: the exponent is 1 (up to the token-independent time embedding)
    assert float(sisma[0]["flops_exponent"]) == pytest.approx(1.0, abs=0.02)
    assert "FLOPs exponent" in result.output and "| sisma" in result.output


def run_cli(args):
    result = CliRunner().invoke(app, ["speed", *args])
    return result.exit_code, result.stderr.strip().splitlines()


@pytest.mark.parametrize("args, says", [
    (["--models", "sisma,nosuchmodel"], "unknown model 'nosuchmodel'"),
    (["--models", "sisma", "--resolutions", "17"], "cannot take 17 px"),
    (["--models", "sdm", "--preset", "cpu", "--resolutions", "34"], "cannot take 34 px"),
    (["--models", "dit", "--batch-sizes", "one"], "--batch-sizes takes comma-separated integers"),
])
def test_bad_input_is_a_one_line_error(tmp_path, args, says):
    code, lines = run_cli([*args, "--flops-only", "--out", str(tmp_path / "x.csv")])
    assert code != 0 and len(lines) == 1 and lines[0].startswith("error:") and says in lines[0], lines
    assert not (tmp_path / "x.csv").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_device_is_a_one_line_error(tmp_path):
    code, lines = run_cli(["--models", "dit", "--device", "cuda", "--out", str(tmp_path / "x.csv")])
    assert code != 0 and len(lines) == 1 and "no CUDA device" in lines[0]


def test_out_of_memory_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch):
    from bench import rounds

    real = rounds.warm_up

    def warm_up(job, it, model, inputs, device, precision):
        if job.settings[it.setting]["name"] == "dit" and it.batch_size == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")
        return real(job, it, model, inputs, device, precision)

    monkeypatch.setattr(rounds, "warm_up", warm_up)
    rows = speed.run_speed(quick_config(tmp_path, models=["dit", "sdm"], full_image_max_seconds=0.0),
                           echo=lambda s: None)
    status = dict(zip(zip(rows["model"], rows["batch_size"]), rows["status"]))
    assert status == {("dit", 1): "ok", ("dit", 2): "oom", ("sdm", 1): "ok", ("sdm", 2): "ok"}
    oom = read_csv(tmp_path / "speed.csv")[1]
    assert oom["status"] == "oom" and "out of memory" in oom["error"] and oom["latency_nfe_median_s"] == ""
    assert int(oom["params"]) > 0  # what was known before the failure is still recorded
    assert timing.is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried ..."))
    assert not timing.is_out_of_memory(RuntimeError("shape mismatch"))


def test_output_is_appended_never_truncated(tmp_path):
    out = tmp_path / "speed.csv"
    cfg = quick_config(tmp_path, models=["sdm"], flops_only=True, resolutions=[16])
    speed.run_speed(cfg, echo=lambda s: None)
    first = out.read_text()
    speed.run_speed(cfg, echo=lambda s: None)
    second = out.read_text()
    assert second.startswith(first) and len(read_csv(out)) == 2
    assert second.count("mode,status") == 1  # one header


def test_a_results_file_that_is_not_ours_is_refused_before_anything_is_timed(tmp_path, monkeypatch):
    out = tmp_path / "speed.csv"
    out.write_text("model,note\nold,kept\n")
    from bench import rounds

    timed = []
    monkeypatch.setattr(rounds, "warm_up", lambda *a, **k: timed.append(1))
    with pytest.raises(BenchError, match="not a sis-bench SpeedRow file"):
        speed.run_speed(quick_config(tmp_path, models=["sdm"]), echo=lambda s: None)
    assert timed == [] and out.read_text() == "model,note\nold,kept\n"


def test_bench_error_for_unknown_precision(tmp_path):
    with pytest.raises(BenchError, match="precision"):
        speed.run_speed(quick_config(tmp_path, precision="fp8"), echo=lambda s: None)


def test_latent_models_decode_with_the_sd_vae_architecture_without_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))  # no SD-VAE weights reachable
    decoder, label = speed.load_decoder("latent", None, torch.device("cpu"))
    assert label == speed.RANDOM_VAE_LABEL
    with torch.inference_mode():
        images = decoder.decode(torch.randn(1, 4, 4, 4))
    assert images.shape == (1, 3, 32, 32)  # SD-VAE: 8x upsampling
    with pytest.raises(BenchError):  # weights asked for by name must exist
        speed.load_decoder("latent", str(tmp_path / "no-such-vae"), torch.device("cpu"))
    pixel, label = speed.load_decoder("pixel", None, torch.device("cpu"))
    assert label == speed.PIXEL_DECODER_LABEL and pixel.decode(torch.full((1, 3, 2, 2), 3.0)).max() == 1


def test_each_model_runs_at_its_recipe_precision_cast_once(tmp_path, monkeypatch):
    """Default: the recipe's precision (bf16 at paper, fp32 at tiny); --precision bf16 casts the timed model once,
    and the whole images come after one untimed image."""
    import bench.sample

    assert speed.recipe_precision("sisma", "paper") == "bf16" and speed.recipe_precision("sdm", "paper") == "bf16"
    assert speed.recipe_precision("sisma:scan=raster", "tiny") == "fp32"
    from bench import rounds

    seen, images = [], []
    real_warm_up, real_sample = rounds.warm_up, bench.sample.sample_batch

    def warm_up(job, it, model, inputs, device, precision):
        seen.append((precision, next(model.parameters()).dtype))
        return real_warm_up(job, it, model, inputs, device, precision)

    def sample(model, *args, **kwargs):
        images.append(model.x_embedder.proj.weight.dtype)
        return real_sample(model, *args, **kwargs)

    monkeypatch.setattr(rounds, "warm_up", warm_up)
    monkeypatch.setattr(bench.sample, "sample_batch", sample)
    rows = speed.run_speed(quick_config(tmp_path, models=["dit"], batch_sizes=[1], image_repeats=2),
                           echo=lambda s: None)
    assert seen == [("fp32", torch.float32)] and rows.iloc[0]["precision"] == "fp32"
    assert images == [torch.float32] * 3  # one untimed image, then image_repeats timed ones
    seen.clear()
    rows = speed.run_speed(quick_config(tmp_path, models=["dit"], batch_sizes=[1], precision="bf16",
                                        full_image_max_seconds=0.0), echo=lambda s: None)
    assert seen == [("bf16", torch.bfloat16)] and rows.iloc[0]["precision"] == "bf16"
    assert rows.iloc[0]["status"] == "ok" and rows.iloc[0]["latency_nfe_median_s"] > 0


def test_compiled_model_does_not_recompile_while_timed(tmp_path, monkeypatch):
    """--compile (dynamo with the eager backend here: no C++ compilation on a CPU test) is warmed in the timed grad
    mode and shapes, so per-NFE, guided and whole-image timings recompile nothing (a recompile would be an error)."""
    compiled = []
    real_compile = torch.compile

    def eager_compile(model, **kwargs):
        compiled.append(model)
        return real_compile(model, backend="eager")

    monkeypatch.setattr(torch, "compile", eager_compile)
    torch._dynamo.reset()
    rows = speed.run_speed(quick_config(tmp_path, models=["dit"], batch_sizes=[1], compile=True, image_repeats=2),
                           echo=lambda s: None)
    assert len(compiled) == 1 and rows.iloc[0]["status"] == "ok" and rows.iloc[0]["image_repeats"] == 2
    torch._dynamo.reset()


def test_a_recompile_inside_a_timed_region_is_an_error():
    from bench.timing import no_recompiles

    fn = torch.compile(lambda x: x * 2, backend="eager")
    fn(torch.ones(2))
    with no_recompiles(False):
        fn(torch.ones(3, 3))  # allowed outside a checked region
    with pytest.raises(BenchError, match="recompiled inside a timed region"):
        with no_recompiles(True):
            fn(torch.ones(4, 4, 4))
    torch._dynamo.reset()


def test_cuda_peak_memory_is_the_rise_over_what_was_allocated(monkeypatch):
    """CUDA's columns from the allocator's counters (faked here): the peak and its rise above the level before."""
    counters = {"allocated": 300 * timing.MIB, "peak": 0}
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats",
                        lambda device=None: counters.update(peak=counters["allocated"]))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: counters["allocated"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: counters["peak"])
    out = timing.peak_memory(lambda: counters.update(peak=counters["peak"] + 48 * timing.MIB), torch.device("cuda"))
    assert out == {"peak_cuda_allocated_mib": 348.0, "peak_cuda_delta_mib": 48.0}


@pytest.mark.parametrize("budget, measured", [(0.29, False), (0.31, True)])
def test_whole_images_are_timed_only_when_every_repeat_fits_the_budget(tmp_path, monkeypatch, budget, measured):
    """Calls timed at 10 ms: an image of 4 steps is projected at 4 x 10 + 10 (decode) = 50 ms, so the untimed image
    and 5 timed ones need 0.30 s: a budget short of that gives the projection alone, never a median of fewer."""
    from bench import rounds

    monkeypatch.setattr(rounds, "time_calls", lambda fn, warmup, repeats, device: [0.01] * repeats)
    cfg = quick_config(tmp_path, models=["dit"], batch_sizes=[1], image_repeats=speed.MIN_IMAGE_REPEATS,
                       full_image_max_seconds=budget)
    rows = speed.run_speed(cfg, echo=lambda s: None)
    row = rows.iloc[0]
    assert row["image_latency_projected_s"] == pytest.approx(0.05)
    if measured:
        assert row["image_repeats"] == speed.MIN_IMAGE_REPEATS and row["image_latency_s"] > 0
    else:
        assert pd.isna(row["image_latency_s"]) and pd.isna(row["image_repeats"])


def round_orders(path):
    """(process, round) -> the (model, kind) sequence in the order the round timed them."""
    rows = speed.ResultsFile(speed.rounds_path(path), speed.RoundRow).read()
    rows = rows.sort_values(["process", "round", "position"])
    return {key: list(zip(g["model"], g["kind"])) for key, g in rows.groupby(["sweep", "process", "round"])}


@pytest.mark.slow  # 18 s of fresh interpreters; the suite must stay under ten minutes on two cores
def test_rounds_interleave_every_model_in_seeded_shuffled_orders_across_fresh_processes(tmp_path):
    """Two worker processes x 3 rounds: every round times each model once per kind, in an order shuffled per round
    and the same for the same seed; the rows carry each process's median."""
    cfg = dict(models=["dit", "sdm"], batch_sizes=[1], processes=2, repeats=3, full_image_max_seconds=0.0,
               breakdown=False)
    rows = speed.run_speed(quick_config(tmp_path, **cfg), echo=lambda s: None)
    assert (rows["processes"] == 2).all() and rows["sweep"].nunique() == 1
    assert all(len(v.split()) == 2 for v in rows["latency_nfe_process_medians_s"])
    first = round_orders(tmp_path / "speed.csv")
    assert sorted({(p, r) for _, p, r in first}) == [(p, r) for p in (0, 1) for r in range(3)]
    expected = sorted((m, k) for m in ("dit", "sdm") for k in ("nfe", "guided", "decode"))
    assert all(sorted(order) == expected for order in first.values())
    assert len({tuple(order) for order in first.values()}) > 1  # shuffled, not one fixed order
    speed.run_speed(quick_config(tmp_path, **cfg), echo=lambda s: None)  # the same seed: the same orders
    both = round_orders(tmp_path / "speed.csv")
    second = {key: order for key, order in both.items() if key not in first}
    assert [second[k] for k in sorted(second)] == [first[k] for k in sorted(first)]
