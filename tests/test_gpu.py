"""Checks that need a CUDA GPU (marker ``gpu``; skipped with the reason elsewhere): ``pytest -m gpu``.

- the CUDA selective scan (mamba-ssm's ``selective_scan_fn``, through ``models.ssm`` with SIS_BENCH_SCAN=cuda) and
  the causal conv (causal-conv1d) against the CPU implementations, at the libraries' own test tolerances
  (mamba-ssm tests/ops/test_selective_scan.py; causal-conv1d tests/test_causal_conv1d.py);
- mamba-ssm's fused ``mamba_inner_fn`` against ``models.ssm.mamba_inner_reference`` on the CPU
  (``bench.gpucheck.fused_mamba_comparison``, which ``bench gpu-check`` runs too), and SISMA's Self-Mamba on CUDA (the
  fused kernel) against the same layer on the CPU;
- one bf16 training step and one sampled image per backbone;
- one ``bench speed`` row on CUDA;
- ``bench plan``'s prediction against ``torch.cuda.max_memory_allocated`` of the same training steps (15%;
  ``bench.gpucheck.measured_training_peak``);
- DDP over NCCL when two GPUs are visible.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.gpucheck import PLAN_TOLERANCE, SCAN_TOL, fused_mamba_comparison, measured_training_peak, self_mamba_layer

CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU: torch.cuda.is_available() is False here "
                                                  "(`bench doctor` says why)")]
PLAN_TOL = PLAN_TOLERANCE  # 0.15
MODELS = ["sisma", "dit", "sdm"]
BENCH = str(Path(sys.executable).with_name("bench"))


def _mamba_scan():
    from models import ssm

    fn = ssm._cuda_op("mamba_ssm.ops.selective_scan_interface", "selective_scan_fn")
    if fn is None:
        pytest.skip("mamba-ssm's CUDA scan does not load (MAMBA_KEEP_CUDA_BUILD=TRUE pip install mamba-ssm "
                    "--no-build-isolation; `bench doctor` gives the error)")
    return fn


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    from bench.synth import ensure_synthetic

    return ensure_synthetic(tmp_path_factory.mktemp("faces"), n=24, size=32, seed=0, progress=False)


# ---------------------------------------------------------------------------------------------- kernels

# SCAN_TOL: mamba-ssm's tolerances, outputs (rtol, atol); weights (rtolw, atolw) raised to the outputs' with z


@pytest.mark.parametrize("itype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("length", [256, 2049])  # 2049: two of the kernel's 2048-position chunks
def test_cuda_scan_matches_the_cpu_kernel(monkeypatch, itype, groups, length):
    from models import ssm

    _mamba_scan()
    monkeypatch.setenv(ssm.BACKEND_ENV, "cuda")
    rtol, atol = SCAN_TOL[itype]
    rtolw, atolw = max(1e-3, rtol), max(1e-3, atol)
    torch.manual_seed(0)
    batch, dim, state = 2, 64, 16
    shape_bc = (batch, state, length) if groups == 1 else (batch, groups, state, length)
    inputs = {  # mamba-ssm's test distributions; A, D and delta_bias in fp32 as its kernel requires
        "u": torch.randn(batch, dim, length, dtype=itype), "delta": 0.5 * torch.rand(batch, dim, length, dtype=itype),
        "A": -0.5 * torch.rand(dim, state), "B": torch.randn(*shape_bc, dtype=itype),
        "C": torch.randn(*shape_bc, dtype=itype), "D": torch.randn(dim),
        "z": torch.randn(batch, dim, length, dtype=itype), "delta_bias": 0.5 * torch.rand(dim),
    }
    gpu = {k: v.cuda().requires_grad_() for k, v in inputs.items()}
    cpu = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    ssm.reset_used_backends()
    out = ssm.selective_scan(**gpu, delta_softplus=True)
    assert ssm.used_backends() == {"cuda"}
    # the C kernel (fp32 inside, like mamba-ssm's reference); the step-by-step loop where no C compiler is at hand
    reference = ssm.selective_scan_cpu if ssm._KERNEL.load() is not None else ssm.selective_scan_ref
    ref = reference(**cpu, delta_softplus=True)
    torch.testing.assert_close(out.cpu(), ref, rtol=rtol, atol=atol)
    g = torch.randn_like(ref)
    out.backward(g.cuda())
    ref.backward(g)
    grad_tol = {"u": (2 * rtol, 2 * atol), "delta": (5 * rtol, 10 * atol), "A": (rtolw, 5 * atolw),
                "B": (rtol, atol), "C": (rtol, atol), "D": (rtolw, atolw), "z": (rtolw, atolw),
                "delta_bias": (rtolw, atolw)}
    for name, (r, a) in grad_tol.items():
        torch.testing.assert_close(gpu[name].grad.cpu(), cpu[name].grad, rtol=r, atol=a, msg=f"d{name}")


# causal-conv1d's tolerances: outputs and dx (rtol, atol), weight and bias gradients (1e-3, 1e-3)
CONV_TOL = {torch.float32: (3e-4, 1e-3), torch.bfloat16: (1e-2, 5e-2)}


@pytest.mark.parametrize("itype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_causal_conv_matches_the_cpu_conv(itype):
    from models import ssm

    if ssm._cuda_op("causal_conv1d", "causal_conv1d_fn") is None:
        pytest.skip("causal-conv1d does not load (pip install causal-conv1d --no-build-isolation)")
    rtol, atol = CONV_TOL[itype]
    torch.manual_seed(0)
    x = torch.randn(2, 64, 256, dtype=itype)
    w, b = torch.randn(64, 4), torch.randn(64)
    xg, wg, bg = (t.cuda().requires_grad_() for t in (x, w, b))
    xc, wc, bc = (t.clone().float().requires_grad_() for t in (x, w, b))  # the reference computes in fp32
    out = ssm.causal_conv1d(xg, wg, bg, activation="silu")
    ref = ssm.causal_conv1d(xc, wc, bc, activation="silu")
    torch.testing.assert_close(out.cpu(), ref.to(itype), rtol=rtol, atol=atol)
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g.cpu().float())
    torch.testing.assert_close(xg.grad.cpu(), xc.grad.to(itype), rtol=rtol, atol=atol)
    torch.testing.assert_close(wg.grad.cpu(), wc.grad, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(bg.grad.cpu(), bc.grad, rtol=1e-3, atol=1e-3)


def _fused_kernel():
    from models import ssm

    if ssm._fused_op() is None:
        pytest.skip("mamba-ssm's mamba_inner_fn needs mamba-ssm's CUDA scan and causal-conv1d's CUDA conv (see "
                    "docs/gpu.md; `bench doctor` says what is missing)")


@pytest.mark.parametrize("itype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_mamba_inner_matches_the_cpu_reference(itype):
    """The kernel against models.ssm.mamba_inner_reference (fp32 on the CPU) with Self-Mamba's weights, as SISMA
    calls it: xz in the input dtype, the weights fp32 (bf16 autocast casts the projections inside); the output within
    5x the scan's tolerances, each gradient within 10 x (atol + rtol x its largest value)."""
    _fused_kernel()
    result = fused_mamba_comparison(itype)
    assert result["ok"], result


