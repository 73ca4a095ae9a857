"""DiM-SIS (models/dim.py): non-causal, pads removed before the output, the mirrored sweeps, skips, variants, sizes.

The contract (shapes, gradients to every parameter, mask and time steer the output, the null mask) is checked for
every registered backbone in tests/test_backbone_contract.py; these are DiM's own properties.
"""
import pytest
import torch
import torch.nn.functional as F

import models
from models import ssm
from models.dim import SWEEPS, PadTokens, Sweep, block_order, mirrored_index
from models.info import count_parameters

pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest.py


def awake(preset: str = "tiny", **overrides):
    """DiM with every parameter random (so every path carries signal and gradient), in eval mode."""
    torch.manual_seed(0)
    model = models.create_model("dim", preset=preset, **overrides)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p + torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def inputs(model, batch: int = 1, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *model.input_shape, generator=g)
    t = torch.rand(batch, generator=g)
    S, K = model.image_size, model.num_classes
    labels = torch.randint(0, K, (batch, S, S), generator=g)
    return x, t, F.one_hot(labels, K).permute(0, 3, 1, 2).float()


def params(name: str, preset: str, **overrides) -> int:
    with torch.device("meta"):
        return count_parameters(models.create_model(name, preset=preset, **overrides))


@pytest.mark.parametrize("overrides", [{}, {"pad": 0}, {"scan": "zigzag"}])
def test_every_output_token_depends_on_every_input_token(overrides):
    model = awake(**overrides)
    x, t, mask = inputs(model)
    x.requires_grad_(True)
    p, g = model.config.patch_size, model.config.grid_size
    v = model(x, t, mask)  # (1, C, H, W)
    patches = v.unflatten(2, (g, p)).unflatten(4, (g, p)).sum(dim=(1, 3, 5))  # (1, g, g): one sum per output token
    for i in range(g * g):
        (grad,) = torch.autograd.grad(patches.flatten()[i], x, retain_graph=True)
        reach = grad.abs().unflatten(2, (g, p)).unflatten(4, (g, p)).sum(dim=(1, 3, 5)).flatten()  # per input token
        assert (reach > 0).all(), f"output token {i} does not see input tokens {(reach == 0).nonzero().flatten()}"


def test_padding_tokens_are_inserted_once_and_removed_before_the_output():
    model = awake()
    cfg = model.config
    g, pad = cfg.grid_size, cfg.pad
    seen = {}

    def record(name, tensor):
        seen[name] = tuple(tensor.shape)  # returns None: the hooks change nothing

    model.blocks[0].register_forward_pre_hook(lambda m, args: record("first", args[0]))
    model.blocks[-1].register_forward_hook(lambda m, args, out: record("last", out))
    model.final_layer.register_forward_pre_hook(lambda m, args: record("final", args[0]))
    x, t, mask = inputs(model, batch=2)
    assert model(x, t, mask).shape == x.shape
    assert seen["first"] == seen["last"] == (2, cfg.sequence_length, cfg.width)
    assert cfg.sequence_length == 1 + pad + (g + pad) ** 2
    assert seen["final"] == (2, g * g, cfg.width)  # the final layer sees only the image tokens

    pads = PadTokens(8, 3, 4)
    h = torch.randn(2, 16, 8)
    padded = pads.insert(h).view(2, 7, 7, 8)
    assert torch.equal(pads.remove(padded.flatten(1, 2)), h)
    assert torch.equal(padded[:, :4, :4].reshape(2, 16, 8), h)
    for i in range(3):  # vector i ends every row (column 4 + i) and fills row 4 + i
        assert (padded[:, :4, 4 + i] == pads.tokens[i]).all() and (padded[:, 4 + i] == pads.tokens[i]).all()


def test_without_pads_the_blocks_scan_the_image_and_the_time_token_only():
    model = awake(pad=0)
    assert model.config.sequence_length == 1 + model.config.grid_size ** 2
    assert not any("pads" in n or "separator" in n for n, _ in model.named_parameters())
    x, t, mask = inputs(model)
    assert model(x, t, mask).shape == x.shape


def test_sweeps_cycle_in_the_first_half_and_mirror_in_the_second():
    depth, prefix, grid = 9, 4, 11
    orders = [block_order("sweep", k, depth, prefix, grid) for k in range(depth)]
    assert orders[0] is None and orders[-1] is None  # rows forward, the layout itself, first and last
    assert [(o.columns, o.reverse) for o in orders[1:4]] == [(False, True), (True, False), (True, True)]
    assert orders[4] is None and len({mirrored_index(k, depth) % SWEEPS for k in range(5)}) == SWEEPS
    for k in range(depth):
        assert orders[k] == orders[depth - 1 - k]
    zig = [block_order("zigzag", k, depth, prefix, grid) for k in range(depth)]
    assert all(o.snake is not None for o in zig) and zig[1] == zig[-2]


def test_a_sweep_keeps_the_prefix_first_and_moves_the_grid_as_its_index_says():
    s = torch.arange(2 * 3 * 29).view(2, 3, 29)  # 4 prefix tokens, a 5 x 5 grid
    grid = torch.arange(25).view(5, 5)
    want = {(False, True): grid.flatten().flip(0), (True, False): grid.t().flatten(),
            (True, True): grid.t().flatten().flip(0)}
    for (columns, reverse), positions in want.items():
        order = Sweep(4, 5, columns=columns, reverse=reverse)
        assert torch.equal(order.perm, torch.cat([torch.arange(4), 4 + positions]))
        assert torch.equal(order.to_scan(s), s[..., order.perm])
        assert torch.equal(order.from_scan(order.to_scan(s)), s)
    snake = Sweep(4, 5, snake=5)
    assert torch.equal(snake.from_scan(snake.to_scan(s)), s) and torch.equal(snake.to_scan(s), s[..., snake.perm])


