"""SISMA and DiT-SIS: interface, gradients, mask conditioning, parameter counts, and the Mamba layers."""
import math

import pytest
import torch
import torch.nn.functional as F

import models
from models.layers import sincos_pos_embed_2d, unpatchify
from models.mamba import CrossMamba, ScanOrder, SelfMamba, scan_orders, snake_order

TOKEN_BACKBONES = ["sisma", "dit"]
PAPER_SISMA_PARAMS = 799e6  # the paper's Table 2
PAPER_TOLERANCE = 0.015


def random_mask(batch: int, size: int, classes: int = 19, seed: int = 0) -> torch.Tensor:
    """One-hot masks made of random blobs (label map upsampled from a coarse grid), (B, K, S, S)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, classes, (batch, 1, size // 4, size // 4), generator=g).float()
    labels = F.interpolate(coarse, size=(size, size), mode="nearest")[:, 0].long()
    return F.one_hot(labels, classes).permute(0, 3, 1, 2).float()


def wake_zero_layers(model: torch.nn.Module, seed: int = 0) -> None:
    """Give the zero-initialised layers (adaLN modulation, output projection) random weights.

    At init adaLN-Zero makes every block the identity and the final layer outputs 0, so nothing but the
    zero layers themselves would receive gradient and the output could not depend on the mask.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and not module.weight.any():
                module.weight.copy_(torch.randn(module.weight.shape, generator=g) * 0.05)
                module.bias.copy_(torch.randn(module.bias.shape, generator=g) * 0.05)


def tiny(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = models.create_model(name, preset="tiny")
    wake_zero_layers(model)
    return model


def inputs(model, batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, *model.input_shape), generator=g)
    t = torch.rand(batch, generator=g)
    return x, t, random_mask(batch, model.image_size, model.num_classes, seed)


# --- interface ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TOKEN_BACKBONES)
def test_interface_attributes_and_output_shape(name):
    model = models.create_model(name, preset="tiny")
    assert model.space == "pixel" and model.input_shape == (3, 16, 16)
    assert model.image_size == 16 and model.num_classes == 19 and model.num_tokens == 64
    assert model.config.depth == len(model.blocks)
    x, t, mask = inputs(model)
    v = model(x, t, mask)
    assert v.shape == x.shape
    assert not v.any(), "adaLN-Zero: the untrained model must output exactly zero velocity"


# --- sizes --------------------------------------------------------------------------------------------------