@pytest.mark.parametrize("scan", ["raster", "zigzag"])
def test_self_mamba_on_cuda_runs_the_fused_kernel_and_matches_the_cpu(scan):
    import copy

    from models import ssm

    _fused_kernel()
    layer = self_mamba_layer(scan=scan)
    x = torch.randn(2, 256, 64)
    ssm.reset_used_backends()
    out = copy.deepcopy(layer).cuda()(x.cuda())
    assert ssm.FUSED_BACKEND in ssm.used_backends()
    ref = layer(x)  # the CPU: C kernel scan, unfused
    torch.testing.assert_close(out.cpu(), ref, rtol=3 * SCAN_TOL[torch.float32][0], atol=3 * SCAN_TOL[torch.float32][1])


# ---------------------------------------------------------------------------------------------- training, sampling

@pytest.mark.parametrize("model", MODELS)
def test_bf16_training_step_and_one_image(faces, tmp_path, model):
    from bench.sample import load_run, sample_batch
    from bench.train import make_config, train
    from models.ssm import reset_used_backends, used_backends

    run = tmp_path / "run"
    cfg = make_config(model, run, preset="tiny", data=str(faces), steps=1, batch_size=4, precision="bf16",
                      grid_steps=2, grid_masks=1)
    reset_used_backends()
    result = train(cfg, run, device="cuda", progress=False)
    assert result["step"] == 1 and torch.isfinite(torch.tensor(result["loss"]))
    if model == "sisma":
        from models import ssm

        mamba = ssm._cuda_op("mamba_ssm.ops.selective_scan_interface", "selective_scan_fn") is not None
        fused = ssm._fused_op() is not None  # Self-Mamba fused, Cross-Mamba through selective_scan_fn
        assert used_backends() == ({"cuda", ssm.FUSED_BACKEND} if fused else {"cuda"} if mamba else {"torch"})
    loaded = load_run(run, "cuda")
    masks = torch.zeros(1, loaded.model.num_classes, loaded.image_size, loaded.image_size)
    masks[:, 1] = 1
    noise = torch.randn(1, *loaded.model.input_shape)
    images, nfe = sample_batch(loaded.model, loaded.space, masks, noise, steps=4, precision="bf16")
    assert nfe == 4 and images.shape == (1, 3, loaded.image_size, loaded.image_size)
    assert torch.isfinite(images).all()


