"""SDM backbone: paper size, shapes, gradients, mask conditioning only in the decoder, edge channel, errors."""
import re

import pytest
import torch
import torch.nn.functional as F

import models
from models.info import count_parameters
from models.sdm import AttentionBlock, SpadeGroupNorm, label_edges

PAPER_PARAMS = 653.06e6  # SDM's parameter count as reported in the SISMA paper (Table 2)
PAPER_TOLERANCE = 0.005
SMALL_PRESET_SPREAD = 0.25  # cpu/tiny backbones must be within 25% of each other
K = 19


def random_mask(batch, size, seed):
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(0, K, (batch, size // 4, size // 4), generator=g)
    label = label.repeat_interleave(4, 1).repeat_interleave(4, 2)  # blobs, so the edge channel is not all ones
    return F.one_hot(label, K).permute(0, 3, 1, 2).float()


@pytest.fixture
def tiny():
    """The tiny SDM with its zero-initialised layers given random weights, so every path carries signal."""
    torch.manual_seed(0)
    model = models.create_model("sdm", "tiny")
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.1)
    return model.eval()


def inputs(model, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *model.input_shape, generator=g)
    t = torch.rand(batch, generator=g)
    return x, t, random_mask(batch, model.image_size, seed)


def test_paper_parameter_count_on_meta():
    with torch.device("meta"):
        model = models.create_model("sdm", "paper")
    n = count_parameters(model)
    assert abs(n / PAPER_PARAMS - 1) < PAPER_TOLERANCE, f"{n / 1e6:.2f}M vs {PAPER_PARAMS / 1e6:.2f}M"
    assert sum(isinstance(m, SpadeGroupNorm) for m in model.modules()) == 50  # 2 per res block: 2 middle + 23 decoder
    assert (model.space, model.input_shape, model.image_size, model.num_classes, model.num_tokens) == (
        "pixel", (3, 256, 256), 256, K, None)


def test_paper_attention_sits_at_32_16_8_px():
    with torch.device("meta"):
        model = models.create_model("sdm", "paper")
        sizes = set()
        for m in model.modules():
            if isinstance(m, AttentionBlock):
                m.register_forward_hook(lambda mod, args, out: sizes.add(out.shape[-1]))
        v = model(torch.randn(1, 3, 256, 256), torch.rand(1), torch.zeros(1, K, 256, 256))
    assert v.shape == (1, 3, 256, 256)
    assert sizes == {32, 16, 8}


@pytest.mark.parametrize("preset", ["cpu", "tiny"])
def test_small_presets_match_the_other_backbones(preset):
    counts = {}
    for name in ("sisma", "dit", "sdm"):
        with torch.device("meta"):
            counts[name] = count_parameters(models.create_model(name, preset))
    assert max(counts.values()) <= (1 + SMALL_PRESET_SPREAD) * min(counts.values()), counts


def test_only_middle_and_decoder_see_the_mask(tiny):
    x, t, mask = inputs(tiny)
    other = random_mask(2, tiny.image_size, seed=1)
    activations = {}
    for part in ("encoder", "decoder"):
        for i, stage in enumerate(getattr(tiny, part)):
            stage.register_forward_hook(
                lambda mod, args, out, key=(part, i): activations.setdefault(key, []).append(out))
    with torch.no_grad():
        tiny(x, t, mask)
        tiny(x, t, other)
    encoder = [a for (part, _), a in activations.items() if part == "encoder"]
    decoder = [a for (part, _), a in activations.items() if part == "decoder"]
    assert encoder and all(torch.equal(a, b) for a, b in encoder)
    assert decoder and all(not torch.allclose(a, b, atol=1e-5) for a, b in decoder)


def test_edge_channel_marks_both_sides_of_every_label_change():
    label = torch.tensor([[0, 0, 0, 1, 1],
                          [0, 0, 0, 1, 1],
                          [2, 2, 0, 0, 0],
                          [2, 2, 0, 0, 0]])
    expected = torch.tensor([[0, 0, 1, 1, 0],
                             [1, 1, 1, 1, 1],
                             [1, 1, 1, 1, 1],
                             [0, 1, 1, 0, 0]]).float()
    mask = F.one_hot(label, K).permute(2, 0, 1)[None].float()
    assert torch.equal(label_edges(mask), expected[None, None])
    assert not label_edges(torch.zeros(1, K, 4, 5)).any()  # the CFG null mask has no edges


@pytest.mark.parametrize("shape", [(2, K - 1, 16, 16), (2, K, 32, 32)])
def test_wrong_mask_raises_naming_the_expected_shape(tiny, shape):
    x, t, _ = inputs(tiny)
    with pytest.raises(ValueError, match=re.escape("(2, 19, 16, 16)") + ".*got " + re.escape(str(shape))):
        tiny(x, t, torch.zeros(shape))