def test_long_skips_join_each_first_half_block_to_its_mirror():
    model = models.create_model("dim", preset="tiny")
    n = model.config.depth // 2
    assert [b.skip_linear is not None for b in model.blocks] == [False] * (n + 1) + [True] * n
    assert model.keeps == [False] + [True] * n + [False] * n
    linear = model.blocks[-1].skip_linear
    assert (linear.in_features, linear.out_features) == (2 * model.config.width, model.config.width)
    plain = models.create_model("dim", preset="tiny", skip=False)
    assert all(b.skip_linear is None for b in plain.blocks) and not any(plain.keeps)


def test_the_variants_parse_build_and_run():
    from bench.variants import build_model, parse_models

    variants = parse_models("dim,dim:pad=0,dim:skip=0,dim:scan=zigzag")
    assert [v.name for v in variants] == ["dim", "dim:pad=0", "dim:skip=false", "dim:scan=zigzag"]
    for variant in variants:
        model = build_model(variant, "tiny")
        x, t, mask = inputs(model)
        assert model(x, t, mask).shape == x.shape
    assert params("dim", "tiny", skip=False) < params("dim", "tiny")


def test_the_mask_enters_as_input_channels_pooled_to_the_latent_grid():
    with torch.device("meta"):
        model = models.create_model("dim", preset="paper")
    assert model.x_embedder.proj.in_channels == 4 + 19 and model.input_shape == (4, 32, 32)
    from models.dim import mask_to_input

    mask = F.one_hot(torch.randint(0, 19, (1, 256, 256)), 19).permute(0, 3, 1, 2).float()
    pooled = mask_to_input(mask, 32)
    assert pooled.shape == (1, 19, 32, 32) and torch.allclose(pooled.sum(1), torch.ones(1, 32, 32))


@pytest.mark.parametrize("preset", ["paper", "cpu", "tiny"])
def test_parameters_match_sisma_within_5_percent(preset):
    assert abs(params("dim", preset) / params("sisma", preset) - 1) < 0.05


def test_parameter_counts_per_preset_and_dim_h():
    assert params("dim", "paper") == 824_855_056  # width 1536, 47 blocks
    assert params("dim", "cpu") == 3_494_412
    assert params("dim", "tiny") == 341_532  # width 60, 9 blocks
    # DiM-H's own shape (49 blocks) is 6% over SISMA's paper preset: why the paper preset has 47
    assert 0.05 < params("dim", "paper", depth=49) / params("sisma", "paper") - 1 < 0.07


def test_the_fused_path_gives_the_unfused_output(monkeypatch):
    """Every DiM mixer is Mamba's own layer in one order (causal conv), so mamba-ssm's fused mamba_inner_fn runs it on
    CUDA; here the CPU reference of that kernel stands in, and the model's output must not change."""
    model = awake()
    x, t, mask = inputs(model, batch=2)
    with torch.no_grad():
        plain = model(x, t, mask)
        assert all(b.mixer.fusable for b in model.blocks)
        monkeypatch.setattr(ssm, "fused_inner", lambda t: ssm.mamba_inner_reference)
        fused = model(x, t, mask)
    torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-5)


def test_bench_plan_simulates_dim_on_the_gpu_kernels_stand_ins_and_checkpoints_its_blocks():
    """On fake CUDA tensors every DiM block runs the fused layer's shape-only stand-in; activation checkpointing finds
    its blocks (``bench.recompute``) and saves less."""
    from bench import plan, recompute

    assert len(recompute.blocks(models.create_model("dim", preset="tiny"))) == 9
    ssm.reset_used_backends()
    plain = plan.training_memory("dim", "tiny", 4, plan.Setting(4, 1, False), "bf16")
    assert "fake" in ssm.used_backends()
    ckpt = plan.training_memory("dim", "tiny", 4, plan.Setting(4, 1, True), "bf16")
    assert ckpt.activations < plain.activations and ckpt.step < plain.step


@pytest.mark.parametrize("preset", ["cpu", "paper"])
def test_scan_flops_are_counted_one_scan_per_block_over_the_padded_sequence(preset):
    from bench.flops import count_flops, example_inputs

    with torch.device("meta"):
        model = models.create_model("dim", preset=preset)
    cfg = model.config
    flops = count_flops(model, *example_inputs(model, 2, "meta"))
    E = cfg.expand * cfg.width
    assert flops.scan == ssm.scan_flops(2, E, cfg.sequence_length, cfg.d_state) * cfg.depth
    assert flops.counter > 0


def test_bench_run_plans_dim_and_its_variants_with_dims_recipe(tmp_path, monkeypatch):
    """The whole run was checked by hand (`bench run --preset tiny --models sisma,dim,dim:pad=0`: a report with the
    three); here its dry run, which builds every stage's settings and does nothing."""
    from typer.testing import CliRunner

    from bench.cli import app
    from bench.presets import recipe

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["run", "--preset", "tiny", "--dry-run", "--results", str(tmp_path / "r"),
                                      "--models", "sisma,dim,dim:pad=0"])
    assert result.exit_code == 0, result.output
    for stage in ["train sisma, seed 0", "train dim, seed 0", "train dim:pad=0, seed 0", "speed", "quality"]:
        assert stage in result.output
    assert 'model_overrides: {"pad": 0}' in result.output and f"lr: {recipe('tiny', 'dim').lr}" in result.output
    assert not (tmp_path / "r").exists()