def count(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_sisma_paper_parameter_count():
    with torch.device("meta"):
        model = models.create_model("sisma", preset="paper")
    n = count(model)
    assert abs(n - PAPER_SISMA_PARAMS) / PAPER_SISMA_PARAMS < PAPER_TOLERANCE, f"{n / 1e6:.2f}M"
    # The paper preset's geometry: SD-VAE latents of 256 px images, 256 tokens of width 1024, 24 blocks.
    assert (model.space, model.input_shape, model.image_size, model.num_tokens) == ("latent", (4, 32, 32), 256, 256)
    assert (model.config.width, model.config.depth) == (1024, 24)


def test_dit_paper_matches_sisma_geometry():
    with torch.device("meta"):
        dit, sisma = models.create_model("dit"), models.create_model("sisma")
    for field in ("space", "in_channels", "input_size", "image_size", "patch_size", "width", "depth"):
        assert getattr(dit.config, field) == getattr(sisma.config, field)
    assert dit.config.width // dit.config.num_heads == 64


@pytest.mark.parametrize("preset", ["cpu", "tiny"])
def test_small_presets_have_comparable_sizes(preset):
    with torch.device("meta"):
        n_sisma, n_dit = (count(models.create_model(n, preset=preset)) for n in TOKEN_BACKBONES)
    assert abs(n_dit - n_sisma) / n_sisma < 0.25


def test_overrides_replace_preset_fields():
    model = models.create_model("sisma", preset="tiny", depth=1, scan="bidirectional")
    assert len(model.blocks) == 1 and model.config.scan == "bidirectional"
    with pytest.raises(ValueError, match="unknown scan order"):
        models.create_model("sisma", preset="tiny", scan="spiral")


# --- Mamba layers ---------------------------------------------------------------------------------------------


def mamba_reference(layer, x, m=None):
    """Mamba / Cross-Mamba written out step by step in float64 from the layer's parameters (one raster scan)."""
    p = {k: v.detach().double() for k, v in layer.named_parameters()}
    x = x.double()
    u, z = (x @ p["in_proj.weight"].T).chunk(2, dim=-1)  # (B, L, E)

    def causal_conv_silu(s, weight, bias):  # s (B, L, E), weight (E, W): out_i = sum_k w_k * s_{i - W + 1 + k}
        W, L = weight.shape[1], s.shape[1]
        out = torch.stack([sum(weight[:, k] * s[:, i - W + 1 + k] for k in range(W) if i - W + 1 + k >= 0) + bias
                           for i in range(L)], dim=1)
        return F.silu(out)

    u = causal_conv_silu(u, p["ssm.conv.conv1d.weight"][:, 0], p["ssm.conv.conv1d.bias"])
    N = p["ssm.A_log"].shape[1]
    proj = u @ p["ssm.x_proj.weight"].T
    if m is None:
        dt, B, C = proj[..., :-2 * N], proj[..., -2 * N:-N], proj[..., -N:]
    else:
        ms = causal_conv_silu(m.double() @ p["mask_proj.weight"].T, p["ssm.mask_conv.conv1d.weight"][:, 0],
                              p["ssm.mask_conv.conv1d.bias"])
        dt = proj
        B, C = (ms @ p["ssm.mask_x_proj.weight"].T).chunk(2, dim=-1)
    delta = F.softplus(dt @ p["ssm.dt_proj.weight"].T + p["ssm.dt_proj.bias"])  # (B, L, E)
    A = -torch.exp(p["ssm.A_log"])  # (E, N)
    h = torch.zeros(x.shape[0], A.shape[0], N, dtype=torch.float64)
    ys = []
    for i in range(x.shape[1]):
        h = torch.exp(delta[:, i, :, None] * A) * h + (delta[:, i] * u[:, i])[..., None] * B[:, i, None, :]
        ys.append((h * C[:, i, None, :]).sum(-1) + p["ssm.D"] * u[:, i])
    y = torch.stack(ys, dim=1) * F.silu(z)  # (B, L, E)
    return y @ p["out_proj.weight"].T


def small_mamba_inputs(seed=0, L=12, D=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, L, D, generator=g), torch.randn(2, L, D, generator=g)


def test_self_mamba_matches_reference():
    torch.manual_seed(0)
    layer = SelfMamba(16, d_state=4)
    x, _ = small_mamba_inputs()
    torch.testing.assert_close(layer(x).double(), mamba_reference(layer, x), rtol=1e-4, atol=1e-5)


def test_cross_mamba_matches_reference():
    torch.manual_seed(0)
    layer = CrossMamba(16, d_state=4)
    x, m = small_mamba_inputs()
    torch.testing.assert_close(layer(x, m).double(), mamba_reference(layer, x, m), rtol=1e-4, atol=1e-5)


def test_cross_mamba_takes_B_and_C_from_the_mask():
    torch.manual_seed(0)
    layer = CrossMamba(16, d_state=4)
    x, m = small_mamba_inputs()
    m2 = m.clone()
    m2[:, 6:] += 1.0  # change the mask tokens from position 6 on
    with torch.no_grad():
        y, y2 = layer(x, m), layer(x, m2)
        # causal in scan order: positions before 6 read no mask token after them; from 6 on they change
        torch.testing.assert_close(y[:, :6], y2[:, :6])
        assert (y[:, 6:] - y2[:, 6:]).abs().amin(dim=-1).gt(0).all()
        # the mask enters only through B and C: with no (B, C) projection the mask stops mattering
        layer.ssm.mask_x_proj.weight.zero_()
        torch.testing.assert_close(layer(x, m), layer(x, m2))


def test_sisma_block_mask_reaches_cross_mamba_only():
    model = tiny("sisma").eval()
    block = model.blocks[0]
    seen = {}
    for key in ("self_mixer", "cross_mixer"):
        getattr(block, key).register_forward_hook(lambda mod, args, out, key=key: seen.setdefault(key, []).append(out))
    x, t, mask = inputs(model)
    with torch.no_grad():
        model(x, t, mask)
        model(x, t, random_mask(2, model.image_size, seed=1))
    torch.testing.assert_close(*seen["self_mixer"])  # Self-Mamba of block 0 never sees the mask
    assert not torch.allclose(*seen["cross_mixer"])


# --- scan orders ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", range(8))
def test_snake_orders_are_continuous_permutations(variant):
    grid = 6
    order = snake_order(grid, variant)
    assert sorted(order.tolist()) == list(range(grid * grid))
    rows, cols = order // grid, order % grid
    steps = (rows.diff().abs() + cols.diff().abs()).tolist()
    assert steps == [1] * (grid * grid - 1), "consecutive tokens must be spatial neighbours"


def test_zigzag_cycles_through_eight_distinct_snakes():
    orders = [tuple(scan_orders("zigzag", 4, i)[0].perm.tolist()) for i in range(16)]
    assert len(set(orders[:8])) == 8 and orders[8:] == orders[:8]


@pytest.mark.parametrize("order", [ScanOrder(5)] + [ScanOrder(4, snake=v) for v in range(8)] + [ScanOrder(5, snake=3)],
                         ids=lambda o: f"grid{o.grid}-{'reverse' if o.snake is None else f'snake{o.snake}'}")
def test_scan_order_moves_tokens_as_its_permutation_says(order):
    """The grid transposes and flips are the gather by ``perm`` and its inverse, values and gradients, bit for bit."""
    L = order.grid ** 2
    s = torch.randn(2, 3, L, requires_grad=True)
    scanned = order.to_scan(s)
    assert torch.equal(scanned, s[..., order.perm])
    assert torch.equal(order.from_scan(scanned), s)
    assert torch.equal(order.from_scan(s), s[..., torch.argsort(order.perm)])
    g = torch.randn(2, 3, L)
    (grad,) = torch.autograd.grad(scanned, s, g)
    assert torch.equal(grad, g[..., torch.argsort(order.perm)])
    assert torch.equal(order.to_scan(s.detach().transpose(0, 1)), s.detach().transpose(0, 1)[..., order.perm])


@pytest.mark.parametrize("scan, sees_the_end", [("raster", False), ("bidirectional", True)])
def test_bidirectional_scan_sees_both_ways(scan, sees_the_end):
    """A raster scan is causal: token 0 cannot see the last token; the reversed second scan makes it see it."""
    torch.manual_seed(0)
    layer = SelfMamba(16, d_state=4, orders=scan_orders(scan, 4, 0))
    x, _ = small_mamba_inputs(L=16)
    x2 = x.clone()
    x2[:, -1] += 1.0
    with torch.no_grad():
        changed = not torch.allclose(layer(x)[:, 0], layer(x2)[:, 0])
    assert changed == sees_the_end


@pytest.mark.parametrize("scan", ["bidirectional", "zigzag"])
def test_scan_order_options_train(scan):
    torch.manual_seed(0)
    model = models.create_model("sisma", preset="tiny", scan=scan)
    wake_zero_layers(model)
    x, t, mask = inputs(model)
    v = model(x, t, mask)
    assert v.shape == x.shape
    v.square().mean().backward()
    assert all(p.grad is not None and p.grad.any() for p in model.parameters())


# --- shared pieces ----------------------------------------------------------------------------------------


def test_unpatchify_inverts_the_patch_layout():
    x = torch.randn(2, 3, 8, 8)
    p = 2
    tokens = x.unfold(2, p, p).unfold(3, p, p)  # (B, C, g, g, p, p)
    tokens = tokens.permute(0, 2, 3, 4, 5, 1).reshape(2, 16, p * p * 3)  # raster tokens, (p, p, C) inside
    assert torch.equal(unpatchify(tokens, p, 3), x)


def test_pos_embed_encodes_row_and_column():
    pe = sincos_pos_embed_2d(32, 8).view(8, 8, 32)  # (row, column, channel)
    assert torch.equal(pe[:, :, :16], pe[:, :1, :16].expand(8, 8, 16)), "first half: the row only"
    assert torch.equal(pe[:, :, 16:], pe[:1, :, 16:].expand(8, 8, 16)), "second half: the column only"
    dist = torch.cdist(pe.view(64, 32), pe.view(64, 32)).fill_diagonal_(math.inf)
    assert dist.min() > 0.1, "every position has its own code"


# --- token mixing: what each output token can see ---------------------------------------------------------


def top_half_changes(model, change: str) -> tuple[bool, bool]:
    """(top half of the output changed, first token row changed) when only the bottom half of x or of the mask
    (``change``: "x" or "mask") changes; the other input is the same."""
    x, t, mask = inputs(model)
    S, p = model.image_size, model.config.patch_size
    x2, mask2 = x.clone(), mask.clone()
    if change == "x":
        x2[..., S // 2:, :] = torch.randn_like(x2[..., S // 2:, :])
    else:
        mask2[..., S // 2:, :] = random_mask(2, S, seed=5)[..., S // 2:, :]
    with torch.no_grad():
        y, y2 = model(x, t, mask), model(x2, t, mask2)
    top = (y[..., : S // 2, :] - y2[..., : S // 2, :]).abs().amax().item()
    first_row = (y[..., :p, :] - y2[..., :p, :]).abs().amax().item()
    return top > 0, first_row > 0


@pytest.mark.parametrize("change", ["x", "mask"])
@pytest.mark.parametrize("scan", ["raster", "bidirectional", "zigzag"])
@pytest.mark.parametrize("conv", ["causal1d", "grid2d"])
def test_only_raster_with_causal_conv_leaves_the_top_blind_to_the_bottom(scan, conv, change):
    torch.manual_seed(0)
    model = models.create_model("sisma", preset="tiny", scan=scan, conv=conv)
    wake_zero_layers(model)
    top, first_row = top_half_changes(model.eval(), change)
    assert top == (not (scan == "raster" and conv == "causal1d"))
    if scan != "raster":  # both directions (bidirectional, or two snakes from opposite corners): the whole image
        assert first_row


def test_scan_orders_share_one_set_of_parameters():
    counts = {scan: sum(p.numel() for p in models.create_model("sisma", preset="tiny", scan=scan).parameters())
              for scan in ["raster", "bidirectional", "zigzag"]}
    assert len(set(counts.values())) == 1, counts


def test_grid_conv_is_a_3x3_depthwise_conv_on_the_token_grid():
    torch.manual_seed(0)
    layer = SelfMamba(16, d_state=4, conv="grid2d", grid=4)
    conv = layer.ssm.conv.conv2d
    assert conv.weight.shape == (32, 1, 3, 3) and conv.groups == 32
    x, _ = small_mamba_inputs(L=16)
    assert layer(x).shape == x.shape
    with pytest.raises(ValueError, match="grid size"):
        SelfMamba(16, conv="grid2d")


def test_aligned_dit_adds_each_mask_token_at_its_own_position():
    torch.manual_seed(0)
    model = models.create_model("dit", preset="tiny", cond="add")
    wake_zero_layers(model)
    block = model.blocks[0]
    assert block.adaLN_modulation[-1].out_features == 7 * model.config.width  # no shift/scale for the add
    x, t, mask = inputs(model)
    v = model(x, t, mask)
    assert v.shape == x.shape
    v.square().mean().backward()
    assert all(p.grad is not None and p.grad.any() for p in model.parameters())
    # the add reads mask token l at token l only: changing the mask under one token changes that token's add
    m = model.mask_encoder(mask) + model.pos_embed
    m2 = m.clone()
    m2[:, 5] += 1.0
    with torch.no_grad():
        diff = (block.cross_mixer(None, m) - block.cross_mixer(None, m2)).abs().amax(-1)  # (B, L)
    assert diff[:, 5].gt(0).all() and diff[:, :5].eq(0).all() and diff[:, 6:].eq(0).all()
    with pytest.raises(ValueError, match="unknown cond"):
        models.create_model("dit", preset="tiny", cond="concat")


def test_aligned_dit_stays_within_a_quarter_of_sismas_parameters_at_cpu():
    def count(name, **kw):
        with torch.device("meta"):
            return sum(p.numel() for p in models.create_model(name, preset="cpu", **kw).parameters())

    assert abs(count("dit", cond="add") / count("sisma") - 1) < 0.25


def test_the_default_sisma_sees_the_whole_image_and_raster_causal1d_does_not():
    """Changing only the bottom half of x, or of the mask, changes the top half of the default model's output (and
    its first token row); with scan=raster and conv=causal1d the top half stays exactly the same."""
    torch.manual_seed(0)
    default = models.create_model("sisma", preset="tiny")
    wake_zero_layers(default)
    assert (default.config.scan, default.config.conv) == ("zigzag", "grid2d")
    torch.manual_seed(0)
    causal = models.create_model("sisma", preset="tiny", scan="raster", conv="causal1d")
    wake_zero_layers(causal)
    for change in ("x", "mask"):
        assert top_half_changes(default.eval(), change) == (True, True)
        assert top_half_changes(causal.eval(), change) == (False, False)


def test_raster_with_the_grid_conv_reaches_at_most_two_token_rows_down_per_block():
    """What the report says of scan=raster, conv=grid2d: the first token row never sees x or the mask more than
    2 x depth token rows below it (the 3 x 3 convs of Self- and Cross-Mamba), but does see the rows within reach."""
    from bench.report.quality import token_reach

    torch.manual_seed(0)
    model = models.create_model("sisma", preset="tiny", scan="raster", conv="grid2d")
    wake_zero_layers(model)
    model.eval()
    x, t, mask = inputs(model)
    S, p, depth = model.image_size, model.config.patch_size, model.config.depth
    assert token_reach(model.config) == f"the tokens before it and at most {2 * depth} token rows below (of {S // p})"

    def first_row_changes(change: str, from_row: int) -> bool:
        x2, mask2 = x.clone(), mask.clone()
        if change == "x":
            x2[..., from_row * p:, :] = torch.randn_like(x2[..., from_row * p:, :])
        else:
            mask2[..., from_row * p:, :] = random_mask(2, S, seed=5)[..., from_row * p:, :]
        with torch.no_grad():
            return (model(x, t, mask) - model(x2, t, mask2))[..., :p, :].abs().amax().item() > 0

    for change in ("x", "mask"):
        assert not first_row_changes(change, 2 * depth + 1)
        assert first_row_changes(change, 1)
