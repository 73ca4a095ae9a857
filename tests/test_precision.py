"""Precision end to end: TF32 set and restored through one API, models cast once for inference (no weight cast per
call), runs sampled at their training precision, the plan's sampling memory with cast weights."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bench.runtime import cast_for_inference, model_precision, tf32

pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest.py


def _flags():
    m, c = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    return m.fp32_precision, c.fp32_precision


@pytest.mark.skipif(not hasattr(torch.backends.cuda.matmul, "fp32_precision"), reason="torch without fp32_precision")
def test_tf32_is_set_inside_and_restored_after():
    before = _flags()
    with tf32(True):
        assert _flags() == ("tf32", "tf32")
        with tf32(False):
            assert _flags() == ("ieee", "ieee")
        assert _flags() == ("tf32", "tf32")
    assert _flags() == before
    with pytest.raises(KeyError):
        with tf32(True):
            raise KeyError("inside")
    assert _flags() == before
    # torch refuses to read the legacy flags while the new API holds values it set: restored, they read again
    assert isinstance(torch.backends.cuda.matmul.allow_tf32, bool) and isinstance(torch.backends.cudnn.allow_tf32, bool)


class WeightCasts(TorchDispatchMode):
    """Counts dtype conversions whose input is one of the given parameters' storages."""

    def __init__(self, params):
        super().__init__()
        self.keys = {p.untyped_storage().data_ptr() for p in params}
        self.casts = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten._to_copy, torch.ops.aten.to) and args:
            if isinstance(args[0], torch.Tensor) and args[0].untyped_storage().data_ptr() in self.keys:
                self.casts += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", ["sisma", "dit", "sdm"])
def test_a_cast_model_runs_bf16_without_casting_a_weight(name):
    from bench.flops import example_inputs
    from bench.runtime import autocast
    from bench.variants import build_model

    torch.manual_seed(0)
    model = build_model(name, "tiny", {}, "cpu").eval().requires_grad_(False)
    x, t, mask = example_inputs(model, 2, "cpu")
    with torch.no_grad():
        reference = model(x, t, mask)
        with autocast("cpu", "bf16"), WeightCasts(model.parameters()) as counter:
            model(x, t, mask)
    assert counter.casts > 0  # autocast on fp32 weights casts them on every call

    cast_for_inference(model, "bf16")
    assert model_precision(model) == "bf16"
    kept = {n for n, _ in model.named_parameters() if n.endswith(("A_log", ".D", "dt_proj.bias"))}
    for n, p in model.named_parameters():
        assert p.dtype == (torch.float32 if n in kept else torch.bfloat16), n
    assert (name == "sisma") == bool(kept)
    with torch.no_grad(), autocast("cpu", "bf16"), WeightCasts(model.parameters()) as counter:
        out = model(x.bfloat16(), t, mask.bfloat16())
    assert counter.casts == 0
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert (out.float() - reference).abs().max() < 0.1 * reference.abs().max() + 0.05
    with pytest.raises(ValueError, match="cast to bf16 already"):
        cast_for_inference(model, "fp16")
    assert cast_for_inference(model, "bf16") is model


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory):
    """A tiny SISMA run trained one step in bf16 autocast."""
    from bench.synth import ensure_synthetic
    from bench.train import make_config, train

    root = tmp_path_factory.mktemp("bf16")
    data = ensure_synthetic(root / "faces", n=12, size=32, seed=0, progress=False)
    run = root / "run"
    cfg = make_config("sisma", run, preset="tiny", data=str(data), steps=1, precision="bf16", grid_steps=2,
                      grid_masks=1)
    train(cfg, run, progress=False)
    return run


def test_a_run_samples_at_its_training_precision(bf16_run):
    from bench.data import onehot
    from bench.sample import generate, load_run

    run = load_run(bf16_run)
    assert run.precision == "bf16" and run.model.x_embedder.proj.weight.dtype == torch.bfloat16
    labels = torch.randint(0, 19, (2, run.image_size, run.image_size))
    images, nfe = generate(run, onehot(labels), range(2), seed=0, steps=3)
    assert nfe == 3 and images.dtype == torch.float32 and torch.isfinite(images).all()
    again, _ = generate(run, onehot(labels), range(2), seed=0, steps=3, precision="bf16")
    assert torch.equal(images, again)

    fp32 = load_run(bf16_run, precision="fp32")
    assert fp32.precision == "fp32" and fp32.model.x_embedder.proj.weight.dtype == torch.float32
    exact, _ = generate(fp32, onehot(labels), range(2), seed=0, steps=3)
    assert (exact - images).abs().max() < 0.1
    generate(fp32, onehot(labels), range(2), seed=0, steps=1, precision="bf16")  # an fp32 run may be cast, once
    assert fp32.precision == "bf16"
    from bench.errors import BenchError

    with pytest.raises(BenchError, match="load it again"):
        generate(run, onehot(labels), range(2), seed=0, steps=1, precision="fp32")


def test_plan_samples_with_cast_weights():
    from bench import plan

    fp32 = plan.sampling_memory("dit", "tiny", 4, "fp32", device="cpu")
    bf16 = plan.sampling_memory("dit", "tiny", 4, "bf16", device="cpu")
    assert bf16 < 0.75 * fp32  # the weights, the largest part here, take half the bytes
