"""Metrics: FID/KID through torch-fidelity (with a tiny registered extractor), diversity arithmetic, LPIPS loading,
mIoU and weight-file checks."""
import dataclasses
import hashlib
import itertools
import math

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn as nn

from bench import metrics
from bench.errors import BenchError
from bench.io import to_uint8

TINY_EXTRACTOR = "sis-bench-test-tiny"
TINY_FEATURES = 8


def _register_tiny_extractor():
    """A small random conv net registered in torch-fidelity: loads its weights from the path it is given."""
    from torch_fidelity import register_feature_extractor
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    class TinyExtractor(FeatureExtractorBase):
        def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
            super().__init__(name, features_list)
            self.conv = nn.Conv2d(3, TINY_FEATURES, 3, padding=1)
            self.conv.load_state_dict(torch.load(feature_extractor_weights_path))

        @staticmethod
        def get_provided_features_list():
            return ("feat",)

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return "feat"

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return None

        def forward(self, x):
            x = x.float() / 127.5 - 1
            return (torch.tanh(self.conv(x)).mean((2, 3)).double(),)  # (B, 8)

    if TINY_EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(TINY_EXTRACTOR, TinyExtractor)
    return TinyExtractor


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(extractor class, weights file) for the tiny registered feature extractor."""
    cls = _register_tiny_extractor()
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny") / "tiny.pth"
    torch.save(nn.Conv2d(3, TINY_FEATURES, 3, padding=1).state_dict(), path)
    return cls, path


def _images(n, seed, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 16, 16, generator=g) * 1.6 - 0.8 + shift
    return to_uint8(x)


def _scipy_frechet(f1, f2):
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_fid_of_a_set_against_itself_is_zero(tiny):
    _, weights = tiny
    real = _images(96, seed=1)
    out = metrics.fid_kid(real, real.clone(), weights, extractor=TINY_EXTRACTOR)
    assert abs(out["fid"]) < 1e-6
    assert abs(out["kid"]) < 1e-4  # the unbiased MMD estimate is not exactly 0; a 0.2 shift gives ~1e-2


def test_fid_grows_with_a_shift(tiny):
    _, weights = tiny
    real = _images(96, seed=1)
    same = metrics.fid_kid(real, _images(96, seed=2), weights, extractor=TINY_EXTRACTOR)
    shifted = metrics.fid_kid(real, _images(96, seed=2, shift=0.2), weights, extractor=TINY_EXTRACTOR)
    assert shifted["fid"] > 5 * same["fid"] > 0
    assert shifted["kid"] > same["kid"]


def test_fid_agrees_with_scipy_frechet_distance(tiny):
    cls, weights = tiny
    real, fake = _images(96, seed=3), _images(80, seed=4, shift=0.1)
    out = metrics.fid_kid(real, fake, weights, extractor=TINY_EXTRACTOR)
    net = cls(TINY_EXTRACTOR, ["feat"], feature_extractor_weights_path=weights).eval()
    with torch.no_grad():
        f1, f2 = (net(x)[0].numpy() for x in (real, fake))
    assert out["fid"] == pytest.approx(_scipy_frechet(f1, f2), rel=1e-5, abs=1e-9)


def test_fid_and_kid_equal_torch_fidelitys_own_on_image_folders(tiny, tmp_path):
    """The harness's FID/KID are torch-fidelity's: the same two PNG folders through its own calculate_metrics."""
    import torch_fidelity
    from PIL import Image

    from bench.io import write_png

    _, weights = tiny
    for name, images in (("real", _images(64, seed=5)), ("fake", _images(48, seed=6, shift=0.1))):
        for i, image in enumerate(images):
            write_png(tmp_path / name / f"{i:04d}.png", image.permute(1, 2, 0).numpy())

    def read(folder):
        return torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1)
                            for p in sorted(folder.glob("*.png"))])

    ours = metrics.fid_kid(read(tmp_path / "real"), read(tmp_path / "fake"), weights, extractor=TINY_EXTRACTOR, seed=0)
    theirs = torch_fidelity.calculate_metrics(
        input1=str(tmp_path / "real"), input2=str(tmp_path / "fake"), fid=True, kid=True,
        feature_extractor=TINY_EXTRACTOR, feature_extractor_weights_path=str(weights),
        kid_subset_size=48,  # its default (1000) needs 1000 images; the harness takes min(1000, n)
        rng_seed=0,  # the harness passes its sampling seed (0 here) where torch-fidelity defaults to 2020
        cuda=False, cache=False, save_cpu_ram=True, verbose=False)  # no feature cache, no worker processes
    for key, theirs_key in (("fid", "frechet_inception_distance"), ("kid", "kernel_inception_distance_mean"),
                            ("kid_std", "kernel_inception_distance_std")):
        assert ours[key] > 0
        assert abs(ours[key] - theirs[theirs_key]) <= 1e-6 * abs(theirs[theirs_key]), key


def test_fid_refuses_inception_without_a_local_file():
    x = _images(4, seed=0)
    with pytest.raises(ValueError, match="local weights"):
        metrics.fid_kid(x, x, None)


def test_pairwise_mean_covers_all_pairs_once():
    calls = []

    def distance(a, b):
        calls.extend(zip(a[:, 0, 0, 0].tolist(), b[:, 0, 0, 0].tolist()))
        return torch.ones(len(a))

    samples = torch.arange(10.0).view(10, 1, 1, 1).expand(10, 3, 2, 2)
    assert metrics.pairwise_mean(samples, distance, batch_size=7) == 1.0
    assert sorted(calls) == [(float(i), float(j)) for i, j in itertools.combinations(range(10), 2)]  # 45 pairs


def test_diversity_averages_pairs_then_masks():
    def group(*values):
        return torch.tensor(values).view(-1, 1, 1, 1).expand(-1, 3, 4, 4)

    # mask 1: |0-1|, |0-3|, |1-3| -> mean 2; mask 2: one pair at distance 0 -> 0; average over masks: 1
    assert metrics.diversity([group(0.0, 1.0, 3.0), group(0.5, 0.5)], metrics.pixel_l1) == pytest.approx(1.0)


def test_pairwise_mean_needs_two_samples():
    with pytest.raises(ValueError, match="at least 2"):
        metrics.pairwise_mean(torch.zeros(1, 3, 4, 4), metrics.pixel_l1)


def test_lpips_loads_a_local_alexnet_and_measures_distance(tmp_path):
    import lpips
    import torchvision

    torch.manual_seed(0)
    # torchvision's file also holds the classifier; LPIPS only uses `features`, which keeps this file small
    full = torchvision.models.alexnet(weights=None).state_dict()
    state = {k: v for k, v in full.items() if k.startswith("features.")}
    path = tmp_path / "alexnet.pth"
    torch.save(state, path)
    model = metrics.load_lpips(path)
    trunk = dict(model.net.named_parameters())
    assert torch.equal(trunk["slice1.0.weight"], state["features.0.weight"])
    assert torch.equal(trunk["slice5.10.weight"], state["features.10.weight"])
    linear = torch.load(metrics.Path(lpips.__file__).parent / "weights/v0.1/alex.pth", map_location="cpu")
    assert torch.equal(model.lin0.model[1].weight, linear["lin0.model.1.weight"])  # calibrated layers from the wheel

    distance = metrics.lpips_distance(model)
    x = torch.rand(4, 3, 16, 16) * 2 - 1  # below LPIPS_MIN_SIZE: upsampled, must not fail in AlexNet's pooling
    d_same, d_diff = distance(x, x), distance(x, x.flip(0))
    assert d_same.shape == (4,) and torch.allclose(d_same, torch.zeros(4))
    assert (d_diff > 0).all()


def test_lpips_rejects_a_file_that_is_not_alexnet(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"weight": torch.zeros(1)}, path)
    with pytest.raises(BenchError, match="not a torchvision AlexNet"):
        metrics.load_lpips(path)


def test_miou_of_a_perfect_parser_is_one():
    label = torch.randint(0, 19, (2, 8, 8))
    assert metrics.miou(metrics.confusion_matrix(label, label, 19)) == 1.0


def test_miou_of_a_known_confusion():
    target = torch.tensor([0, 0, 1, 1])
    pred = torch.tensor([0, 1, 1, 1])
    # class 0: TP 1, union 2 -> 1/2; class 1: TP 2, union 3 -> 2/3; the 17 absent classes do not count
    assert metrics.miou(metrics.confusion_matrix(pred, target, 19)) == pytest.approx((1 / 2 + 2 / 3) / 2)
    # a class only in the prediction counts with IoU 0
    target, pred = torch.zeros(4, dtype=torch.long), torch.tensor([0, 0, 0, 5])
    iou = metrics.class_iou(metrics.confusion_matrix(pred, target, 19))
    assert iou[0] == pytest.approx(3 / 4) and iou[5] == 0 and math.isnan(iou[1])
    assert metrics.miou(metrics.confusion_matrix(pred, target, 19)) == pytest.approx(3 / 8)


def test_confusion_matrix_accumulates_over_batches():
    g = torch.Generator().manual_seed(0)
    t, p = torch.randint(0, 19, (4, 8, 8), generator=g), torch.randint(0, 19, (4, 8, 8), generator=g)
    split = metrics.confusion_matrix(p[:2], t[:2], 19) + metrics.confusion_matrix(p[2:], t[2:], 19)
    assert torch.equal(split, metrics.confusion_matrix(p, t, 19))
    assert split.sum() == t.numel()


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty torch hub cache."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    return tmp_path / "hub" / "checkpoints"


def test_missing_weights_say_where_to_put_them(hub):
    with pytest.raises(metrics.WeightsMissing) as e:
        metrics.resolve_weights(metrics.INCEPTION_WEIGHTS)
    msg = str(e.value)
    assert str(hub / "weights-inception-2015-12-05-6726825d.pth") in msg and "--inception-weights" in msg
    assert "\n" not in msg


def test_weights_with_the_wrong_hash_are_an_error_naming_the_file(tmp_path, hub):
    bad = tmp_path / "alexnet.pth"
    bad.write_bytes(b"not alexnet")
    with pytest.raises(BenchError) as e:
        metrics.resolve_weights(metrics.ALEXNET_WEIGHTS, bad)
    assert not isinstance(e.value, metrics.WeightsMissing)
    assert str(bad) in str(e.value) and "--alexnet-weights" in str(e.value)


def test_weights_found_in_the_hub_cache_when_the_hash_matches(hub):
    hub.mkdir(parents=True)
    (hub / "w.pth").write_bytes(b"weights")
    spec = dataclasses.replace(metrics.INCEPTION_WEIGHTS, filename="w.pth",
                               sha256=hashlib.sha256(b"weights").hexdigest())
    assert metrics.resolve_weights(spec) == hub / "w.pth"


def test_published_hashes_match_the_file_name_prefixes():
    # torch hub names files <name>-<first 8 hex digits of the SHA-256>.pth
    for spec in (metrics.INCEPTION_WEIGHTS, metrics.ALEXNET_WEIGHTS):
        assert spec.filename.rsplit("-", 1)[1].removesuffix(".pth") == spec.sha256[:8]
        assert len(spec.sha256) == 64