def test_one_speed_row_on_cuda(tmp_path):
    from bench.speed import SpeedConfig, run_speed

    cfg = SpeedConfig(models=["sisma", "dit"], preset="tiny", steps=4, batch_sizes=[2], warmup=1, repeats=3,
                      image_repeats=1, device="cuda", precision="bf16", out=tmp_path / "speed.csv")
    rows = run_speed(cfg, echo=lambda *a, **k: None)
    rows = rows.to_dict("records") if hasattr(rows, "to_dict") else list(rows)  # a DataFrame of the rows
    assert [r["model"] for r in rows] == ["sisma", "dit"]
    for row in rows:
        assert row["status"] == "ok" and row["device"] == "cuda"
        assert float(row["peak_cuda_allocated_mib"]) > float(row["peak_cuda_delta_mib"]) > 0
        assert float(row["latency_nfe_median_s"]) > 0 and row["precision"] == "bf16"
    assert rows[1]["attention_kernel"] != "none"


# ---------------------------------------------------------------------------------------------- bench plan

@pytest.mark.parametrize("model, batch, micro, checkpointing", [
    ("sisma", 4, 4, False), ("dit", 4, 4, False), ("sdm", 4, 4, False),
    ("sisma", 8, 4, True), ("sdm", 8, 4, True),  # sdm's 24 GiB plan at the paper's batch 8
])
def test_plan_predicts_max_memory_allocated(model, batch, micro, checkpointing):
    """The paper preset in bf16: bench plan's training peak (the sample grid left out) against the allocator."""
    from bench.plan import Setting, training_memory

    if model == "sisma":
        _mamba_scan()  # the prediction assumes mamba-ssm's kernel
    setting = Setting(micro, batch // micro, checkpointing)
    free, total = torch.cuda.mem_get_info()
    predicted = training_memory(model, "paper", batch, setting, "bf16", grid_batch=0).peak
    if predicted > 0.8 * free:
        pytest.skip(f"predicted {predicted / 2 ** 30:.1f} GiB does not fit this GPU's free memory")
    measured = measured_training_peak(model, "paper", batch, setting, "bf16", steps=2)
    assert predicted == pytest.approx(measured, rel=PLAN_TOL), (predicted / 2 ** 30, measured / 2 ** 30)


# ---------------------------------------------------------------------------------------------- DDP

@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="DDP over NCCL needs two GPUs")
def test_ddp_over_nccl_matches_one_gpu(faces, tmp_path):
    from bench.checkpoint import load
    from bench.train import make_config, train

    one, two = tmp_path / "one", tmp_path / "two"
    options = ["--preset", "tiny", "--data", str(faces), "--steps", "3", "--batch-size", "4", "--grid-steps", "2",
               "--log-every", "1", "--device", "cuda"]
    # TF32 off (cuDNN allows it for convs by default): a conv of half the batch may round differently
    env = dict(os.environ, PYTHONUNBUFFERED="1", NVIDIA_TF32_OVERRIDE="0")
    env.pop("RANK", None), env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", BENCH, "train",
           "dit", *options, "--out", str(two)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        train(make_config("dit", one, preset="tiny", data=str(faces), steps=3, batch_size=4, grid_steps=2, log_every=1),
              one, device="cuda", progress=False)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    s1, s2 = load(one / "checkpoints" / "last.pt"), load(two / "checkpoints" / "last.pt")
    assert s2["step"] == 3
    losses = [[float(line.split(",")[1]) for line in (run / "loss.csv").read_text().splitlines()[1:]]
              for run in (one, two)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-3)
    for name in s1["model"]:  # the all-reduce sums in another order than one process; AdamW rescales the difference
        torch.testing.assert_close(s2["model"][name], s1["model"][name], rtol=1e-2, atol=1e-3, msg=name)
